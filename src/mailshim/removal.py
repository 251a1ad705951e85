"""What removing the package needs: stop every mailshim process that serves the system spool
(the spool's delivery agent, users' drop agents, a ``mailshim daemon`` started by hand), and
say what mail the spool still holds. Run by the maintainer scripts (prerm, %preun) as
``python3 -m mailshim.removal stop`` and ``... count``.

A process is stopped only when it names itself, in its own command line, as a mailshim agent for the
system spool (``-m mailshim.agent --spool /var/spool/mailshim``, the path compared normalised) or as
``mailshim [-C FILE] daemon`` run by root or the spool's owner (a user's own daemon serves her own
spool): no pid is taken from a file the runner account controls (``state/agent.pid``), so a stale or
forged pid file cannot make root signal a stranger. Each process is held by a pidfd from before its
command line is read until the signal, so a pid reused in between is never signalled. SIGTERM lets
an agent finish the message in flight; one still running after ``GRACE`` seconds gets a second
SIGTERM (it stops at once, the message stays queued), then SIGKILL (the entry lock protects the
spool; the message may be sent twice, never lost).

Trust: run by root from the maintainer scripts, or by an administrator. Reads /proc and lists
the spool's folders without following links; writes nothing. Raises nothing: every problem is
a line on stderr, and the exit status is 0 (a removal must not fail on it).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mailshim import paths

GRACE = 20.0
PROC = "/proc"


def is_spool_process(argv: list[str], spool_root: str) -> bool:
    """Whether a command line is a mailshim agent for ``spool_root`` or ``mailshim daemon``
    (``find`` also asks who runs a daemon: see ``_serves``).

    >>> is_spool_process(["python3", "-m", "mailshim.agent", "--spool", "/s/"], "/s")
    True
    >>> is_spool_process(["/usr/bin/python3", "/usr/bin/mailshim", "-C", "/c", "daemon"], "/s")
    True
    >>> is_spool_process(["vim", "mailshim.agent"], "/s")
    False
    >>> is_spool_process(["grep", "-r", "mailshim", "daemon"], "/s")
    False
    """
    return _is_agent(argv, spool_root) or _is_daemon(argv)


def _is_agent(argv: list[str], spool_root: str) -> bool:
    for i, word in enumerate(argv[:-1]):
        if word == "-m" and argv[i + 1] == "mailshim.agent":
            rest = argv[i + 2 :]
            # agent.start passes the configured [queue] dir as written ("/var/spool/mailshim/")
            return any(
                rest[j] == "--spool"
                and j + 1 < len(rest)
                and os.path.normpath(rest[j + 1]) == os.path.normpath(spool_root)
                for j in range(len(rest))
            )
    return False


def _is_daemon(argv: list[str]) -> bool:
    """``mailshim [-C FILE | --config FILE | --config=FILE] daemon``, as the script or as
    ``-m mailshim`` / ``-m mailshim.cli.entry``: the subcommand is the first word after the
    options the command accepts before it (a word "daemon" further on is an argument)."""
    python = bool(argv) and os.path.basename(argv[0]).startswith("python")
    for i, word in enumerate(argv):
        # Only the program itself: the script run directly, or by an interpreter whose
        # options come first (``python3 -I /usr/bin/mailshim``); never an argument of
        # another program (``grep -r mailshim daemon``).
        if i > 0 and not (python and all(w.startswith("-") for w in argv[1:i])):
            return False
        if os.path.basename(word) == "mailshim":
            rest = argv[i + 1 :]
        elif (
            python
            and word == "-m"
            and argv[i + 1 : i + 2] in (["mailshim"], ["mailshim.cli.entry"])
        ):
            rest = argv[i + 2 :]
        else:
            continue
        while rest[:1] in (["-C"], ["--config"]) and len(rest) > 1:
            rest = rest[2:]
        while rest[:1] and rest[0].startswith("--config="):
            rest = rest[1:]
        return rest[:1] == ["daemon"]
    return False


def _uid(pid: int) -> int | None:
    """The process's effective uid (``/proc/PID/status``), or None when it is gone."""
    try:
        with open(f"{PROC}/{pid}/status", "rb") as f:
            for line in f.read(65536).splitlines():
                if line.startswith(b"Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _serves(pid: int, argv: list[str], spool_root: str) -> bool:
    """Whether process ``pid`` serves ``spool_root``. A ``mailshim daemon`` serves the
    system spool only as root or as the spool's owner (the runner): anyone else's daemon
    serves their own spool (a pip install in their home) and is not the package's to stop."""
    if _is_agent(argv, spool_root):
        return True
    if not _is_daemon(argv):
        return False
    try:
        owner = os.stat(os.path.join(spool_root, "queue"), follow_symlinks=False).st_uid
    except OSError:
        owner = 0
    return _uid(pid) in (0, owner)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            raw = f.read(65536)
    except OSError:
        return []
    return [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]


def _open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def find(spool_root: str) -> dict[int, int]:
    """{pid: pidfd} of the processes serving ``spool_root``, each checked after its pidfd
    was opened (so the pidfd is the process whose command line was read)."""
    found: dict[int, int] = {}
    try:
        names = os.listdir(PROC)
    except OSError:
        return found
    me = os.getpid()
    for name in names:
        if not name.isdigit() or int(name) in (me, 1):
            continue
        pid = int(name)
        fd = _open(pid)
        if fd is None:
            continue
        if _serves(pid, _cmdline(pid), spool_root):
            found[pid] = fd
        else:
            os.close(fd)
    return found


def _send(fd: int, signum: int) -> None:
    try:
        signal.pidfd_send_signal(fd, signum)
    except OSError:
        pass  # gone already


def _alive(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)  # a pidfd turns readable when its process has exited


def stop(spool_root: str, grace: float = GRACE) -> int:
    """Stop the processes serving ``spool_root``; the number stopped."""
    procs = find(spool_root)
    steps = ((signal.SIGTERM, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
    for signum, wait in steps:
        living = [fd for fd in procs.values() if _alive(fd)]
        if not living:
            break
        for fd in living:
            _send(fd, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(fd) for fd in living):
            time.sleep(0.1)
    left = [pid for pid, fd in procs.items() if _alive(fd)]
    for fd in procs.values():
        os.close(fd)
    if left:
        _say(f"could not stop process(es) {', '.join(map(str, left))}")
    return len(procs) - len(left)


def count(spool_root: str) -> dict[str, int]:
    """Messages left in each of the spool's folders (incoming, queue, dead, corrupt)."""
    from mailshim import spoolfmt

    out: dict[str, int] = {}
    for folder in ("incoming", "queue", "dead", "corrupt"):
        try:
            names = os.listdir(os.path.join(spool_root, folder))
        except OSError:
            names = []
        if folder == "corrupt":
            out[folder] = sum(1 for n in names if not n.startswith("."))
        else:
            out[folder] = sum(1 for n in names if spoolfmt.valid_id(n))
    return out


def summary(spool_root: str) -> str:
    """One line for the administrator: how much mail is left, and where."""
    counts = count(spool_root)
    total = sum(counts.values())
    if total == 0:
        return f"no undelivered mail in {spool_root}"
    parts = ", ".join(f"{n} in {folder}/" for folder, n in counts.items() if n)
    return (
        f"{total} undelivered message(s) remain in {spool_root} ({parts}): they are kept;"
        " reinstall mailshim to deliver them (mailshim flush), or read them there"
    )


def _say(line: str) -> None:
    try:
        sys.stderr.write(f"mailshim: {line}\n")
    except (OSError, ValueError):
        pass


def main(argv: list[str]) -> int:
    root = paths.SYSTEM_SPOOL
    if argv[:1] == ["stop"]:
        stopped = stop(root)
        if stopped:
            _say(f"stopped {stopped} mailshim process(es) serving {root}")
        _say(summary(root))
    elif argv[:1] == ["count"]:
        _say(summary(root))
    else:
        _say("usage: python3 -m mailshim.removal stop|count")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
