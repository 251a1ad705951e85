"""The only module that touches the spool folder: enqueue, pick up, list, lock, state, bury.

Layout under the spool root (owners and modes of the system spool, whose root belongs to
root, 0711; docs/spool.md explains each)::

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

Durability: an entry is written to ``tmp/``, fsynced, renamed into ``queue/`` and the folder
is fsynced before anyone is told it is safe. A drop-folder entry is written under a temporary
name in ``incoming/``, fsynced, renamed, and fsynced again (its writer may not read the folder,
so cannot fsync it; on Linux file systems the second fsync commits the rename). Exclusion:
whoever delivers or moves an entry holds an flock on its file, so two agents or runners never
send one message twice.

Trust: runs as the submitting user (their own spool, or the drop folder of the system spool),
as root, and as the runner (root or the ``mailshim`` user). Everything in ``incoming/`` is
hostile: names are checked against the queue-id alphabet, ``lstat`` decides before anything
is opened, files are opened with O_NOFOLLOW|O_NONBLOCK and checked with ``fstat`` (regular,
one link, bounded size), the submitter is the file's owner (never the ``uid`` record), and the
entry is copied, normalised and re-encoded rather than trusted in place. Files this module
creates use O_EXCL and never O_TRUNC, so a planted link cannot make a privileged process
truncate or write something else; root gives what it creates to the spool's owner.
"""

from __future__ import annotations

import errno
import fcntl
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
PICKUP_BATCH = 64
# At most this many entries of one owner are taken from the drop folder per pickup, so a
# user who floods it cannot make everyone else's mail wait behind theirs; the rest is taken
# by the next pickups (a flush picks up again after every sweep).
PICKUP_PER_USER = 256
STALE_TEMP = 24 * 3600.0  # a temp entry nobody holds, untouched this long, is removed
UNREADABLE_GRACE = 24 * 3600.0  # a drop entry the runner may not read is removed after this
COPY_CHUNK = 1024 * 1024


def new_queue_id(now_ns: int | None = None) -> str:
    """13 hex digits of microseconds (sortable by arrival) + 7 random base32 characters."""
    usec = (now_ns if now_ns is not None else time.time_ns()) // 1000
    rand = int.from_bytes(os.urandom(5), "big")
    tail = "".join(_B32[(rand >> (5 * i)) & 31] for i in range(7))
    return f"{usec:013X}"[-13:] + tail


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

    def setup(self, uid: int, gid: int) -> list[str]:
        """Create or repair the system spool for the runner user ``uid``/``gid`` (as root).

        The root folder belongs to root (so the runner user cannot swap a subfolder for a
        link that root would then write through); the subfolders and the agent lock belong
        to the runner user; ``incoming/`` is the drop folder. Returns what was changed.
        """
        changes: list[str] = []
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.root)), mode=0o755, exist_ok=True)
            changes += _make_dir(self.root, 0, 0, 0o711)
            for name in SUBDIRS:
                changes += _make_dir(os.path.join(self.root, name), uid, gid, 0o700)
            changes += _make_dir(self.incoming, uid, gid, INCOMING_MODE)
            lock = os.path.join(self.root, "agent.lock")
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
            changes += _make_public_file(os.path.join(self.root, LISTENER_SIZE), uid, gid)
            # Entries a root process left behind before the runner user existed.
            for name in SUBDIRS:
                changes += _give_files(os.path.join(self.root, name), uid, gid)
        except OSError as exc:
            raise from_oserror(exc, "setting up the spool") from None
        self._owner = None
        return changes

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
            if st.st_nlink != 1:
                raise DataError("spool entry has more than one link")
            return LockedEntry(self, qid, fd)
        except BaseException:
            _close(fd)
            raise

    # --- state ---------------------------------------------------------------

    def load_state(self, qid: str) -> State:
        path = os.path.join(self.state_dir, qid)
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return State()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError("state file is a symbolic link") from None
            raise from_oserror(exc, f"reading the state of {qid}") from None
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError("state file is not a regular file")
            raw = f.read(16 * 1024 * 1024)
        return spoolfmt.decode_state(raw)

    def save_state(self, qid: str, state: State) -> None:
        path = os.path.join(self.state_dir, qid)
        tmp = f"{path}.{os.getpid()}.tmp"
        data = spoolfmt.encode_state(state)
        try:
            _unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | _CREATE, 0o600)
            try:
                self.give(fd)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            _fsync_dir(self.state_dir)
        except OSError as exc:
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
        """Someone got through: forget the mark (one stat when there is none)."""
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

    @staticmethod
    def mark_relay(lock_fd: int, reachable: bool) -> None:
        try:
            if reachable:
                if os.fstat(lock_fd).st_size:
                    os.ftruncate(lock_fd, 0)
            else:
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
        """Move an unreadable entry to corrupt/ (a human decides)."""
        try:
            os.rename(self.path(qid), os.path.join(self.corrupt, qid))
            _write_reason(self, os.path.join(self.corrupt, qid + ".reason"), reason)
        except OSError:
            pass

    # --- the drop folder (runner side) --------------------------------------------

    def clean_incoming(self, now: float | None = None) -> int:
        """Remove what is not an entry from ``incoming/``: abandoned temp files, links,
        FIFOs, sockets, stray names. Entries (queue-id names) are left to ``pickup``."""
        removed = 0
        cutoff = (time.time() if now is None else now) - STALE_TEMP
        for name in _listdir(self.incoming):
            if spoolfmt.valid_id(name):
                continue
            path = os.path.join(self.incoming, name)
            if spoolfmt.is_temp_name(name):
                if _remove_if_abandoned(path, cutoff, hostile=True):
                    removed += 1
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(path)
                    removed += 1
                except OSError:
                    pass
            elif _unlink(path):
                removed += 1
        return removed

    def pickup(
        self, max_size: int, max_recipients: int, per_user: int = PICKUP_PER_USER
    ) -> list[Pickup]:
        """Move complete, unlocked entries from ``incoming/`` into ``queue/``, at most
        ``per_user`` of each owner's (a fair share: see PICKUP_PER_USER).

        Each is validated and copied (never renamed: its owner could still write to it),
        with the owner's uid and a fresh envelope; the copy is made durable before the
        original goes. Returns one ``Pickup`` per name looked at (for the log).
        """
        if not self.has_incoming():
            return []
        try:
            names = sorted(n for n in os.listdir(self.incoming) if spoolfmt.valid_id(n))
        except OSError as exc:
            raise from_oserror(exc, "listing the drop folder") from None
        names = self._fair_share(names, per_user)
        results: list[Pickup] = []
        for start in range(0, len(names), PICKUP_BATCH):
            batch: list[Pickup] = []
            try:
                for name in names[start : start + PICKUP_BATCH]:
                    batch.append(self._take(name, max_size, max_recipients))
            except MailshimError:
                for p in batch:
                    if p.status == "picked":
                        p.abandon()
                raise
            taken = [p for p in batch if p.status == "picked"]
            if taken:
                try:
                    _fsync_dir(self.queue)
                except OSError as exc:
                    for p in taken:
                        p.abandon()
                    raise from_oserror(exc, "saving picked-up entries") from None
                for p in taken:
                    p.finish()
                try:
                    _fsync_dir(self.incoming)
                except OSError:
                    pass
            results += batch
        return results

    def _fair_share(self, names: list[str], per_user: int) -> list[str]:
        taken: dict[int, int] = {}
        out = []
        for name in names:
            try:
                owner = os.lstat(os.path.join(self.incoming, name)).st_uid
            except OSError:
                continue
            if taken.get(owner, 0) < per_user:
                taken[owner] = taken.get(owner, 0) + 1
                out.append(name)
        return out

    def _take(self, name: str, max_size: int, max_recipients: int) -> Pickup:
        path = os.path.join(self.incoming, name)
        pick = Pickup(self, name)
        try:
            before = os.lstat(path)
        except OSError:
            return pick.set("gone")
        if not stat.S_ISREG(before.st_mode):
            return pick.reject(before, "not a regular file")
        if before.st_nlink != 1:
            return pick.reject(before, "a file with more than one link")
        limit = max_size + max_recipients * spoolfmt.MAX_RECORD + 65536
        if before.st_size > limit:
            return pick.reject(before, f"{before.st_size} bytes is over the limit")
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return pick.set("gone")
        except PermissionError:
            if time.time() - before.st_ctime > UNREADABLE_GRACE:
                return pick.reject(before, "unreadable by the runner for a day")
            return pick.set("busy", "unreadable by the runner (mode or group changed?)")
        except OSError as exc:
            return pick.set("busy", os.strerror(exc.errno or 0))
        pick.src_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pick.close()
            return pick.set("busy", "locked by its writer or its owner's agent")
        st = os.fstat(fd)
        pick.src = st
        try:
            again = os.lstat(path)
        except OSError:
            pick.close()
            return pick.set("gone")
        if not (_same(st, before) and _same(again, st)):
            pick.close()
            return pick.set("busy", "replaced while being looked at")
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > limit:
            pick.close()
            return pick.reject(st, "changed into something that is not an entry")
        try:
            self._copy(pick, fd, st, max_size, max_recipients)
        except DataError as exc:
            pick.close()
            return pick.corrupt(exc.message)
        except MailshimError:
            pick.close()
            raise
        return pick

    def _copy(
        self, pick: Pickup, fd: int, st: os.stat_result, max_size: int, max_recipients: int
    ) -> None:
        with open(os.dup(fd), "rb") as src:
            env, offset = spoolfmt.decode_envelope(src)
            if env.queue_id != pick.name:
                raise DataError(f"entry named {pick.name} claims to be {env.queue_id}")
            if len(env.recipients) > max_recipients:
                raise DataError(f"{len(env.recipients)} recipients is over the limit")
            if st.st_size - offset != env.size:
                raise DataError(f"message is {st.st_size - offset} bytes, envelope says {env.size}")
            if env.size > max_size:
                raise DataError(f"message of {env.size} bytes is over the limit")
            _check_addresses(env)
            qid = env.queue_id
            if os.path.lexists(os.path.join(self.queue, qid)):
                if _already_picked(self, qid, env, st.st_uid):
                    pick.duplicate = True
                    pick.queue_id = qid
                    pick.uid = st.st_uid
                    pick.status = "picked"
                    return
                qid = new_queue_id()
            # The submitter is whoever owns the file; a forged uid record changes nothing.
            # An arrival time in the future would postpone expiry: it is clamped to now.
            arrival = min(env.arrival, int(time.time()))
            writer = EntryWriter(
                self, Envelope(qid, env.sender, env.recipients, arrival, st.st_uid), drop=False
            )
            try:
                ends = spoolfmt.LineEnds()
                copied = 0
                eightbit = False
                while copied <= env.size:
                    chunk = src.read(min(COPY_CHUNK, env.size + 1 - copied))
                    if not chunk:
                        break
                    copied += len(chunk)
                    out = ends.feed(chunk)
                    eightbit = eightbit or not out.isascii()
                    writer.write(out)
                if copied != env.size:
                    raise DataError("the entry changed while it was being copied")
                writer.write(ends.end())
                pick.copy = writer.commit(eightbit, keep_lock=True, sync_dir=False)
            except BaseException:
                writer.abort()
                raise
        pick.queue_id = qid
        pick.uid = st.st_uid
        pick.status = "picked"


def _check_addresses(env: Envelope) -> None:
    """Only what ``sendmail`` itself would spool passes: canonical, qualified addresses (the
    boundary checks again what the front end checked, STYLE.md)."""
    from mailshim import address  # pure; only runners pay for it here

    for what, addr in [("sender", env.sender), *(("recipient", r) for r in env.recipients)]:
        try:
            canon = address.check_envelope_address(addr)
        except DataError as exc:
            raise DataError(f"{what}: {exc.message}") from None
        if canon != addr or (addr and "@" not in addr) or (what == "recipient" and not addr):
            shown = addr.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            raise DataError(f"{what} {shown[:80]!r} is not a canonical, qualified address")


def _already_picked(target: Spool, qid: str, env: Envelope, uid: int) -> bool:
    """queue/<qid> is this very entry, copied by a runner that died before removing it."""
    try:
        have = target.read_envelope(qid)
    except (DataError, OSError):
        return False
    return (have.uid, have.sender, have.recipients) == (uid, env.sender, env.recipients)


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
    finally:
        os.close(fd)
    return made


def _give_files(folder: str, uid: int, gid: int) -> list[str]:
    """Give root-owned plain files in ``folder`` to the runner user. Files with more than one
    link are left alone: chowning a planted hard link would hand over its other name too."""
    changed = []
    for name in _listdir(folder):
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == 0 and uid != 0:
                os.lchown(path, uid, gid)
                changed.append(f"{path}: owner {uid}:{gid}")
        except OSError:
            continue
    return changed


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


class Pickup:
    """What became of one name in ``incoming/``: picked, busy, gone, rejected or corrupt."""

    __slots__ = (
        "copy",
        "duplicate",
        "name",
        "queue_id",
        "reason",
        "spool",
        "src",
        "src_fd",
        "status",
        "uid",
    )

    def __init__(self, spool: Spool, name: str) -> None:
        self.spool = spool
        self.name = name
        self.status = ""
        self.reason = ""
        self.queue_id = ""
        self.uid = -1
        self.duplicate = False
        self.src_fd = -1
        self.src: os.stat_result | None = None
        self.copy: LockedEntry | DropEntry | None = None

    def __repr__(self) -> str:
        return f"Pickup({self.name}, {self.status}, {self.queue_id}, {self.reason!r})"

    def set(self, status: str, reason: str = "") -> Pickup:
        self.status = status
        self.reason = reason
        return self

    def close(self) -> None:
        if self.src_fd >= 0:
            _close(self.src_fd)
            self.src_fd = -1

    def reject(self, st: os.stat_result, reason: str) -> Pickup:
        """Not an entry at all: the name goes (unlinking a link never touches its target)."""
        self.uid = st.st_uid
        path = os.path.join(self.spool.incoming, self.name)
        try:
            now = os.lstat(path)
            if _same(now, st):
                if stat.S_ISDIR(now.st_mode):
                    os.rmdir(path)  # an empty one; a full one is its owner's clutter
                else:
                    os.unlink(path)
        except OSError:
            pass
        return self.set("rejected", reason)

    def corrupt(self, reason: str) -> Pickup:
        """A plain file that is not a valid entry: kept in corrupt/ for a human."""
        src = os.path.join(self.spool.incoming, self.name)
        dst = os.path.join(self.spool.corrupt, f"incoming.{self.name}")
        try:
            st = os.lstat(src)
            self.uid = st.st_uid
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.rename(src, dst)
                why = f"from incoming/ (uid {st.st_uid}): {reason}"
                _write_reason(self.spool, dst + ".reason", why)
        except OSError:
            _unlink(src)
        return self.set("corrupt", reason)

    def finish(self) -> None:
        """The copy is durable: remove the original (if it is still the file we read)."""
        path = os.path.join(self.spool.incoming, self.name)
        try:
            now = os.lstat(path)
            if self.src is not None and _same(now, self.src):
                os.unlink(path)
        except OSError:
            pass
        self.close()
        if self.copy is not None:
            self.copy.release()
            self.copy = None

    def abandon(self) -> None:
        """The copy could not be made durable: drop it, keep the original."""
        if isinstance(self.copy, LockedEntry) and not self.duplicate:
            _unlink(os.path.join(self.spool.queue, self.queue_id))
        if self.copy is not None:
            self.copy.release()
            self.copy = None
        self.close()
        self.status = "busy"


class EntryWriter:
    """A new entry being written; ``commit()`` makes it durable and visible.

    In the drop folder the temp file is ``incoming/.<id>.tmp`` (mode 0640, group of the
    folder: the runner reads it through the group); elsewhere it is ``tmp/<id>``.
    """

    def __init__(self, spool: Spool, envelope: Envelope, drop: bool = False) -> None:
        self.spool = spool
        self.queue_id = envelope.queue_id
        self.envelope = envelope
        self.drop = drop
        self._enc = spoolfmt.encode_envelope(envelope)
        if drop:
            self.tmp_path = os.path.join(spool.incoming, spoolfmt.temp_name(self.queue_id))
            self.final_path = os.path.join(spool.incoming, self.queue_id)
        else:
            self.tmp_path = os.path.join(spool.tmp, self.queue_id)
            self.final_path = os.path.join(spool.queue, self.queue_id)
        self.size = 0
        self.eightbit = False
        self._done = False
        self.fd = -1
        try:
            self.fd = os.open(self.tmp_path, os.O_RDWR | _CREATE, 0o600)
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
            os.rename(self.tmp_path, self.final_path)
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
        _unlink(self.tmp_path)
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1


class _Held:
    """An entry file whose flock this process holds; the envelope is read from the fd."""

    def __init__(self, spool: Spool, qid: str, fd: int) -> None:
        self.spool = spool
        self.queue_id = qid
        self.fd = fd
        self._envelope: Envelope | None = None
        self._offset = 0

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
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
        f = open(os.dup(self.fd), "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self._offset)
        total = os.fstat(self.fd).st_size - self._offset
        if total != env.size:
            f.close()
            raise DataError(
                f"entry {self.queue_id}: message is {total} bytes, envelope says {env.size}"
            )
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

    def state(self) -> State:
        return self.spool.load_state(self.queue_id)

    def save_state(self, state: State) -> None:
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
        _unlink(os.path.join(self.spool.state_dir, self.queue_id))
        self.release()

    def bury(self, folder: str, reason: str) -> str:
        """Move to dead/ (or corrupt/) with the reason and last state; returns the new path."""
        target_dir = self.spool.dead if folder == "dead" else self.spool.corrupt
        target = os.path.join(target_dir, self.queue_id)
        try:
            if not os.path.isdir(target_dir):
                os.makedirs(target_dir, mode=0o700, exist_ok=True)
            os.rename(os.path.join(self.spool.queue, self.queue_id), target)
            _write_reason(self.spool, target + ".reason", reason)
            state_path = os.path.join(self.spool.state_dir, self.queue_id)
            if os.path.lexists(state_path):
                os.rename(state_path, target + ".state")
            _fsync_dir(target_dir)
            _fsync_dir(self.spool.queue)
        except OSError as exc:
            raise from_oserror(exc, f"moving entry {self.queue_id} to {folder}/") from None
        finally:
            self.release()
        return target


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

    def rewrite(self, recipients: list[str]) -> None:
        """Atomically replace the entry by one for ``recipients`` only (same id, same arrival)."""
        env = self.envelope
        if not self.still_here():
            self.release()
            return
        _unlink(os.path.join(self.spool.incoming, spoolfmt.temp_name(self.queue_id)))
        writer = EntryWriter(
            self.spool,
            Envelope(self.queue_id, env.sender, list(recipients), env.arrival, env.uid),
            drop=True,
        )
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
        path = os.path.join(self.spool.incoming, f".{self.queue_id}.poke")
        try:
            os.close(os.open(path, os.O_WRONLY | _CREATE, 0o600))
            os.unlink(path)
        except OSError:
            pass


def open_drop_entry(spool: Spool, qid: str, fd: int) -> DropEntry:
    """Adopt a locked drop-folder entry handed over as an open fd (the agent's side)."""
    if not spoolfmt.valid_id(qid):
        raise DataError(f"not a queue id: {qid[:40]!r}")
    return DropEntry(spool, qid, fd)


def user_agent_slot() -> int | None:
    """An fd holding this user's drop-folder agent slot, or None when one of their agents
    already runs or they have no state folder of their own (their mail then waits for
    the runner, which the drop folder wakes)."""
    folder = paths.user_state_dir()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(
            os.path.join(folder, "drop-agent.lock"),
            os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC,
            0o600,
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


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


def log_pickups(results: list[Pickup], log: Callable[[str, bool], None]) -> None:
    """One log line per picked-up or refused drop-folder entry."""
    for p in results:
        if p.status == "picked":
            if p.duplicate:
                log(f"{p.queue_id}: incoming copy already in the queue; removed", False)
            elif p.queue_id != p.name:
                log(f"{p.queue_id}: uid={p.uid} picked up from incoming/{p.name}", False)
            else:
                log(f"{p.queue_id}: uid={p.uid} picked up from incoming/", False)
        elif p.status in ("rejected", "corrupt"):
            log(f"incoming/{p.name}: uid={p.uid} refused ({p.status}): {p.reason}", True)
