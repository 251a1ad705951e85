"""File-system primitives of the spool: unpredictable names, exclusive creation, link without
replace, folder fsync, durable folder creation, and the quiet listdir/unlink/close helpers;
nothing about its layout.

Every create is O_EXCL under a name with 60 random bits (a fresh name on EEXIST) and never
O_TRUNC; a final name is linked, never renamed over (a rename would replace it). What the
folders mean, and which entry goes where, is ``spool``'s and ``spoolentry``'s.

Trust: runs as the submitting user, as root and as the runner, in folders other users may
create names in (the drop folder). Nothing here follows a symbolic link (O_NOFOLLOW), opens a
FIFO without O_NONBLOCK or takes a terminal; a planted file can make a create pick another
name, never fail or truncate something else. ``_remove_if_abandoned`` removes only a file
whose writer's lock is free, and rechecks that the name still is that file.

Raises: the ``OSError``s of the calls (callers turn them into sysexits codes with
``errors.from_oserror``); ``FileExistsError`` from ``_link_no_replace`` when the final name is
another file; the quiet helpers (``_listdir``, ``_unlink``, ``_close``) raise nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from mailshim import spoolfmt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_READ = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NOCTTY | os.O_NONBLOCK
_CREATE = os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_NOCTTY
_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
TEMP_TRIES = 16  # fresh random names tried before a create gives up (EEXIST each time)


def _tag() -> str:
    """Random characters for a temp name (60 bits): another user cannot plant it first."""
    rand = int.from_bytes(os.urandom(8), "big")
    return "".join(_B32[(rand >> (5 * i)) & 31] for i in range(spoolfmt.TAG_LENGTH))


def _create_temp(make_path: Callable[[str], str], mode: int) -> tuple[str, int]:
    """Create a new file under an unpredictable name (O_EXCL, a fresh name on EEXIST), so a
    stale or planted file never makes a create fail. Returns (path, fd)."""
    for _ in range(TEMP_TRIES - 1):
        path = make_path(_tag())
        try:
            return path, os.open(path, os.O_RDWR | _CREATE, mode)
        except FileExistsError:
            continue
    path = make_path(_tag())
    return path, os.open(path, os.O_RDWR | _CREATE, mode)


def _link_no_replace(src: str, dst: str) -> None:
    """Give ``src`` the name ``dst`` and drop ``src``; never replaces an existing ``dst``
    (rename would). ``dst`` already naming the same file (a crash between the two steps)
    counts as done. Raises FileExistsError when ``dst`` is another file."""
    try:
        os.link(src, dst)
    except FileExistsError:
        if not _same(os.lstat(src), os.lstat(dst)):
            raise
    except OSError as exc:
        # A file system without hard links (vfat, some FUSE): look, then rename. The folders
        # are the spool owner's, or sticky, where nobody else's name can be renamed over.
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: str, mode: int) -> bool:
    """``os.makedirs(path, mode, exist_ok=True)`` that makes every new folder durable.

    A new folder's name is on disk only once its parent is fsynced: without that, a power cut
    after an entry was fsynced into a new spool could take the folder, and the entry with it
    (issue 27, found by tests/test_crash_states.py). Parents made on the way get 0777 less the
    umask, as with ``os.makedirs``. A parent this process may not read cannot be fsynced and
    is left as it is. Returns whether anything was created."""
    parent = os.path.dirname(path.rstrip("/")) or "."
    if parent != path and not os.path.isdir(parent):
        _make_dirs(parent, 0o777)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if os.path.isdir(path):
            return False
        raise
    try:
        _fsync_dir(parent)
    except PermissionError:
        pass
    return True


def _may_write(folder: str) -> bool:
    if os.access(folder, os.W_OK | os.X_OK):
        return True
    try:
        if not os.statvfs(folder).f_flag & os.ST_RDONLY:
            return False
        st = os.stat(folder)
    except OSError:
        return False
    if os.geteuid() == 0:
        return True
    need = stat.S_IWUSR | stat.S_IXUSR
    if st.st_uid != os.geteuid():
        groups = {os.getegid(), *os.getgroups()}
        need = stat.S_IWGRP | stat.S_IXGRP if st.st_gid in groups else stat.S_IWOTH | stat.S_IXOTH
    return st.st_mode & need == need


def open_folder(
    name: str,
    owners: Collection[int],
    dir_fd: int | None = None,
    create: int | None = None,
    give: tuple[int, int] | None = None,
) -> int:
    """A folder as a descriptor, reached without following a link: ``name`` (relative to
    ``dir_fd`` when given) opened O_DIRECTORY|O_NOFOLLOW, owned by one of ``owners`` (this
    process's euid always counts) and writable by nobody else. ``create``: the mode to make
    it with when missing; a folder root makes here goes to ``give`` (the spool's owner).

    What root opens under a folder the runner account owns goes through such descriptors,
    one component at a time: the runner account could otherwise swap a folder for a link
    between root's look and root's use (docs/security.md). Raises ``OSError`` (ELOOP or
    ENOTDIR for a link or a file, EPERM for a folder of another account)."""
    made = False
    if create is not None:
        try:
            os.mkdir(name, create, dir_fd=dir_fd)
            made = True
        except FileExistsError:
            pass
    fd = os.open(name, _FOLDER, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if made and give is not None and os.geteuid() == 0 and st.st_uid != give[0]:
            os.fchown(fd, give[0], give[1])
            st = os.fstat(fd)
        if st.st_uid not in {*owners, os.geteuid()} or st.st_mode & 0o022:
            raise PermissionError(errno.EPERM, "a folder another account controls", name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _remove_if_abandoned(path: str, cutoff: float, hostile: bool = False) -> bool:
    """Unlink a temp file older than ``cutoff`` whose writer is gone (its lock is free).

    ``hostile``: the file's owner may have set its mtime, so its ctime counts too."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return _unlink(path)
        if (max(st.st_mtime, st.st_ctime) if hostile else st.st_mtime) > cutoff:
            return False
        fd = os.open(path, _READ)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        again = os.lstat(path)
        if _same(again, os.fstat(fd)):
            return _unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)
    return False
