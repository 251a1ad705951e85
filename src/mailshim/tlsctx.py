"""The TLS client contexts a relay connection uses: verification settings and the pinned name.

Trust: called by ``relay`` with the configuration's ``tls``, ``verify``, ``ca_file`` and client
certificate; the files are read with the caller's privileges, and a client key that group or
others can read is refused. A context checks the listener's certificate against
the configured host name, never against the address dialled. Raises ``OSError`` or
``ValueError`` when the CA file cannot be read or parsed (``relay`` reports it as the
``tls-settings`` failure kind: the message stays queued, exit 75).
"""

from __future__ import annotations

import ssl

__all__ = ["ContextCache", "tls_context"]


class _PinnedNameContext(ssl.SSLContext):
    """Checks the certificate against the configured host name, whatever address we dialled.

    We connect to each resolved address as an IP literal (so that each is tried in turn with
    its own timeout), which would otherwise make the TLS layer check the certificate against
    the address. asyncio calls ``wrap_bio`` for both implicit TLS and STARTTLS, on every
    supported Python, so this one override serves both aiosmtplib versions.
    """

    expected_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        name = server_hostname if server_side else (self.expected_name or server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, name, session)


def tls_context(
    name: str,
    verify: bool,
    ca_file: str | None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> ssl.SSLContext:
    """A TLS 1.2+ client context checking certificates for ``name`` (unless ``verify`` is off),
    presenting ``client_cert`` (with ``client_key``, or a key in the same file) when given."""
    context = _PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)
    if client_cert:
        _check_key(client_key or client_cert)
        context.load_cert_chain(client_cert, client_key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.expected_name = name
    if verify:
        if ca_file:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _check_key(path: str) -> None:
    """Refuse a private key that group or others can read, as ``password_file`` is refused."""
    import os

    if os.stat(path).st_mode & 0o077:
        raise ValueError(f"{path} is readable by others: chmod 600 it")


class ContextCache:
    """Contexts built once per client, keyed by everything that defines one.

    Not by relay name: two ``[[relay]]`` tables may share a name and differ in ``ca_file``.
    """

    def __init__(self) -> None:
        self._contexts: dict[
            tuple[str, bool, str | None, str | None, str | None], ssl.SSLContext
        ] = {}

    def get(
        self,
        name: str,
        verify: bool,
        ca_file: str | None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> ssl.SSLContext:
        key = (name, verify, ca_file, client_cert, client_key)
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = tls_context(*key)
        return context
