"""Who runs delivery passes over a spool: ``flush`` (everything now), ``mailshim run`` (what
is due) and the agent's session (what is due, then linger while submissions keep coming).

Callers: the detached delivery agent (agent.py: due entries, then it lingers until nothing
deferred is left), ``sendmail -q`` / ``mailshim flush`` (everything now), ``mailshim run`` (the
timer and path units: only what is due); ``mailshim daemon`` runs passes itself (daemon.py).
The runners (flush, run, an agent that may write the queue) first pick up the system spool's
drop folder (pickup.py). The pass itself is runpass.py's.

Trust: the agent runs as the submitting user on their own spool; the runners as root or the
``mailshim`` user. Drop-folder entries are copied and checked by pickup.py.

Raises ``TempFailError`` (exit 75) when the spool is too full to record an outcome, and
``MailshimError`` when a spool cannot be written.
"""

from __future__ import annotations

import os
import time

from mailshim import (
    deadletters,
    maillog,
    metrics,
    runpass,
    spool,
    spoolindex,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from mailshim.config import Config

AGENT_LINGER = 1.0  # seconds an idle agent waits for more submissions before it exits


def pickup(config: Config, target: spool.Spool) -> tuple[int, int]:
    """Move the drop folder's entries into the queue (runners only). Returns how many were
    moved, and how many were left because their owner still holds them."""
    if not target.has_incoming() or not target.writable():
        return 0, 0
    from mailshim import pickup as drop

    drop.clean_incoming(target)
    results = drop.pickup(target, config, max_size=config.max_size_for(target.listener_size()))
    drop.log_pickups(results, lambda text, error: maillog.log(text, error=error))
    picked = sum(1 for p in results if p.status == "picked")
    return picked, sum(1 for p in results if p.status == "busy")


def flush(
    config: Config,
    spools: list[spool.Spool],
    *,
    only: set[str] | None = None,
    progress: Callable[[str, str], None] | None = None,
    transcript: Callable[[str], None] | None = None,
    force: bool = True,
) -> runpass.Counts:
    """One run over the queue, over up to ``[relay] concurrency`` sessions at once.

    ``force`` (``sendmail -q``, ``mailshim flush``): every entry now, due or not (a failed
    early attempt keeps its schedule: policy.py). Without it (``mailshim run``: the timer,
    the path unit): only entries that are due, held back by their back-off; a run that
    finds nothing due changes nothing in queue/ or incoming/, which is why the path unit
    that watches them cannot trigger itself for ever.

    The drop folder is picked up first and again after each sweep, as are entries that
    arrived meanwhile (bounces included). Raises ``MailshimError`` when a spool cannot be
    written (nothing is sent whose result could not be recorded).
    """
    import asyncio

    from mailshim.relay import RelayClient

    counts = runpass.Counts()
    RelayClient.forget_failures()

    async def run() -> None:
        async with runpass.pool_for(config, transcript) as pool:
            for target in spools:
                target.check_usable()
                target.clean_tmp(states=spoolindex.sweep_due(target))
                deadletters.expire(target, config.keep_dead)
                seen = runpass.Taken()  # packed: ~19 bytes an entry
                try:
                    pickup(config, target)
                    while True:
                        status = await runpass.run_pass(
                            config, pool, target, counts, force=force, only=only, seen=seen,
                            progress=progress,
                        )  # fmt: skip
                        if status != "done":
                            break
                        picked, _ = pickup(config, target)
                        # entries outside a -qI filter are never "seen": do not wait for them
                        left = any(
                            row[0] not in seen and (only is None or row[0] in only)
                            for row in spoolindex.due(target, time.time(), force)
                        )
                        if not picked and not left:
                            break
                finally:
                    target.sync(force=True)
                    metrics.after_pass(config, target, time.time())

    asyncio.run(run())
    return counts


def queue_stamp(target: spool.Spool) -> tuple[int, ...]:
    """The folders' change times: equal stamps, nothing new arrived or changed."""
    out = []
    for folder in (target.queue, target.incoming, target.state_dir):
        try:
            out.append(os.stat(folder).st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)


STOP_POLL = 0.1  # seconds between the agent's looks for a blocked SIGTERM while it delivers


async def _watch_signals(stops: frozenset[int], stop: asyncio.Event) -> None:
    """Set ``stop`` once one of ``stops`` is pending. The agent keeps them blocked (so none
    can cut a delivery short); they stay pending for its ``sigtimedwait`` after the pass."""
    import asyncio
    import signal

    while not stop.is_set():
        if stops & signal.sigpending():
            stop.set()
            return
        await asyncio.sleep(STOP_POLL)


async def _agent_session(
    config: Config, target: spool.Spool, stops: frozenset[int] = frozenset()
) -> str:
    """Deliver due entries until the queue stays quiet: "done", or "down" (the listener was
    unreachable) or "busy" (it kept asking to slow down), after which the agent sleeps. With
    ``stops`` (blocked signals), one of them pending ends it after the entries in flight."""
    import asyncio

    counts = runpass.Counts()
    deadletters.expire(target, config.keep_dead)
    stop = asyncio.Event()
    watch = asyncio.ensure_future(_watch_signals(stops, stop)) if stops else None
    try:
        async with runpass.pool_for(config) as pool:
            while not stop.is_set():
                stamp = queue_stamp(target)
                pickup(config, target)
                status = await runpass.run_pass(
                    config, pool, target, counts, force=False, stop=stop
                )
                target.sync(force=True)
                metrics.after_pass(config, target, time.time())
                if status in ("down", "busy"):
                    return status
                deadline = time.monotonic() + AGENT_LINGER
                while (
                    queue_stamp(target) == stamp
                    and time.monotonic() < deadline
                    and not stop.is_set()
                ):
                    await asyncio.sleep(0.05)
                if queue_stamp(target) == stamp:
                    return "done"
            return "done"
    finally:
        if watch is not None:
            watch.cancel()


def deliver_due(config: Config, target: spool.Spool, stops: frozenset[int] = frozenset()) -> str:
    """The agent's pass (agent.py): deliver due entries until the queue stays quiet; "done",
    "down" (the listener was unreachable) or "busy" (it kept asking to slow down). One of
    ``stops`` (signals the caller blocks) pending ends it after the entries in flight,
    leaving it pending."""
    import asyncio

    return asyncio.run(_agent_session(config, target, stops))
