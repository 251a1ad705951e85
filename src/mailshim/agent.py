"""The delivery agent: started detached by ``sendmail``, it delivers and then stays responsible
for what it could not deliver, until nothing deferred is left (dma's way).

``start()`` (in ``sendmail``, after the entry is durable) forks, leaves the caller's session,
points fds 0-2 at /dev/null, drops to the spool's owner when root, and execs
``python -m mailshim.agent``. At most one agent serves a spool: it holds the spool's
``agent.lock`` while it lives, asleep or not, and names itself in ``state/agent.pid``. A
``sendmail`` that finds the lock taken starts none: it pokes the agent (SIGURG) so that its
new entry goes at once, unless the agent just found the listener down (then the entry waits
with the others for the next attempt: a burst of submissions costs no connections).

The agent delivers what is due (runner.deliver_due), then sleeps in ``sigtimedwait`` until
the next entry falls due, a poke, or SIGTERM: no timers, no polling, no wake-up while
nothing is due. It exits when the queue holds nothing it could retry (empty, or only held
entries), when its spool is gone, or on SIGTERM/SIGHUP/SIGINT after the entry in flight.
``mailshim daemon`` stops a lingering agent when it starts (it serves the spool itself).

A drop-folder entry (a user's mail in the system spool) is delivered by that user's own
agent; what it leaves deferred that agent keeps retrying on the ``[queue] retry`` schedule
until a runner takes it over or nothing is left (dropagent.py: one such agent per user per
spool, its lock in the user's own state folder).

Queue ids never appear in an agent's argv (anyone may read /proc/PID/cmdline): a drop agent
is given ``--incoming -`` and reads its entry's id from the locked entry itself.

Trust: runs as the submitting user (their own spool or drop entry) or, started by root, as
the spool's owner (the ``mailshim`` user). Entries are hostile (runner.py, spool.py). The pid
file is only ever a hint: a signal goes only to a pid whose agent lock is held, and SIGURG's
default action is to be ignored, so a stale pid cannot hurt another process.

Exit status: 0 (also when delivery failed: that is logged); 64 bad arguments; 78 the
configuration could not be read. It has no terminal: problems go to syslog.

Raises: nothing escapes. ``agent_main`` returns the exit status above (a ``MailshimError``
becomes its code and a log line); ``start`` returns quietly when no agent can be started, since
the entry is already safe in the spool for the runner.
"""

from __future__ import annotations

import os
import sys
import time

from mailshim import dropagent, maillog, serving, spool, spoolentry
from mailshim.errors import EX_CONFIG, MailshimError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.reply import Reply

MIN_NAP = 1.0  # never wake more often than this (an entry held by an interactive sendmail)
RETAKE_TRIES = 10  # a leaving agent's tries at the lock when something fell due meanwhile
RETAKE_PAUSE = 0.2


# --- starting an agent (in sendmail) --------------------------------------------------------


def start(
    target: spool.Spool,
    config: Config,
    entry: spoolentry.DropEntry | None = None,
    lock_fd: int | None = None,
    slot_fd: int | None = None,
) -> None:
    """Start a detached delivery agent for ``target``, or poke the one that serves it.

    With ``entry`` (the system spool's drop folder): the entry is noted in the user's state
    folder; the child gets its lock and the user's slot, tries it, and lingers for what the
    user left deferred (dropagent.py). When the user's agent already runs, it is poked to
    adopt the entry; with no state folder of their own, the runner delivers it.
    ``lock_fd`` (the spool's agent lock, from ``serving.claim_or_poke``) and ``slot_fd``
    (the user's slot, from ``dropagent.claim``) are what the caller already holds: the
    agent is started with them. ``slot_fd`` alone (from ``dropagent.hand_over``): the user's
    drop agent for the entries noted in their state folder (one ``sendmail -odi`` tried).
    Root starts the spool's agent as the spool's owner (the ``mailshim`` user).
    """
    args = [sys.executable, "-m", "mailshim.agent", "--spool", target.root]
    keep: list[int] = []
    if entry is not None:
        slot = slot_fd if slot_fd is not None else dropagent.claim(target.root, entry)
        if slot is None:
            return
        keep = [entry.fd, slot]
        # "-": the agent reads the id from the locked entry; argv is public in /proc
        args += ["--incoming", "-", "--lock-fd", str(entry.fd), "--slot-fd", str(slot)]
    elif slot_fd is not None:
        # The user's drop agent for entries already noted (sendmail -odi tried its own)
        keep = [slot_fd]
        args += ["--slot-fd", str(slot_fd)]
    else:
        if lock_fd is None:
            try:
                lock_fd = serving.claim_or_poke(target, config)
            except OSError:
                return  # the runner's schedule will pick the entry up; it is safe in the spool
            if lock_fd is None:
                return
        keep = [lock_fd]
        args += ["--lock-fd", str(lock_fd)]
    if config.path:
        args += ["--config", os.path.abspath(config.path)]
    owner = target.owner() if os.geteuid() == 0 and entry is None and slot_fd is None else None
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:  # pragma: no cover - the child execs at once
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(null, std)
            for fd in keep:
                os.set_inheritable(fd, True)
            if owner is not None and owner[0] != 0:
                os.setgroups([])
                os.setgid(owner[1])
                os.setuid(owner[0])
            os.execv(sys.executable, args)
        finally:
            os._exit(127)
    for fd in keep:
        os.close(fd)
    if entry is not None:
        entry.fd = -1


# --- the agent process --------------------------------------------------------------------


def _next_wake(config: Config, target: spool.Spool) -> float | None:
    """When something falls due next (epoch), or None when nothing is left to retry.

    From the schedule index (spoolindex): nothing changed since it was written, one read of
    its header, whatever the size of the queue. While the listener was found down less
    than its pause ago (``Config.down_pause``), nothing is tried before the pause ends, and
    the agent looks again right then, whatever was due: a submission during the pause pokes
    nobody, and it must not wait for a wake time computed before it existed."""
    from mailshim import spoolindex

    soonest = spoolindex.soonest(target)
    if soonest is None:
        return None
    down = target.relay_down_since()
    when = float(soonest)
    if down is not None and time.time() < down + config.down_pause:
        when = down + config.down_pause
    return max(when, time.time() + MIN_NAP)


def serve(config: Config, target: spool.Spool, lock_fd: int) -> bool:
    """Deliver what is due, sleep until the next due time or a poke, until nothing is left.

    Holds ``lock_fd`` (the spool's agent lock) throughout and closes it before returning.
    Returns False when asked to stop (SIGTERM, SIGHUP, SIGINT) or the spool is gone."""
    import signal

    from mailshim import configload, policy, runner

    stops = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    wanted = stops | {signal.SIGURG}
    for sig in wanted:
        signal.signal(sig, signal.SIG_DFL)  # sendmail handed over with some of them ignored
    # Blocked, they wait until sigtimedwait takes them: the entry in flight is finished.
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    serving.write_pid(target, serving.AGENT)
    try:
        while True:
            rest_until = 0.0
            config = configload.refresh(config, "agent")
            try:
                status = runner.deliver_due(config, target, frozenset(stops))
                # Only an unreachable listener is "down" (no pokes for a while). One that
                # answered with rate limits is up: pokes still wake the agent, which
                # otherwise rests a moment before the entries the busy pass left untried.
                target.mark_relay(lock_fd, status != "down")
                if status == "busy":
                    rest_until = time.time() + policy.pressure_delay(config, policy.RATE)
            except MailshimError as exc:
                maillog.log(f"agent: {exc.message}", error=True)
            if not os.path.isdir(target.queue):
                return False  # the spool was removed
            if signal.sigtimedwait(stops, 0) is not None:
                return False
            try:
                wake = _next_wake(config, target)
            except MailshimError:
                wake = time.time() + config.retry[0]
            if wake is None:
                return True
            wake = max(wake, rest_until)
            got = signal.sigtimedwait(wanted, max(0.0, wake - time.time()))
            if got is not None and got.si_signo in stops:
                return False
    finally:
        serving.clear_pid(target)
        os.close(lock_fd)


def _drop_agent(
    config: Config, root: str, lock_fd: int, incoming: str, slot_fd: int | None = None
) -> int:
    """The submitter's agent for its own drop-folder entry: one attempt now; then, holding
    the user's slot (``slot_fd``), it lingers for what that user left deferred
    (dropagent.py) until a runner takes it or nothing is left."""
    import asyncio

    from mailshim import delivery
    from mailshim.constants import QUEUED, REJECTED, SENT
    from mailshim.errors import DataError

    qid = "" if incoming == "-" else incoming  # "-": the id is read from the entry
    target = spool.Spool(root, drop=True)
    first: str | None = None
    if slot_fd is not None:
        dropagent.write_pid(root)  # the slot is held from now on: pokes and check find it
    try:
        entry = spoolentry.open_drop_entry(target, qid, lock_fd)
    except (DataError, OSError):
        entry = None  # unreadable: the runner's pickup sends it to corrupt/ with the reason

    async def one(entry: spoolentry.DropEntry) -> tuple[str, dict[str, Reply]]:
        async with delivery.client_for(config) as client:
            return await delivery.deliver_drop(config, client, entry)

    first_down = False
    if entry is not None:
        try:
            status, replies = asyncio.run(one(entry))
            if status in (SENT, REJECTED, QUEUED):
                dropagent.forget(root, entry.queue_id)
            else:
                first = entry.queue_id
                first_down = delivery.is_connection_failure(replies)
        except MailshimError as exc:
            maillog.log(f"agent: {exc.message}", error=True)
            first = entry.queue_id
        finally:
            entry.release()
    if slot_fd is None:
        return 0
    return dropagent.linger(config, target, slot_fd, first, first_down)


def agent_main(
    root: str,
    lock_fd: int | None,
    config_path: str | None,
    incoming: str | None = None,
    slot_fd: int | None = None,
) -> int:
    """The agent process: a drop entry's (``--incoming``) or the spool's.

    A ``sendmail`` that finds the spool's lock taken starts no agent, trusting the holder to
    see its entry; so after releasing the lock the agent looks once more and carries on if
    anything is due."""
    from mailshim import configload

    try:
        config = configload.load_or_fallback(config_path)
    except MailshimError as exc:
        maillog.log(f"agent: {exc.message}", error=True)
        return exc.code
    configload.announce(config)
    if not configload.usable(config):
        return EX_CONFIG  # the entries wait for a runner (or the next agent) with a good file
    if incoming is not None:
        if lock_fd is None:
            return 64
        return _drop_agent(config, root, lock_fd, incoming, slot_fd)
    if slot_fd is not None:
        # A user's drop agent for what they noted as tried (sendmail -odi, -v): it lingers.
        return dropagent.linger(config, spool.Spool(root, drop=True), slot_fd, None)
    target = spool.Spool(root)
    fd = lock_fd if lock_fd is not None else target.try_agent_lock()
    while fd is not None:
        if not serve(config, target, fd) or _next_wake(config, target) is None:
            break
        fd = _retake(target)
    return 0


def _retake(target: spool.Spool) -> int | None:
    """The lock again, after something fell due while this agent was leaving. Someone may
    hold it for a moment (``mailshim check`` looking, a daemon starting): try for a while;
    a holder that keeps it (a new agent, the daemon) serves the spool instead."""
    for _ in range(RETAKE_TRIES):
        try:
            fd = target.try_agent_lock()
        except OSError:
            return None
        if fd is not None:
            return fd
        time.sleep(RETAKE_PAUSE)
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    root = cfg = incoming = None
    lock: int | None = None
    slot_fd: int | None = None
    try:
        i = 0
        while i < len(args):
            if args[i] == "--spool":
                root = args[i + 1]
            elif args[i] == "--lock-fd":
                lock = int(args[i + 1])
            elif args[i] == "--slot-fd":
                slot_fd = int(args[i + 1])
            elif args[i] == "--config":
                cfg = args[i + 1]
            elif args[i] == "--incoming":
                incoming = args[i + 1]
            else:
                raise ValueError(args[i])
            i += 2
    except (IndexError, ValueError):
        root = None
    if root is None:
        try:
            sys.stderr.write(
                "usage: python -m mailshim.agent --spool DIR [--lock-fd N] [--incoming -]"
                " [--slot-fd N] [--config FILE]\n"
            )
        except (OSError, AttributeError):
            pass
        return 64
    return agent_main(root, lock, cfg, incoming, slot_fd)


if __name__ == "__main__":
    sys.exit(main())
