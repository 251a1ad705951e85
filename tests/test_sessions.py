"""sessions: a flush delivers over several SMTP sessions at once, as many as ``[relay]
concurrency`` allows, and fewer when the listener pushes back; every message still goes
exactly once. The real ``mailshim flush`` runs as a subprocess against a real listener
(conftest.FaultListener) that counts its open connections and can refuse the extra ones."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest

from conftest import message_queue_id, queue_config, queue_entries, tool
from mailshim import configload, spool
from mailshim.errors import ConfigError


def queue(world, n: int, rcpts=("bob@example.org",)) -> list[str]:
    return queue_entries(world, rcpts, n=n)


def configure(world, relay: str = "", extra: str = "") -> None:
    log = world.tmp / "mail.log"
    queue_config(world, relay=relay, extra=f'[log]\nfile = "{log}"\n{extra}')


def flush(world) -> subprocess.CompletedProcess[bytes]:
    done = world.run("mailshim", ["flush"], timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def delivered(world) -> Counter[str]:
    return Counter(message_queue_id(m) for m in world.listener.messages)


def logged(world) -> str:
    path = world.tmp / "mail.log"
    return path.read_text() if path.exists() else ""


def attempts(world, qid: str) -> int:
    try:
        return spool.Spool(str(world.spool)).load_state(qid).attempts
    except FileNotFoundError:
        return 0


def test_a_flush_opens_up_to_four_sessions_by_default_and_sends_each_message_once(fworld):
    configure(fworld)
    fworld.listener.handler.data_delay = 0.02  # a listener that takes a moment per message
    ids = queue(fworld, 60)
    out = flush(fworld)
    assert delivered(fworld) == Counter(ids)
    assert fworld.queued() == []
    assert b"60 delivered" in out.stdout
    h = fworld.listener.handler
    assert 2 <= h.peak_connections <= 4
    assert h.sessions <= 4  # each session carried many messages: no reconnect per message


def test_the_other_sessions_open_while_the_first_message_is_still_going(fworld):
    # They wait for the listener's greeting, not for the first message's reply: a big first
    # message does not hold the rest back.
    configure(fworld)
    fworld.listener.handler.data_delay = 0.5
    ids = queue(fworld, 4)
    flush(fworld)
    assert delivered(fworld) == Counter(ids)
    assert fworld.listener.handler.open_at_reply[0] >= 2


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_caps_the_sessions_open_at_once(fworld, concurrency):
    configure(fworld, relay=f"concurrency = {concurrency}")
    fworld.listener.handler.data_delay = 0.02
    ids = queue(fworld, 30)
    flush(fworld)
    assert delivered(fworld) == Counter(ids)
    assert fworld.listener.handler.peak_connections == concurrency


def test_a_listener_down_costs_one_entry_an_attempt_not_one_per_session(fworld):
    configure(fworld)
    ids = queue(fworld, 10)
    fworld.listener.stop()
    out = fworld.run("mailshim", ["flush"])
    assert out.returncode == 0
    assert [q for q in ids if attempts(fworld, q)] == ids[:1]
    fworld.listener.start()
    flush(fworld)
    assert delivered(fworld) == Counter(ids)


def test_extra_sessions_refused_with_421_lower_the_concurrency_and_cost_no_attempt(fworld):
    configure(fworld)
    h = fworld.listener.handler
    h.max_connections = 2
    h.data_delay = 0.02
    ids = queue(fworld, 40)
    out = flush(fworld)
    assert h.refused_connections >= 1  # the flush did try a third session
    assert delivered(fworld) == Counter(ids)
    assert fworld.queued() == []
    assert b"40 delivered" in out.stdout and b"deferred" not in out.stdout
    assert "the listener is pushing back" in logged(fworld)
    assert "2 session(s) from now on" in logged(fworld)


def test_a_per_session_message_limit_opens_new_sessions_without_deferring(fworld):
    # Stalwart answers 452 4.4.5 to the 11th MAIL of a session: not a failure, a new session.
    configure(fworld)
    h = fworld.listener.handler
    h.per_session = 10
    ids = queue(fworld, 45)
    out = flush(fworld)
    assert delivered(fworld) == Counter(ids)
    assert b"45 delivered" in out.stdout and b"deferred" not in out.stdout
    assert h.sessions >= 5
    assert "pushing back" not in logged(fworld)  # the limit per session is no back-pressure


def test_a_rate_limit_lowers_the_concurrency_and_no_message_goes_twice(fworld):
    configure(fworld)
    h = fworld.listener.handler
    h.per_second = 4
    h.data_delay = 0.02
    ids = queue(fworld, 16)
    for _ in range(6):
        fworld.run("mailshim", ["flush"], timeout=120)
        if not fworld.queued():
            break
    assert h.throttled >= 1
    assert delivered(fworld) == Counter(ids)
    assert "rate limited" in logged(fworld)
    # Throttling is not failure: no entry that waited was charged an attempt.
    assert all(attempts(fworld, q) == 0 for q in fworld.queued())


def test_two_parallel_flushes_never_send_one_entry_twice(fworld):
    configure(fworld)
    fworld.listener.handler.data_delay = 0.01
    ids = queue(fworld, 150)
    procs = [
        subprocess.Popen([tool("mailshim"), "flush"], env=fworld.env, stdout=subprocess.DEVNULL)
        for _ in range(3)
    ]
    for p in procs:
        assert p.wait(120) == 0
    assert delivered(fworld) == Counter(ids)
    assert fworld.queued() == []


def test_the_daemon_delivers_over_parallel_sessions(fworld):
    configure(fworld)
    fworld.listener.handler.data_delay = 0.02
    ids = queue(fworld, 40)
    daemon = subprocess.Popen(
        [tool("mailshim"), "daemon"], env=fworld.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        fworld.wait_queue_empty(60)
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert delivered(fworld) == Counter(ids)
    assert fworld.listener.handler.peak_connections >= 2


def test_recipient_results_survive_parallel_sessions(fworld):
    # Refusals and deferrals are per entry and per recipient, whichever session met them.
    configure(fworld)
    h = fworld.listener.handler
    h.rcpt_replies = {
        "gone@example.org": "550 5.1.1 no such user",
        "later@example.org": "451 4.3.0 try later",
    }
    ids = queue(fworld, 12, rcpts=("bob@example.org", "gone@example.org", "later@example.org"))
    flush(fworld)
    got = delivered(fworld)
    assert all(got[q] == 1 for q in ids)
    assert sorted(fworld.queued()) == sorted(ids)  # later@ is still owed, by every entry
    for qid in ids:
        state = spool.Spool(str(fworld.spool)).load_state(qid)
        assert "bob@example.org" in state.done and "gone@example.org" in state.failed
    bounces = [m for m in fworld.listener.messages if m.mail_from == "<>"]
    assert bounces == []  # no bounce until nothing is pending for the entry


@pytest.mark.parametrize("bad", ["0", "65", '"four"', "true"])
def test_concurrency_out_of_range_is_a_config_error_naming_the_key(tmp_path, bad):
    path = tmp_path / "c.toml"
    path.write_text(f'[relay]\nhost = "127.0.0.1"\nconcurrency = {bad}\n')
    with pytest.raises(ConfigError) as err:
        configload.load(str(path), use_cache=False)
    assert "concurrency" in err.value.message


def test_concurrency_is_read_per_relay(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[[relay]]\nhost = "127.0.0.1"\nconcurrency = 8\n\n[[relay]]\nhost = "127.0.0.2"\n'
    )
    cfg = configload.load(str(path), use_cache=False)
    assert [r.concurrency for r in cfg.relays] == [8, 4]


def test_flush_verbose_names_the_session_of_each_line(fworld):
    configure(fworld)
    fworld.listener.handler.data_delay = 0.02
    queue(fworld, 12)
    out = fworld.run("mailshim", ["flush", "-v"], timeout=120)
    assert out.returncode == 0
    lines = out.stderr.decode().splitlines()
    sessions = {line.split("]", 1)[0] + "]" for line in lines if ">>> DATA" in line}
    assert "[1]" in sessions and len(sessions) >= 2
    assert all(line.startswith("[") for line in lines if ">>> " in line)


def test_one_entry_opens_one_session(fworld):
    configure(fworld)
    ids = queue(fworld, 5)
    out = fworld.sendmail(f"-qI{ids[2]}")
    assert out.returncode == 0, out.stderr
    assert delivered(fworld) == Counter([ids[2]])
    assert fworld.listener.handler.sessions == 1
