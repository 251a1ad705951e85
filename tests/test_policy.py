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


# --- back-pressure: which pause, and which kind wins -----------------------------------------


def slow_config() -> Config:
    """A schedule whose first step (600 s) is longer than the rate-limit pause (60 s), so the
    greylisting pause (the first step) and the rate-limit pause can be told apart."""
    cfg = config()
    cfg.retry = (600, 1200)
    return cfg


@pytest.mark.parametrize(
    ("replies", "kind", "pause"),
    [
        ({A: GREY}, policy.GREYLIST, 600),
        ({A: RATE}, policy.RATE, policy.PRESSURE_DELAY),
        ({A: GREY, B: RATE}, policy.RATE, policy.PRESSURE_DELAY),
        ({A: RATE, B: GREY}, policy.RATE, policy.PRESSURE_DELAY),
        ({A: GREY, B: GREY}, policy.GREYLIST, 600),
    ],
)
def test_greylisting_waits_a_step_and_a_rate_limit_a_minute(replies, kind, pause):
    st, env = state(), envelope(rcpts=(A, B))
    st.throttled = 2
    assert policy.record(st, replies, NOW) == kind
    assert st.attempts == 0 and st.throttled == 3
    action = policy.decide(slow_config(), env, st, NOW, pressure=kind)
    assert action.status == THROTTLED and action.next_attempt == NOW + pause


def test_a_short_first_step_bounds_the_rate_limit_pause():
    assert policy.pressure_delay(config(), policy.RATE) == 60
    cfg = config()
    cfg.retry = (30, 300)
    assert policy.pressure_delay(cfg, policy.RATE) == 30
    assert policy.pressure_delay(cfg, policy.GREYLIST) == 30


def test_a_real_failure_beside_back_pressure_counts_and_clears_the_throttle():
    st = state()
    st.throttled = 4
    assert policy.record(st, {A: RATE, B: LATER}, NOW) is None
    assert st.attempts == 1 and st.throttled == 0 and st.last_error == str(LATER)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(452, "4.4.6 other"),
        Reply(552, "5.4.5 not back-pressure"),
        Reply(0, "4.4.5 a failure text", kind="timeout"),
        Reply(550, "4.2.2 wrong class"),
    ],
)
def test_only_temporary_replies_with_those_statuses_are_back_pressure(reply):
    assert policy.pressure_kind(reply) is None


# --- the schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "delay"), [(0, 60), (1, 60), (2, 300), (3, 900), (9, 900)])
def test_next_delay_steps(attempts, delay):
    assert policy.next_delay(config(), attempts) == delay


def test_early_means_strictly_before_the_scheduled_time():
    assert policy.is_early(state(next_attempt=NOW + 1), NOW)
    assert not policy.is_early(state(next_attempt=NOW), NOW)
    assert not policy.is_early(state(next_attempt=NOW - 1), NOW)


def test_a_due_time_now_or_past_does_not_pull_the_next_attempt_in():
    for due_at in (NOW, NOW - 10):
        st = state()
        policy.record(st, {A: LATER}, NOW)
        action = policy.decide(config(), envelope(), st, NOW, due_at=due_at)
        assert action.next_attempt == NOW + 60
    st = state()
    policy.record(st, {A: LATER}, NOW)
    assert policy.decide(config(), envelope(), st, NOW, due_at=NOW + 1).next_attempt == NOW + 1


def test_record_keeps_the_first_attempt_and_moves_the_last():
    st = state()
    policy.record(st, {A: LATER}, NOW + 0.7)
    policy.record(st, {A: LATER}, NOW + 500.9)
    assert (st.first_attempt, st.last_attempt) == (NOW, NOW + 500)


@pytest.mark.parametrize("code", [199, 300, 354])
def test_only_2xx_is_delivered(code):
    st = state()
    policy.record(st, {A: Reply(code, "odd")}, NOW)
    assert A not in st.done and A in st.pending and st.attempts == 1


def test_2xx_boundaries_are_delivered():
    st = state()
    policy.record(st, {A: Reply(200, "ok"), B: Reply(299, "ok")}, NOW)
    assert set(st.done) == {A, B} and not st.pending and st.attempts == 0


def test_a_later_answer_replaces_an_earlier_pending_one():
    st = state()
    policy.record(st, {A: LATER, B: LATER}, NOW)
    policy.record(st, {A: OK, B: NO}, NOW + 60)
    assert not st.pending and st.done == {A: OK} and st.failed == {B: NO}


# --- lifetime and warnings: the boundaries ----------------------------------------------------


@pytest.mark.parametrize(("age", "expired"), [(5 * 86400 - 1, False), (5 * 86400, True)])
def test_lifetime_boundary(age, expired):
    st = state()
    policy.record(st, {A: LATER}, NOW)
    action = policy.decide(config(), envelope(age=age), st, NOW)
    assert (action.status == BOUNCED) is expired and (st.expired == [A]) is expired


def test_lifetime_counts_from_a_requeue_out_of_dead():
    st = state()
    st.requeued = NOW - 100
    policy.record(st, {A: LATER}, NOW)
    assert policy.decide(config(), envelope(age=6 * 86400), st, NOW).status == DEFERRED
    assert not st.expired


def test_a_recipient_never_tried_expires_as_not_tried():
    st, env = state(done=(B,)), envelope(age=6 * 86400, rcpts=(A, B))
    assert policy.expire(config(), env, st, NOW)
    assert st.failed[A].kind == "not-tried" and st.failed[A].code == 0
    assert st.failed[A].text == "no attempt reached the listener" and st.expired == [A]
    # expiring again neither adds nor repeats anything
    assert not policy.expire(config(), env, st, NOW + 1)
    assert st.expired == [A]


def test_expired_recipients_are_listed_once():
    st = state()
    st.expired = [A]
    st.pending[A] = LATER
    assert policy.expire(config(), envelope(age=6 * 86400), st, NOW)
    assert st.expired == [A]


@pytest.mark.parametrize(("age", "warned"), [(4 * 3600 - 1, False), (4 * 3600, True)])
def test_warn_after_boundary(age, warned):
    st = state()
    policy.record(st, {A: LATER}, NOW)
    action = policy.decide(config(), envelope(age=age), st, NOW)
    assert (action.warn is not None) is warned and st.warned is warned


def test_warning_counts_from_a_requeue_and_is_off_at_zero():
    st = state()
    st.requeued = NOW - 60
    policy.record(st, {A: LATER}, NOW)
    assert policy.decide(config(), envelope(age=5 * 3600), st, NOW).warn is None
    cfg = config()
    cfg.warn_after = 0
    st = state()
    policy.record(st, {A: LATER}, NOW)
    assert policy.decide(cfg, envelope(age=5 * 3600), st, NOW).warn is None


def test_the_warning_names_untried_recipients_as_not_yet_tried():
    st, env = state(), envelope(age=5 * 3600, rcpts=(A, B))
    policy.record(st, {A: LATER}, NOW)
    st.pending.pop(B, None)
    warn = policy.decide(config(), env, st, NOW).warn
    assert warn is not None and warn[A] == LATER
    assert (warn[B].code, warn[B].kind, warn[B].text) == (0, "not-tried", "not yet tried")


# --- finished entries ----------------------------------------------------------------------


def test_interactive_partly_accepted_bounces_nothing_to_the_sender():
    """-odi: the caller saw the refusal; the accepted part went, so the entry is finished as
    bounced (buried for the record) with no report."""
    st, env = state(), envelope(rcpts=(A, B))
    policy.record(st, {A: NO, B: OK}, NOW)
    action = policy.decide(config(), env, st, NOW, interactive=True)
    assert (action.status, action.report, action.bury) == (BOUNCED, None, True)


def test_the_reason_lists_every_failed_recipient():
    st, env = state(), envelope(rcpts=(A, B))
    policy.record(st, {A: NO, B: Reply(554, "5.7.1 denied")}, NOW)
    action = policy.decide(config(), env, st, NOW)
    assert action.reason == (
        "<a@example.org>: 550 5.1.1 no such user; <b@example.org>: 554 5.7.1 denied"
    )


def test_action_defaults_and_repr():
    action = policy.Action(SENT)
    assert (action.next_attempt, action.warn, action.report, action.bury, action.reason) == (
        0, None, None, False, "",
    )  # fmt: skip
    assert repr(action) == (
        "Action('sent', next_attempt=0, warn=None, report=None, bury=False, reason='')"
    )


def test_an_attempt_without_back_pressure_returns_none_and_keeps_the_throttle_count():
    for replies in ({A: OK}, {A: NO}, {A: OK, B: NO}):
        st = state()
        st.throttled = 2
        assert policy.record(st, replies, NOW) is None
        assert st.throttled == 2 and st.attempts == 0


# --- waiting for the relay, not for the recipient (relay_wait, due_after_recovery) -------------


@pytest.mark.parametrize(
    ("replies", "relay_level", "waits"),
    [
        ({A: DOWN}, {A}, True),  # the relay refused the connection: only the relay is awaited
        ({A: DOWN, B: DOWN}, {A, B}, True),
        ({A: OK, B: DOWN}, {B}, True),  # one delivered, the other waits for the relay
        ({A: LATER, B: DOWN}, {B}, False),  # A's own 4xx keeps the schedule for the entry
        ({A: LATER}, set(), False),  # greylisting-like 4xx of the recipient
        ({A: OK}, set(), False),  # nothing deferred: nothing waits
        ({A: OK}, {A}, False),
        ({A: NO}, {A}, False),  # a permanent failure is no wait at all
        ({A: RATE}, {A}, False),  # back-pressure keeps its own short pause
    ],
)
def test_relay_wait_only_when_every_deferral_is_the_relays(replies, relay_level, waits):
    st = state()
    policy.record(st, replies, NOW, relay_level=frozenset(relay_level))
    assert st.relay_wait is waits
    assert policy.due_after_recovery(st) is waits


def test_a_later_attempt_clears_relay_wait_and_held_entries_never_go_early():
    st = state()
    policy.record(st, {A: DOWN}, NOW, relay_level=frozenset({A}))
    assert st.relay_wait is True and policy.due_after_recovery(st) is True
    st.held = True
    assert policy.due_after_recovery(st) is False  # held by the administrator: stays
    st.held = False
    policy.record(st, {A: LATER}, NOW + 60)  # now the recipient's own deferral
    assert st.relay_wait is False and policy.due_after_recovery(st) is False
    st.relay_wait, st.held = False, True
    assert policy.due_after_recovery(st) is False
