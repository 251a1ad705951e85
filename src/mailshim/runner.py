"""Deliver spool entries: lock → relay → remove, defer with a schedule, or bury in dead/.

Three callers share this code: the detached delivery agent that ``sendmail`` starts after
spooling (``python -m mailshim.runner agent``), ``sendmail -q`` / ``mailshim flush`` (every
entry now), and ``sendmail -odi``/``-v``/``-bs`` (one entry, before replying). Each entry is
delivered under its flock, so two of them at once never send one message twice.

Exactly-once holds except in one window: between the listener's final 250 and the removal of
the entry (or the state update recording that recipient as done). A crash there means the
message is sent again on the next attempt (at-least-once). The window is a rename-free unlink
plus an fsync of the queue folder.

Trust: the agent runs as the submitting user on that user's spool; the runner as root or the
``mailshim`` user. Entries are parsed strictly (spoolfmt) and unreadable ones quarantined.
"""

from __future__ import annotations

import os
import sys
import time

from mailshim import maillog, spool
from mailshim.errors import DataError, MailshimError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from mailshim.config import Config
    from mailshim.relay import RelayClient, Reply, SendResult
    from mailshim.spoolfmt import Envelope, State

AGENT_LINGER = 1.0  # seconds an idle agent waits for more submissions before it exits


class Counts:
    __slots__ = ("bounced", "deferred", "quarantined", "sent", "skipped")

    def __init__(self) -> None:
        self.sent = 0
        self.deferred = 0
        self.bounced = 0
        self.skipped = 0
        self.quarantined = 0

    def total(self) -> int:
        return self.sent + self.deferred + self.bounced + self.quarantined


def next_delay(config: Config, attempts: int) -> int:
    """Seconds until the next try after ``attempts`` failed tries (the last step repeats)."""
    steps = config.retry
    return steps[min(max(attempts, 1), len(steps)) - 1]


def _fmt_delay(seconds: float) -> str:
    return f"{seconds:.2g}" if seconds < 10 else f"{seconds:.0f}"


def _apply_result(
    config: Config, env: Envelope, state: State, result: SendResult, now: float
) -> None:
    if state.first_attempt == 0:
        state.first_attempt = int(now)
    state.attempts += 1
    delay = _fmt_delay(max(0.0, now - env.arrival))
    for rcpt, reply in result.replies.items():
        if 200 <= reply.code < 300:
            state.done[rcpt] = str(reply)
            state.pending.pop(rcpt, None)
            status = "sent"
        elif reply.permanent:
            state.failed[rcpt] = str(reply)
            state.pending.pop(rcpt, None)
            status = "bounced"
        else:
            state.pending[rcpt] = str(reply)
            state.last_error = str(reply)
            status = "deferred"
        maillog.log(
            f"{env.queue_id}: to=<{rcpt}>, relay={result.relay}, delay={delay},"
            f" status={status} ({reply})",
            error=status != "sent",
        )


def _finish(
    config: Config, locked: spool.LockedEntry, state: State, now: float, discard_rejected: bool
) -> str:
    """Remove, bury or reschedule after an attempt; returns sent|deferred|bounced|rejected."""
    env = locked.envelope
    open_rcpts = state.open_recipients(env)
    if open_rcpts and now - env.arrival >= config.lifetime:
        for rcpt in open_rcpts:
            last = state.pending.get(rcpt, "no attempt succeeded")
            state.failed[rcpt] = f"expired after {config.lifetime // 3600}h in the queue: {last}"
        open_rcpts = []
    if open_rcpts:
        state.next_attempt = int(now) + next_delay(config, state.attempts)
        locked.save_state(state)
        locked.release()
        return "deferred"
    if not state.failed:
        locked.remove()
        maillog.log(f"{env.queue_id}: removed")
        return "sent"
    if discard_rejected and not state.done:
        locked.remove()
        maillog.log(f"{env.queue_id}: rejected by the listener; the client was told")
        return "rejected"
    reason = "; ".join(f"<{r}>: {why}" for r, why in state.failed.items())
    locked.save_state(state)
    where = locked.bury("dead", reason)
    maillog.log(f"{env.queue_id}: moved to {where}: {reason}", error=True)
    return "bounced" if state.done else "rejected"


async def deliver_entry(
    config: Config,
    client: RelayClient,
    locked: spool.LockedEntry,
    *,
    discard_rejected: bool = False,
) -> tuple[str, dict[str, Reply]]:
    """One attempt at one locked entry. Returns (status, replies of this attempt)."""
    try:
        env = locked.envelope
        state = locked.state()
    except DataError as exc:
        locked.release()
        locked.spool.quarantine(locked.queue_id, exc.message)
        maillog.log(f"{locked.queue_id}: moved to corrupt/: {exc.message}", error=True)
        return "quarantined", {}
    rcpts = state.open_recipients(env)
    if not rcpts:
        return _finish(config, locked, state, time.time(), discard_rejected), {}
    try:
        with locked.message() as body:
            result = await client.send(env.sender, rcpts, body, env.size, env.eightbit)
    except DataError as exc:
        locked.release()
        locked.spool.quarantine(locked.queue_id, exc.message)
        maillog.log(f"{locked.queue_id}: moved to corrupt/: {exc.message}", error=True)
        return "quarantined", {}
    now = time.time()
    _apply_result(config, env, state, result, now)
    return _finish(config, locked, state, now, discard_rejected), dict(result.replies)


def _client(config: Config, transcript: Callable[[str], None] | None = None) -> RelayClient:
    from mailshim.relay import RelayClient

    return RelayClient(config.relays, helo=config.helo_name, transcript=transcript)


def deliver_now(
    config: Config,
    locked: spool.LockedEntry,
    *,
    verbose: bool = False,
    discard_rejected: bool = False,
) -> tuple[str, dict[str, Reply]]:
    """Deliver one entry synchronously (``-odi``, ``-v``, ``-bs``)."""
    import asyncio

    def transcript(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    async def run() -> tuple[str, dict[str, Reply]]:
        async with _client(config, transcript if verbose else None) as client:
            return await deliver_entry(config, client, locked, discard_rejected=discard_rejected)

    try:
        return asyncio.run(run())
    finally:
        locked.release()


def _is_connection_failure(replies: dict[str, Reply]) -> bool:
    return bool(replies) and all(r.code == 0 for r in replies.values())


async def run_pass(
    config: Config,
    client: RelayClient,
    target: spool.Spool,
    counts: Counts,
    *,
    force: bool,
    only: set[str] | None = None,
    seen: set[str] | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> bool:
    """One sweep over the queue. Returns False when the listener was unreachable (the rest
    of the sweep is left for later rather than failing every entry the same way)."""
    now = time.time()
    for qid in target.ids():
        if only is not None and qid not in only:
            continue
        if seen is not None:
            if qid in seen:
                continue
            seen.add(qid)
        try:
            state = target.load_state(qid)
        except DataError:
            state = None
        if state is not None and (state.held or (not force and state.next_attempt > now)):
            counts.skipped += 1
            continue
        try:
            locked = target.lock(qid)
        except DataError as exc:
            target.quarantine(qid, exc.message)
            counts.quarantined += 1
            continue
        if locked is None:
            counts.skipped += 1
            continue
        status, replies = await deliver_entry(config, client, locked)
        if status == "sent":
            counts.sent += 1
        elif status == "deferred":
            counts.deferred += 1
        elif status == "quarantined":
            counts.quarantined += 1
        else:
            counts.bounced += 1
        if progress is not None:
            progress(qid, status)
        if status == "deferred" and _is_connection_failure(replies):
            return False
    return True


def flush(
    config: Config,
    spools: list[spool.Spool],
    *,
    only: set[str] | None = None,
    progress: Callable[[str, str], None] | None = None,
    transcript: Callable[[str], None] | None = None,
) -> Counts:
    """Try every entry now, over one connection (``sendmail -q``, ``mailshim flush``)."""
    import asyncio

    counts = Counts()

    async def run() -> None:
        async with _client(config, transcript) as client:
            for target in spools:
                target.clean_tmp()
                seen: set[str] = set()
                while await run_pass(
                    config, client, target, counts, force=True, only=only, seen=seen,
                    progress=progress,
                ):
                    # entries that arrived during the sweep are taken too
                    if not any(q not in seen for q in target.ids()):
                        break

    asyncio.run(run())
    return counts


def _due(target: spool.Spool) -> bool:
    now = time.time()
    for qid in target.ids():
        try:
            state = target.load_state(qid)
        except DataError:
            return True
        if not state.held and state.next_attempt <= now:
            return True
    return False


def _queue_stamp(target: spool.Spool) -> int:
    try:
        return os.stat(target.queue).st_mtime_ns
    except OSError:
        return 0


async def _agent_session(config: Config, target: spool.Spool) -> bool:
    """Deliver due entries until the queue stays quiet; False if the listener was unreachable."""
    import asyncio

    counts = Counts()
    async with _client(config) as client:
        while True:
            stamp = _queue_stamp(target)
            if not await run_pass(config, client, target, counts, force=False):
                return False
            deadline = time.monotonic() + AGENT_LINGER
            while _queue_stamp(target) == stamp and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if _queue_stamp(target) == stamp:
                return True


def agent_main(spool_root: str, lock_fd: int | None, config_path: str | None) -> int:
    """The detached delivery agent: drain due entries, linger briefly, exit.

    Holding the spool's agent lock makes it the only agent. A ``sendmail`` that finds the
    lock taken does not start another, trusting this one to see its entry; so after
    releasing the lock the agent looks once more and carries on if anything is due.
    """
    from mailshim import config as config_mod

    try:
        config = config_mod.load(config_path)
    except MailshimError as exc:
        maillog.log(f"agent: {exc.message}", error=True)
        return exc.code
    import asyncio

    target = spool.Spool(spool_root)
    fd = lock_fd if lock_fd is not None else target.try_agent_lock()
    while fd is not None:
        reachable = False
        try:
            reachable = asyncio.run(_agent_session(config, target))
        except MailshimError as exc:
            maillog.log(f"agent: {exc.message}", error=True)
        finally:
            os.close(fd)
        if not reachable or not _due(target):
            break  # when the listener is down, the runner's schedule takes over
        fd = target.try_agent_lock()
        if fd is not None and not _due(target):
            os.close(fd)
            break
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "agent":
        sys.stderr.write("usage: python -m mailshim.runner agent --spool DIR [--lock-fd N]\n")
        return 64
    root = lock = cfg = None
    i = 1
    while i + 1 < len(args):
        if args[i] == "--spool":
            root = args[i + 1]
        elif args[i] == "--lock-fd":
            lock = int(args[i + 1])
        elif args[i] == "--config":
            cfg = args[i + 1]
        i += 2
    if root is None:
        return 64
    return agent_main(root, lock, cfg)


if __name__ == "__main__":
    sys.exit(main())
