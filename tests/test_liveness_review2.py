"""liveness, second hostile review: suspicions read from the code after issue 22/23's
fixes, each reproduced here for real before it was fixed.

Real processes (``mailshim run``/``flush``, the delivery agent, a real user's drop agent)
against real listeners (conftest.FaultListener, relayhelpers.Listener, LMTP included).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections import Counter

import pytest

from conftest import message_queue_id, queue_config, queue_entries
from mailshim import spool
from relayhelpers import Listener


def delivered(world) -> Counter[str]:
    return Counter(message_queue_id(m) for m in world.listener.messages)


def agent_pid(world) -> int | None:
    try:
        return int((world.spool / "state" / "agent.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def state_of(world, qid: str) -> spool.State:
    return spool.Spool(str(world.spool)).load_state(qid)


def _qid(data: bytes) -> str:
    found = re.search(rb"Message-ID: <([^@>]+)@", data)
    assert found is not None
    return found.group(1).decode()


# -- a rate limit after the final dot is one session's, not the relay down (item 6) ----------


def test_a_rate_limit_after_the_dot_neither_marks_the_relay_down_nor_fails_over(fworld):
    # Stalwart may answer the final dot with 452 4.4.5. It marked the primary down for the
    # whole process: the pass's retry of that very entry went to the backup (one entry: with
    # more, another session's success on the primary clears the mark first).
    from test_liveness_attacks import pair_config

    with Listener() as primary, Listener() as backup:
        pair_config(fworld, primary.port, backup.port, "")
        ids = queue_entries(fworld)
        primary.handler.script("DATA", "452 4.4.5 Rate limit exceeded, try again later")
        out = fworld.run("mailshim", ["flush"], timeout=60)
        assert out.returncode == 0, out.stderr
        assert backup.handler.connections == 0 and backup.handler.messages == [], out.stdout
        got = Counter(_qid(m.data) for m in primary.handler.messages)
        assert got == Counter(ids), out.stdout


# -- LMTP: one recipient's 421 says nothing of another's own 452 (item 5) --------------------


def test_lmtp_one_recipients_421_leaves_anothers_own_452_on_its_schedule(fworld, tmp_path):
    # After the dot, LMTP answers per recipient. A 421 for one made every deferred
    # recipient "relay-level", so the other's full mailbox was retried early at every
    # recovery instead of on its schedule.
    sock = str(tmp_path / "lmtp.sock")
    with Listener(unix=sock, lmtp=True) as lmtp:
        fworld.config.write_text(
            f'[relay]\nsocket = "{sock}"\nprotocol = "lmtp"\n'
            f'[addresses]\ndomain = "example.org"\n'
            f'[queue]\ndir = "{fworld.spool}"\nretry = ["10m"]\n'
        )
        lmtp.handler.data_replies = {
            "full@example.org": "452 4.2.0 Mailbox full",
            "gone@example.org": "421 4.3.2 Shutting down",
        }
        (qid,) = queue_entries(fworld, rcpts=("full@example.org", "gone@example.org"))
        out = fworld.run("mailshim", ["flush"], timeout=60)
        assert out.returncode == 0, out.stderr
        state = state_of(fworld, qid)
        assert set(state.pending) == {"full@example.org", "gone@example.org"}, out.stdout
        assert not state.relay_wait  # full@'s own 4xx keeps the schedule


# -- the agent after a rate-limited ("busy") pass (item 7) -----------------------------------

SYS_RT_SIGTIMEDWAIT = {"x86_64": 128, "aarch64": 137}


def asleep_in_sigtimedwait(pid: int) -> bool:
    """The agent sleeps between passes (``/proc/PID/syscall`` names the call it waits in)."""
    import platform

    number = SYS_RT_SIGTIMEDWAIT.get(platform.machine())
    if number is None:
        pytest.skip("no rt_sigtimedwait number known for this machine")
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == str(number)
    except (OSError, IndexError):
        return False


def test_a_busy_pass_does_not_mark_the_relay_down_so_new_mail_still_pokes_the_agent(fworld):
    # A pass that met only 452 4.4.5 ends "busy"; the agent wrote the "relay down" mark for
    # it, so sendmail stopped poking the agent for the listener-down pause (300 s here),
    # though the listener answered every connection.
    queue_config(
        fworld, queue='retry = ["10m"]', relay="concurrency = 1\nretry_after_failure = 300"
    )
    h = fworld.listener.handler
    plain_mail = h.handle_MAIL
    limited = [True]

    async def mail(server, session, envelope, address, options):
        if limited[0]:
            h.throttled += 1
            return "452 4.4.5 Rate limit exceeded, try again later"
        return await plain_mail(server, session, envelope, address, options)

    h.handle_MAIL = mail
    queue_entries(fworld, n=6)
    out = fworld.sendmail("bob@example.org", input=b"Subject: start\n\nstarts the agent\n")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 60
    pid = None
    while time.monotonic() < deadline:
        pid = agent_pid(fworld)
        if pid is not None and h.throttled >= 5 and asleep_in_sigtimedwait(pid):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the agent never slept after its busy pass")
    assert spool.Spool(str(fworld.spool)).relay_down_since() is None  # it answered: not down
    limited[0] = False
    out = fworld.sendmail("carol@example.org", input=b"Subject: new\n\nnew mail\n")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(m.rcpt_tos == ["carol@example.org"] for m in fworld.listener.messages):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the new mail waited for the listener-down pause")


# -- a real user's drop agent: stop between entries (item 1), recovery (item 2) ---------------

DROP_RUN, DROP_A, DROP_B = "mshl2-run", "mshl2-a", "mshl2-b"


@pytest.fixture(scope="module")
def dbox():
    if os.geteuid() != 0:
        pytest.skip("needs root to create users")
    from test_multiuser import built_box

    with built_box((DROP_RUN, DROP_A, DROP_B), "10m", "retry_after_failure = 1") as system:
        yield system


@pytest.fixture
def drop(dbox):
    from test_drop_linger import _agents
    from test_multiuser import emptied

    plain = dbox.config.read_text()
    mu = emptied(dbox)
    yield mu
    for name in (DROP_A, DROP_B, DROP_RUN):
        for pid in _agents(mu.users[name].uid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        state = mu.users[name].home / ".local" / "state" / "mailshim"
        if state.is_dir():
            shutil.rmtree(state, ignore_errors=True)
    dbox.config.write_text(plain)
    if mu.listener.controller is None:
        mu.listener.start()


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _incoming(mu) -> list[str]:
    return [n for n in mu.names("incoming") if not n.startswith(".")]


@pytest.mark.root
def test_a_users_drop_agent_goes_out_with_the_first_new_mail_after_an_outage(drop):
    # Deferred while the listener was down, the user's entry waited for its 10-minute step
    # although the agent delivered the user's next message at once: the drop agent had no
    # recovery rule (issue 23 item 2).
    from test_drop_linger import _agents

    alice = drop.users[DROP_A]
    drop.listener.stop()
    r = drop.sendmail(alice, "-i", "old@example.org", input=b"Subject: old\n\nold\n")
    assert r.returncode == 0, r.stderr.decode()
    _until(lambda: len(_agents(alice.uid)) == 1, 20, "the user's drop agent")
    _until(lambda: asleep_in_sigtimedwait(_agents(alice.uid)[0]), 20, "the agent to sleep")
    drop.listener.start()
    time.sleep(1.5)  # past the listener-down pause (retry_after_failure = 1)
    r = drop.sendmail(alice, "-i", "new@example.org", input=b"Subject: new\n\nnew\n")
    assert r.returncode == 0, r.stderr.decode()
    got = drop.listener.wait(2, timeout=30)
    assert sorted(m.rcpt_tos[0] for m in got) == ["new@example.org", "old@example.org"]
    _until(lambda: not _agents(alice.uid), 20, "the agent to leave")
    assert _incoming(drop) == []


@pytest.mark.root
def test_sigterm_stops_a_users_drop_agent_after_the_entry_in_flight(drop, tmp_path):
    # A round tried every due entry before the blocked SIGTERM was looked at.
    from conftest import FaultListener, free_port
    from test_drop_linger import _agents

    slow = FaultListener(free_port())
    slow.start()
    try:
        drop.config.write_text(
            drop.config.read_text().replace(f"port = {drop.listener.port}", f"port = {slow.port}")
        )
        alice = drop.users[DROP_A]
        slow.stop()
        for i in range(6):  # all deferred together: one round tries them all
            r = drop.sendmail(alice, "-i", f"r{i}@example.org", input=b"Subject: s\n\nslow\n")
            assert r.returncode == 0, r.stderr.decode()
        _until(lambda: len(_agents(alice.uid)) == 1, 20, "the user's drop agent")
        (pid,) = _agents(alice.uid)
        slow.handler.data_delay = 1.0
        slow.start()
        r = drop.sendmail(alice, "-i", "go@example.org", input=b"Subject: go\n\nnow\n")
        assert r.returncode == 0, r.stderr.decode()
        _until(lambda: slow.handler.data_started >= 1, 30, "the first delivery")
        os.kill(pid, signal.SIGTERM)
        _until(lambda: not _agents(alice.uid), 30, "the agent to leave")
        slow.wait_idle()
        assert len(slow.messages) < 7  # not the whole round first
        assert len(_incoming(drop)) == 7 - len(slow.messages)  # the rest kept, safe
    finally:
        slow.stop()
