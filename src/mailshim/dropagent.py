"""A user's own lingering agent for their deferred entries in a system spool's drop folder.

A user who is neither root nor the spool's owner submits through ``incoming/`` and may not
write ``queue/`` or ``state/``. Their ``sendmail`` starts an agent that tries the entry once
(agent.py); what it could not deliver used to wait for a runner, and where none runs (no
systemd, units not enabled, a container) it waited forever. This agent stays instead: it
retries that user's own entries on the ``[queue] retry`` schedule of a configuration root
controls, keeps per-recipient progress in the entry itself (``DropEntry.rewrite``), and
exits when none of them is left. A runner that appears takes them over without duplicates:
the agent tries an entry only while holding its flock and the runner's pickup skips locked
entries; an entry that has left the drop folder (picked up, or replaced by another user's
file) is forgotten, so the agent leaves at its next step once the runner has them all (a
user cannot see the spool's ``agent.lock`` or ``state/``, so it does not ask whether a
runner serves). Bounces and expiry stay the runner's: an entry past ``[queue] lifetime`` is
logged once and retried on the last step, never dropped; an entry whose recipients are all
refused is left for the runner to bounce.

What the agent serves lives in the user's own state folder (``paths.user_state_dir``),
never in the shared drop folder: ``drop-agent.<spool>.lock`` (held while the agent lives:
one agent per user per spool), ``drop-agent.<spool>.pid`` (a hint for pokes) and
``drop-agent.<spool>.d/<id>`` (one empty file per entry the user's ``sendmail`` handed to
it). ``<spool>`` is the spool's path, escaped. The folder must belong to the user and be
writable by nobody else, so another user can neither take the lock nor plant entries.

Trust: runs as the submitting user. Entries it opens must be regular files the user owns
(another user's file under a remembered name is ignored). The pid file is a hint: a poke is
SIGURG, whose default action is to be ignored. Raises nothing: the start-up helpers return
None when the folder is unusable (the entry then waits for a runner, as before).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from mailshim import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim import spool, spoolentry
    from mailshim.config import Config
    from mailshim.relay import RelayClient

MIN_NAP = 1.0  # never wake more often than this
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_OPEN = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NOCTTY", 0) | os.O_NONBLOCK

# An attempt's outcome, for the schedule.
GONE = "gone"  # taken by a runner, or not this user's: nothing left to do here
DONE = "done"  # delivered or refused for good: the listener took a transaction
BUSY = "busy"  # someone else holds the entry now (a runner moving it, an interactive sendmail)
LATER = "later"  # tried; something is left to retry
DOWN = "down"  # the listener could not be reached


# --- the user's own folder (the sendmail side: cheap, no imports) ----------------------------


def _key(root: str) -> str:
    """The spool's path as one file-name part (one agent per user per spool)."""
    return "".join(c if c.isalnum() or c in "-_" else f"%{ord(c):02x}" for c in root)


def _own_folder() -> str | None:
    """The user's state folder, made if missing, when it is theirs alone; else None."""
    folder = paths.user_state_dir()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return folder


def _name(root: str, suffix: str) -> str | None:
    folder = _own_folder()
    return None if folder is None else os.path.join(folder, f"drop-agent.{_key(root)}{suffix}")


def slot(root: str) -> int | None:
    """An fd holding this user's drop-agent lock for ``root``, or None when their agent
    already runs or they have no state folder of their own."""
    path = _name(root, ".lock")
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
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


def claim(root: str, entry: spoolentry.DropEntry) -> int | None:
    """For the user's new drop entry: the slot's fd when no agent of theirs runs (the caller
    starts one with it and the entry), else None, the entry released and their lingering
    agent poked to adopt it (with no state folder of their own, the runner delivers it)."""
    # Noted before the slot is tried: an agent of this user leaving now looks once more.
    noted = note(root, entry.queue_id)
    fd = slot(root)
    if fd is None:
        entry.release()
        if noted:
            poke(root)
    return fd


def hand_over(root: str, qid: str) -> int | None:
    """For the user's drop entry that ``sendmail -odi``/``-v`` tried just now and left
    deferred: noted as tried (its first retry is one step from now), then the slot's fd when
    no agent of theirs runs (the caller starts one with it), else None, their lingering agent
    poked to adopt it (with no state folder of their own, the runner delivers it)."""
    noted = note(root, qid, tried=True)
    fd = slot(root)
    if fd is None and noted:
        poke(root)
    return fd


def _records(root: str, create: bool) -> str | None:
    path = _name(root, ".d")
    if path is None:
        return None
    try:
        if create:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return path


TRIED = b"tried\n"  # a note's content when the entry was tried at the note's mtime


def note(root: str, qid: str, tried: bool = False) -> bool:
    """Remember ``qid`` as this user's entry for their agent; done before the slot is tried,
    so that an agent leaving at that moment sees it (``linger`` looks once more). ``tried``:
    the submitter has just tried it (``-odi``), so the agent's first try is one step on."""
    folder = _records(root, create=True)
    if folder is None:
        return False
    try:
        fd = os.open(os.path.join(folder, qid), os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW, 0o600)
        try:
            if tried:
                os.write(fd, TRIED)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def _tried_at(root: str, qid: str) -> float | None:
    """When the submitter tried the noted entry (the note's mtime), or None if it did not."""
    folder = _records(root, create=False)
    if folder is None:
        return None
    try:
        fd = os.open(os.path.join(folder, qid), os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or os.read(fd, 16) != TRIED:
            return None
        return st.st_mtime
    except OSError:
        return None
    finally:
        os.close(fd)


def noted(root: str) -> list[str]:
    """The ids this user's ``sendmail`` noted for ``root``'s drop folder (their own view of
    what they submitted: ``mailq`` as a user, queueview.py)."""
    folder = _records(root, create=False)
    if folder is None:
        return []
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read(32).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def poke(root: str) -> None:
    """Wake this user's lingering agent for ``root`` to adopt a new entry (SIGURG)."""
    path = _name(root, ".pid")
    pid = None if path is None else _pid(path)
    if pid is not None and pid > 1 and pid != os.getpid():
        try:
            # _signal, not signal (which imports enum: the sendmail fast path)
            os.kill(pid, __import__("_signal").SIGURG)
        except OSError:
            pass


def running(root: str) -> int | None:
    """For ``mailshim check``: the pid of this user's lingering drop agent for ``root``, or
    None. Looked up from the pid file and /proc, without taking the lock even for a moment
    (a ``sendmail`` finding it taken then would start no agent)."""
    path = _name(root, ".pid")
    pid = None if path is None else _pid(path)
    if pid is None:
        return None
    try:
        st = os.stat(f"/proc/{pid}")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return None
    return pid if st.st_uid == os.geteuid() and b"mailshim.agent" in argv else None


# --- the agent --------------------------------------------------------------------------


class _Track:
    __slots__ = ("attempts", "late", "next_at", "relay_wait")

    def __init__(self, next_at: float, attempts: int = 0, relay_wait: bool = False) -> None:
        self.next_at = next_at
        self.attempts = attempts
        self.late = False  # its lifetime has passed and that was logged
        # Waiting only for the listener (it was unreachable): due at once when it takes
        # mail again, as in the runner's pass (policy.due_after_recovery).
        self.relay_wait = relay_wait


def _noted(root: str) -> list[str]:
    from mailshim import spoolfmt

    folder = _records(root, create=False)
    if folder is None:
        return []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [n for n in names if spoolfmt.valid_id(n)]


def forget(root: str, qid: str) -> None:
    folder = _records(root, create=False)
    if folder is not None:
        try:
            os.unlink(os.path.join(folder, qid))
        except OSError:
            pass


def schedule(config: Config) -> tuple[int, ...]:
    """``[queue] retry`` from a configuration root controls: the one in use when root
    controls it, else the system one, else the built-in steps. A user's own file may not
    make their agent hammer the listener."""
    from mailshim import config as config_mod
    from mailshim import configload
    from mailshim.errors import MailshimError

    if config.path and configload.root_controlled(config.path):
        return config.retry
    if os.path.exists(paths.SYSTEM_CONFIG) and configload.root_controlled(paths.SYSTEM_CONFIG):
        try:
            return configload.load(paths.SYSTEM_CONFIG).retry
        except MailshimError:
            pass  # a broken system file: the built-in steps
    return config_mod.Config().retry


def _take(target: spool.Spool, qid: str) -> spoolentry.DropEntry | str:
    """The entry, locked, or GONE / BUSY."""
    from mailshim import spoolentry

    try:
        fd = os.open(os.path.join(target.incoming, qid), _OPEN)
    except OSError:
        return GONE
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            return GONE  # not this user's: someone else's file under a remembered name
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return BUSY
    except OSError:
        os.close(fd)
        return GONE
    entry = spoolentry.DropEntry(target, qid, fd)
    if not entry.still_here():
        entry.release()
        return GONE
    return entry


async def _attempt(
    config: Config, client: RelayClient, target: spool.Spool, qid: str, tr: _Track
) -> str:
    from mailshim import delivery, maillog
    from mailshim.constants import QUEUED, REJECTED, SENT
    from mailshim.errors import DataError

    entry = _take(target, qid)
    if isinstance(entry, str):
        return entry
    try:
        env = entry.envelope
    except DataError:
        entry.release()
        return GONE  # the runner's pickup quarantines it with the reason
    if not tr.late and time.time() - env.arrival >= config.lifetime:
        tr.late = True
        maillog.log(
            f"{qid}: older than [queue] lifetime; only a runner bounces expired mail and none"
            f" serves {target.root}: retried on the last step until one does",
            error=True,
        )
    status, replies = await delivery.deliver_drop(config, client, entry)
    if status in (SENT, REJECTED, QUEUED):
        return DONE  # QUEUED: only refusals are left, the runner's to bounce
    if delivery.is_connection_failure(replies):
        return DOWN
    return LATER


def _round(
    config: Config,
    target: spool.Spool,
    tracks: dict[str, _Track],
    steps: tuple[int, ...],
    gone: set[str],
    down_until: float,
    stops: frozenset[int] = frozenset(),
) -> float:
    """Try every due entry once (one connection for them all). Returns until when the
    listener is taken to be down: 0 once reached, ``down_until`` when nothing was tried.
    One of ``stops`` (blocked signals) pending ends the round after the entry in flight.
    Once the listener takes mail, the entries that waited only for it join the round."""
    import asyncio
    import signal

    from mailshim import delivery, maillog
    from mailshim.errors import MailshimError

    now = time.time()
    due = [q for q, tr in tracks.items() if tr.next_at <= now]
    if not due:
        return down_until
    down_until = 0.0

    async def run() -> None:
        async with delivery.client_for(config) as client:
            nonlocal down_until
            i = 0
            while i < len(due):
                if i and stops & signal.sigpending():
                    return  # the rest stay due, safe in the drop folder
                qid = due[i]
                i += 1
                tr = tracks[qid]
                try:
                    got = await _attempt(config, client, target, qid, tr)
                except MailshimError as exc:
                    maillog.log(f"{qid}: agent: {exc.message}", error=True)
                    got = LATER
                if got in (GONE, DONE):
                    del tracks[qid]
                    gone.add(qid)
                    forget(target.root, qid)
                    if got == DONE:
                        for other, waiting in tracks.items():
                            if waiting.relay_wait and other not in due[i:]:
                                due.append(other)
                            waiting.relay_wait = False
                    continue
                if got == BUSY:
                    tr.next_at = time.time() + steps[0]
                    continue
                tr.attempts += 1
                tr.next_at = time.time() + steps[min(tr.attempts, len(steps)) - 1]
                tr.relay_wait = got == DOWN
                if got == DOWN:
                    # The listener is down: the others wait with this one, no connection
                    # each, and so do entries noted during the pause (a burst costs nothing).
                    for rest in due[i:]:
                        tracks[rest].next_at = tr.next_at
                        tracks[rest].relay_wait = True
                    pause = min(r.retry_after_failure for r in config.relays)
                    down_until = time.time() + min(pause, steps[0])
                    return

    asyncio.run(run())
    return down_until


def _adopt(root: str, qid: str, steps: tuple[int, ...], earliest: float) -> _Track:
    """A newly noted entry's track: due at once, or one step after the submitter's try."""
    tried = _tried_at(root, qid)
    if tried is None:
        return _Track(earliest)
    return _Track(max(earliest, min(tried, time.time()) + steps[0]), attempts=1)


def _clear_pid(root: str) -> None:
    path = _name(root, ".pid")
    try:
        if path is not None and _pid(path) == os.getpid():
            os.unlink(path)
    except OSError:
        pass


def write_pid(root: str) -> None:
    """Name this process as the holder of the user's slot for ``root`` (a hint)."""
    from mailshim import serving

    path = _name(root, ".pid")
    if path is not None:
        serving.write_pid_file(path, "drop", 0o600)


def linger(
    config: Config,
    target: spool.Spool,
    slot_fd: int,
    first: str | None,
    first_down: bool = False,
) -> int:
    """Retry this user's noted drop entries until none is left; ``first`` was tried just now
    (``first_down``: and found the listener unreachable).

    Holds ``slot_fd`` throughout; after letting it go, looks once more for entries noted
    meanwhile and carries on when it can take the slot again."""
    import signal

    from mailshim import configload, maillog
    from mailshim.errors import MailshimError

    stops = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    wanted = stops | {signal.SIGURG}
    for sig in wanted:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    steps = schedule(config)
    tracks: dict[str, _Track] = {}
    if first is not None:
        tracks[first] = _Track(time.time() + steps[0], attempts=1, relay_wait=first_down)
    gone: set[str] = set()  # ids finished with: never adopted again (ids are not reused)
    down_until = 0.0
    fd: int | None = slot_fd
    while fd is not None:
        write_pid(target.root)
        try:
            while True:
                now = time.time()
                for qid in _noted(target.root):
                    if qid not in gone and qid not in tracks:
                        tracks[qid] = _adopt(target.root, qid, steps, max(now, down_until))
                if not tracks or not os.path.isdir(target.incoming):
                    break
                config = configload.refresh(config, "drop agent")
                try:
                    down_until = _round(
                        config, target, tracks, steps, gone, down_until, frozenset(stops)
                    )
                except MailshimError as exc:
                    maillog.log(f"agent: {exc.message}", error=True)
                    for tr in tracks.values():
                        tr.next_at = max(tr.next_at, time.time() + steps[0])
                if not tracks:
                    continue  # adopt what was noted meanwhile, or leave
                soonest = min(tr.next_at for tr in tracks.values())
                got = signal.sigtimedwait(wanted, max(MIN_NAP, soonest - time.time()))
                if got is not None and got.si_signo in stops:
                    return 0  # the entries stay in the drop folder, safe
        finally:
            _clear_pid(target.root)
            os.close(fd)
        if not set(_noted(target.root)) - gone or not os.path.isdir(target.incoming):
            return 0
        fd = slot(target.root)  # None: another agent of this user took over
    return 0
