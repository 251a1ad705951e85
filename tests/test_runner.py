"""runner: per-recipient retries, bounces, delay warnings, expiry, back-pressure, one
connection per flush, the daemon. A real listener (conftest.FaultListener) and a real spool;
flushes run in-process, the daemon and concurrent flushes as real processes."""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import message_queue_id, queue_config, queue_entries, tool
from mailshim import configload, policy, runner, runpass, spool, spoolentry, spoolfmt


@pytest.fixture(autouse=True)
def no_syslog(monkeypatch):
    monkeypatch.setenv("MAILSHIM_NO_SYSLOG", "1")


def cfg(world):
    return configload.load(str(world.config), use_cache=False)


def sp(world) -> spool.Spool:
    s = spool.Spool(str(world.spool))
    s.ensure()
    return s


def queue(world, rcpts=("bob@example.org",), sender="alice@example.org", arrival=None, n=1):
    return queue_entries(world, rcpts, sender, arrival, n)


def flush(world) -> runpass.Counts:
    return runner.flush(cfg(world), [sp(world)])


def state_of(world, qid) -> spoolfmt.State:
    return sp(world).load_state(qid)


def dead(world) -> list[str]:
    return sorted(n for n in os.listdir(world.spool / "dead") if spoolfmt.valid_id(n))


def reports(world):
    """Messages the listener got from the null sender, parsed."""
    return [
        email.message_from_bytes(m.data, policy=email.policy.default)
        for m in world.listener.messages
        if m.mail_from == "<>"
    ]


def test_flush_uses_one_connection_for_many_messages(fworld):
    queue_config(fworld, relay="concurrency = 1")  # test_sessions.py: several at once
    ids = queue(fworld, n=30)
    counts = flush(fworld)
    assert counts.sent == 30 and fworld.queued() == []
    assert sorted(message_queue_id(m) for m in fworld.listener.messages) == sorted(ids)
    assert fworld.listener.handler.sessions == 1


def test_each_recipient_is_sent_once_and_refusals_bounce_at_the_end(fworld):
    h = fworld.listener.handler
    h.rcpt_replies = {
        "bad@example.org": "550 5.1.1 No such user",
        "later@example.org": "451 4.3.0 Try again later",
    }
    (qid,) = queue(fworld, rcpts=["ok@example.org", "bad@example.org", "later@example.org"])
    flush(fworld)
    (first,) = fworld.listener.messages
    assert first.rcpt_tos == ["ok@example.org"]
    st = state_of(fworld, qid)
    assert list(st.done) == ["ok@example.org"] and list(st.failed) == ["bad@example.org"]
    assert list(st.pending) == ["later@example.org"] and st.attempts == 1
    assert reports(fworld) == []  # no bounce while a recipient is still pending

    del h.rcpt_replies["later@example.org"]
    flush(fworld)
    second = fworld.listener.messages[1]
    assert second.rcpt_tos == ["later@example.org"]  # the 4xx recipient, alone
    (dsn,) = reports(fworld)
    assert fworld.listener.messages[2].rcpt_tos == ["alice@example.org"]
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@example.org>"
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; bad@example.org" in text and "Status: 5.1.1" in text
    assert "ok@example.org" not in text.split("text/rfc822-headers")[0].split("report")[-1]
    assert "Subject: test 0" in text  # the original's headers
    assert fworld.queued() == [] and dead(fworld) == [qid]
    flush(fworld)
    assert len(fworld.listener.messages) == 3  # and nothing more, ever


def test_null_sender_never_gets_a_bounce(fworld):
    fworld.listener.handler.rcpt_replies = {"bad@example.org": "550 5.1.1 No such user"}
    (qid,) = queue(fworld, rcpts=["bad@example.org"], sender="")
    counts = flush(fworld)
    assert counts.bounced == 1 and dead(fworld) == [qid]
    assert fworld.queued() == [] and fworld.listener.messages == []


def test_a_bounce_is_spooled_first_and_survives_the_listener_going_down(fworld):
    fworld.listener.handler.rcpt_replies = {"bad@example.org": "550 5.1.1 No such user"}
    h = fworld.listener.handler
    (qid,) = queue(fworld, rcpts=["bad@example.org"])
    h.data_reply = "451 4.3.0 not now"  # the bounce itself cannot go yet
    flush(fworld)
    (bounce_id,) = fworld.queued()
    assert dead(fworld) == [qid] and state_of(fworld, qid) is not None
    env = sp(fworld).read_envelope(bounce_id)
    assert env.sender == "" and env.recipients == ["alice@example.org"]
    h.data_reply = None
    flush(fworld)
    assert len(reports(fworld)) == 1 and fworld.queued() == []


def test_delay_warning_goes_once_after_warn_after(fworld):
    queue_config(fworld, queue='retry = ["1s"]\nwarn_after = "4h"')
    fworld.listener.handler.rcpt_replies = {"slow@example.org": "451 4.3.0 Try again later"}
    (qid,) = queue(fworld, rcpts=["slow@example.org"], arrival=int(time.time()) - 5 * 3600)
    flush(fworld)
    (warning,) = reports(fworld)
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    assert "Action: delayed" in warning.as_string()
    assert "Will-Retry-Until:" in warning.as_string()
    assert state_of(fworld, qid).warned
    flush(fworld)
    flush(fworld)
    assert len(reports(fworld)) == 1 and fworld.queued() == [qid]


def test_no_warning_before_warn_after(fworld):
    queue_config(fworld, queue='retry = ["1s"]\nwarn_after = "4h"')
    fworld.listener.handler.rcpt_replies = {"slow@example.org": "451 4.3.0 Try again later"}
    queue(fworld, rcpts=["slow@example.org"], arrival=int(time.time()) - 3 * 3600)
    flush(fworld)
    assert reports(fworld) == []


def test_expiry_after_lifetime_bounces_with_the_last_error(fworld):
    fworld.listener.handler.rcpt_replies = {"slow@example.org": "451 4.3.0 Try again later"}
    (qid,) = queue(fworld, rcpts=["slow@example.org"], arrival=int(time.time()) - 6 * 86400)
    flush(fworld)
    assert dead(fworld) == [qid]
    (dsn,) = reports(fworld)
    text = dsn.as_string()
    assert "Action: failed" in text and "Status: 4.3.0" in text
    assert "expired" in text and "451 4.3.0 Try again later" in text
    assert state_of_dead(fworld, qid).expired == ["slow@example.org"]


def state_of_dead(world, qid) -> spoolfmt.State:
    return spoolfmt.decode_state((world.spool / "dead" / (qid + ".state")).read_bytes())


def test_an_old_message_is_still_delivered_when_the_listener_takes_it(fworld):
    queue(fworld, arrival=int(time.time()) - 6 * 86400)
    assert flush(fworld).sent == 1 and reports(fworld) == []


def test_the_retry_schedule_counts_failed_attempts(fworld):
    queue_config(fworld, queue='retry = ["2s", "60s", "600s"]')
    fworld.listener.handler.rcpt_replies = {"bob@example.org": "451 4.3.0 later"}
    (qid,) = queue(fworld)
    for attempts, delay in ((1, 2), (2, 60), (3, 600), (4, 600)):
        make_due(fworld, qid)  # as if its time had come
        before = int(time.time())
        flush(fworld)
        st = state_of(fworld, qid)
        assert st.attempts == attempts and st.throttled == 0
        assert before + delay <= st.next_attempt <= int(time.time()) + delay
        assert st.last_error == "451 4.3.0 later"


def make_due(world, qid) -> None:
    target = sp(world)
    st = target.load_state(qid)
    st.next_attempt = 0
    target.save_state(qid, st)


def test_forced_flushes_before_the_due_time_never_delay_the_schedule(fworld):
    """Issue 11: three `sendmail -q` while the listener refuses gave "TRIES 4, next in 29m".
    A forced attempt made before the entry was due neither counts nor moves its schedule."""
    queue_config(fworld, queue='retry = ["30s", "600s"]')
    fworld.listener.handler.rcpt_replies = {"bob@example.org": "451 4.3.0 later"}
    (qid,) = queue(fworld)
    flush(fworld)  # the first attempt: due, so it counts
    first = state_of(fworld, qid)
    assert first.attempts == 1
    for _ in range(3):
        flush(fworld)
        st = state_of(fworld, qid)
        assert st.attempts == 1 and st.next_attempt == first.next_attempt


def test_rate_limits_make_the_runner_pause_not_fail(fworld, monkeypatch):
    monkeypatch.setattr(runpass, "RATE_PAUSE", 0.6)
    h = fworld.listener.handler
    h.per_second = 3
    ids = queue(fworld, n=8)
    counts = flush(fworld)
    assert counts.sent == 8 and fworld.queued() == []
    assert sorted(message_queue_id(m) for m in fworld.listener.messages) == sorted(ids)
    assert h.throttled > 0  # the limit was hit, and waited out


def test_per_session_limit_means_a_new_connection(fworld):
    h = fworld.listener.handler
    h.per_session = 10  # Stalwart's limit
    ids = queue(fworld, n=25)
    counts = flush(fworld)
    assert counts.sent == 25 and fworld.queued() == []
    assert len(fworld.listener.messages) == 25 and h.sessions >= 3
    assert sorted(message_queue_id(m) for m in fworld.listener.messages) == sorted(ids)


def test_back_pressure_does_not_burn_the_schedule(fworld, monkeypatch):
    monkeypatch.setattr(runpass, "RATE_RETRIES", 0)
    queue_config(fworld, queue='retry = ["300s"]')
    h = fworld.listener.handler
    h.per_second = 1
    _, second = queue(fworld, n=2)
    counts = flush(fworld)
    assert counts.sent == 1 and counts.throttled == 1
    st = state_of(fworld, second)
    assert st.attempts == 0 and st.throttled == 1 and "4.4.5" in st.last_error
    assert st.next_attempt - int(time.time()) <= policy.PRESSURE_DELAY


def test_greylisting_is_retried_without_counting(fworld):
    h = fworld.listener.handler
    h.greylist = 1.0
    (qid,) = queue(fworld)
    flush(fworld)
    st = state_of(fworld, qid)
    assert st.attempts == 0 and st.throttled == 1 and st.last_error.startswith("452 4.2.2")
    assert h.greylisted == 1
    time.sleep(1.1)
    flush(fworld)
    assert fworld.queued() == [] and len(fworld.listener.messages) == 1


def test_listener_down_leaves_the_rest_untouched(fworld):
    ids = queue(fworld, n=5)
    fworld.listener.stop()
    counts = flush(fworld)
    assert counts.deferred == 1 and counts.sent == 0
    tried = [q for q in ids if state_of(fworld, q).attempts]
    assert tried == ids[:1]  # one connection failure is enough to stop the sweep
    fworld.listener.start()
    assert flush(fworld).sent == 5


def test_two_flushes_at_once_send_each_message_once(fworld):
    ids = queue(fworld, n=120)
    procs = [
        subprocess.Popen([tool("mailshim"), "flush"], env=fworld.env, stdout=subprocess.DEVNULL)
        for _ in range(2)
    ]
    for p in procs:
        p.wait(120)
        assert p.returncode == 0
    got = [message_queue_id(m) for m in fworld.listener.messages]
    assert sorted(got) == sorted(ids)
    assert fworld.queued() == []


def test_a_corrupt_entry_goes_to_corrupt_and_the_rest_is_delivered(fworld):
    good = queue(fworld, n=2)
    bad = spoolentry.new_queue_id()
    (fworld.spool / "queue" / bad).write_bytes(b"MAILSHIM-ENTRY 1\nnonsense\n")
    counts = flush(fworld)
    assert counts.sent == 2 and counts.quarantined == 1
    assert (fworld.spool / "corrupt" / bad).exists()
    assert sorted(message_queue_id(m) for m in fworld.listener.messages) == sorted(good)


# --- the daemon ------------------------------------------------------------------------------


def start_daemon(world) -> subprocess.Popen:
    return subprocess.Popen(
        [tool("mailshim"), "daemon"],
        env=world.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_daemon_wakes_on_new_entries_and_stops_on_sigterm(fworld):
    daemon = start_daemon(fworld)
    try:
        for i in range(3):
            r = fworld.sendmail("-odq", "-i", "bob", input=b"Subject: %d\n\nx\n" % i)
            assert r.returncode == 0
        fworld.listener.wait(3)
        wait_for(lambda: fworld.queued() == [])
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert b"daemon: stopped" in err and b"Traceback" not in err
    assert len(fworld.listener.messages) == 3


def test_daemon_retries_on_schedule(fworld):
    h = fworld.listener.handler
    h.rcpt_replies = {"bob@example.org": "451 4.3.0 later"}
    (qid,) = queue(fworld)
    daemon = start_daemon(fworld)
    try:
        wait_for(lambda: state_of(fworld, qid).attempts >= 1)
        h.rcpt_replies = {}
        fworld.listener.wait(1)  # retry = 1s: no new entry needed to wake it
        wait_for(lambda: fworld.queued() == [])
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert daemon.returncode == 0


def test_daemon_finishes_the_message_in_flight_on_sigterm(fworld):
    h = fworld.listener.handler
    h.data_delay = 1.5
    queue(fworld)
    daemon = start_daemon(fworld)
    try:
        wait_for(lambda: h.data_started > 0)  # the whole message is with the listener
        daemon.send_signal(signal.SIGTERM)  # ... which has not answered yet
        _, err = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err
    assert b"daemon: stopped" in err
    # the reply was waited for and recorded: delivered once, gone from the spool
    assert len(fworld.listener.messages) == 1 and fworld.queued() == []


@contextlib.contextmanager
def _immovable(world, qid: str):
    """Make ``queue/<qid>`` immutable (chattr +i): linking, renaming or removing it fails
    with EPERM, even for root, so finishing that one entry is a local error."""
    path = world.spool / "queue" / qid
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_one_entry_that_cannot_be_finished_does_not_stop_the_flush(fworld):
    """Issue 12 item 1: one entry that could not be finished (then: a stale bounce temp
    file; here: an entry that cannot be moved to dead/) made flush exit non-zero and left
    every later entry undelivered. The error is now that entry's: it waits, the others go."""
    fworld.listener.handler.rcpt_replies = {"nobody@example.org": "550 5.1.1 no such user"}
    (bad,) = queue(fworld, rcpts=("nobody@example.org",))
    good = queue(fworld, n=3)
    with _immovable(fworld, bad):
        done = fworld.run("mailshim", ["flush"])
        assert done.returncode == 0, done.stderr
        assert b"1 left after a local error" in done.stdout
        sent = [message_queue_id(m) for m in fworld.listener.messages if m.mail_from != "<>"]
        assert sorted(sent) == sorted(good)
        assert bad in fworld.queued()  # still here, for its next attempt
    assert fworld.run("mailshim", ["flush"]).returncode == 0
    # buried (under a fresh id if its first, interrupted move left a name behind)
    assert fworld.queued() == [] and len(dead(fworld)) == 1
    assert len(reports(fworld)) == 1  # one bounce, however many attempts it took


def test_one_entry_that_cannot_be_finished_does_not_pause_the_daemon(fworld):
    queue_config(fworld, queue='retry = ["10m"]', mode="queue")  # a pause would be 10 minutes
    fworld.listener.handler.rcpt_replies = {"nobody@example.org": "550 5.1.1 no such user"}
    (bad,) = queue(fworld, rcpts=("nobody@example.org",))
    with _immovable(fworld, bad):
        daemon = subprocess.Popen(
            [tool("mailshim"), "daemon"], env=fworld.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and fworld.listener.handler.sessions == 0:
                time.sleep(0.05)  # until the daemon has met the bad entry
            r = fworld.sendmail("-i", "bob@example.org", input=b"Subject: after\n\nbody\n")
            assert r.returncode == 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(
                m.rcpt_tos == ["bob@example.org"] for m in fworld.listener.messages
            ):
                time.sleep(0.05)
            # delivered at once: the spool is not paused for a retry step
            assert any(m.rcpt_tos == ["bob@example.org"] for m in fworld.listener.messages)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and b"Traceback" not in err
    assert b"next pass in" not in err


def test_the_taken_table_holds_every_id_it_was_given_and_no_other():
    """A run's memory of the entries it looked at (runpass.Taken, a packed table that grows
    as it fills): exact, however many ids, for ids of the same microsecond too."""
    taken = runpass.Taken()
    given = [spoolentry.new_queue_id() for _ in range(5000)]
    same_usec = [given[0][:13] + tail for tail in ("AAAAAAA", "AAAAAAB", "ZZZZZZZ")]
    for qid in given + same_usec:
        taken.add(qid)
    taken.add(given[7])  # again: counted once
    assert len(taken) == len(given) + len(same_usec)
    assert all(qid in taken for qid in given + same_usec)
    others = [spoolentry.new_queue_id() for _ in range(5000)] + [given[0][:13] + "AAAAAAC"]
    assert not any(qid in taken for qid in others)
    assert len(taken.table) < 64 * len(taken)  # packed: not a Python object per id
