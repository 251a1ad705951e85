"""Where mailshim's files live: system paths, per-user XDG paths, and this host's name.

On Linux the per-user folders follow the XDG rules that ``platformdirs`` implements; they are
computed here without importing it because ``sendmail`` start-up time is the product (a test
checks that both agree). Elsewhere ``platformdirs`` is used.

Trust: called by every process as whatever user runs it. The environment (HOME, XDG_*) is the
caller's own and only chooses the caller's own per-user folders; system paths are constants.

Raises nothing: a missing ``HOME`` or ``XDG_*`` variable falls back to the documented defaults.
"""

from __future__ import annotations

import os
import sys

SYSTEM_CONFIG = "/etc/mailshim/config.toml"
SYSTEM_SPOOL = "/var/spool/mailshim"
APP = "mailshim"


def _xdg(env: str, fallback: str) -> str:
    base = os.environ.get(env, "").strip()
    if not base:
        base = os.path.expanduser(fallback)
    return os.path.join(base, APP)


def user_config_dir() -> str:
    if sys.platform.startswith("linux"):
        return _xdg("XDG_CONFIG_HOME", "~/.config")
    import platformdirs

    return platformdirs.user_config_dir(APP)


def user_state_dir() -> str:
    if sys.platform.startswith("linux"):
        return _xdg("XDG_STATE_HOME", "~/.local/state")
    import platformdirs

    return platformdirs.user_state_dir(APP)


def user_cache_dir() -> str:
    if sys.platform.startswith("linux"):
        return _xdg("XDG_CACHE_HOME", "~/.cache")
    import platformdirs

    return platformdirs.user_cache_dir(APP)


def user_spool_dir() -> str:
    return os.path.join(user_state_dir(), "spool")


_fqdn: str | None = None


def fqdn() -> str:
    """This host's fully qualified name, looked up once per process.

    ``socket.getfqdn()`` asks DNS for a reverse record and can stall for seconds; like
    ``hostname -f`` we take the node name when it is already qualified, else the canonical
    name the resolver gives for it (``/etc/hosts`` usually answers).
    """
    global _fqdn
    if _fqdn is None:
        name = os.uname().nodename
        if "." not in name:
            try:
                import socket

                infos = socket.getaddrinfo(name, None, 0, 0, 0, socket.AI_CANONNAME)
                for info in infos:
                    if info[3] and "." in info[3]:
                        name = info[3]
                        break
            except (OSError, UnicodeError):
                pass
        _fqdn = name.rstrip(".").lower() or "localhost"
    return _fqdn


def publish_file(path: str, data: bytes, mode: int) -> str:
    """Put ``data`` at ``path`` whole for other accounts to read (a metrics textfile, the
    monitoring summary): a fresh temp name with 64 random bits beside it (O_EXCL, never
    following a link; not ``*.prom``, which node_exporter would read half-written), ``mode``
    set whatever the umask, renamed over ``path``. "" or the reason it was not written, with
    nothing left behind."""
    tmp = f"{path}.{os.urandom(8).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as exc:
        return f"{os.path.dirname(path)}: {exc.strerror}"
    try:
        try:
            os.fchmod(fd, mode)
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return f"{path}: {exc.strerror}"
    return ""


def replace_file(path: str, data: bytes, mode: int) -> bool:
    """Put ``data`` at ``path`` whole: written to a fresh ``<path>.<pid>.tmp`` (O_EXCL,
    never following a link) and renamed over ``path``. False, with nothing left behind,
    when that fails: the callers (a cache, a pid file) can do without the file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
