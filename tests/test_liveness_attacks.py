"""liveness under attack: the combinations a hostile reviewer tried after issue 22/23's fixes.

Real processes (the delivery agent, ``mailshim run``/``flush``/``daemon``) against real
listeners (conftest.FaultListener, relayhelpers.RawListener); each test names what it found.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

from conftest import message_queue_id, queue_config, queue_entries, tool
from mailshim import spool


def delivered(world) -> Counter[str]:
    return Counter(message_queue_id(m) for m in world.listener.messages)


def state_of(world, qid: str) -> spool.State:
    return spool.Spool(str(world.spool)).load_state(qid)


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


def deferred_at_an_outage(world, n: int) -> list[str]:
    """``n`` entries, each deferred once for the relay's sake (``relay_wait``) with a long
    step ahead: one ``mailshim run`` per entry while the listener is down."""
    queue_config(world, queue='retry = ["10m"]', relay="concurrency = 1")
    ids = queue_entries(world, n=n)
    world.listener.stop()
    for _ in range(n):
        out = world.run("mailshim", ["run"])
        assert out.returncode == 0, out.stderr
    assert all(state_of(world, q).relay_wait for q in ids)
    world.listener.start()
    return ids


# -- SIGTERM while a recovery drains the entries that waited for the relay -------------------


def test_sigterm_stops_the_agent_while_it_sends_what_waited_for_the_relay(fworld):
    # The pass's recovery list is served before the fair order, and only the order looked
    # at the stop: a SIGTERM waited until every recovered entry had gone.
    old = deferred_at_an_outage(fworld, 10)
    fworld.listener.handler.data_delay = 0.5
    out = fworld.sendmail("bob@example.org", input=b"Subject: new\n\nnew mail\n")
    assert out.returncode == 0, out.stderr
    fworld.listener.wait(2, timeout=30)  # the new one, and the first of the old ones
    pid = agent_pid(fworld)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 30)
    got = delivered(fworld)
    assert all(n == 1 for n in got.values())
    assert len(got) < len(old) + 1  # it stopped after the entry in flight, not at the end
    left = fworld.queued()
    assert left and set(left) <= set(old)


def test_sigterm_stops_the_daemon_while_it_sends_what_waited_for_the_relay(fworld):
    old = deferred_at_an_outage(fworld, 10)
    fworld.listener.handler.data_delay = 0.5
    (new,) = queue_entries(fworld)
    daemon = subprocess.Popen(
        [tool("mailshim"), "daemon"], env=fworld.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        fworld.listener.wait(2, timeout=30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=60)
    got = delivered(fworld)
    assert all(n == 1 for n in got.values())
    assert new in got
    assert len(got) < len(old) + 1


# -- a failover in the middle of a pass, onto a backup with one slot -------------------------


def pair_config(world, primary_port: int, backup_port: int, backup: str, primary: str = "") -> None:
    log = world.tmp / "mail.log"
    world.config.write_text(
        f"""
[[relay]]
name = "primary"
host = "127.0.0.1"
port = {primary_port}
timeout = 5
helo = "client.example.org"
{primary}

[[relay]]
name = "backup"
host = "127.0.0.1"
port = {backup_port}
timeout = 1
helo = "client.example.org"
{backup}

[addresses]
domain = "example.org"

[queue]
dir = "{world.spool}"
retry = ["10m"]

[log]
file = "{log}"
"""
    )


def test_a_failover_in_the_middle_of_a_pass_defers_nothing_as_all_busy(fworld):
    # Four sessions at work on the primary (concurrency 4); one of them meets a 451 at MAIL,
    # the primary is marked down and every session turns to the backup (concurrency 1). The
    # three that find its one slot taken waited the backup's timeout and then deferred their
    # entry "all busy", an attempt counted, though nothing was wrong with either relay.
    from conftest import FaultListener, free_port

    backup = FaultListener(free_port())
    backup.start()
    try:
        backup.handler.data_delay = 0.3
        fworld.listener.handler.data_delay = 0.2
        pair_config(fworld, fworld.listener.port, backup.port, "concurrency = 1")
        ids = queue_entries(fworld, n=16)
        h = fworld.listener.handler
        plain_mail = h.handle_MAIL
        seen = []

        async def mail(server, session, envelope, address, options):
            seen.append(address)
            if len(seen) >= 3:  # the primary turns sour in the middle of the pass
                return "451 4.3.0 Temporary local problem"
            return await plain_mail(server, session, envelope, address, options)

        h.handle_MAIL = mail
        out = fworld.run("mailshim", ["flush"], timeout=120)
        assert out.returncode == 0, out.stderr
        got = Counter(message_queue_id(m) for m in fworld.listener.messages + backup.messages)
        assert all(n == 1 for n in got.values())
        busy = [q for q in fworld.queued() if "all busy" in state_of(fworld, q).last_error]
        assert busy == [], out.stdout
        assert got == Counter(ids), out.stdout
    finally:
        backup.stop()


def test_a_primary_at_its_connection_limit_lowers_the_sessions_and_does_not_fail_over(fworld):
    # The primary takes two connections and answers 421 to a third (Postfix's smtpd and
    # Stalwart at their limit). The extra session it refused went on to the backup, and its
    # next message tried the primary again, met the 421 and marked it down for every session:
    # mail went to the backup while the primary was healthy. The docs say a refused extra
    # session means one session fewer.
    from conftest import FaultListener, free_port

    backup = FaultListener(free_port())
    backup.start()
    try:
        fworld.listener.handler.max_connections = 2
        fworld.listener.handler.data_delay = 0.1
        pair_config(fworld, fworld.listener.port, backup.port, "concurrency = 1")
        ids = queue_entries(fworld, n=12)
        out = fworld.run("mailshim", ["flush"], timeout=120)
        assert out.returncode == 0, out.stderr
        assert b"12 delivered" in out.stdout, out.stdout
        assert fworld.listener.handler.refused_connections >= 1
        assert delivered(fworld) == Counter(ids)
        assert backup.handler.sessions == 0 and backup.messages == []  # not even an EHLO
        log = (fworld.tmp / "mail.log").read_text()
        assert "refused" in log and "session(s) from now on" in log
    finally:
        backup.stop()


# -- a hold between the pass's look at an entry and its lock (the model test, seed 2) --------


def test_an_entry_held_while_the_pass_waits_for_the_relay_is_not_sent(fworld):
    # A pass looks at each entry's state before it takes the entry's lock; those that wait
    # only for the relay are looked at first and sent once a relay takes mail. A `mailshim
    # queue hold` in between finds the lock free and returns: the entry must stay held.
    (old,) = deferred_at_an_outage(fworld, 1)
    fworld.listener.handler.data_delay = 2.0  # the new one's final dot: time to hold the old
    (new,) = queue_entries(fworld)
    run = subprocess.Popen(
        [tool("mailshim"), "run"], env=fworld.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and fworld.listener.handler.data_started < 1:
            time.sleep(0.02)
        assert fworld.listener.handler.data_started == 1  # the new one is in flight
        hold = fworld.run("mailshim", ["queue", "hold", old])
        assert hold.returncode == 0 and b"hold: 1 entry" in hold.stdout, hold.stderr
        _out, err = run.communicate(timeout=60)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 0, err
    assert delivered(fworld) == Counter([new])
    assert fworld.queued() == [old] and state_of(fworld, old).held
