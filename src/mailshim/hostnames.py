"""Pure tests on the names a relay is reached by: loopback or not, a usable HELO name.

Trust: called by ``relay`` (on the address actually dialled) and ``check`` (on the configured
host) with values from the configuration or the socket layer; no I/O, no DNS. Raises nothing.
"""

from __future__ import annotations

__all__ = [
    "LOCALHOST_NAMES",
    "LOOPBACK_ADDRESSES",
    "bare_host",
    "is_loopback",
    "relay_is_local",
    "valid_helo",
]

LOCALHOST_NAMES = ("localhost", "localhost.")
LOOPBACK_ADDRESSES = ("::1", "127.0.0.1")


def bare_host(host: str) -> str:
    """``host`` without the brackets of an address literal.

    >>> bare_host(" [::1] ")
    '::1'
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def is_loopback(host: str | None) -> bool:
    """True for a unix socket (``None``), a localhost name or a loopback address literal.

    >>> [is_loopback(h) for h in (None, "localhost", "[::1]", "127.0.0.2", "example.org")]
    [True, True, True, True, False]
    """
    if host is None:  # a unix socket never leaves the machine
        return True
    import ipaddress

    host = bare_host(host)
    if host.lower() in LOCALHOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_helo(name: str) -> bool:
    """One word of printable ASCII, as EHLO/HELO/LHLO need.

    >>> valid_helo("mail.example.org"), valid_helo("two words"), valid_helo("")
    (True, False, False)
    """
    return bool(name) and name.isascii() and all(33 <= ord(ch) < 127 for ch in name)


def relay_is_local(host: str | None, socket: str | None) -> bool:
    """Whether a configured relay stays on this machine (a unix socket or a loopback host)."""
    return bool(socket) or is_loopback(host or "")
