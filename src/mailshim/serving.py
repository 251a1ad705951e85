"""Who serves a spool now: the holder of its agent lock, named in ``state/agent.pid``.

The agent lock (``agent.lock`` in the spool root) is held by the one delivery agent or
``mailshim daemon`` serving the spool; the pid file says which process that is, so that
``sendmail`` can poke a sleeping agent, the daemon can ask a lingering agent to leave, and
``mailshim check`` can say who retries deferred mail. A new entry goes to the holder
(``claim_or_poke``): a submission that finds the lock taken needs nothing more, and imports
the agent's module only when it must start one.

Trust: runs as the submitting user, the runner or root. The pid file is only a hint, in a
folder the runner account owns: it is read without following a link or opening a FIFO,
believed only while the agent lock is held, and a signal (SIGURG to poke, SIGTERM for the
daemon's takeover) goes only to a process proven to have the agent lock open, through a
pidfd taken before the proof (``_signal``). Whether the lock is held is read from
``/proc/locks``, never by taking it. The ``served`` mark counts only when it belongs to the
spool's owner or root.

Raises nothing but what ``spool.Spool.try_agent_lock`` raises (``OSError``), which callers
treat as "unknown".
"""

from __future__ import annotations

import os
import stat
import time

from mailshim import maillog, paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim import spool
    from mailshim.config import Config

PID_FILE = "agent.pid"  # in state/: "<pid> <role>"
AGENT = "agent"
DAEMON = "daemon"
UNITS = "units"
SERVED = "served"  # at the spool's root, readable by all: "<role>\n", mtime = last refresh
SERVED_REFRESH = 60.0  # the daemon refreshes the mark this often (the timer runs each minute)
SERVED_FRESH = 150.0  # a mark older than this is stale: its server stopped (or hung)
DAEMON_TAKEOVER = 10.0  # seconds the daemon waits for a lingering agent to leave
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_pid(target: spool.Spool, role: str) -> None:
    """Name this process as the holder of ``target``'s agent lock (a hint for pokes/check)."""
    write_pid_file(os.path.join(target.state_dir, PID_FILE), role, 0o644)


def write_pid_file(path: str, role: str, mode: int) -> None:
    """Replace ``path`` with "<pid> <role>" (a fresh file renamed over it; never followed)."""
    paths.replace_file(path, f"{os.getpid()} {role}\n".encode(), mode)


def clear_pid(target: spool.Spool) -> None:
    """Remove the pid file if it names this process."""
    found = holder(target, locked=True)
    if found is not None and found[0] == os.getpid():
        try:
            os.unlink(os.path.join(target.state_dir, PID_FILE))
        except OSError:
            pass


def holder(target: spool.Spool, *, locked: bool = False) -> tuple[int, str] | None:
    """(pid, role) from the pid file; with ``locked`` False, only if the agent lock is held
    by someone (a free lock means nobody serves the spool, whatever the file says)."""
    try:
        # state/ is the runner account's: the name may be a link or a FIFO it planted.
        fd = os.open(
            os.path.join(target.state_dir, PID_FILE),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
        )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            words = os.read(fd, 64).split()
        finally:
            os.close(fd)
        pid, role = int(words[0]), words[1].decode("ascii")
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if not locked and not lock_busy(target):
        return None
    return pid, role


def lock_busy(target: spool.Spool) -> bool:
    """Whether someone holds the agent lock, found without taking it: a ``sendmail`` that
    found it taken even for a moment (``mailshim check`` looking) would start no agent and
    trust the holder to see its entry. Read from ``/proc/locks``; where that cannot be read,
    a live process named in the pid file counts as the holder."""
    try:
        st = os.stat(os.path.join(target.root, "agent.lock"))
    except OSError:
        return False
    held = _flocked(st.st_dev, st.st_ino)
    if held is not None:
        return held
    found = holder(target, locked=True)
    return found is not None and os.path.isdir(f"/proc/{found[0]}")


def _flocked(dev: int, ino: int) -> bool | None:
    """Whether ``/proc/locks`` lists an flock on the file (dev, ino); None if unreadable."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read(4 * 1024 * 1024).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:4244243 0 EOF"; "1: -> FLOCK ..." waits
        if len(words) >= 6 and words[1] == "FLOCK" and words[5] == want:
            return True
    return False


def who_retries(target: spool.Spool) -> str | None:
    """For ``mailshim check``: the process serving ``target`` now, in words, or None."""
    found = holder(target)
    if found is None:
        return "a delivery agent or daemon (pid unknown)" if lock_busy(target) else None
    pid, role = found
    if role == DAEMON:
        return f"mailshim daemon (pid {pid})"
    return f"a lingering delivery agent (pid {pid})"


def served(target: spool.Spool) -> str | None:
    """``units`` or ``daemon`` while the packaged units or ``mailshim daemon`` serve
    ``target`` (a fresh mark), else None: then ``sendmail`` leaves new and deferred entries
    to them and starts no agent of its own (issue 23, item 5). One ``open``; every user may
    read the mark, and only one of the spool's owner (or root) counts."""
    try:
        fd = os.open(os.path.join(target.root, SERVED), os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        own = target.owner()
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, own[0] if own else 0):
            return None
        if not 0 <= time.time() - st.st_mtime < SERVED_FRESH:
            return None
        role = os.read(fd, 16)
    except OSError:
        return None
    finally:
        os.close(fd)
    return {b"units\n": UNITS, b"daemon\n": DAEMON}.get(role)


def mark_served(target: spool.Spool, role: str | None) -> None:
    """Say that ``role`` (``units``, ``daemon``) serves ``target`` from now on, refreshing
    the mark's time; None clears it (a daemon stopping). Best effort: without the mark,
    ``sendmail`` starts agents as where nothing serves the spool."""
    data = b"" if role is None else role.encode() + b"\n"
    try:
        # O_CREAT without O_TRUNC: the system spool's root is root's, where setup-spool made
        # this file for the runner; a per-user spool's owner may create it.
        fd = os.open(
            os.path.join(target.root, SERVED),
            os.O_WRONLY | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
            0o644,
        )
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.utime(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _signal(target: spool.Spool, pid: int, name: str) -> bool:
    """Send ``name`` to ``pid`` only if that process is proven to hold ``target``'s agent
    lock: it has the lock file open (its descriptors, in /proc, name the lock's inode). The
    pid file is only a claim, written in a folder the runner account owns, and a pid left by
    an agent killed with SIGKILL may since belong to anyone. The process is pinned by a
    pidfd before it is looked at, and signalled through it, so a pid reused in between gets
    nothing."""
    import signal

    if pid <= 1 or pid == os.getpid():
        return False
    try:
        lock = os.stat(os.path.join(target.root, "agent.lock"), follow_symlinks=False)
    except OSError:
        return False
    pidfd_open = getattr(os, "pidfd_open", None)
    try:
        pidfd = pidfd_open(pid) if pidfd_open is not None else -1
    except OSError:
        return False
    try:
        if not _holds_open(pid, lock):
            return False
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, getattr(signal, name))
        else:  # a kernel before 5.3: the check and the kill are a moment apart
            os.kill(pid, getattr(signal, name))
    except OSError:
        return False
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return True


def _holds_open(pid: int, lock: os.stat_result) -> bool:
    """Whether process ``pid`` has the file ``lock`` open (read from /proc/<pid>/fd, which
    only its own user and root may read: the users who may signal it anyway)."""
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    for name in names:
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (lock.st_ino, lock.st_dev):
            return True
    return False


def claim_or_poke(target: spool.Spool, config: Config) -> int | None:
    """For a new entry in ``target``: the agent lock's fd when nobody serves the spool (the
    caller starts an agent with it), else None once the server knows of the entry.

    The holder is poked (SIGURG), unless the listener was found down less than its pause
    (``Config.down_pause``) ago: then the entry waits with the others for the next attempt
    and a burst of submissions costs no connections. Raises ``OSError`` when the lock cannot
    be opened (the entry is safe in the spool for the runner)."""
    fd = target.try_agent_lock()
    if fd is None:
        down = target.relay_down_since()
        pause = config.down_pause
        if down is None or not 0 <= time.time() - down < pause:
            poke(target)
    return fd


def poke(target: spool.Spool) -> bool:
    """Wake the agent serving ``target`` to deliver what is due now (SIGURG).

    The caller has just found the agent lock taken; the lock is not taken again here (even
    for a moment: an agent leaving looks once more for due entries and must find it free)."""
    found = holder(target, locked=True)
    if found is None or found[1] != AGENT:
        return False  # nobody, or the daemon (it watches the folders itself)
    return _signal(target, found[0], "SIGURG")


def stop_lingering(target: spool.Spool) -> int | None:
    """The daemon's start: ask a lingering agent to leave, then take the agent lock. Returns
    the lock fd, or None when the lock is still held (another daemon, or an agent that did
    not leave in time: the daemon does not deliver beside it, and looks again)."""
    fd = target.try_agent_lock()
    if fd is not None:
        return fd
    found = holder(target)
    if found is None or found[1] != AGENT or not _signal(target, found[0], "SIGTERM"):
        return None
    deadline = time.monotonic() + DAEMON_TAKEOVER
    while time.monotonic() < deadline:
        time.sleep(0.1)
        fd = target.try_agent_lock()
        if fd is not None:
            maillog.log(f"daemon: lingering delivery agent {found[0]} handed {target.root} over")
            return fd
    return None
