"""The queue-file API: enqueue, list, lock, state, bury; the only module writing queue files.

Layout under the spool root (owners and modes of the system spool, whose root belongs to
root, 0711; docs/spool.md explains each; ``spoolsetup`` creates them)::

    incoming/   drop folder: any user's ``sendmail`` leaves entries here   mailshim 3733
    tmp/        entries being written by root or the runner                mailshim 0700
    queue/      complete entries, named by queue id; never changed         mailshim 0700
    state/      per-entry state (attempts, next try, per-recipient results)  mailshim 0700
    dead/       entries that failed permanently or expired, with .reason    mailshim 0700
    corrupt/    entries that could not be read, kept for a human            mailshim 0700
    agent.lock  held by the one delivery agent or daemon working on this spool
    listener-size  the SIZE the listener last announced in EHLO (digits); 0644, so every
                submitter may size its limit by it                             mailshim 0644

A per-user spool (under the XDG state folder) has the same layout without ``incoming/``.
Taking entries from ``incoming/`` into ``queue/`` is ``pickup``'s job, not this module's.

Durability: an entry is written to ``tmp/<id>.<random>``, fsynced, linked into ``queue/``
(a link never replaces a name, as a rename would), and the folder is fsynced before anyone is
told it is safe. A drop-folder entry is written under a random temporary name in
``incoming/``, fsynced, linked, and fsynced again (its writer may not read the folder, so
cannot fsync it; on Linux file systems the second fsync commits the link). Exclusion: whoever
delivers or moves an entry holds an flock on its file until the move is done, so two agents
or runners never send one message twice.

Trust: runs as the submitting user (their own spool, or their entries in the drop folder of
the system spool), as root, and as the runner (root or the ``mailshim`` user). Files this
module creates use O_EXCL under names with 60 random bits (a fresh name on EEXIST) and never
O_TRUNC, so a planted or stale file cannot make a create fail or a privileged process
truncate or write something else; nothing in ``queue/``, ``dead/`` or ``corrupt/`` is ever
replaced (a taken name makes a buried entry go under a fresh id); the only rename over a name
is ``state/<id>``, by the holder of the entry's lock, and a user's own drop entry, by its
owner. Root gives what it creates to the spool's owner.

Raises: ``CantCreateError`` (73) when a name that must be new is taken or a folder is not one;
``DataError`` (65) for an entry that cannot be read (the caller moves it to ``corrupt/``);
other ``OSError``s as their sysexits code (``errors.from_oserror``: 75 full or over quota,
73 read-only or missing, 77 denied, 74 otherwise).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import time

from mailshim import paths, spoolfmt
from mailshim.errors import CantCreateError, DataError, MailshimError, from_oserror
from mailshim.spoolfmt import Envelope, State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    from mailshim.config import Config

SUBDIRS = ("tmp", "queue", "state", "dead", "corrupt")
LISTENER_SIZE = "listener-size"
INCOMING_MODE = 0o3733  # setgid + sticky; owner rwx, group and others may only create
ENTRY_MODE_DROP = 0o640  # the runner reads drop-folder entries through the group
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_READ = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NOCTTY | os.O_NONBLOCK
_CREATE = os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_NOCTTY
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
SYNC_INTERVAL = 0.2  # seconds: removals of delivered entries are made durable in batches
TEMP_TRIES = 16  # fresh random names tried before a create gives up (EEXIST each time)
COPY_CHUNK = 1024 * 1024
MARK_RECHECK = 1.0  # seconds: how long a cleared "listener unreachable" mark is trusted
HEAD_READ = 64 * 1024  # bytes of an entry read at once when it is locked (see _Held)


def new_queue_id(now_ns: int | None = None) -> str:
    """13 hex digits of microseconds (sortable by arrival) + 7 random base32 characters."""
    usec = (now_ns if now_ns is not None else time.time_ns()) // 1000
    rand = int.from_bytes(os.urandom(5), "big")
    tail = "".join(_B32[(rand >> (5 * i)) & 31] for i in range(7))
    return f"{usec:013X}"[-13:] + tail


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


def move_no_replace(target: Spool, src: str, folder: str, name: str, reason: str) -> str:
    """Move ``src`` into ``dead/`` or ``corrupt/`` as ``name`` with a ``.reason`` file; when
    that name is taken by another file, under a fresh queue id instead. Returns the path.

    A look, then a rename: only the runner (and root) can create names in those folders
    (0700), and the one moving an entry holds its lock, so nothing can appear in between;
    a rename, unlike a link, also works on a drop-folder file another user owns
    (``fs.protected_hardlinks``) and is atomic if the process stops."""
    target_dir = target.dead if folder == "dead" else target.corrupt
    if not os.path.isdir(target_dir):
        os.makedirs(target_dir, mode=0o700, exist_ok=True)
    dst = os.path.join(target_dir, name)
    for _ in range(TEMP_TRIES):
        if not (os.path.lexists(dst) or os.path.lexists(dst + ".reason")):
            break
        dst = os.path.join(target_dir, new_queue_id())
    else:
        raise CantCreateError(f"no free name in {target_dir}")
    os.rename(src, dst)
    _write_reason(target, dst + ".reason", reason)
    return dst


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class Spool:
    """One spool folder. ``drop`` is true when this process submits through ``incoming/``."""

    def __init__(self, root: str, drop: bool = False) -> None:
        self.root = root
        self.drop = drop
        self.tmp = os.path.join(root, "tmp")
        self.queue = os.path.join(root, "queue")
        self.state_dir = os.path.join(root, "state")
        self.dead = os.path.join(root, "dead")
        self.corrupt = os.path.join(root, "corrupt")
        self.incoming = os.path.join(root, "incoming")
        self._owner: tuple[int, int] | None = None
        self._dirty = False
        self._synced_at = 0.0
        self._listener_size: int | None = None  # as last recorded by this process
        self._mark_clear_at = -MARK_RECHECK  # monotonic time clear_relay_down last looked

    def __repr__(self) -> str:
        return f"Spool({self.root!r}{', drop=True' if self.drop else ''})"

    # --- creation and choice -------------------------------------------------

    def ensure(self) -> None:
        """Create missing folders (mode 0700: entries are private to the spool's owner)."""
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for name in SUBDIRS:
                path = os.path.join(self.root, name)
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    st = os.lstat(path)
                    if not stat.S_ISDIR(st.st_mode):
                        raise CantCreateError(f"spool folder {path} is not a folder") from None
        except OSError as exc:
            raise from_oserror(exc, "creating the spool folder") from None

    def forget_owner(self) -> None:
        """The spool's owner changed (setup-spool): look it up again when next needed."""
        self._owner = None

    def writable(self) -> bool:
        """This process may create entries in ``queue/`` directly (root, the spool owner).

        A spool on a file system mounted read-only still counts when its modes allow it:
        the write then fails with EX_CANTCREAT naming the reason, instead of the message
        going to another spool that no runner reads.
        """
        return all(_may_write(os.path.join(self.root, d)) for d in ("tmp", "queue"))

    def droppable(self) -> bool:
        """There is a drop folder this process may create entries in."""
        return os.path.isdir(self.incoming) and os.access(self.incoming, os.W_OK | os.X_OK)

    def has_incoming(self) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.incoming).st_mode)
        except OSError:
            return False

    def owner(self) -> tuple[int, int] | None:
        """Who owns the spool's queue folder (uid, gid); None when it does not exist."""
        if self._owner is None:
            try:
                st = os.lstat(self.queue)
            except OSError:
                return None
            self._owner = (st.st_uid, st.st_gid)
        return self._owner

    def give(self, fd: int) -> None:
        """Root hands what it creates to the spool's owner, so the runner user can use it."""
        if os.geteuid() != 0:
            return
        own = self.owner()
        if own is not None and own[0] != 0:
            os.fchown(fd, own[0], own[1])

    def check_usable(self) -> None:
        """Raise the right error when entries cannot be recorded here (read-only, denied)."""
        for folder in (self.queue, self.state_dir, self.tmp):
            if not os.access(folder, os.W_OK | os.X_OK):
                try:
                    os.utime(folder)  # the kernel says why: EROFS, EACCES, ENOENT ...
                except OSError as exc:
                    raise from_oserror(exc, "the spool cannot be written") from None
                raise CantCreateError(f"the spool folder {folder} cannot be written")

    # --- writing -------------------------------------------------------------

    def new_entry(
        self,
        sender: str,
        recipients: list[str],
        uid: int,
        *,
        queue_id: str | None = None,
        arrival: int | None = None,
    ) -> EntryWriter:
        qid = queue_id or new_queue_id()
        when = int(time.time()) if arrival is None else arrival
        return EntryWriter(self, Envelope(qid, sender, recipients, when, uid), drop=self.drop)

    def sync(self, force: bool = False) -> None:
        """Make recent removals from ``queue/`` durable (batched: one fsync per interval)."""
        if not self._dirty:
            return
        now = time.monotonic()
        if force or now - self._synced_at >= SYNC_INTERVAL:
            self._dirty = False
            self._synced_at = now
            try:
                _fsync_dir(self.queue)
            except OSError:
                pass

    # --- reading -------------------------------------------------------------

    def ids(self) -> list[str]:
        """Queue ids in arrival order. Names that are not queue ids are ignored."""
        try:
            names = os.listdir(self.queue)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise from_oserror(exc, "listing the spool") from None
        return sorted(n for n in names if spoolfmt.valid_id(n))

    def path(self, qid: str) -> str:
        if not spoolfmt.valid_id(qid):
            raise DataError(f"not a queue id: {qid[:40]!r}")
        return os.path.join(self.queue, qid)

    def exists(self, qid: str) -> bool:
        return os.path.lexists(self.path(qid))

    def read_envelope(self, qid: str) -> Envelope:
        """The envelope of an entry, without locking it (for listings)."""
        fd = os.open(self.path(qid), _READ)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError("spool entry is not a regular file")
            env, _ = spoolfmt.decode_envelope(f)
        if env.queue_id != qid:
            raise DataError(f"entry {qid} claims to be {env.queue_id}")
        return env

    def lock(self, qid: str, blocking: bool = False) -> LockedEntry | None:
        """Lock an entry for delivery; None when another process holds it or it is gone.

        Raises ``DataError`` when the entry cannot be read (the caller moves it to corrupt/).
        """
        path = self.path(qid)
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError("spool entry is a symbolic link") from None
            raise from_oserror(exc, f"opening entry {qid}") from None
        try:
            flags = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                return None
            st = os.fstat(fd)
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                os.close(fd)
                return None
            if not _same(now, st) or st.st_nlink == 0:
                os.close(fd)
                return None
            if not stat.S_ISREG(st.st_mode):
                raise DataError("spool entry is not a regular file")
            if st.st_nlink == 2 and self._drop_temp_twin(qid, st):
                st = os.fstat(fd)
            if st.st_nlink != 1:
                raise DataError("spool entry has more than one link")
            return LockedEntry(self, qid, fd)
        except BaseException:
            _close(fd)
            raise

    def _drop_temp_twin(self, qid: str, st: os.stat_result) -> bool:
        """A writer stopped between linking ``tmp/<id>.<random>`` into queue/ and unlinking
        it: the second name goes (we hold the lock, so that writer is gone)."""
        for name in _listdir(self.tmp):
            if name.startswith(qid + "."):
                path = os.path.join(self.tmp, name)
                try:
                    if _same(os.lstat(path), st):
                        return _unlink(path)
                except OSError:
                    continue
        return False

    # --- state ---------------------------------------------------------------

    def load_state(self, qid: str) -> State:
        return self.stored_state(qid) or State()

    def stored_state(self, qid: str) -> State | None:
        """The entry's state file; None when it has none (never tried, or all was fresh)."""
        path = os.path.join(self.state_dir, qid)
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError("state file is a symbolic link") from None
            raise from_oserror(exc, f"reading the state of {qid}") from None
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError("state file is not a regular file")
            raw = f.read(16 * 1024 * 1024)
        return spoolfmt.decode_state(raw)

    def save_state(self, qid: str, state: State, sync: bool = True) -> None:
        """Replace the state of ``qid`` (whose entry this process holds locked) atomically.

        The one rename over an existing name in the spool: ``state/<id>`` is written only
        by the holder of the entry's lock, and replacing it whole is the point."""
        path = os.path.join(self.state_dir, qid)
        data = spoolfmt.encode_state(state)
        tmp = ""
        try:
            tmp, fd = _create_temp(lambda tag: f"{path}.{tag}.tmp", 0o600)
            try:
                self.give(fd)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            if sync:
                _fsync_dir(self.state_dir)
        except OSError as exc:
            if tmp:
                _unlink(tmp)
            raise from_oserror(exc, "saving the state of an entry") from None

    # --- the agent lock --------------------------------------------------------
    # It doubles as a "listener unreachable" mark: an agent that could reach no relay writes
    # a line into it (mtime = when), one that delivered empties it. Submissions in the next
    # few seconds then start no agent that would only fail the same way (measured: 234
    # agents for 1000 submissions while the listener was down).

    def relay_down_since(self) -> float | None:
        """When an agent last found every relay unreachable; None when it since got through."""
        try:
            st = os.stat(os.path.join(self.root, "agent.lock"))
        except OSError:
            return None
        return st.st_mtime if st.st_size > 0 else None

    def clear_relay_down(self) -> None:
        """Someone got through: forget the mark (one stat when there is none, and none at
        all within ``MARK_RECHECK`` of the last look: a runner calls this per delivery)."""
        now = time.monotonic()
        if now - self._mark_clear_at < MARK_RECHECK:
            return
        self._mark_clear_at = now
        path = os.path.join(self.root, "agent.lock")
        try:
            if os.stat(path).st_size == 0:
                return
            fd = os.open(path, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def mark_relay(self, lock_fd: int, reachable: bool) -> None:
        try:
            if reachable:
                if os.fstat(lock_fd).st_size:
                    os.ftruncate(lock_fd, 0)
            else:
                self._mark_clear_at = -MARK_RECHECK  # the next delivery clears it again
                os.pwrite(lock_fd, b"relay down\n", 0)
        except OSError:
            pass  # only an optimisation

    # --- the listener's own size limit ------------------------------------------
    # The delivery side records the EHLO SIZE it last saw; submissions then refuse early
    # (exit 65, nothing kept) exactly what the listener would refuse, and nothing less.

    def listener_size(self) -> int | None:
        """The SIZE the listener last announced, as recorded here; None when unknown.

        Only a file of the spool's owner (or root) counts: it sets how much others may send.
        """
        try:
            fd = os.open(os.path.join(self.root, LISTENER_SIZE), _READ)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            own = self.owner()
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, own[0] if own else 0):
                return None
            raw = os.read(fd, 32)
        except OSError:
            return None
        finally:
            os.close(fd)
        text = raw.strip()
        if raw.endswith(b"\n") and text.isdigit() and 0 < len(text) < 19:
            return int(text)
        return None

    def record_listener_size(self, size: int | None) -> None:
        """Remember ``size`` (the runner; best effort: a stale figure only moves a default)."""
        if size is None or size <= 0 or size == self._listener_size:
            return
        self._listener_size = size
        if self.listener_size() == size:
            return
        data = b"%d\n" % size
        try:
            # O_CREAT without O_TRUNC: the system spool's root is root's, where setup-spool
            # made this file for the runner; a per-user spool's owner may create it.
            fd = os.open(
                os.path.join(self.root, LISTENER_SIZE),
                os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK,
                0o644,
            )
        except OSError:
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
        except OSError:
            pass
        finally:
            os.close(fd)

    def try_agent_lock(self) -> int | None:
        """An fd holding the spool's agent lock, or None when an agent already runs."""
        path = os.path.join(self.root, "agent.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        except PermissionError:
            # The system spool's root belongs to root: the runner user opens the lock
            # setup-spool made for it.
            fd = os.open(path, _READ)
        try:
            self.give(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    # --- housekeeping ----------------------------------------------------------

    def clean_tmp(self, older_than: float = 60.0) -> int:
        """Remove temp files whose writer is gone (nobody holds their lock)."""
        removed = 0
        cutoff = time.time() - older_than
        for name in _listdir(self.tmp):
            if _remove_if_abandoned(os.path.join(self.tmp, name), cutoff):
                removed += 1
        for name in _listdir(self.state_dir):
            path = os.path.join(self.state_dir, name)
            if spoolfmt.valid_id(name):
                if not os.path.lexists(os.path.join(self.queue, name)):
                    _unlink(path)
            elif name.endswith(".tmp"):
                try:
                    if os.lstat(path).st_mtime < cutoff:
                        _unlink(path)
                except OSError:
                    pass
        return removed

    def quarantine(self, qid: str, reason: str) -> None:
        """Move an entry that cannot even be locked (a link, not a plain file) to corrupt/,
        for a human. Whoever can lock it uses ``LockedEntry.bury("corrupt", ...)``."""
        try:
            move_no_replace(self, self.path(qid), "corrupt", qid, reason)
        except OSError:
            pass


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


def _write_reason(spool: Spool, path: str, reason: str) -> None:
    _unlink(path)
    fd = os.open(path, os.O_WRONLY | _CREATE, 0o600)
    try:
        spool.give(fd)
        os.write(fd, reason.encode("utf-8", "replace") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


class EntryWriter:
    """A new entry being written; ``commit()`` makes it durable and visible.

    In the drop folder the temp file is ``incoming/.<id>.<random>.tmp`` (mode 0640, group of
    the folder: the runner reads it through the group); elsewhere it is ``tmp/<id>.<random>``.
    The random part is new for every create, so no file planted or left behind can make the
    create fail; the final name is linked, never renamed over (``_link_no_replace``).
    """

    def __init__(self, spool: Spool, envelope: Envelope, drop: bool = False) -> None:
        self.spool = spool
        self.queue_id = envelope.queue_id
        self.envelope = envelope
        self.drop = drop
        self._enc = spoolfmt.encode_envelope(envelope)
        if drop:
            folder = spool.incoming
            self.final_path = os.path.join(spool.incoming, self.queue_id)
        else:
            folder = spool.tmp
            self.final_path = os.path.join(spool.queue, self.queue_id)
        self.replace = False  # DropEntry.rewrite: the owner replaces their own entry
        self.size = 0
        self.eightbit = False
        self._done = False
        self.fd = -1
        qid = self.queue_id
        self.tmp_path = ""
        try:
            if drop:
                self.tmp_path, self.fd = _create_temp(
                    lambda tag: os.path.join(folder, spoolfmt.temp_name(qid, tag)), 0o600
                )
            else:
                self.tmp_path, self.fd = _create_temp(
                    lambda tag: os.path.join(folder, f"{qid}.{tag}"), 0o600
                )
        except OSError as exc:
            raise from_oserror(exc, "creating the spool entry") from None
        try:
            if drop:
                os.fchmod(self.fd, ENTRY_MODE_DROP)
            else:
                spool.give(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._file = open(self.fd, "wb", buffering=256 * 1024, closefd=False)  # noqa: SIM115
            self._file.write(self._enc.data)
        except OSError as exc:
            self.abort()
            raise from_oserror(exc, "writing the spool entry") from None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise from_oserror(exc, "writing the spool entry") from None

    def commit(
        self, eightbit: bool, keep_lock: bool = False, sync_dir: bool = True
    ) -> LockedEntry | DropEntry | None:
        """fsync, rename into place, make the rename durable. Returns the still-locked entry
        when ``keep_lock`` (the caller delivers or hands it on), else closes it."""
        self.eightbit = eightbit
        self.envelope.eightbit = eightbit
        self.envelope.size = self.size
        try:
            self._file.flush()
            digits, body = spoolfmt.patch_size_and_body(self.size, eightbit)
            os.pwrite(self.fd, digits, self._enc.size_offset)
            os.pwrite(self.fd, body, spoolfmt.body_type_offset(self._enc.size_offset))
            os.fsync(self.fd)
            if self.replace:
                os.rename(self.tmp_path, self.final_path)
            else:
                _link_no_replace(self.tmp_path, self.final_path)
            self._done = True
            if self.drop:
                # The submitter cannot open incoming/ to fsync it; fsync of the renamed file
                # commits the rename with it on ext4, xfs and btrfs.
                os.fsync(self.fd)
            elif sync_dir:
                _fsync_dir(self.spool.queue)
        except OSError as exc:
            if not self._done:
                self.abort()
            if isinstance(exc, FileExistsError):
                raise CantCreateError(f"{self.final_path} already exists") from None
            raise from_oserror(exc, "committing the spool entry") from None
        except MailshimError:
            self.abort()
            raise
        self._file.close()
        if keep_lock:
            if self.drop:
                return DropEntry(self.spool, self.queue_id, self.fd)
            return LockedEntry(self.spool, self.queue_id, self.fd)
        os.close(self.fd)
        self.fd = -1
        return None

    def abort(self) -> None:
        """Remove the half-written entry: nothing is sent, nothing is kept."""
        if self._done:
            return
        self._done = True
        if self.tmp_path:
            _unlink(self.tmp_path)
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1


class _Held:
    """An entry file whose flock this process holds; the envelope is read from the fd.

    One ``pread`` of ``HEAD_READ`` bytes holds the envelope of nearly every entry, and the
    whole file of a small one: such a message is then sent from memory, with no second
    read (a flush of 1000 small entries saved ~10 syscalls each)."""

    def __init__(self, spool: Spool, qid: str, fd: int) -> None:
        self.spool = spool
        self.queue_id = qid
        self.fd = fd
        self._envelope: Envelope | None = None
        self._offset = 0
        self._whole: bytes | None = None  # the entry's bytes, when one read held them all

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
            try:
                head = os.pread(self.fd, HEAD_READ, 0)
            except OSError as exc:
                raise from_oserror(exc, f"reading entry {self.queue_id}") from None
            if len(head) < HEAD_READ:
                self._whole = head  # a short read of a regular file: its end
            if self._whole is not None or b"\n\n" in head:
                env, self._offset = spoolfmt.decode_envelope(io.BytesIO(head))
            else:  # an envelope longer than the first read (thousands of recipients)
                with open(self.fd, "rb", closefd=False) as f:
                    f.seek(0)
                    env, self._offset = spoolfmt.decode_envelope(f)
            if env.queue_id != self.queue_id:
                raise DataError(f"entry {self.queue_id} claims to be {env.queue_id}")
            self._envelope = env
        return self._envelope

    def message(self) -> BinaryIO:
        """A new file object positioned at the first byte of the message."""
        env = self.envelope
        if self._whole is not None:
            total = len(self._whole) - self._offset
            if total == env.size:
                return io.BytesIO(self._whole[self._offset :])
        else:
            total = os.fstat(self.fd).st_size - self._offset
        if total != env.size:
            raise DataError(
                f"entry {self.queue_id}: message is {total} bytes, envelope says {env.size}"
            )
        f = open(os.dup(self.fd), "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self._offset)
        return f

    def headers(self, limit: int = 64 * 1024) -> bytes:
        """The message's header section (without the blank line), at most ``limit`` bytes."""
        with self.message() as f:
            head = f.read(limit)
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 2]
        if head.startswith(b"\r\n"):
            return b""
        cut = head.rfind(b"\r\n")
        return head[: cut + 2] if cut >= 0 else b""

    def release(self) -> None:
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1


class LockedEntry(_Held):
    """An entry in queue/ whose flock this process holds."""

    def quarantine(self, reason: str) -> str:
        """Unreadable: to corrupt/ for a human, the lock held until it is there."""
        return self.bury("corrupt", reason)

    _stateless = False  # state() found no state file: remove() need not unlink one

    def state(self) -> State:
        stored = self.spool.stored_state(self.queue_id)
        # Only the lock holder writes state/<id>, so none can appear while we hold it.
        self._stateless = stored is None
        return stored or State()

    def save_state(self, state: State) -> None:
        self._stateless = False
        self.spool.save_state(self.queue_id, state)

    def remove(self) -> None:
        """Delivered: forget it. The entry goes first, so a crash leaves at worst a stray
        state. The folder is fsynced in batches (``Spool.sync``): a power cut may bring back
        an entry delivered in the last ``SYNC_INTERVAL`` seconds (docs/spool.md)."""
        try:
            os.unlink(os.path.join(self.spool.queue, self.queue_id))
            self.spool._dirty = True
            self.spool.sync()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.release()
                raise from_oserror(exc, "removing a delivered entry") from None
        if not self._stateless:
            _unlink(os.path.join(self.spool.state_dir, self.queue_id))
        self.release()

    def bury(self, folder: str, reason: str) -> str:
        """Move to dead/ (or corrupt/) with the reason and last state; returns the new path.

        The lock is held until the move is complete. Nothing there is replaced: a name that
        is taken (by a planted or older file) makes the entry go under a fresh id. The state
        gets its new name before the entry leaves queue/, so ``clean_tmp``, which removes a
        state whose entry is gone, can never take it in between."""
        target_dir = self.spool.dead if folder == "dead" else self.spool.corrupt
        src = os.path.join(self.spool.queue, self.queue_id)
        state_path = os.path.join(self.spool.state_dir, self.queue_id)
        try:
            if not os.path.isdir(target_dir):
                os.makedirs(target_dir, mode=0o700, exist_ok=True)
            name = self._free_name(target_dir, state_path)
            target = os.path.join(target_dir, name)
            has_state = os.path.lexists(state_path)
            if has_state:
                try:
                    os.link(state_path, target + ".state")
                except FileExistsError:
                    pass  # ours, from a bury a crash interrupted (_free_name checked)
            target = move_no_replace(self.spool, src, folder, name, reason)
            if has_state:
                if not target.endswith(name):
                    os.link(state_path, target + ".state")
                _unlink(state_path)
            _fsync_dir(target_dir)
            _fsync_dir(self.spool.queue)
        except OSError as exc:
            raise from_oserror(exc, f"moving entry {self.queue_id} to {folder}/") from None
        finally:
            self.release()
        return target

    def _free_name(self, target_dir: str, state_path: str) -> str:
        """The entry's id, unless dead/<id> (or its .state) is another file: then a new id."""
        name = self.queue_id
        pairs = [(os.path.join(self.spool.queue, name), os.path.join(target_dir, name))]
        pairs.append((state_path, os.path.join(target_dir, name + ".state")))
        for mine, there in pairs:
            try:
                theirs = os.lstat(there)
            except FileNotFoundError:
                continue
            try:
                if _same(os.lstat(mine), theirs):
                    continue
            except FileNotFoundError:
                pass
            return new_queue_id()
        return name


class DropEntry(_Held):
    """An entry in incoming/ held by its submitter (their ``sendmail`` or agent).

    The submitter may deliver it and then remove it, or replace it with one listing only the
    recipients still to do; it cannot record state (it may not write state/), so whatever is
    left is the runner's to retry, bounce or expire.
    """

    @property
    def path(self) -> str:
        return os.path.join(self.spool.incoming, self.queue_id)

    def still_here(self) -> bool:
        """The name still refers to the file we hold (nobody replaced or took it)."""
        try:
            return self.fd >= 0 and _same(os.lstat(self.path), os.fstat(self.fd))
        except OSError:
            return False

    def remove(self) -> None:
        """Delivered: unlink it, then fsync the unlinked file, which commits the unlink."""
        if self.still_here():
            try:
                os.unlink(self.path)
                os.fsync(self.fd)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    self.release()
                    raise from_oserror(exc, "removing a delivered entry") from None
        self.release()

    def rewrite(self, recipients: list[str], failed: dict[str, str] | None = None) -> None:
        """Atomically replace the entry by one for ``recipients`` only (same id, same arrival).

        ``failed``: recipients (among ``recipients``) the listener refused while nobody could
        tell the caller, with the reply: the runner bounces them and never sends them again.
        The replacement is a rename over the owner's own entry (the sticky drop folder lets
        nobody else's name be replaced); a stop in between leaves the old or the new one."""
        env = self.envelope
        if not self.still_here():
            self.release()
            return
        new = Envelope(self.queue_id, env.sender, list(recipients), env.arrival, env.uid)
        new.failed = dict(failed or {})
        writer = EntryWriter(self.spool, new, drop=True)
        writer.replace = True
        try:
            with self.message() as body:
                while True:
                    chunk = body.read(COPY_CHUNK)
                    if not chunk:
                        break
                    writer.write(chunk)
            writer.commit(env.eightbit)
        except BaseException:
            writer.abort()
            raise
        finally:
            self.release()

    def poke(self) -> None:
        """Create and remove a name in incoming/ so that a runner watching it looks again."""
        folder = self.spool.incoming
        qid = self.queue_id
        try:
            path, fd = _create_temp(
                lambda tag: os.path.join(folder, spoolfmt.temp_name(qid, tag, "poke")), 0o600
            )
            os.close(fd)
            os.unlink(path)
        except OSError:
            pass


def open_drop_entry(spool: Spool, qid: str, fd: int) -> DropEntry:
    """Adopt a locked drop-folder entry handed over as an open fd (the agent's side).

    ``qid`` "" reads the id from the entry itself, so that it need not be in the agent's
    argv, where every local user can read it in /proc (issue 12, item 5)."""
    if qid == "":
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            qid = spoolfmt.decode_envelope(f)[0].queue_id
    if not spoolfmt.valid_id(qid):
        raise DataError(f"not a queue id: {qid[:40]!r}")
    return DropEntry(spool, qid, fd)


def choose(config: Config, create: bool = True) -> Spool:
    """The spool a submission writes to.

    The configured (or system) spool when this process may write its queue (root, the spool
    owner); its drop folder when there is one; else, when the spool does not exist, a
    per-user spool under the XDG state folder. A spool that exists and is ours but cannot be
    written now (read-only, full) is still returned: the write fails with the real reason
    rather than the message going somewhere no runner looks.
    """
    root = config.queue_dir or paths.SYSTEM_SPOOL
    spool = Spool(root)
    if spool.writable():
        return spool
    if spool.droppable():
        return Spool(root, drop=True)
    own = spool.owner()
    euid = os.geteuid()
    if own is not None and (euid == 0 or own[0] == euid):
        return spool
    if own is None and (euid == 0 or config.queue_dir is not None):
        try:
            if create:
                spool.ensure()
            if spool.writable():
                return spool
        except MailshimError:
            if euid == 0:
                raise
    user = Spool(paths.user_spool_dir())
    if create and not user.writable():
        user.ensure()
    return user


def known_spools(config: Config) -> list[Spool]:
    """Spools this user can read: the configured/system one and the per-user one."""
    out: list[Spool] = []
    for root in (config.queue_dir or paths.SYSTEM_SPOOL, paths.user_spool_dir()):
        spool = Spool(root)
        if os.access(spool.queue, os.R_OK | os.X_OK) and all(s.root != root for s in out):
            out.append(spool)
    return out
