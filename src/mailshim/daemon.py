"""``mailshim daemon``: one foreground process delivering the spools as entries arrive and
fall due (containers, ``mailshim-daemon.service``).

It polls the spool folders' change times every half second and sleeps until the next entry
falls due; each round picks up the drop folder and runs runpass.py's pass (parallel sessions,
back-pressure, policy) over what is due. While it runs it holds each spool's ``agent.lock``
(asking a lingering agent to leave, once), so ``sendmail`` starts no agents and pokes none;
it never delivers a spool whose lock another process still holds (an agent finishing the
entry in flight, a second daemon): it looks again every second until it can take it.
SIGTERM or SIGINT: the messages in flight are finished, then it stops; a second signal
abandons them (they stay in the spool and are tried again later).

Trust: runs as root or the ``mailshim`` user (the system spool) or a user on their own spool;
what it reads of the spool is parsed by spoolfmt/pickup as for any runner.

Raises nothing of its own: a spool it cannot write is logged and the daemon pauses for the
first retry step (``MailshimError`` from a pass); ``run`` returns the exit code.
"""

from __future__ import annotations

import os
import time

from mailshim import (
    configload,
    deadletters,
    maillog,
    metrics,
    policy,
    runner,
    runpass,
    serving,
    spool,
    spoolindex,
)
from mailshim.errors import MailshimError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from mailshim.config import Config
    from mailshim.sessions import Pool

POLL = 0.5  # seconds between the daemon's cheap looks at the spool folders
LOCKED_RECHECK = 1.0  # how often the daemon looks again at drop entries held by their owner
DEAD_EXPIRY_EVERY = 3600.0  # seconds between the daemon's looks for old dead letters


def _schedule(target: spool.Spool) -> tuple[bool, float | None]:
    """(something is due now, when the next one falls due), from the schedule index: one
    header read when nothing changed since it was written."""
    soonest = spoolindex.soonest(target)
    if soonest is None:
        return False, None
    if soonest <= time.time():
        return True, None
    return False, float(soonest)


class _Daemon:
    """``mailshim daemon``: one process delivering the spools as entries arrive and fall due."""

    def __init__(self, config: Config, spools: list[spool.Spool], say: Callable[[str], None]):
        self.config = config
        self.spools = spools
        self.say = say
        self.pool: Pool | None = None
        self.hold_until = 0.0  # the listener was down or busy: wait before the next pass
        self.locks: dict[str, int] = {}
        self.took_over: set[str] = set()
        self.waiting: set[str] = set()  # spools whose agent.lock another process holds
        self.dead_expired: dict[str, float] = {}
        self.marked: dict[str, float] = {}  # when the "served" mark was last refreshed

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                wake = await self.round(stop)
                await self.wait(stop, wake)
        finally:
            if self.pool is not None:
                await self.pool.close()
            for target in self.spools:
                target.sync(force=True)
                if target.root in self.locks:
                    serving.clear_pid(target)
                    serving.mark_served(target, None)  # sendmail starts agents again
            for fd in self.locks.values():
                os.close(fd)

    def _claim(self, target: spool.Spool) -> bool:
        """Whether the daemon may deliver ``target``: it holds its agent lock, or the lock
        cannot be opened at all (as before: nothing else can hold it either). While the
        daemon runs, sendmail starts no agents: the daemon sees its entry. A lingering agent
        is asked to leave, once; until it has (the entry in flight first), or while another
        daemon holds the lock, the daemon never delivers beside it."""
        if target.root in self.locks:
            return True
        try:
            if target.root in self.took_over:
                fd = target.try_agent_lock()
            else:
                self.took_over.add(target.root)
                fd = serving.stop_lingering(target)
        except OSError:
            return True
        if fd is None:
            if target.root not in self.waiting:
                self.waiting.add(target.root)
                self.say(f"{target.root}: served by another process; waiting for it to leave")
            return False
        self.locks[target.root] = fd
        serving.write_pid(target, serving.DAEMON)
        if target.root in self.waiting:
            self.waiting.discard(target.root)
            self.say(f"{target.root}: the other process left; the daemon delivers it now")
        return True

    async def round(self, stop: asyncio.Event) -> float:
        """Pick up, deliver what is due; returns the time (epoch) to look again at the latest."""
        fresh = configload.refresh(self.config, "daemon")
        if fresh is not self.config:
            self.config = fresh
            if self.pool is not None:
                await self.pool.close()  # its sessions are to the relays of the old file
                self.pool = None
        now = time.time()
        wake = now + 3600.0
        waiting_drops = False
        for target in self.spools:
            if not self._claim(target):
                waiting_drops = True  # look again within a second
                continue
            try:
                target.clean_tmp(states=spoolindex.sweep_due(target))
                if now - self.dead_expired.get(target.root, 0.0) > DEAD_EXPIRY_EVERY:
                    self.dead_expired[target.root] = now
                    deadletters.expire(target, self.config.keep_dead, now)
                waiting_drops = runner.pickup(self.config, target)[1] > 0 or waiting_drops
                due, soonest = _schedule(target)
                if soonest is not None:
                    wake = min(wake, soonest)
                if not due or now < self.hold_until:
                    continue
                counts = runpass.Counts()
                if self.pool is None:
                    self.pool = runpass.pool_for(self.config)
                status = await runpass.run_pass(
                    self.config, self.pool, target, counts, force=False, stop=stop
                )
                target.sync(force=True)
                metrics.after_pass(self.config, target, time.time())
                if counts.total():
                    self.say(f"{target.root}: {counts.summary()}")
                    wake = time.time()  # look again at once: new entries (bounces) may be due
                else:
                    wake = min(wake, time.time() + LOCKED_RECHECK)  # due, but held by others
                if status in ("down", "busy"):
                    delay = self.config.down_pause if status == "down" else runpass.RATE_PAUSE * 5
                    self.hold_until = time.time() + delay
                    self.say(f"{target.root}: the listener is {status}; next pass in {delay:.0f}s")
                    await self.pool.close()
                    self.pool = None
            except MailshimError as exc:
                maillog.log(f"daemon: {exc.message}", error=True)
                self.say(f"{target.root}: {exc.message}")
                self.hold_until = time.time() + policy.next_delay(self.config, 1)
        if self.hold_until > time.time():
            wake = max(wake, self.hold_until)
        if waiting_drops:
            wake = min(wake, time.time() + LOCKED_RECHECK)
        self.keep_marks()
        return wake

    def keep_marks(self) -> None:
        """Keep the "served" mark of each spool this daemon holds fresh: users' sendmail
        then leaves their mail to the daemon instead of starting their own agents."""
        now = time.monotonic()
        for target in self.spools:
            last = self.marked.get(target.root, -serving.SERVED_REFRESH)
            if target.root in self.locks and now - last >= serving.SERVED_REFRESH:
                self.marked[target.root] = now
                serving.mark_served(target, serving.DAEMON)

    async def wait(self, stop: asyncio.Event, wake: float) -> None:
        """Sleep until ``wake``, a change in a spool folder, or ``stop``."""
        stamps = [runner.queue_stamp(t) for t in self.spools]
        idle_since = time.monotonic()
        while not stop.is_set() and time.time() < wake:
            await runpass.sleep(min(POLL, max(0.0, wake - time.time())), stop)
            if [
                runner.queue_stamp(t) for t in self.spools
            ] != stamps and time.time() >= self.hold_until:
                return
            self.keep_marks()
            if self.pool is not None and time.monotonic() - idle_since > 5.0:
                await self.pool.close()  # do not hold the listener's connections while idle
                self.pool = None


def run(config: Config, spools: list[spool.Spool], say: Callable[[str], None]) -> int:
    """Run until SIGTERM or SIGINT: the current message is finished, then the daemon stops.
    A second signal abandons it (it stays in the spool and is tried again later)."""
    import asyncio
    import signal

    for target in spools:
        target.check_usable()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and task is not None:
                task.cancel()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await _Daemon(config, spools, say).run(stop)

    say(f"daemon: watching {', '.join(t.root for t in spools)}")
    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        say("daemon: stopped at once; the message in flight stays in the spool")
        return 0
    say("daemon: stopped")
    return 0
