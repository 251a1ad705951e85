"""sendlimits: per-user sending limits. The decision as a table, the durable counters, and the
runner holding what is over the limit (real spool, real listener, in-process flushes). The
real-user half (a burst from one user, others unaffected, the daemon) is in
tests/test_sealed_users.py.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import queue_config, tool
from mailshim import config as config_mod
from mailshim import configload, runner, sendlimits, spool
from mailshim.errors import ConfigError
from mailshim.sendlimits import Usage, decide

H = 3600
M = 10**6


@pytest.fixture(autouse=True)
def no_syslog(monkeypatch):
    monkeypatch.setenv("MAILSHIM_NO_SYSLOG", "1")


# --- the decision, as a table -------------------------------------------------------------

# (usage before, recipients, now, messages limit, recipients limit, window)
#   -> (ok, until, first, usage after)
TABLE = [
    # a first message opens a window
    (Usage(), 3, 1000, 100, 500, H, (True, 0, False, Usage(1000, 1, 3))),
    # within the window, under both limits
    (Usage(1000, 5, 10), 2, 1500, 100, 500, H, (True, 0, False, Usage(1000, 6, 12))),
    # the last message the limit allows
    (Usage(1000, 99, 10), 1, 1500, 100, 500, H, (True, 0, False, Usage(1000, 100, 11))),
    # one more: held until the window ends, and this is the refusal to log
    (Usage(1000, 100, 11), 1, 1500, 100, 500, H, (False, 4600, True, Usage(1000, 100, 11, True))),
    # and the next one is held without a second log line
    (
        Usage(1000, 100, 11, True), 1, 1600, 100, 500, H,
        (False, 4600, False, Usage(1000, 100, 11, True)),
    ),
    # the window is over: a fresh one, the log flag cleared
    (Usage(1000, 100, 11, True), 1, 4600, 100, 500, H, (True, 0, False, Usage(4600, 1, 1))),
    # the recipient limit
    (Usage(1000, 3, 499), 2, 1500, 100, 500, H, (False, 4600, True, Usage(1000, 3, 499, True))),
    (Usage(1000, 3, 498), 2, 1500, 100, 500, H, (True, 0, False, Usage(1000, 4, 500))),
    # one message alone over the recipient limit goes at the start of a window
    (Usage(), 800, 1000, 100, 500, H, (True, 0, False, Usage(1000, 1, 800))),
    (Usage(1000, 1, 1), 800, 1500, 100, 500, H, (False, 4600, True, Usage(1000, 1, 1, True))),
    # a limit of 0 is no limit
    (Usage(1000, M, M), 5, 1500, 0, 0, H, (True, 0, False, Usage(1000, M + 1, M + 5))),
    (Usage(1000, M, 3), 5, 1500, 0, 500, H, (True, 0, False, Usage(1000, M + 1, 8))),
    # a clock set back starts a fresh window rather than holding mail for hours
    (Usage(5000, 100, 11, True), 1, 1000, 100, 500, H, (True, 0, False, Usage(1000, 1, 1))),
    # a short window (the tests' own)
    (Usage(1000, 2, 2), 1, 1002, 2, 500, 3, (False, 1003, True, Usage(1000, 2, 2, True))),
    (Usage(1000, 2, 2, True), 1, 1003, 2, 500, 3, (True, 0, False, Usage(1003, 1, 1))),
]  # fmt: skip


@pytest.mark.parametrize(("before", "rcpts", "now", "msgs", "rcpt_limit", "window", "want"), TABLE)
def test_decide(before, rcpts, now, msgs, rcpt_limit, window, want):
    verdict, after = decide(before, rcpts, now, msgs, rcpt_limit, window)
    assert (verdict.ok, verdict.until, verdict.first, after) == want


def test_record_is_fixed_size_and_garbage_counts_from_zero():
    usage = Usage(1_800_000_000, 12, 345, True)
    raw = usage.encode()
    assert len(raw) == 64 and raw.endswith(b"\n")
    assert Usage.decode(raw) == usage
    for junk in (b"", b"v1 1 2", b"v2 1 2 3 0", b"v1 -1 2 3 0", b"\xff" * 64, b"v1 a b c d"):
        assert Usage.decode(junk) == Usage()


# --- the counters on disk -------------------------------------------------------------------


def limiter(folder, messages=2, recipients=500, window=H, exempt=frozenset({0})):
    return sendlimits.Limiter(str(folder), messages, recipients, window, exempt)


def test_counters_survive_a_new_process_and_are_private(tmp_path):
    now = 1_800_000_000
    first = limiter(tmp_path / "limits")
    assert first.admit(4242, 1, now).ok and first.admit(4242, 1, now + 1).ok
    # a new runner (another process, after a crash or restart) reads the same counters
    second = limiter(tmp_path / "limits")
    verdict = second.admit(4242, 1, now + 2)
    assert (verdict.ok, verdict.until, verdict.first) == (False, now + H, True)
    assert second.admit(4242, 1, now + 3).first is False
    path = tmp_path / "limits" / "4242"
    st = path.stat()
    assert st.st_size == 64 and st.st_mode & 0o777 == 0o600
    assert (tmp_path / "limits").stat().st_mode & 0o777 == 0o700
    assert second.at_limit(now + 4) == [(4242, Usage(now, 2, 2, True))]
    assert second.at_limit(now + H) == []  # the window is over


def test_exempt_uids_are_never_counted(tmp_path):
    lim = limiter(tmp_path / "limits", messages=1)
    for _ in range(5):
        assert lim.admit(0, 10, 1_800_000_000).ok
    assert not (tmp_path / "limits").exists()


def test_an_unwritable_counter_never_holds_mail(tmp_path):
    folder = tmp_path / "limits"
    folder.write_text("not a folder")  # mkdir fails, open fails: logged, not counted
    lim = limiter(folder, messages=1)
    assert lim.admit(4242, 1, 1_800_000_000).ok
    assert lim.admit(4242, 1, 1_800_000_001).ok


# --- configuration -------------------------------------------------------------------------


def test_config_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[limits]\nuser_messages = 7\nuser_recipients = 0\nuser_window = "90s"\n')
    cfg = configload.load(str(path), use_cache=False)
    assert (cfg.user_messages, cfg.user_recipients, cfg.user_window) == (7, 0, 90)
    defaults = config_mod.Config()
    assert (defaults.user_messages, defaults.user_recipients, defaults.user_window) == (
        100, 500, 3600,
    )  # fmt: skip
    for bad in ("user_messages = -1", 'user_messages = "many"', 'user_window = "0s"'):
        path.write_text(f"[limits]\n{bad}\n")
        with pytest.raises(ConfigError) as info:
            configload.load(str(path), use_cache=False)
        assert "[limits]" in info.value.message


def test_bad_limits_key_is_exit_78_naming_it(world):
    world.config.write_text(world.config.read_text() + '\n[limits]\nuser_window = "soon"\n')
    r = world.sendmail("bob@example.org", input=b"Subject: x\n\nx\n")
    assert r.returncode == 0 and len(world.queued()) == 1  # a broken file costs no mail
    r = world.run("mailshim", ["run"])
    assert r.returncode == 78
    assert "user_window" in r.stderr.decode(), r.stderr


# --- the runner holds what is over the limit -------------------------------------------------


def system_spool(world) -> spool.Spool:
    target = spool.Spool(str(world.spool))
    target.ensure()
    os.makedirs(world.spool / "incoming", exist_ok=True)  # a system spool: others drop mail
    return target


def queue_as(world, uid: int, n: int, rcpts=("bob@example.org",)) -> list[str]:
    ids = []
    target = system_spool(world)
    for i in range(n):
        w = target.new_entry(f"u{uid}@example.org", list(rcpts), uid)
        w.write(b"From: u@example.org\r\nSubject: %d\r\n\r\nbody\r\n" % i)
        w.commit(False)
        ids.append(w.queue_id)
    return ids


def test_runner_holds_the_rest_until_the_next_window_and_others_go_on(fworld):
    queue_config(fworld, extra='[limits]\nuser_messages = 3\nuser_window = "3s"')
    cfg = configload.load(str(fworld.config), use_cache=False)
    burst = queue_as(fworld, 4242, 7)
    queue_as(fworld, 4343, 2)
    queue_as(fworld, os.getuid(), 4)  # root / the runner: exempt
    counts = runner.flush(cfg, [system_spool(fworld)])
    assert (counts.sent, counts.limited) == (3 + 2 + 4, 4)
    assert "4 held by the sending limits" in counts.summary()
    target = system_spool(fworld)
    held = target.ids()
    # which four wait depends on which session reached its entry first (each is counted
    # under its lock, as its attempt starts); that they are four of the burst does not
    assert len(held) == 4 and set(held) <= set(burst)
    state = target.load_state(held[0])
    assert state.attempts == 0 and state.first_attempt == 0  # nothing was tried
    assert state.last_error.startswith("held: uid 4242 reached its sending limit (3 messages")
    assert state.next_attempt > time.time()
    # mailq says why it waits
    r = fworld.run("mailq", [])
    assert r.returncode == 0
    assert "reached its sending limit" in r.stdout.decode()
    # a forced flush in the same window does not get round the limit
    assert runner.flush(cfg, [system_spool(fworld)]).sent == 0
    assert sorted(target.ids()) == sorted(held)
    # the next window: three more, then the last one
    time.sleep(max(0.0, state.next_attempt - time.time()) + 0.1)
    assert runner.flush(cfg, [system_spool(fworld)]).sent == 3
    time.sleep(3.1)
    assert runner.flush(cfg, [system_spool(fworld)]).sent == 1
    assert system_spool(fworld).ids() == []
    got = [m.mail_from for m in fworld.listener.messages]
    assert got.count("u4242@example.org") == 7 and got.count("u4343@example.org") == 2
    assert len(got) == 7 + 2 + 4  # nothing lost, nothing twice


def test_check_names_users_at_their_limit(fworld):
    queue_config(fworld, extra='[limits]\nuser_messages = 1\nuser_window = "1h"')
    cfg = configload.load(str(fworld.config), use_cache=False)
    queue_as(fworld, 4242, 3)
    runner.flush(cfg, [system_spool(fworld)])
    r = subprocess.run(
        [tool("mailshim"), "check"],
        capture_output=True,
        text=True,
        env={**os.environ, "MAILSHIM_CONFIG": str(fworld.config), "MAILSHIM_NO_SYSLOG": "1"},
        timeout=60,
    )
    (line,) = [x for x in r.stdout.splitlines() if " limits " in x]
    assert line.startswith("warning") and "uid 4242 is at its sending limit" in line
    assert "1 messages" in line or "1 message" in line
