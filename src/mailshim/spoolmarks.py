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

from mailshim import spoolfmt
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
    _O_CLOEXEC,
    _O_NOFOLLOW,
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

SUBDIRS = ("tmp", "queue", "state", "dead", "corrupt")
LISTENER_SIZE = "listener-size"
HELD_NOTICE = ".held."  # incoming/.held.<uid>: why that user's mail waits there
INCOMING_MODE = 0o3733  # setgid + sticky; owner rwx, group and others may only create
SYNC_INTERVAL = 0.2  # seconds: removals of delivered entries are made durable in batches
MARK_RECHECK = 1.0  # seconds: how long a cleared "listener unreachable" mark is trusted


def requeued_state(old: State | None, now: float) -> State:
    """The state of a dead letter put back in the queue: a fresh schedule, the lifetime
    counted from ``now``, the recipients already delivered still delivered."""
    state = State()
    if old is not None:
        state.done = dict(old.done)
    state.requeued = int(now)
    return state


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

    def mark_relay_down(self) -> None:
        """A pass found every relay unreachable: leave the mark the agent leaves (without
        holding the agent lock: a run, a flush, the daemon), so that listings show what
        waits for the listener and a burst of submissions pokes nobody. Only a plain file
        of one link is written; best effort."""
        self._mark_clear_at = -MARK_RECHECK
        path = os.path.join(self.root, "agent.lock")
        # Made here only by the spool's owner: one root made in the runner's spool would shut
        # the runner out of its lock (setup-spool makes the system spool's).
        own = self.owner()
        make = os.O_CREAT if own is not None and own[0] == os.geteuid() else 0
        try:
            fd = os.open(path, os.O_WRONLY | make | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.pwrite(fd, b"relay down\n", 0)
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

    # --- a user held out of the queue ---------------------------------------------------
    # Pickup leaves a user's entries in incoming/ while they are over their spool budget;
    # it says why in ``incoming/.held.<uid>`` (the runner's, 0644: the user may open the
    # name, not list the folder), and the user's next ``sendmail`` tells them.

    def held_notice(self, uid: int) -> str:
        """Why ``uid``'s mail waits in the drop folder, as the runner last wrote; "" when
        it does not (a file of another owner than the drop folder's is not believed)."""
        path = os.path.join(self.incoming, f"{HELD_NOTICE}{uid}")
        try:
            fd = os.open(path, _READ)
        except OSError:
            return ""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.lstat(self.incoming).st_uid:
                return ""
            raw = os.read(fd, 1024)
        except OSError:
            return ""
        finally:
            os.close(fd)
        return raw.decode("utf-8", "replace").strip().splitlines()[0] if raw.strip() else ""

    def notice_owner(self) -> int | None:
        """Whose ``incoming/.held.<uid>`` notices are believed: the drop folder's owner."""
        try:
            return os.lstat(self.incoming).st_uid
        except OSError:
            return None

    def set_held_notice(self, uid: int, reason: str) -> None:
        """Record (``reason``) or clear ("") why ``uid``'s mail cannot enter the queue (the
        runner; best effort). A name a user planted there is removed first. Root's notice
        goes to the drop folder's owner (only what it creates here), since only a notice of
        that owner is believed (``held_notice``): a root pickup must tell the user too."""
        path = os.path.join(self.incoming, f"{HELD_NOTICE}{uid}")
        data = reason.encode("utf-8", "replace") + b"\n"
        owner = self.notice_owner()
        if owner is None:
            return
        try:
            st = os.lstat(path)
            if not reason or st.st_uid != owner or not stat.S_ISREG(st.st_mode):
                _unlink(path)
            elif self.held_notice(uid) == reason:
                return
        except OSError:
            pass
        if not reason:
            return
        flags = os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                made = True
            except FileExistsError:
                fd = os.open(path, flags)
                made = False
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if made and st.st_uid != owner and os.geteuid() == 0:
                os.fchown(fd, owner, -1)
                st = os.fstat(fd)
            if st.st_uid == owner and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.fchmod(fd, 0o644)
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
        # A state whose entry is gone is a crash's leftover, but pickup writes the state of
        # its copy before linking it into queue/ (a crash then leaves no copy without its
        # refusals): a state whose entry is still in tmp/ is being written. States are listed
        # first, tmp/ then, queue/ last: a writer's temp file exists from before its state
        # until after its link, so each state is found in one or the other.
        states = _listdir(self.state_dir)
        writing = {name.split(".", 1)[0] for name in _listdir(self.tmp)}
        for name in states:
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
