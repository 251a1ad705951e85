"""sendlimits: per-user sending limits. The decision as a table, the durable counters, and the
runner holding what is over the limit (real spool, real listener, in-process flushes). The
real-user half (a burst from one user, others unaffected, the daemon) is in
tests/test_sealed_users.py.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import subprocess
import threading
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
    # a message that fits after a held one keeps the window's "logged" mark: one log line
    (Usage(1000, 1, 1, True), 1, 1500, 100, 500, H, (True, 0, False, Usage(1000, 2, 2, True))),
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


# --- only one of the two limits set -----------------------------------------------------------


def test_a_recipient_limit_alone_is_enforced(tmp_path):
    """user_messages = 0 and user_recipients = 5: the limiter exists, applies to a user, and
    holds the message that would pass five recipients."""
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    cfg = config_mod.Config()
    cfg.user_messages, cfg.user_recipients, cfg.user_window = 0, 5, 600
    lim = sendlimits.limiter_for(cfg, target)
    assert lim is not None and (lim.messages, lim.recipients, lim.window) == (0, 5, 600)
    assert lim.folder == os.path.join(target.state_dir, "limits")
    assert lim.applies(4242)
    now = 1_800_000_000
    assert lim.admit(4242, 3, now).ok and lim.admit(4242, 2, now + 1).ok
    held = lim.admit(4242, 1, now + 2)
    assert (held.ok, held.until, held.first) == (False, now + 600, True)
    assert lim.rule() == "5 recipients per 10m"


def test_a_message_limit_alone_is_enforced(tmp_path):
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    cfg = config_mod.Config()
    cfg.user_messages, cfg.user_recipients = 1, 0
    lim = sendlimits.limiter_for(cfg, target)
    assert lim is not None and lim.applies(4242) and lim.rule() == "1 messages per 1h"
    assert lim.admit(4242, 1000, 1_800_000_000).ok
    assert not lim.admit(4242, 1, 1_800_000_001).ok


def test_no_limits_no_limiter(tmp_path):
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    cfg = config_mod.Config()
    cfg.user_messages = cfg.user_recipients = 0
    assert sendlimits.limiter_for(cfg, target) is None
    assert not limiter(tmp_path, messages=0, recipients=0).applies(4242)


def test_who_is_exempt(tmp_path):
    import pwd

    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    owner = os.lstat(target.queue).st_uid
    cfg = config_mod.Config()
    nobody = pwd.getpwnam("nobody").pw_uid
    cfg.trusted_users = ("no-such-user-here", "nobody")
    lim = sendlimits.limiter_for(cfg, target)
    assert lim is not None
    assert lim.exempt == {0, os.geteuid(), owner, nobody}
    assert not lim.applies(nobody) and not lim.applies(0) and lim.applies(4242)
    assert lim.owner == (owner, os.lstat(target.queue).st_gid)
    cfg.trusted_users = ()
    assert sendlimits.limiter_for(cfg, target).applies(nobody)  # type: ignore[union-attr]


# --- what check and mailq say ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "span"),
    [(86400, "1d"), (2 * 86400, "2d"), (3600, "1h"), (7200, "2h"), (90000, "25h"),
     (60, "1m"), (120, "2m"), (90, "90s"), (59, "59s"), (3, "3s")],
)  # fmt: skip
def test_window_in_words(seconds, span):
    assert limiter("/x", window=seconds).rule() == f"2 messages / 500 recipients per {span}"


def test_why_names_the_user_the_rule_the_usage_and_the_time():
    lim = limiter("/x")
    until = time.mktime((2030, 1, 2, 13, 14, 15, 0, 0, -1))
    text = lim.why(0, Usage(1, 2, 7), until)
    assert text == (
        "held: root (uid 0) reached its sending limit (2 messages / 500 recipients per 1h;"
        " sent 2 messages to 7 recipients); goes on at 13:14:15"
    )


def test_login_names_unknown_uids_by_number():
    assert sendlimits.login(0) == "root (uid 0)"
    assert sendlimits.login(4_000_000_000) == "uid 4000000000"


def test_at_limit_lists_who_is_held_or_used_up(tmp_path):
    now = 1_800_000_000
    folder = tmp_path / "limits"
    lim = limiter(folder, messages=3, recipients=10)
    folder.mkdir(mode=0o700)
    for uid, usage in (
        (101, Usage(now, 3, 3)),  # used up its messages
        (102, Usage(now, 2, 3)),  # one message left
        (103, Usage(now, 1, 9, True)),  # held for its recipients
        (104, Usage(now - H, 3, 3, True)),  # that window is over
        (0, Usage(now, 3, 3, True)),  # exempt
    ):
        (folder / str(uid)).write_bytes(usage.encode())
    (folder / "notes").write_text("x")
    assert lim.at_limit(now + 1) == [(101, Usage(now, 3, 3)), (103, Usage(now, 1, 9, True))]
    assert limiter(tmp_path / "none").at_limit(now) == []


def test_usage_record_words():
    assert Usage.decode(b"v1 5 6 7 1") == Usage(5, 6, 7, True)
    assert Usage.decode(b"v1 5 6 7 2").logged is False
    assert Usage.decode(b"v1 5 6 7 0 9") == Usage()
    assert Usage(1, 2, 3, True) != "v1 1 2 3 1" and Usage(1, 2, 3) != Usage(1, 2, 4)
    assert repr(Usage(1, 2, 3, True)) == "Usage(1, 2, 3, True)"
    assert Usage(1, 2, 3).encode() == b"v1 1 2 3 0".ljust(63) + b"\n"
    verdict = sendlimits.Verdict(False, 5, True)
    assert repr(verdict) == "Verdict(ok=False, until=5, first=True)"
    assert repr(sendlimits.Verdict(True)) == "Verdict(ok=True, until=0, first=False)"


def test_a_recipient_limit_counts_only_once_a_window_has_recipients():
    # 0 recipients so far: a message of any size goes (or it could never go)
    verdict, after = decide(Usage(1000, 0, 0), 900, 1001, 100, 500, H)
    assert verdict.ok and after == Usage(1000, 1, 900)
    # exactly up to the limit goes; one more is held
    assert decide(Usage(1000, 1, 400), 100, 1001, 100, 500, H)[0].ok
    assert not decide(Usage(1000, 1, 400), 101, 1001, 100, 500, H)[0].ok


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_root_gives_the_counters_to_the_runner_user(tmp_path):
    folder = tmp_path / "limits"
    lim = sendlimits.Limiter(str(folder), 1, 0, H, frozenset({0}), owner=(4343, 4444))
    assert lim.admit(4242, 1, 1_800_000_000).ok
    st, fst = (folder / "4242").stat(), folder.stat()
    assert (st.st_uid, st.st_gid, fst.st_uid, fst.st_gid) == (4343, 4444, 4343, 4444)
    # a second counter in the existing folder is given away too
    assert lim.admit(4243, 1, 1_800_000_000).ok
    assert (folder / "4243").stat().st_uid == 4343


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool away")
def test_the_spool_owner_is_exempt_not_its_group(tmp_path):
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    os.chown(target.queue, 4343, 4444)
    target = spool.Spool(str(tmp_path / "spool"))
    cfg = config_mod.Config()
    cfg.trusted_users = ()
    lim = sendlimits.limiter_for(cfg, target)
    assert lim is not None and lim.exempt == {0, os.geteuid(), 4343}
    assert lim.owner == (4343, 4444) and lim.applies(4444)


def test_a_counter_that_is_a_symlink_is_not_followed(tmp_path):
    folder = tmp_path / "limits"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(Usage(1_800_000_000, 2, 2, True).encode())
    (folder / "4242").symlink_to(elsewhere)
    lim = limiter(folder, messages=2)
    assert lim.usage(4242) == Usage()  # not the planted record
    assert lim.admit(4242, 1, 1_800_000_000).ok
    assert elsewhere.read_bytes() == Usage(1_800_000_000, 2, 2, True).encode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a device node")
def test_a_counter_that_cannot_be_written_is_logged_and_the_message_goes(tmp_path, capsys):
    from mailshim import maillog

    folder = tmp_path / "limits"
    folder.mkdir()
    os.mknod(folder / "4242", 0o600 | 0o020000, os.makedev(1, 7))  # /dev/full: pwrite fails
    lim = limiter(folder, messages=1)
    old = maillog._stderr
    maillog._stderr = True
    try:
        assert lim.admit(4242, 1, 1_800_000_000).ok
    finally:
        maillog._stderr = old
    err = capsys.readouterr().err
    assert f"limits: {folder / '4242'}: " in err and "; not counted" in err


# --- the gate before a first attempt --------------------------------------------------------


def queued(target: spool.Spool, uid: int) -> str:
    w = target.new_entry("a@example.org", ["b@example.org"], uid)
    w.write(b"Subject: x\r\n\r\nx\r\n")
    w.commit(False)
    return w.queue_id


def gate(lim: sendlimits.Limiter, target: spool.Spool, qid: str, now: float) -> bool:
    """The runner's call: ``gate`` under the entry's lock, released after."""
    locked = target.lock(qid)
    assert locked is not None
    try:
        return sendlimits.gate(lim, locked, now)
    finally:
        locked.release()


def test_gate_counts_first_attempts_and_holds_what_is_over(tmp_path):
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    lim = limiter(tmp_path / "limits", messages=1, window=600)
    now = 1_800_000_000
    first, second = queued(target, 4242), queued(target, 4242)
    assert gate(lim, target, first, now)
    assert not gate(lim, target, second, now + 1)
    state = target.load_state(second)
    assert state.next_attempt == now + 600
    assert state.last_error == lim.why(4242, Usage(now, 1, 1, True), now + 600)
    assert "sent 1 messages to 1 recipients" in state.last_error
    # an entry already tried was counted then: it always goes on
    tried = queued(target, 4242)
    locked = target.lock(tried)
    assert locked is not None
    st = locked.state()
    st.first_attempt = now - 5
    locked.save_state(st)
    locked.release()
    assert gate(lim, target, tried, now + 2)


def test_gate_lets_the_attempt_deal_with_a_damaged_entry(tmp_path):
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    lim = limiter(tmp_path / "limits", messages=1)
    now = 1_800_000_000
    assert gate(lim, target, queued(target, 4242), now)  # uses the one message
    bad_state = queued(target, 4242)
    (tmp_path / "spool" / "state" / bad_state).write_bytes(b"not json")
    assert gate(lim, target, bad_state, now)  # the attempt quarantines it


# --- what the administrator reads: warnings in the journal ---------------------------------


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """A real datagram socket standing in for journald; ``lines()`` -> [(priority, message)]
    of the entries sent to it so far (priority 4 is a warning, 5 a notice)."""
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("MAILSHIM_JOURNAL_SOCKET", path)
    monkeypatch.delenv("MAILSHIM_NO_SYSLOG", raising=False)
    got: list[tuple[str, str]] = []

    def lines() -> list[tuple[str, str]]:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return got
            fields = dict(f.split("=", 1) for f in data.decode().splitlines() if "=" in f)
            got.append((fields["PRIORITY"], fields["MESSAGE"]))

    yield lines
    sock.close()


def test_the_first_refusal_of_a_window_is_a_warning_naming_the_entry(tmp_path, journal):
    target = spool.Spool(str(tmp_path / "spool"))
    target.ensure()
    lim = limiter(tmp_path / "limits", messages=1)
    now = 1_800_000_000
    first, second, third = (queued(target, 4242) for _ in range(3))
    assert gate(lim, target, first, now) and journal() == []
    assert not gate(lim, target, second, now)
    assert not gate(lim, target, third, now)  # one line per user per window
    why = target.load_state(second).last_error
    assert journal() == [("4", f"{second}: {why}; more of its mail waits")]


def test_a_counter_folder_that_cannot_be_made_is_a_warning_and_the_message_goes(tmp_path, journal):
    folder = tmp_path / "limits"
    folder.write_text("not a folder")
    verdict = limiter(folder, messages=1).admit(4242, 1, 1_800_000_000)
    assert verdict.ok is True
    [(priority, line)] = journal()
    assert priority == "4" and line == f"limits: {folder / '4242'}: Not a directory; not counted"


def test_a_counter_that_cannot_be_written_is_a_warning_and_the_message_goes(tmp_path, journal):
    """A full disk or a file-size limit: the count is lost, never the message."""
    lim = limiter(tmp_path / "limits", messages=1)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, old[1]))  # Python ignores SIGXFSZ: EFBIG
    try:
        verdict = lim.admit(4242, 1, 1_800_000_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert verdict.ok is True
    path = tmp_path / "limits" / "4242"
    assert journal() == [("4", f"limits: {path}: File too large; not counted")]
    assert path.read_bytes() == b""  # made, never written: the next message counts from zero
    assert lim.admit(4242, 1, 1_800_000_000).ok and not lim.admit(4242, 1, 1_800_000_001).ok


# --- a counter another runner holds (the daemon and a flush at once) ----------------------------


def hold(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def release_after(fd: int, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, fcntl.flock, (fd, fcntl.LOCK_UN))
    timer.start()
    return timer


def test_a_counter_another_runner_holds_for_a_moment_is_waited_for_and_counted(tmp_path):
    lim = limiter(tmp_path / "limits", messages=5)
    now = 1_800_000_000
    assert lim.admit(4242, 1, now).ok
    fd = hold(tmp_path / "limits" / "4242")
    try:
        timer = release_after(fd, 0.3)  # well within LOCK_WAIT (5 s)
        assert lim.admit(4242, 1, now).ok
        timer.join()
    finally:
        os.close(fd)
    assert lim.usage(4242) == Usage(now, 2, 2)  # not lost: both messages counted


def test_a_counter_that_stays_locked_is_waited_for_once_and_logged_once(
    tmp_path, journal, monkeypatch
):
    """The runner account holding a counter's flock must not stall root's pass per message:
    the message goes uncounted, one warning, and the next ones do not wait again."""
    lim = limiter(tmp_path / "limits", messages=5)
    now = 1_800_000_000
    path = tmp_path / "limits" / "4242"
    assert lim.admit(4242, 1, now).ok
    stuck = ("4", f"limits: {path} stays locked; not counted")
    fd = hold(path)
    try:
        monkeypatch.setattr(sendlimits, "LOCK_WAIT", 0.2)
        for _ in range(3):
            assert lim.admit(4242, 1, now).ok is True
        assert lim.usage(4242) == Usage(now, 1, 1)  # nothing written while another holds it
        assert journal() == [stuck]
        # known to be held: not waited for, even when the holder lets go a moment later
        monkeypatch.setattr(sendlimits, "LOCK_WAIT", 5.0)
        timer = release_after(fd, 2.0)
        assert lim.admit(4242, 1, now).ok
        assert lim.usage(4242) == Usage(now, 1, 1)
        timer.join()
        # free again: counted, and forgotten as stuck, so a new hold is waited for and logged
        assert lim.admit(4242, 1, now).ok and lim.usage(4242) == Usage(now, 2, 2)
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setattr(sendlimits, "LOCK_WAIT", 0.2)
        assert lim.admit(4242, 1, now).ok
        assert journal() == [stuck, stuck]
    finally:
        os.close(fd)


# --- counters and folders that are not what they should be -----------------------------------


def test_a_hardlinked_counter_is_not_used(tmp_path, journal):
    """A link to another file (a planted record, or a file of the runner's elsewhere) would
    let whoever made it set someone's count."""
    folder = tmp_path / "limits"
    folder.mkdir(mode=0o700)
    planted = Usage(1_800_000_000, 2, 2, True).encode()
    (tmp_path / "elsewhere").write_bytes(planted)
    os.link(tmp_path / "elsewhere", folder / "4242")
    lim = limiter(folder, messages=2)
    assert lim.usage(4242) == Usage()
    assert lim.admit(4242, 1, 1_800_000_000).ok
    assert (tmp_path / "elsewhere").read_bytes() == planted
    assert journal() == [
        ("4", f"limits: {folder / '4242'}: not a plain file with one link; not counted")
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_a_counter_of_another_account_is_not_used(tmp_path, journal):
    folder = tmp_path / "limits"
    folder.mkdir(mode=0o700)
    (folder / "4242").write_bytes(Usage(1_800_000_000, 2, 2, True).encode())
    os.chown(folder / "4242", 4242, 4242)  # the counted user's own, say
    lim = limiter(folder, messages=2)
    assert lim.usage(4242) == Usage() and lim.at_limit(1_800_000_001) == []
    assert lim.admit(4242, 1, 1_800_000_000).ok
    assert journal() == [
        ("4", f"limits: {folder / '4242'}: a file another account owns; not counted")
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_root_keeps_counting_in_the_counters_it_gave_the_runner_user(tmp_path):
    lim = sendlimits.Limiter(str(tmp_path / "limits"), 2, 0, H, frozenset({0}), (4343, 4444))
    now = 1_800_000_000
    assert lim.admit(4242, 1, now).ok and lim.admit(4242, 1, now).ok
    assert (tmp_path / "limits" / "4242").stat().st_uid == 4343
    assert lim.usage(4242) == Usage(now, 2, 2)
    assert not lim.admit(4242, 1, now).ok


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder away")
@pytest.mark.parametrize("owner", [None, (4343, 4444)])
def test_a_limits_folder_another_account_controls_is_not_used(tmp_path, journal, owner):
    """uid 1 (daemon) stands for any account that is neither root nor the spool's owner."""
    folder = tmp_path / "limits"
    folder.mkdir(mode=0o700)
    (folder / "4242").write_bytes(Usage(1_800_000_000, 2, 2, True).encode())
    os.chown(folder, 1, 1)
    lim = sendlimits.Limiter(str(folder), 2, 0, H, frozenset({0}), owner)
    assert lim.usage(4242) == Usage() and lim.at_limit(1_800_000_001) == []
    assert lim.admit(4242, 1, 1_800_000_000).ok
    why = "a folder another account controls"
    assert journal() == [("4", f"limits: {folder / '4242'}: {why}; not counted")]


def test_reading_the_counters_never_makes_the_folder(tmp_path):
    """``mailshim check`` and ``mailq`` read the counters: they must not create state/limits
    (as root, with the wrong owner) where the runner has not counted anything yet."""
    lim = limiter(tmp_path / "limits")
    assert lim.usage(4242) == Usage() and lim.at_limit(1_800_000_000) == []
    assert not (tmp_path / "limits").exists()
