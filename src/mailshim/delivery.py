"""One entry's delivery: the lock already held → relay → carry out policy's action.

Callers: the runner's pass (runner.py) for each entry it claims, the agents (agent.py,
dropagent.py) for a user's own drop-folder entry, and ``sendmail -odi``/``-v``/``-bs``
(``deliver_now``: one entry before replying). What to do after each attempt is policy.py's
decision; this module carries it out: remove, reschedule, warn, or bounce into ``dead/``.

Per recipient: a 2xx is recorded and never sent again; a 4xx is retried alone on the
``[queue] retry`` schedule; a 5xx is reported to the envelope sender in one RFC 3464 bounce
(bounce.py) once nothing else is pending, and the entry moves to ``dead/``. After
``warn_after`` a one-time delay warning goes out; once ``lifetime`` has passed, what is still
pending after one last try expires and is bounced. Reports are spooled like any message, with
the null sender; no report is made for a message whose sender is ``<>``. Back-pressure is not
failure: Stalwart's ``452 4.4.5`` and greylisting's ``452 4.2.2`` leave the entry
``throttled`` (the pass decides when to try again: runner.py) and neither counts as an
attempt on the schedule.

Exactly once, with one window: between the listener taking the message and the spool update
that records it (the unlink of the entry, or the state naming the recipients done), a crash,
or a connection lost before the reply, means the message goes again at the next attempt. The
update follows the reply at once; a power cut can also bring back entries removed in the last
``spool.SYNC_INTERVAL`` (their folder is fsynced in batches). docs/spool.md, section 5, lists
every window.

Trust: runs as the submitting user on their own spool or drop-folder entry (the agents,
``sendmail -odi``), and as the runners (root or the ``mailshim`` user). Entries are parsed
strictly (spoolfmt); unreadable ones are quarantined. The listener is untrusted: its replies
arrive cleaned by relay.py and only ever go into logs, state and reports as text.

Raises ``MailshimError`` when the spool cannot record an outcome (full, read-only); the
entry's lock is released. Problems with the entry itself or with the listener never escape
(they are logged, retried, bounced or quarantined).
"""

from __future__ import annotations

import os
import sys
import time

from mailshim import bounce, maillog, mailstats, ownview, policy, spoolentry
from mailshim.constants import (
    BOUNCED,
    DEFERRED,
    QUARANTINED,
    QUEUED,
    REJECTED,
    SENT,
    THROTTLED,
)
from mailshim.errors import DataError
from mailshim.reply import Reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from mailshim.config import Config
    from mailshim.relay import RelayClient, SendResult
    from mailshim.spoolfmt import State


def _fmt_delay(seconds: float) -> str:
    return f"{seconds:.2g}" if seconds < 10 else f"{seconds:.0f}"


def _log_replies(queue_id: str, arrival: int, result: SendResult, now: float) -> None:
    """One line per recipient, tagged ``mailshim/smtp`` for pflogsumm, with journal fields;
    each outcome also counts for the metrics (mailstats)."""
    seconds = max(0.0, now - arrival)
    delay = _fmt_delay(seconds)
    for rcpt, reply in result.replies.items():
        if 200 <= reply.code < 300:
            status = SENT
        elif reply.permanent:
            status = BOUNCED
        else:
            status = DEFERRED
        maillog.log(
            f"{queue_id}: to=<{rcpt}>, relay={result.relay}, delay={delay},"
            f" status={status} ({reply})",
            error=status != SENT,
            program="smtp",
            fields={"status": status, "relay": result.relay, "recipient": rcpt, "delay": delay},
        )
        mailstats.delivery(result.relay, status, reply.code, seconds, now)


def _write_report(
    config: Config,
    locked: spoolentry.LockedEntry,
    state: State,
    kind: str,
    recipients: dict[str, Reply],
    now: float,
    queue_id: str | None = None,
) -> str:
    """Spool a delivery status notification about ``locked`` to its sender; returns its id."""
    env = locked.envelope
    try:
        headers = locked.headers()
    except (DataError, OSError):
        headers = b""
    qid = queue_id or spoolentry.new_queue_id()
    data = bounce.build_report(
        kind=kind,
        envelope=env,
        recipients=recipients,
        original_headers=headers,
        reporting_mta=config.helo_name,
        domain=config.domain,
        now=now,
        utc_offset=time.localtime(now).tm_gmtoff,
        message_id=qid,
        expired=state.expired,
        retry_until=env.arrival + config.lifetime if kind == bounce.DELAYED else None,
        last_attempt=state.last_attempt or None,
    )
    writer = locked.spool.new_entry("", [env.sender], os.geteuid(), queue_id=qid)
    try:
        writer.write(data)
        writer.commit(not data.isascii())
    except BaseException:
        writer.abort()
        raise
    what = "non-delivery" if kind == bounce.FAILED else "delay"
    maillog.log(f"{env.queue_id}: sender {what} notification: {qid}")
    return qid


def _carry_out(
    config: Config, locked: spoolentry.LockedEntry, state: State, action: policy.Action, now: float
) -> str:
    """Carry out policy's action on ``locked``: remove, bury or reschedule.

    Returns the action's status (sent | deferred | throttled | bounced | rejected).
    """
    env = locked.envelope
    if action.status in (DEFERRED, THROTTLED):
        if action.warn is not None:
            _write_report(config, locked, state, bounce.DELAYED, action.warn, now)
        locked.save_state(state)
        if state.view:
            ownview.publish(locked.spool, env, state)  # her mailq: status and next try
        locked.release()
        return action.status
    if action.status == SENT:
        locked.remove()
        maillog.log(f"{env.queue_id}: removed")
        _withdraw(locked, state)
        return SENT
    if not action.bury:
        locked.remove()
        maillog.log(f"{env.queue_id}: rejected by the listener; the client was told")
        _withdraw(locked, state)
        return action.status
    if action.report is not None and not state.reported:
        # The report's id is recorded first: after a crash between writing the report and
        # moving the entry, the next run sees the report in the queue and does not repeat it;
        # once written, "reported" says so even after the report itself has gone out (the
        # move to dead/ may fail and be tried again at the next attempt).
        if not state.bounce_id:
            state.bounce_id = spoolentry.new_queue_id()
            locked.save_state(state)
        target = locked.spool
        if not (
            target.exists(state.bounce_id)
            or os.path.lexists(os.path.join(target.dead, state.bounce_id))
        ):
            _write_report(config, locked, state, bounce.FAILED, action.report, now, state.bounce_id)
        state.reported = True
    locked.save_state(state)
    where = locked.bury("dead", action.reason)
    maillog.log(f"{env.queue_id}: moved to {where}: {action.reason}", error=True)
    mailstats.expired(len(set(state.expired)), max(0.0, now - env.arrival))
    _withdraw(locked, state)
    return action.status


def _withdraw(locked: spoolentry.LockedEntry, state: State) -> None:
    """The entry has left the queue: its submitter's view goes too (a bounce tells her)."""
    if state.view:
        ownview.withdraw(locked.spool, state)


def _sendable(addr: str) -> bool:
    """Spool records keep undecodable bytes as surrogates; no such address can be sent."""
    try:
        addr.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quarantine(locked: spoolentry.LockedEntry, why: str) -> tuple[str, dict[str, Reply]]:
    locked.quarantine(why)
    maillog.log(f"{locked.queue_id}: moved to corrupt/: {why}", error=True)
    return QUARANTINED, {}


async def deliver_entry(
    config: Config,
    client: RelayClient,
    locked: spoolentry.LockedEntry,
    *,
    interactive: bool = False,
    discard_rejected: bool = False,
) -> tuple[str, dict[str, Reply]]:
    """One attempt at one locked entry. Returns (status, replies of this attempt).

    Spool errors (disk full, read-only) raise ``MailshimError``; the lock is released.
    """
    try:
        try:
            env = locked.envelope
            state = locked.state()
        except DataError as exc:
            return _quarantine(locked, exc.message)
        if not _sendable(env.sender):
            return _quarantine(locked, "the sender is not valid UTF-8")
        rcpts = state.open_recipients(env)
        for rcpt in [r for r in rcpts if not _sendable(r)]:
            # Only a hand-made entry holds one: it can never go out, so it fails now.
            state.failed[rcpt] = Reply(553, "5.1.3 the address is not valid UTF-8 (not sent)")
            rcpts.remove(rcpt)
        if not rcpts:
            # Nothing left to send: a crash came after the last reply was recorded.
            now = time.time()
            action = policy.decide(config, env, state, now, interactive=interactive)
            return _carry_out(config, locked, state, action, now), {}
        started = time.time()
        try:
            with locked.message() as body:
                result = await client.send(env.sender, rcpts, body, env.size, env.eightbit)
        except DataError as exc:
            return _quarantine(locked, exc.message)
        locked.spool.record_listener_size(client.listener_size)
        now = time.time()
        _log_replies(env.queue_id, env.arrival, result, now)
        # A forced attempt before the entry was due neither counts nor moves its schedule.
        due_at = state.next_attempt if policy.is_early(state, started) else 0
        pressure = policy.record(
            state, result.replies, now, counted=not due_at, relay_level=result.relay_level
        )
        action = policy.decide(
            config, env, state, now, pressure=pressure, due_at=due_at,
            interactive=interactive, discard_rejected=discard_rejected,
        )  # fmt: skip
        return _carry_out(config, locked, state, action, now), dict(result.replies)
    finally:
        locked.release()


async def deliver_drop(
    config: Config,
    client: RelayClient,
    entry: spoolentry.DropEntry,
    *,
    interactive: bool = False,
    discard_rejected: bool = False,
) -> tuple[str, dict[str, Reply]]:
    """One attempt at the submitter's own drop-folder entry, by the submitter.

    Delivered recipients leave the entry (it is removed, or atomically replaced by one for
    the others); what is left, the runner picks up and retries or bounces. Refusals the
    caller is told about now (interactive) are dropped.
    """
    try:
        if not entry.still_here():
            return QUEUED, {}
        try:
            env = entry.envelope
            body_file = entry.message()
        except DataError:
            return QUEUED, {}  # the runner will look at it and quarantine it
        rcpts = [r for r in env.recipients if r not in env.failed]
        if not rcpts:
            body_file.close()
            return QUEUED, {}  # only refusals are left: the runner bounces them
        with body_file as body:
            result = await client.send(env.sender, rcpts, body, env.size, env.eightbit)
        _log_replies(env.queue_id, env.arrival, result, time.time())
        done = set(result.sent())
        refused = set(result.bounced())
        told = interactive and (not discard_rejected or not done)
        left = [r for r in env.recipients if r not in done and not (told and r in refused)]
        # Refusals nobody told the caller about stay in the entry as failed records: the
        # runner bounces them and never sends the message to them again (issue 12, item 11).
        failed = dict(env.failed)
        failed.update((r, str(result.replies[r])) for r in left if r in refused)
        if not left:
            entry.remove()
            maillog.log(f"{env.queue_id}: removed")
            if not refused:
                return SENT, dict(result.replies)
            return (BOUNCED if done else REJECTED), dict(result.replies)
        if len(left) < len(env.recipients) or len(failed) > len(env.failed):
            entry.rewrite(left, failed)
        else:
            entry.poke()
        if refused and done:
            return BOUNCED, dict(result.replies)
        return DEFERRED, dict(result.replies)
    finally:
        entry.release()


def client_for(config: Config, transcript: Callable[[str], None] | None = None) -> RelayClient:
    from mailshim.relay import RelayClient

    return RelayClient(config.relays, helo=config.helo_name, transcript=transcript)


def deliver_now(
    config: Config,
    locked: spoolentry.LockedEntry | spoolentry.DropEntry,
    *,
    verbose: bool = False,
    discard_rejected: bool = False,
) -> tuple[str, dict[str, Reply]]:
    """Deliver one just-submitted entry synchronously (``-odi``, ``-v``, ``-bs``)."""
    import asyncio

    def transcript(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    async def run() -> tuple[str, dict[str, Reply]]:
        async with client_for(config, transcript if verbose else None) as client:
            if isinstance(locked, spoolentry.DropEntry):
                return await deliver_drop(
                    config, client, locked, interactive=True, discard_rejected=discard_rejected
                )
            return await deliver_entry(
                config, client, locked, interactive=True, discard_rejected=discard_rejected
            )

    try:
        result = asyncio.run(run())
    finally:
        locked.release()
    if isinstance(locked, spoolentry.LockedEntry):
        if result[0] == SENT:
            locked.spool.clear_relay_down()
        # Counted at once (cheap); the queue's figures wait for the next pass.
        mailstats.merge(locked.spool.state_dir, mailstats.take_notes(), time.time())
    return result


def is_connection_failure(replies: dict[str, Reply]) -> bool:
    """Whether no recipient got as far as the listener (it could not be reached)."""
    return bool(replies) and all(r.listener_down for r in replies.values())
