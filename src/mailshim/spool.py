"""The queue API (``Spool``): folders, enqueue, list, lock, state, housekeeping, spool-wide marks.

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

The spool-wide marks live in ``agent.lock`` (listener down: non-empty; the agent: its flock)
and ``listener-size``. The entries themselves (writing, holding, burying) are
``spoolentry``'s, which with this module are the only writers of queue files; the file-system
primitives are ``spoolfs``'s; which spool a submission uses is ``spoolchoice``'s.

Trust: runs as the submitting user (their own spool, or their entries in the drop folder of
the system spool), as root, and as the runner (root or the ``mailshim`` user). Files this
module creates use O_EXCL under names with 60 random bits (a fresh name on EEXIST) and never
O_TRUNC, so a planted or stale file cannot make a create fail or a privileged process
truncate or write something else; nothing in ``queue/``, ``dead/`` or ``corrupt/`` is ever
replaced; the only rename over a name is ``state/<id>``, by the holder of the entry's lock.
An entry is locked only when it is a plain file with one link, still under its name. The
listener's size counts only from a file of the spool's owner or root. Root gives what it
creates to the spool's owner.

Raises: ``CantCreateError`` (73) when a folder is not one or cannot be written; ``DataError``
(65) for an entry or state that cannot be read (the caller moves it to ``corrupt/``); other
``OSError``s as their sysexits code (``errors.from_oserror``: 75 full or over quota, 73
read-only or missing, 77 denied, 74 otherwise).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from mailshim import spoolfmt, spoolindex
from mailshim.errors import CantCreateError, DataError, MailshimError, from_oserror
from mailshim.spoolentry import (
    EntryWriter,
    LockedEntry,
    move_no_replace,
    new_drop_id,
    new_queue_id,
)
from mailshim.spoolfmt import Envelope, State
from mailshim.spoolfs import (
    _FOLDER,
    _READ,
    _close,
    _create_temp,
    _fsync_dir,
    _listdir,
    _make_dirs,
    _may_write,
    _remove_if_abandoned,
    _same,
    _unlink,
)
from mailshim.spoolmarks import MARK_RECHECK, SpoolMarks

SUBDIRS = ("tmp", "queue", "state", "dead", "corrupt")
INCOMING_MODE = 0o3733  # setgid + sticky; owner rwx, group and others may only create
STATE_LIMIT = 16 * 1024 * 1024  # bytes of a state file read at most
HEAD_READ = 64 * 1024  # bytes of an entry read at once for its envelope
SYNC_INTERVAL = 0.2  # seconds: removals of delivered entries are made durable in batches


def requeued_state(old: State | None, now: float) -> State:
    """The state of a dead letter put back in the queue: a fresh schedule, the lifetime
    counted from ``now``, the recipients already delivered still delivered."""
    state = State()
    if old is not None:
        state.done = dict(old.done)
    state.requeued = int(now)
    return state


class Spool(SpoolMarks):
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
        """Create missing folders (mode 0700: entries are private to the spool's owner), each
        made durable in its parent before any entry is written into it."""
        try:
            _make_dirs(self.root, 0o700)
            made = False
            own = self._runner_account() if os.geteuid() == 0 else None
            for name in SUBDIRS:
                path = os.path.join(self.root, name)
                try:
                    os.mkdir(path, 0o700)
                    made = True
                except FileExistsError:
                    st = os.lstat(path)
                    if not stat.S_ISDIR(st.st_mode):
                        raise CantCreateError(f"spool folder {path} is not a folder") from None
                    continue
                if own is not None:
                    # Root completing the system spool: the folder is the runner user's, as
                    # setup-spool makes it, or that user could no longer write it.
                    fd = os.open(path, _FOLDER)
                    try:
                        os.fchown(fd, own[0], own[1])
                    finally:
                        os.close(fd)
            if made:
                self._owner = None
                # their names, or the first entry fsynced into queue/ could vanish with it
                _fsync_dir(self.root)
        except OSError as exc:
            raise from_oserror(exc, "creating the spool folder") from None

    def _runner_account(self) -> tuple[int, int] | None:
        """The (uid, gid) of the account a spool's existing folders belong to, when that is
        not root (the system spool's runner user); None otherwise."""
        for name in (*SUBDIRS, "incoming"):
            try:
                st = os.lstat(os.path.join(self.root, name))
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid != 0:
                return st.st_uid, st.st_gid
        return None

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
        """Raise the right error when entries cannot be recorded here (read-only, denied).

        A spool whose creation a crash cut short (``queue/`` made, ``state/`` not: a
        submission fills such a spool without looking) is completed when this process may
        write its root, rather than refusing every run until someone notices (issue 27)."""
        folders = (self.queue, self.state_dir, self.tmp)
        if not all(map(os.path.lexists, folders)) and os.access(self.root, os.W_OK | os.X_OK):
            self.ensure()
        for folder in folders:
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
        # A drop id is also the secret name of its submitter's view (ownview.py).
        qid = queue_id or (new_drop_id() if self.drop else new_queue_id())
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
        return self.queue + "/" + qid  # os.path.join's result (queue/ has no trailing /)

    def exists(self, qid: str) -> bool:
        return os.path.lexists(self.path(qid))

    def read_envelope(self, qid: str) -> Envelope:
        """The envelope of an entry, without locking it (for listings).

        One read of ``HEAD_READ`` bytes holds nearly every envelope: no file object, which
        costs more than the read (a listing of 100,000 does this 100,000 times)."""
        fd = os.open(self.path(qid), _READ)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError("spool entry is not a regular file")
            head = os.read(fd, HEAD_READ)
            if len(head) < HEAD_READ or b"\n\n" in head:
                env = spoolfmt.decode_envelope_head(head)
            else:  # thousands of recipients: read on from the file
                with open(fd, "rb", closefd=False) as f:
                    f.seek(0)
                    env, _ = spoolfmt.decode_envelope(f)
        finally:
            os.close(fd)
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
            if st.st_nlink == 2 and (
                self._drop_temp_twin(qid, st) or self._finish_requeue(qid, st)
            ):
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

    def _finish_requeue(self, qid: str, st: os.stat_result) -> bool:
        """A requeue (``deadletters.requeue``) stopped between linking ``dead/<id>`` into
        queue/ and removing it from dead/ (we hold the lock, so it is gone): finish it, rather
        than send an acknowledged message to corrupt/ for its second link. Its state is made
        from ``dead/<id>.state`` first when the requeue had not written it, so that delivered
        recipients stay delivered."""
        dead = os.path.join(self.dead, qid)
        try:
            if not _same(os.lstat(dead), st):
                return False
            if not os.path.lexists(os.path.join(self.state_dir, qid)):
                self.save_state(qid, requeued_state(self.dead_state(qid), time.time()))
        except (OSError, MailshimError):
            return False
        for name in (f"{qid}.reason", f"{qid}.state", qid):  # the entry's own name last
            _unlink(os.path.join(self.dead, name))
        try:
            _fsync_dir(self.dead)
        except OSError:
            pass
        return True

    def dead_state(self, qid: str) -> State | None:
        """The last state kept beside a dead letter (``dead/<id>.state``), None when there is
        none or it cannot be read. The runner account owns dead/: never a link or a FIFO."""
        try:
            fd = os.open(os.path.join(self.dead, f"{qid}.state"), _READ)
        except OSError:
            return None
        try:
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                return spoolfmt.decode_state(f.read(1024 * 1024))
        except (OSError, DataError):
            return None

    # --- state ---------------------------------------------------------------

    def load_state(self, qid: str) -> State:
        return self.stored_state(qid) or State()

    def stored_state(self, qid: str) -> State | None:
        """The entry's state file; None when it has none (never tried, or all was fresh)."""
        path = self.state_dir + "/" + qid  # a listing does this 100,000 times
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError("state file is a symbolic link") from None
            raise from_oserror(exc, f"reading the state of {qid}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DataError("state file is not a regular file")
            # Reads sized by the file, not a 16 MB request (which costs an allocation each:
            # a listing reads every state); the cap stays for a file that grows meanwhile.
            chunks, left = [], STATE_LIMIT
            while left > 0:
                want = min(left, max(st.st_size + 1, 4096))
                chunk = os.read(fd, want)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
                if len(chunk) < want:
                    break  # a short read of a plain file is its end: no read for the EOF
            raw = b"".join(chunks)
        finally:
            os.close(fd)
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
        spoolindex.note_state(self, qid, state)

    def wake_relay_waiters(self) -> int:
        """Entries deferred because no relay could be reached (flag ``w`` in the schedule
        index: the state's ``relay_wait``) become due now; returns how many. The one call
        for "a relay takes mail again": only those entries' files are opened."""

        def now_due(qid: str) -> bool:
            try:
                locked = self.lock(qid)
            except MailshimError:
                return False  # unreadable: the next pass quarantines it
            if locked is None:
                return False
            try:
                state = locked.state()
                state.next_attempt = 0
                if hasattr(state, "relay_wait"):
                    setattr(state, "relay_wait", False)  # noqa: B010 - a newer State's field
                locked.save_state(state)
            finally:
                locked.release()
            return True

        return spoolindex.make_due(self, lambda row: "w" in row[4], now_due)

    # --- housekeeping ----------------------------------------------------------

    def clean_tmp(self, older_than: float = 60.0, states: bool = True) -> int:
        """Remove temp files whose writer is gone (nobody holds their lock); with ``states``,
        also state files whose entry is gone (a look at every name in ``state/``: runners
        ask for it once per ``spoolindex.SWEEP_EVERY``, not at every pass)."""
        removed = 0
        cutoff = time.time() - older_than
        for name in _listdir(self.tmp):
            if _remove_if_abandoned(os.path.join(self.tmp, name), cutoff):
                removed += 1
        if not states:
            return removed
        # A state whose entry is gone is a crash's leftover, but pickup writes the state of
        # its copy before linking it into queue/ (a crash then leaves no copy without its
        # refusals): a state whose entry is still in tmp/ is being written. States are listed
        # first, tmp/ then, queue/ last: a writer's temp file exists from before its state
        # until after its link, so each state is found in one or the other.
        names = _listdir(self.state_dir)
        writing = {name.split(".", 1)[0] for name in _listdir(self.tmp)}
        for name in names:
            path = os.path.join(self.state_dir, name)
            if spoolfmt.valid_id(name):
                if name in writing:
                    continue
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
        spoolindex.note_gone(self, qid)
