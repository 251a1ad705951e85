"""policy: (entry state, attempt result, now, config) -> action, as a table.

policy.py is pure, so these rows are the rules themselves: no listener, no spool, no clock.
The runner's tests (test_runner.py) show the same rules carried out against a real listener.
"""

from __future__ import annotations

import copy

import pytest

from mailshim import policy
from mailshim.config import Config
from mailshim.constants import BOUNCED, DEFERRED, REJECTED, SENT, THROTTLED
from mailshim.reply import Reply
from mailshim.spoolfmt import Envelope, State

NOW = 1_000_000
A, B = "a@example.org", "b@example.org"
OK = Reply(250, "2.1.5 OK")
LATER = Reply(451, "4.3.0 try later")
DOWN = Reply(0, "connection refused")
NO = Reply(550, "5.1.1 no such user")
RATE = Reply(452, "4.4.5 Rate limit exceeded")
GREY = Reply(452, "4.2.2 Greylisted")


def config() -> Config:
    cfg = Config()
    cfg.retry = (60, 300, 900)
    cfg.lifetime = 5 * 86400
    cfg.warn_after = 4 * 3600
    return cfg


def state(attempts: int = 0, next_attempt: int = 0, warned: bool = False, done=()) -> State:
    st = State()
    st.attempts = attempts
    st.next_attempt = next_attempt
    st.warned = warned
    for rcpt in done:
        st.done[rcpt] = Reply(250, "ok")
    return st


def envelope(age: int = 0, sender: str = "s@example.org", rcpts=(A,)) -> Envelope:
    return Envelope("Q" * 20, sender, list(rcpts), NOW - age, 0)


# (name, state, envelope, replies, options) -> (status, next attempt - NOW, attempts, report?)
ROWS = [
    ("accepted", state(), envelope(), {A: OK}, {}, (SENT, None, 0, None)),
    ("first failure: first step", state(), envelope(), {A: LATER}, {}, (DEFERRED, 60, 1, None)),
    ("second failure", state(attempts=1), envelope(), {A: LATER}, {}, (DEFERRED, 300, 2, None)),
    ("last step repeats", state(attempts=5), envelope(), {A: LATER}, {}, (DEFERRED, 900, 6, None)),
    ("no connection counts too", state(), envelope(), {A: DOWN}, {}, (DEFERRED, 60, 1, None)),
    (
        "forced before due: not counted, schedule kept",
        state(attempts=2, next_attempt=NOW + 200),
        envelope(),
        {A: LATER},
        {"forced": True},
        (DEFERRED, 200, 2, None),
    ),
    (
        "forced before due, unreachable: schedule kept",
        state(attempts=1, next_attempt=NOW + 50),
        envelope(),
        {A: DOWN},
        {"forced": True},
        (DEFERRED, 50, 1, None),
    ),
    (
        "forced when due: an ordinary attempt",
        state(attempts=1, next_attempt=NOW - 5),
        envelope(),
        {A: LATER},
        {"forced": True},
        (DEFERRED, 300, 2, None),
    ),
    (
        "rate limit: not counted",
        state(attempts=1),
        envelope(),
        {A: RATE},
        {},
        (THROTTLED, 60, 1, None),
    ),
    ("greylisting: first step", state(), envelope(), {A: GREY}, {}, (THROTTLED, 60, 0, None)),
    (
        "refused: bounce to the sender",
        state(),
        envelope(),
        {A: NO},
        {},
        (BOUNCED, None, 0, {A: "550 5.1.1 no such user"}),
    ),
    (
        "refused, null sender: no report",
        state(),
        envelope(sender=""),
        {A: NO},
        {},
        (BOUNCED, None, 0, None),
    ),
    (
        "one refused, one pending: wait for the other",
        state(),
        envelope(rcpts=(A, B)),
        {A: NO, B: LATER},
        {},
        (DEFERRED, 60, 1, None),
    ),
    (
        "one refused, one accepted: bounce the refused",
        state(),
        envelope(rcpts=(A, B)),
        {A: NO, B: OK},
        {},
        (BOUNCED, None, 0, {A: "550 5.1.1 no such user"}),
    ),
    (
        "interactive refusal: the caller was told",
        state(),
        envelope(),
        {A: NO},
        {"interactive": True},
        (REJECTED, None, 0, None),
    ),
    (
        "-bs refusal: dropped",
        state(),
        envelope(),
        {A: NO},
        {"interactive": True, "discard_rejected": True},
        (REJECTED, None, 0, None),
    ),
    (
        "-bs partly accepted: the rest bounces",
        state(),
        envelope(rcpts=(A, B)),
        {A: NO, B: OK},
        {"interactive": True, "discard_rejected": True},
        (BOUNCED, None, 0, {A: "550 5.1.1 no such user"}),
    ),
    (
        "lifetime over: expire",
        state(attempts=9),
        envelope(age=5 * 86400 + 1),
        {A: LATER},
        {},
        (BOUNCED, None, 10, {A: "451 4.3.0 try later"}),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_policy_table(row):
    _name, st, env, replies, opts, (status, delay, attempts, report) = row
    # The rows are built once, at import: a run must not leave its changes for the next one
    # (mutmut runs the table many times in one process).
    st, env = copy.deepcopy(st), copy.deepcopy(env)
    cfg = config()
    due_at = st.next_attempt if opts.get("forced") and policy.is_early(st, NOW) else 0
    pressure = policy.record(st, replies, NOW, counted=not due_at)
    action = policy.decide(
        cfg,
        env,
        st,
        NOW,
        pressure=pressure,
        due_at=due_at,
        interactive=opts.get("interactive", False),
        discard_rejected=opts.get("discard_rejected", False),
    )
    assert action.status == status
    assert st.attempts == attempts
    if delay is None:
        assert action.status not in (DEFERRED, THROTTLED)
    else:
        assert action.next_attempt == st.next_attempt == NOW + delay
    shown = None if action.report is None else {r: str(v) for r, v in action.report.items()}
    assert shown == report
    assert action.bury == (
        status == BOUNCED or (status == REJECTED and not opts.get("discard_rejected"))
    )


def test_expiry_names_the_recipients_and_the_reason():
    st, env = state(attempts=3), envelope(age=6 * 86400)
    policy.record(st, {A: LATER}, NOW)
    action = policy.decide(config(), env, st, NOW)
    assert st.expired == [A]
    assert action.reason == "<a@example.org>: expired in the queue; last error: 451 4.3.0 try later"


def test_delay_warning_once_after_warn_after():
    cfg = config()
    st, env = state(), envelope(age=4 * 3600 + 1)
    policy.record(st, {A: LATER}, NOW)
    first = policy.decide(cfg, env, st, NOW)
    assert first.warn == {A: LATER} and st.warned
    policy.record(st, {A: LATER}, NOW + 60)
    assert policy.decide(cfg, env, st, NOW + 60).warn is None


def test_no_warning_for_the_null_sender_or_before_warn_after():
    cfg = config()
    for env in (envelope(age=5 * 3600, sender=""), envelope(age=3600)):
        st = state()
        policy.record(st, {A: LATER}, NOW)
        assert policy.decide(cfg, env, st, NOW).warn is None and not st.warned


def test_a_forced_attempt_is_never_later_than_the_schedule_alone():
    """Whatever the forced attempts meet, the next attempt never moves past the time the
    schedule alone gave, and only due attempts count."""
    cfg = config()
    st, env = state(), envelope()
    policy.record(st, {A: LATER}, NOW)
    policy.decide(cfg, env, st, NOW)
    scheduled = st.next_attempt
    for t, reply in ((NOW + 1, DOWN), (NOW + 2, LATER), (NOW + 3, RATE), (NOW + 59, GREY)):
        due_at = st.next_attempt if policy.is_early(st, t) else 0
        pressure = policy.record(st, {A: reply}, t, counted=not due_at)
        policy.decide(cfg, env, st, t, pressure=pressure, due_at=due_at)
        assert st.next_attempt <= scheduled and st.attempts == 1
