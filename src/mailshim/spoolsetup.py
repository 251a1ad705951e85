"""Create or repair the system spool's folders, owners and modes (``mailshim setup-spool``).

Trust: runs as root only, once at installation or when an administrator repairs the spool.
The spool's root belongs to root (so the runner user cannot swap a subfolder for a link that
root would then write through); every folder is opened with O_NOFOLLOW|O_DIRECTORY and
changed through its descriptor, so a planted link is refused, never followed; files with more
than one link are never chowned. Nothing here reads entries or touches ``queue/`` contents.

Raises: ``CantCreateError`` (73) when a name that must be a folder or plain file is something
else; other ``OSError``s become their sysexits code through ``errors.from_oserror``.
"""

from __future__ import annotations

import errno
import os
import stat

from mailshim.errors import CantCreateError, from_oserror
from mailshim.queuestats import FOLDER as MONITOR_FOLDER
from mailshim.spool import INCOMING_MODE, LISTENER_SIZE, SUBDIRS, Spool
from mailshim.spoolfs import _fsync_dir, _make_dirs, open_folder

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FILE = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def setup(target: Spool, uid: int, gid: int) -> list[str]:
    """Create or repair the system spool for the runner user ``uid``/``gid`` (as root).

    The root folder belongs to root (so the runner user cannot swap a subfolder for a
    link that root would then write through); the subfolders and the agent lock belong
    to the runner user; ``incoming/`` is the drop folder; ``monitor/`` (0755) holds the
    runner's public summary. Returns what was changed.
    """
    changes: list[str] = []
    try:
        _make_dirs(os.path.dirname(os.path.abspath(target.root)), 0o755)
        changes += _make_dir(target.root, 0, 0, 0o711)
        for name in SUBDIRS:
            changes += _make_dir(os.path.join(target.root, name), uid, gid, 0o700)
        changes += _make_dir(target.incoming, uid, gid, INCOMING_MODE)
        # The runner's public figures (queuestats.publish): counts and ages, for monitoring.
        changes += _make_dir(os.path.join(target.root, MONITOR_FOLDER), uid, gid, 0o755)
        # Users' views of their own entries after pickup, found by name only (ownview.py).
        changes += _make_dir(os.path.join(target.root, "status"), uid, gid, 0o711)
        lock = os.path.join(target.root, "agent.lock")
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise CantCreateError(f"{lock} is not a plain file; remove it and retry")
            if (st.st_uid, st.st_gid) != (uid, gid) or stat.S_IMODE(st.st_mode) != 0o600:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, 0o600)
                changes.append(f"{lock}: owner {uid}:{gid}, mode 0600")
        finally:
            os.close(fd)
        changes += _make_public_file(os.path.join(target.root, LISTENER_SIZE), uid, gid)
        # serving.SERVED: the runner's "the units or the daemon serve this spool" mark
        changes += _make_public_file(os.path.join(target.root, "served"), uid, gid)
        # Entries a root process left behind before the runner user existed.
        for name in SUBDIRS:
            changes += _give_files(os.path.join(target.root, name), uid, gid)
        # The names made here (folders, agent.lock, listener-size) are on disk only once
        # the root is fsynced: "done" must survive a power cut (issue 27).
        _fsync_dir(target.root)
    except OSError as exc:
        raise from_oserror(exc, "setting up the spool") from None
    target.forget_owner()
    return changes


def _make_public_file(path: str, uid: int, gid: int) -> list[str]:
    """A plain file of the runner user that everyone may read (mode 0644)."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise CantCreateError(f"{path} is not a plain file; remove it and retry")
        if (st.st_uid, st.st_gid) == (uid, gid) and stat.S_IMODE(st.st_mode) == 0o644:
            return []
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o644)
        return [f"{path}: owner {uid}:{gid}, mode 0644"]
    finally:
        os.close(fd)


def _make_dir(path: str, uid: int, gid: int, mode: int) -> list[str]:
    try:
        os.mkdir(path, mode & 0o777)
        made = [f"{path}: created"]
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except FileExistsError:
        made = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CantCreateError(
                f"{path} exists and is not a folder; remove it and retry"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
            made.append(f"{path}: owner {uid}:{gid}")
        # chown clears set-id bits: the mode is set last, and always.
        os.fchmod(fd, mode)
        if stat.S_IMODE(st.st_mode) != mode:
            made.append(f"{path}: mode {mode:04o}")
        if made:
            os.fsync(fd)  # its owner and mode, which nobody else would make durable
    finally:
        os.close(fd)
    return made


def _give_files(folder: str, uid: int, gid: int) -> list[str]:
    """Give root-owned plain files in ``folder`` to the runner user. Each is looked at and
    changed through descriptors (the folder's, then the file's: O_NOFOLLOW, O_NONBLOCK), so
    a name the runner account swaps for a link in between is never followed; files with
    more than one link are left alone: chowning a hard link would hand over its other name."""
    changed: list[str] = []
    if uid == 0:
        return changed
    try:
        dir_fd = open_folder(folder, {uid})
    except OSError:
        return changed
    try:
        for name in os.listdir(dir_fd):
            try:
                st = os.lstat(name, dir_fd=dir_fd)
                if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == 0):
                    continue
                fd = os.open(name, _FILE, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                now = os.fstat(fd)
                if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev) and now.st_nlink == 1:
                    os.fchown(fd, uid, gid)
                    changed.append(f"{os.path.join(folder, name)}: owner {uid}:{gid}")
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return changed
