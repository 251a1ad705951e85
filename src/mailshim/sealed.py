"""Decide whether this caller is sealed out of the listener: only the runner holds its secret.

A sealed set-up is one where the listener refuses mail without AUTH (or without a client
certificate) and the system configuration gives the relay a secret (``password_file``, or
``client_key``, owned by the runner user, mode 0600) that the submitting user cannot read.
Such a user's ``sendmail`` cannot deliver and must not try: it drops the entry into the
spool's drop folder and the runner (daemon, path unit, whatever serves the spool) delivers
it, as Postfix's ``postdrop`` hands mail to its queue manager. Root and the runner user
read the secret and deliver as before.

``secret_holders`` says who can read a secret (for ``mailshim check``); ``sealed_out`` is
the one question ``sendmail`` asks, with one ``access()`` per secret and no other import.

Trust: runs as every user, on the ``sendmail`` fast path. It only stats and ``access()``es the
files the configuration names; a secret the caller cannot read is never opened. The answer
is a convenience, not the seal: the listener refusing unauthenticated mail is the wall, and a
user who lies to this function (``-C`` with another relay) only reaches a listener that
refuses them. Raises nothing.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config, RelayConfig

__all__ = ["relay_sealed_out", "sealed_out", "secret_files", "secret_holders"]


def secret_files(relay: RelayConfig) -> list[str]:
    """The files of ``relay`` that hold a credential the listener requires: the AUTH
    password, the client certificate's private key (in the certificate file when no
    ``client_key`` is named)."""
    files = [relay.password_file] if relay.password_file else []
    key = relay.client_key or relay.client_cert
    if key:
        files.append(key)
    return files


def sealed_out(cfg: Config) -> bool:
    """True when some relay needs a secret this process cannot read (and it is not root)."""
    return any(relay_sealed_out(relay) for relay in cfg.relays)


def relay_sealed_out(relay: RelayConfig) -> bool:
    """True when ``relay`` needs a secret this process cannot read (and it is not root)."""
    if os.geteuid() == 0:
        return False
    return any(not os.access(p, os.R_OK, effective_ids=True) for p in secret_files(relay))


def secret_holders(st: os.stat_result) -> str:
    """Who besides root can read a file with this status, in words: "only mailshim",
    "mailshim and group adm", "everyone"."""
    import grp
    import pwd

    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o004:
        return "everyone"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    readers = [owner] if mode & 0o400 or st.st_uid == 0 else []
    if mode & 0o040:
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = f"gid {st.st_gid}"
        readers.append(f"group {group}")
    if not readers:
        return "only root"
    return "only " + " and ".join(readers) if len(readers) == 1 else " and ".join(readers)
