"""Delivery policy: what to do with an entry after an attempt, as a pure function.

``record()`` folds one attempt's replies into the entry's state; ``decide()`` turns the state
into an ``Action`` (sent, retry at T, warn, bounce, expire). Neither touches a file, a socket
or the clock: the time is an argument, and the runner (runner.py) executes the action.

The rules, per recipient: a 2xx is recorded and never sent again; a 4xx waits for the next
step of ``[queue] retry`` (the last step repeats); a 5xx is reported to the envelope sender in
one bounce once nothing else is pending. After ``warn_after`` a one-time delay warning goes
out; once ``lifetime`` has passed, what is still pending expires and is bounced.
Back-pressure is not failure: ``452 4.4.5`` (rate limit) and ``452 4.2.2`` (greylisting) do
not count as attempts and come back sooner. A *forced* attempt (``sendmail -q``,
``mailshim flush``) made before the entry was due and failing temporarily does not count
either, and leaves the next attempt where the schedule had put it: flushing while the
listener is down can never delay the mail (Postfix's ``postqueue -f`` behaves the same).

Trust: pure; the replies come from an untrusted listener but arrive as (code, text) values
already cleaned by smtpsession.py, and are only stored and quoted. Raises nothing.
"""

from __future__ import annotations

from mailshim import reply as reply_mod
from mailshim.constants import BOUNCED, DEFERRED, REJECTED, SENT, THROTTLED
from mailshim.reply import Reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.spoolfmt import Envelope, State

PRESSURE_DELAY = 60  # at most this long before a throttled entry is due again
RATE_LIMITED = ("4.4.5",)  # Stalwart: too many messages per session or per second
GREYLISTED = ("4.2.2",)  # Stalwart's greylisting reply
RATE = "rate"
GREYLIST = "greylist"


def next_delay(config: Config, attempts: int) -> int:
    """Seconds until the next try after ``attempts`` counted failures (the last step repeats)."""
    steps = config.retry
    return steps[min(max(attempts, 1), len(steps)) - 1]


def pressure_kind(reply: Reply) -> str | None:
    """``RATE`` or ``GREYLIST`` when ``reply`` is back-pressure rather than a failure."""
    if reply.code == 0 or not reply.temporary:
        return None
    if reply.enhanced in RATE_LIMITED:
        return RATE
    if reply.enhanced in GREYLISTED:
        return GREYLIST
    return None


def pressure_delay(config: Config, kind: str) -> int:
    first = config.retry[0]
    return first if kind == GREYLIST else min(first, PRESSURE_DELAY)


def is_early(state: State, now: float) -> bool:
    """The entry is tried before its scheduled time (only a forced flush does that)."""
    return state.next_attempt > now


def record(
    state: State,
    replies: dict[str, Reply],
    now: float,
    *,
    counted: bool = True,
    relay_level: frozenset[str] = frozenset(),
) -> str | None:
    """Fold one attempt's replies into ``state``; returns the back-pressure kind when that is
    all the attempt met. A temporary failure that is not back-pressure counts toward the
    schedule, unless ``counted`` is False (a forced attempt before the entry was due).
    ``relay_level``: the recipients deferred for the relay's sake, not their own (see
    ``relay.SendResult``); when every deferral is such, ``state.relay_wait`` says so, and the
    entry is due again as soon as a relay takes mail (``due_after_recovery``)."""
    if state.first_attempt == 0:
        state.first_attempt = int(now)
    state.last_attempt = int(now)
    failure = False
    pressure: str | None = None
    for rcpt, reply in replies.items():
        if 200 <= reply.code < 300:
            state.done[rcpt] = reply
            state.pending.pop(rcpt, None)
        elif reply.permanent:
            state.failed[rcpt] = reply
            state.pending.pop(rcpt, None)
        else:
            state.pending[rcpt] = reply
            state.last_error = str(reply)
            kind = pressure_kind(reply)
            if kind is None:
                failure = True
            elif pressure != RATE:
                pressure = kind
    state.relay_wait = failure and all(
        rcpt in relay_level for rcpt, reply in replies.items() if reply.temporary
    )
    if failure:
        if counted:
            state.attempts += 1
        state.throttled = 0
        return None
    if pressure is not None:
        state.throttled += 1
    return pressure


def due_after_recovery(state: State) -> bool:
    """Whether an entry not yet due may go now that a relay has taken mail again: it waits
    only for the relay (refused, timed out, 421, no reply...), not for a recipient's own 4xx
    (greylisting, a full mailbox), which keeps its schedule. Held entries never go."""
    return state.relay_wait and not state.held


class Action:
    """What the runner does with an entry after ``decide()``.

    - ``status``: SENT (remove the entry), DEFERRED or THROTTLED (save the state: the next
      attempt is ``next_attempt``), BOUNCED or REJECTED (the entry is finished with failures).
    - ``warn``: recipients -> reason for a delay warning to write first, or None.
    - ``report``: recipients -> reason for a non-delivery report, or None.
    - ``bury``: move the entry to dead/ with ``reason``; otherwise a finished entry is removed.
    """

    __slots__ = ("bury", "next_attempt", "reason", "report", "status", "warn")

    def __init__(self, status: str) -> None:
        self.status = status
        self.next_attempt = 0
        self.warn: dict[str, Reply] | None = None
        self.report: dict[str, Reply] | None = None
        self.bury = False
        self.reason = ""

    def __repr__(self) -> str:
        return (
            f"Action({self.status!r}, next_attempt={self.next_attempt}, warn={self.warn!r},"
            f" report={self.report!r}, bury={self.bury}, reason={self.reason!r})"
        )


def _since(env: Envelope, state: State) -> int:
    """Lifetime and warnings count from arrival, or from the requeue out of dead/."""
    return max(env.arrival, state.requeued)


def expire(config: Config, env: Envelope, state: State, now: float) -> bool:
    """Once ``lifetime`` has passed, every open recipient fails as expired."""
    open_rcpts = state.open_recipients(env)
    if not open_rcpts or now - _since(env, state) < config.lifetime:
        return False
    for rcpt in open_rcpts:
        last = state.pending.pop(rcpt, None)
        state.failed[rcpt] = last or Reply(
            0, "no attempt reached the listener", kind=reply_mod.NOT_TRIED
        )
        if rcpt not in state.expired:
            state.expired.append(rcpt)
    return True


def decide(
    config: Config,
    env: Envelope,
    state: State,
    now: float,
    *,
    pressure: str | None = None,
    due_at: int = 0,
    interactive: bool = False,
    discard_rejected: bool = False,
) -> Action:
    """The action after an attempt (``state`` already holds its replies; see ``record``).

    ``due_at``: when the attempt was forced before the entry was due, its scheduled time,
    which the next attempt is never later than. ``interactive``: the caller was told each
    refusal (``-odi``, ``-bs``), so no report is made; with ``discard_rejected`` (``-bs``) a
    message nobody accepted is dropped (the client got the 5xx), while a partly accepted one
    still bounces the rest (the client got a 250). Updates ``state`` (expiry, next attempt,
    warned) to what the action leaves behind.
    """
    expire(config, env, state, now)
    open_rcpts = state.open_recipients(env)
    if open_rcpts:
        action = Action(THROTTLED if pressure else DEFERRED)
        delay = pressure_delay(config, pressure) if pressure else next_delay(config, state.attempts)
        next_attempt = int(now) + delay
        if due_at > now:
            next_attempt = min(next_attempt, due_at)
        state.next_attempt = action.next_attempt = next_attempt
        if (
            config.warn_after
            and not state.warned
            and env.sender
            and now - _since(env, state) >= config.warn_after
        ):
            action.warn = {
                r: state.pending.get(r) or Reply(0, "not yet tried", kind=reply_mod.NOT_TRIED)
                for r in open_rcpts
            }
            state.warned = True
        return action
    if not state.failed:
        return Action(SENT)
    told = interactive and (not discard_rejected or not state.done)
    if told and discard_rejected:
        return Action(REJECTED)
    action = Action(BOUNCED if (state.done or not told) else REJECTED)
    action.bury = True
    action.reason = "; ".join(
        f"<{r}>: {'expired in the queue; last error: ' if r in state.expired else ''}{why}"
        for r, why in state.failed.items()
    )
    if not told and env.sender:
        action.report = dict(state.failed)
    return action
