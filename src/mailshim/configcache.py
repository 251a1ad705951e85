"""The marshal cache of parsed configuration tables: where it lives, when it is believed, and
the rule that keeps root's out of folders other accounts control.

Parsing TOML costs more than the rest of ``sendmail`` start-up (``tomllib`` pulls in ``re``,
``typing`` and ``datetime``), so ``configload`` keeps each table that validated in the
caller's cache folder (``$MAILSHIM_CACHE_DIR``, else the XDG cache folder), keyed on the
file's identity (device, inode, size, mtime, ctime) and the Python version. Only a validated
table is stored, so the cache is also the last good configuration of that file
(``configload.load_or_fallback``).

Trust: runs as every user, and as root. A cache file is believed only when it and its folder
belong to the caller (or root) and nobody else can write them, and whatever it holds is
validated again like a freshly parsed table. Root reads or writes its cache only when every
folder from ``/`` down is root's and writable by nobody else (``_root_path``): root's HOME or
XDG_CACHE_HOME may come from a user (``sudo -E``, ``su -m``).

Raises nothing: a cache that cannot be read or written only costs the next run some
milliseconds.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys

from mailshim import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Table

CACHE_VERSION = 1


def cache_path() -> str:
    base = os.environ.get("MAILSHIM_CACHE_DIR") or paths.user_cache_dir()
    return os.path.join(base, "config.marshal")


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _root_path(folder: str, create: bool) -> bool:
    """For root: whether no other account can change what ``folder`` names. Every component
    from ``/`` down is looked at with ``lstat`` (a link anywhere refuses it: ``os.stat`` of the
    folder would follow one a user planted in a folder of theirs above it) and must be a
    folder of root's, writable by nobody else (a sticky folder excepted on the way, since what
    it holds is then root's and cannot be renamed by others). With ``create``, missing folders
    are made (0700), one at a time: ``mkdir`` never follows a link at its last component.

    Root's cache folder lies under whatever HOME or XDG_CACHE_HOME it was started with, which
    ``sudo -E``, ``su -m`` or ``su`` (XDG_CACHE_HOME) take from a user (issue 24, item 1)."""
    parts = [p for p in os.path.abspath(folder).split("/") if p]
    path = "/"
    for i in range(len(parts) + 1):
        if i:
            path = os.path.join(path, parts[i - 1])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return False
            try:
                os.mkdir(path, 0o700)
                st = os.lstat(path)
            except OSError:
                return False
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            return False
        if st.st_mode & 0o022 and (i == len(parts) or not st.st_mode & stat.S_ISVTX):
            return False
    return True


def get(cache_file: str, key: tuple[object, ...] | None) -> tuple[tuple[object, ...], Table] | None:
    """The cached (key, table) when it matches ``key`` (any key: None), else None."""
    if os.geteuid() == 0 and not _root_path(os.path.dirname(cache_file), create=False):
        return None
    try:
        dst = os.stat(os.path.dirname(cache_file))
        fd = os.open(cache_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _trusted(st) and _trusted(dst)):
            return None
        if st.st_size > 8 * 1024 * 1024:
            return None
        blob = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            blob += chunk
        stored = marshal.loads(blob)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)
    if (
        isinstance(stored, tuple)
        and len(stored) == 2
        and isinstance(stored[0], tuple)
        and len(stored[0]) == 8
        and (
            stored[0] == key
            if key is not None
            else stored[0][:2] == (CACHE_VERSION, sys.version_info[:2])
        )
        and isinstance(stored[1], dict)
    ):
        return stored[0], stored[1]
    return None


def put(cache_file: str, key: tuple[object, ...], data: Table) -> None:
    """Best effort: a cache that cannot be written only costs the next run some milliseconds."""
    try:
        # marshal's stub lists concrete types; the table holds only TOML's plain values.
        blob = marshal.dumps((key, data))  # type: ignore[arg-type]
    except ValueError:
        return  # a TOML date or time value: not marshal-able, and rejected by validation anyway
    folder = os.path.dirname(cache_file)
    if os.geteuid() == 0 and not _root_path(folder, create=True):
        return
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # Root never writes into a cache folder another account controls (the units' is
        # the runner's): it would not read it back anyway (_cache_get), and writes nothing
        # there that account could aim elsewhere.
        if not _trusted(os.stat(folder)):
            return
    except OSError:
        return
    paths.replace_file(cache_file, blob, 0o600)
