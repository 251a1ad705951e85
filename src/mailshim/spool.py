"""The only module that touches the spool folder: enqueue, list, lock, state, remove, bury.

Layout under the spool root::

    tmp/      entries being written (each held under flock by its writer)
    queue/    complete entries, named by queue id; never modified after the rename
    state/    per-entry state (attempts, next try, per-recipient results), replaced atomically
    dead/     entries that failed permanently or expired, with a .reason file
    corrupt/  entries that could not be read, kept for a human
    agent.lock  held by the one delivery agent working on this spool

Durability: an entry is written to ``tmp/``, fsynced, renamed into ``queue/`` and the folder
is fsynced before anyone is told it is safe. Exclusion: whoever delivers an entry holds an
flock on its file, so two agents or runners never send one message twice.

Trust: runs as the submitting user (its own spool, or root's) and as the runner. Names found
in the folders are checked against the queue-id alphabet before use, files are opened with
O_NOFOLLOW, and a lock is only trusted after checking that the locked file is still the one
at that name.
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
    from typing import BinaryIO

    from mailshim.config import Config

SUBDIRS = ("tmp", "queue", "state", "dead", "corrupt")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


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


class Spool:
    """One spool folder."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.tmp = os.path.join(root, "tmp")
        self.queue = os.path.join(root, "queue")
        self.state_dir = os.path.join(root, "state")
        self.dead = os.path.join(root, "dead")
        self.corrupt = os.path.join(root, "corrupt")

    def __repr__(self) -> str:
        return f"Spool({self.root!r})"

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

    def writable(self) -> bool:
        return all(
            os.access(os.path.join(self.root, d), os.W_OK | os.X_OK) for d in ("tmp", "queue")
        )

    # --- writing -------------------------------------------------------------

    def new_entry(self, sender: str, recipients: list[str], uid: int) -> EntryWriter:
        return EntryWriter(self, sender, recipients, uid)

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

    def read_envelope(self, qid: str) -> Envelope:
        """The envelope of an entry, without locking it (for listings)."""
        fd = os.open(self.path(qid), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
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
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
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
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev) or st.st_nlink == 0:
                os.close(fd)
                return None
            if not stat.S_ISREG(st.st_mode):
                raise DataError("spool entry is not a regular file")
            return LockedEntry(self, qid, fd)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise

    # --- state ---------------------------------------------------------------

    def load_state(self, qid: str) -> State:
        path = os.path.join(self.state_dir, qid)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return State()
        with open(fd, "rb") as f:
            raw = f.read(16 * 1024 * 1024)
        return spoolfmt.decode_state(raw)

    def save_state(self, qid: str, state: State) -> None:
        path = os.path.join(self.state_dir, qid)
        tmp = f"{path}.{os.getpid()}.tmp"
        data = spoolfmt.encode_state(state)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            _fsync_dir(self.state_dir)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise from_oserror(exc, "saving the state of an entry") from None

    # --- the agent lock --------------------------------------------------------

    def try_agent_lock(self) -> int | None:
        """An fd holding the spool's agent lock, or None when an agent already runs."""
        path = os.path.join(self.root, "agent.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # --- housekeeping ----------------------------------------------------------

    def clean_tmp(self, older_than: float = 60.0) -> int:
        """Remove temp files whose writer is gone (nobody holds their lock)."""
        removed = 0
        try:
            names = os.listdir(self.tmp)
        except OSError:
            return 0
        cutoff = time.time() - older_than
        for name in names:
            path = os.path.join(self.tmp, name)
            try:
                st = os.lstat(path)
                if st.st_mtime > cutoff:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    os.unlink(path)
                    removed += 1
                    continue
                fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(path)
                removed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        for name in _listdir(self.state_dir):
            if spoolfmt.valid_id(name) and not os.path.exists(os.path.join(self.queue, name)):
                try:
                    os.unlink(os.path.join(self.state_dir, name))
                except OSError:
                    pass
        return removed

    def quarantine(self, qid: str, reason: str) -> None:
        """Move an unreadable entry to corrupt/ (a human decides)."""
        try:
            os.rename(self.path(qid), os.path.join(self.corrupt, qid))
            _write_reason(os.path.join(self.corrupt, qid + ".reason"), reason)
        except OSError:
            pass


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _write_reason(path: str, reason: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        os.write(fd, reason.encode("utf-8", "replace") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


class EntryWriter:
    """A new entry being written to tmp/; ``commit()`` makes it durable and visible."""

    def __init__(self, spool: Spool, sender: str, recipients: list[str], uid: int) -> None:
        self.spool = spool
        self.queue_id = new_queue_id()
        self.envelope = Envelope(self.queue_id, sender, recipients, int(time.time()), uid)
        self._enc = spoolfmt.encode_envelope(self.envelope)
        self.tmp_path = os.path.join(spool.tmp, self.queue_id)
        self.size = 0
        self.eightbit = False
        self._done = False
        try:
            self.fd = os.open(
                self.tmp_path,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise from_oserror(exc, "creating the spool entry") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._file = open(self.fd, "wb", buffering=256 * 1024, closefd=False)
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

    def commit(self, eightbit: bool, keep_lock: bool = False) -> LockedEntry | None:
        """fsync, rename into queue/, fsync the folder. Returns the still-locked entry when
        ``keep_lock`` (the caller delivers it now), else closes it."""
        self.eightbit = eightbit
        self.envelope.eightbit = eightbit
        self.envelope.size = self.size
        try:
            self._file.flush()
            digits, body = spoolfmt.patch_size_and_body(self.size, eightbit)
            os.pwrite(self.fd, digits, self._enc.size_offset)
            os.pwrite(self.fd, body, spoolfmt.body_type_offset(self._enc.size_offset))
            os.fsync(self.fd)
            final = os.path.join(self.spool.queue, self.queue_id)
            os.rename(self.tmp_path, final)
            self._done = True
            _fsync_dir(self.spool.queue)
        except OSError as exc:
            if not self._done:
                self.abort()
            raise from_oserror(exc, "committing the spool entry") from None
        self._file.close()
        if keep_lock:
            return LockedEntry(self.spool, self.queue_id, self.fd)
        os.close(self.fd)
        return None

    def abort(self) -> None:
        """Remove the half-written entry: nothing is sent, nothing is kept."""
        if self._done:
            return
        self._done = True
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


class LockedEntry:
    """An entry in queue/ whose flock this process holds."""

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
        f = open(os.dup(self.fd), "rb")
        f.seek(self._offset)
        total = os.fstat(self.fd).st_size - self._offset
        if total != env.size:
            f.close()
            raise DataError(f"entry {self.queue_id}: message is {total} bytes, envelope says {env.size}")
        return f

    def state(self) -> State:
        return self.spool.load_state(self.queue_id)

    def save_state(self, state: State) -> None:
        self.spool.save_state(self.queue_id, state)

    def remove(self) -> None:
        """Delivered: forget it. The entry goes first, so a crash leaves at worst a stray state."""
        try:
            os.unlink(os.path.join(self.spool.queue, self.queue_id))
            _fsync_dir(self.spool.queue)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise from_oserror(exc, "removing a delivered entry") from None
        try:
            os.unlink(os.path.join(self.spool.state_dir, self.queue_id))
        except OSError:
            pass
        self.release()

    def bury(self, folder: str, reason: str) -> str:
        """Move to dead/ (or corrupt/) with the reason and last state; returns the new path."""
        target_dir = self.spool.dead if folder == "dead" else self.spool.corrupt
        target = os.path.join(target_dir, self.queue_id)
        try:
            os.makedirs(target_dir, mode=0o700, exist_ok=True)
            os.rename(os.path.join(self.spool.queue, self.queue_id), target)
            _write_reason(target + ".reason", reason)
            state_path = os.path.join(self.spool.state_dir, self.queue_id)
            if os.path.exists(state_path):
                os.rename(state_path, target + ".state")
            _fsync_dir(target_dir)
            _fsync_dir(self.spool.queue)
        except OSError as exc:
            raise from_oserror(exc, f"moving entry {self.queue_id} to {folder}/") from None
        finally:
            self.release()
        return target

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


def choose(config: Config, create: bool = True) -> Spool:
    """The spool a submission writes to: the configured or system spool when this user can
    write it, else a per-user spool under the XDG state folder."""
    root = config.queue_dir or paths.SYSTEM_SPOOL
    spool = Spool(root)
    if spool.writable():
        return spool
    if os.geteuid() == 0 or config.queue_dir is not None:
        try:
            if create:
                spool.ensure()
            if spool.writable():
                return spool
        except MailshimError:
            if os.geteuid() == 0:
                raise
    user = Spool(paths.user_spool_dir())
    if create and not user.writable():
        user.ensure()
    return user


def known_spools(config: Config) -> list[Spool]:
    """Spools this user can read: the configured/system one and the per-user one."""
    out = []
    for root in (config.queue_dir or paths.SYSTEM_SPOOL, paths.user_spool_dir()):
        spool = Spool(root)
        if os.access(spool.queue, os.R_OK | os.X_OK) and all(s.root != root for s in out):
            out.append(spool)
    return out
