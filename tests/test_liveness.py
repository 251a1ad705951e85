"""liveness: every pass ends, every wait in it is bounded, and deferred mail comes back out.

Real processes against real listeners: ``mailshim flush``, ``mailshim daemon`` and the
delivery agent run as subprocesses; the backup relay is an aiosmtpd listener
(conftest.FaultListener), the primary a closed port. Issue 22 items 1, 4, 6, 9 and issue 23
item 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from conftest import free_port, message_queue_id, queue_entries, tool
from mailshim import spool
from relayhelpers import Listener


def failover_config(
    world,
    *,
    backup: str = "concurrency = 1",
    queue: str = "",
    primary_port: int = 0,
    backup_port: int = 0,
) -> None:
    """[[relay]] primary on a closed port (default concurrency, 4), backup = the listener."""
    log = world.tmp / "mail.log"
    world.config.write_text(
        f"""
[[relay]]
name = "primary"
host = "127.0.0.1"
port = {primary_port or free_port()}
timeout = 5
helo = "client.example.org"

[[relay]]
name = "backup"
host = "127.0.0.1"
port = {backup_port or world.listener.port}
timeout = 5
helo = "client.example.org"
{backup}

[addresses]
domain = "example.org"

[queue]
dir = "{world.spool}"
retry = ["1s"]
{queue}

[log]
file = "{log}"
"""
    )


def delivered(world) -> Counter[str]:
    return Counter(message_queue_id(m) for m in world.listener.messages)


def test_a_flush_through_a_backup_with_one_slot_ends_and_delivers_everything(fworld):
    failover_config(fworld)
    ids = queue_entries(fworld, n=6)
    out = fworld.run("mailshim", ["flush"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert b"6 delivered" in out.stdout
    assert delivered(fworld) == Counter(ids)
    assert fworld.queued() == []
    assert fworld.listener.handler.peak_connections == 1


def agent_pid(world) -> int | None:
    try:
        return int((world.spool / "state" / "agent.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def agent_lock_free(world) -> bool:
    fd = spool.Spool(str(world.spool)).try_agent_lock()
    if fd is None:
        return False
    os.close(fd)
    return True


def submit(world, n: int) -> None:
    for i in range(n):
        out = world.sendmail(
            "bob@example.org",
            input=b"Subject: %d\n\nbody %d\n" % (i, i),
        )
        assert out.returncode == 0, out.stderr


def test_the_agent_through_a_backup_with_one_slot_delivers_and_leaves(fworld):
    failover_config(fworld)
    submit(fworld, 6)
    fworld.listener.wait(6, timeout=60)
    fworld.wait_queue_empty(30)
    deadline = time.monotonic() + 30
    while not agent_lock_free(fworld) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent_lock_free(fworld)  # the agent left: it holds agent.lock while it lives
    assert len(delivered(fworld)) == 6
    assert fworld.listener.handler.peak_connections == 1


def test_the_daemon_through_a_backup_with_one_slot_delivers_and_stops(fworld):
    failover_config(fworld)
    ids = queue_entries(fworld, n=6)
    daemon = subprocess.Popen(
        [tool("mailshim"), "daemon"], env=fworld.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        fworld.wait_queue_empty(60)
        more = queue_entries(fworld, n=3)  # and a second round, with the pool already open
        fworld.wait_queue_empty(60)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    assert daemon.returncode == 0
    assert delivered(fworld) == Counter(ids + more)
    assert fworld.listener.handler.peak_connections == 1


# -- relay state is not shared too widely (issue 22 item 9) ----------------------------------


def logged(world) -> str:
    path = world.tmp / "mail.log"
    return path.read_text() if path.exists() else ""


def test_a_rate_limit_at_mail_lowers_the_sessions_and_does_not_fail_over(fworld):
    # Stalwart's 452 4.4.5 beyond 4 messages a second, answered at MAIL: one session's
    # back-pressure, not the relay down for the whole run.
    h = fworld.listener.handler
    h.per_second = 4
    h.data_delay = 0.02
    with Listener() as backup:
        failover_config(fworld, backup="", primary_port=fworld.listener.port,
                        backup_port=backup.port)  # fmt: skip
        ids = queue_entries(fworld, n=16)
        for _ in range(8):
            out = fworld.run("mailshim", ["flush"], timeout=60)
            assert out.returncode == 0, out.stderr
            if not fworld.queued():
                break
        assert h.throttled >= 1
        assert delivered(fworld) == Counter(ids)
        assert backup.handler.connections == 0 and backup.handler.messages == []
        assert "rate limited" in logged(fworld)


@pytest.mark.parametrize("said", ["421 4.3.2 Shutting down", "451 4.3.0 queue trouble"])
def test_a_4xx_after_the_dot_waits_for_the_next_attempt_instead_of_failing_over(fworld, said):
    h = fworld.listener.handler
    h.data_reply = said
    with Listener() as backup:
        failover_config(fworld, backup="", primary_port=fworld.listener.port,
                        backup_port=backup.port)  # fmt: skip
        (qid,) = queue_entries(fworld)
        out = fworld.run("mailshim", ["flush"], timeout=60)
        assert out.returncode == 0, out.stderr
        assert b"1 deferred" in out.stdout
        assert backup.handler.connections == 0
        assert fworld.queued() == [qid]
        h.data_reply = None
        out = fworld.run("mailshim", ["flush"], timeout=60)
        assert b"1 delivered" in out.stdout
        assert delivered(fworld) == Counter([qid]) and backup.handler.messages == []


# -- deferred for the relay's sake: due at once when a relay takes mail again (issue 23/2) ---


def state_of(world, qid: str) -> spool.State:
    return spool.Spool(str(world.spool)).load_state(qid)


def test_mail_deferred_while_the_listener_was_down_goes_with_the_first_new_mail(fworld):
    # A long first step: without the recovery rule the deferred entry would wait 10 minutes.
    from conftest import queue_config

    queue_config(fworld, queue='retry = ["10m"]')
    h = fworld.listener.handler
    h.rcpt_replies = {"grey@example.org": "450 4.2.0 Greylisted, try again later"}
    asked: list[str] = []
    plain_rcpt = h.handle_RCPT

    async def rcpt(server, session, envelope, address, options):
        asked.append(address)
        return await plain_rcpt(server, session, envelope, address, options)

    h.handle_RCPT = rcpt
    (grey,) = queue_entries(fworld, rcpts=("grey@example.org",))
    out = fworld.run("mailshim", ["run"])
    assert b"1 deferred" in out.stdout
    grey_next = state_of(fworld, grey).next_attempt
    assert not state_of(fworld, grey).relay_wait  # the recipient's own 4xx
    fworld.listener.stop()
    (old,) = queue_entries(fworld)
    out = fworld.run("mailshim", ["run"])
    assert out.returncode == 0 and b"1 deferred" in out.stdout, out.stdout
    assert state_of(fworld, old).relay_wait and state_of(fworld, old).attempts == 1
    fworld.listener.start()
    out = fworld.run("mailshim", ["run"])  # nothing new: nothing is due, nothing is tried
    # (a scheduled run that tried nothing says nothing: issue 23 item 5)
    assert out.returncode == 0 and fworld.listener.messages == []
    assert state_of(fworld, old).attempts == 1 and state_of(fworld, grey).attempts == 1
    (new,) = queue_entries(fworld)
    out = fworld.run("mailshim", ["run"])
    assert out.returncode == 0, out.stderr
    assert delivered(fworld) == Counter([new, old])  # the old one did not wait for its step
    assert fworld.queued() == [grey]
    assert state_of(fworld, grey).next_attempt == grey_next  # greylisting keeps its schedule
    assert asked.count("grey@example.org") == 1  # not asked again


# -- the listener-down pause (issue 22 item 4) ------------------------------------------------


def test_mail_submitted_after_a_short_blip_goes_out_at_once_not_at_the_next_step(fworld):
    from conftest import queue_config

    queue_config(fworld, queue='retry = ["1s", "25s"]')
    fworld.listener.stop()
    out = fworld.sendmail("bob@example.org", input=b"Subject: during\n\nduring the blip\n")
    assert out.returncode == 0, out.stderr
    (first,) = fworld.queued()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and state_of(fworld, first).attempts < 1:
        time.sleep(0.05)
    assert state_of(fworld, first).attempts >= 1  # the agent found the listener down
    time.sleep(1.5)  # the blip
    fworld.listener.start()
    out = fworld.sendmail("bob@example.org", input=b"Subject: after\n\nright after\n")
    assert out.returncode == 0, out.stderr
    # Well before the 25 s step: the new message, and the deferred one with it.
    got = fworld.listener.wait(2, timeout=15)
    assert sorted(m.header("Subject")[0] for m in got) == ["after", "during"]


# -- SIGTERM after the entry in flight; the daemon never beside an agent (issue 22 item 6) ---


def slow_queue(world, n: int) -> list[str]:
    from conftest import queue_config

    queue_config(world, relay="concurrency = 1")
    world.listener.handler.data_delay = 0.5  # each message takes a moment
    return queue_entries(world, n=n)


def test_sigterm_stops_the_agent_after_the_entry_in_flight(fworld):
    ids = slow_queue(fworld, 12)
    out = fworld.sendmail("bob@example.org", input=b"Subject: start\n\nstarts the agent\n")
    assert out.returncode == 0, out.stderr
    fworld.listener.wait(1, timeout=30)
    pid = agent_pid(fworld)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 30)
    got = delivered(fworld)
    assert len(got) < 13  # it did not finish the whole queue first
    assert all(n == 1 for n in got.values())
    assert agent_lock_free(fworld)
    out = fworld.run("mailshim", ["flush"], timeout=60)  # the rest is intact and goes once
    assert out.returncode == 0, out.stderr
    assert set(ids) <= set(delivered(fworld)) and all(n == 1 for n in delivered(fworld).values())


def test_a_starting_daemon_takes_over_from_a_busy_agent_and_never_runs_beside_it(fworld):
    ids = slow_queue(fworld, 12)
    out = fworld.sendmail("bob@example.org", input=b"Subject: start\n\nstarts the agent\n")
    assert out.returncode == 0, out.stderr
    fworld.listener.wait(1, timeout=30)
    daemon = subprocess.Popen(
        [tool("mailshim"), "daemon"], env=fworld.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        fworld.wait_queue_empty(90)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    got = delivered(fworld)
    assert set(ids) <= set(got) and all(n == 1 for n in got.values())
    # concurrency = 1 per process: two connections at once means two processes delivering
    assert fworld.listener.handler.peak_connections == 1


def test_the_daemon_waits_for_the_holder_of_the_agent_lock(fworld):
    ids = queue_entries(fworld, n=3)
    fd = spool.Spool(str(fworld.spool)).try_agent_lock()  # someone else serves the spool
    assert fd is not None
    daemon = subprocess.Popen(
        [tool("mailshim"), "daemon"], env=fworld.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        time.sleep(2)  # a daemon delivering beside the holder would have sent them by now
        assert fworld.listener.messages == []
        os.close(fd)  # the holder leaves
        fworld.wait_queue_empty(30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert delivered(fworld) == Counter(ids)
    assert b"waiting for it to leave" in err
