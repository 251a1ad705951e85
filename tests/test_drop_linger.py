"""A user's deferred drop entries reach the listener with no runner (dropagent.py; issue 11).

Real users (useradd, as in test_multiuser.py), the system spool layout made by ``mailshim
setup-spool``, a real listener stopped and started, no ``mailshim flush`` by anyone: the
user's own lingering agent retries on the ``[queue] retry`` schedule of the (root-owned)
configuration, one agent per user per spool, and a runner that appears takes over without
a duplicate. Skipped when not root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_multiuser import MSG, System, built_box, emptied

# Names of their own: test_multiuser.py may run at the same time (another checkout).
RUNNER, ALICE, BOB = "mshlinger-run", "mshlinger-a", "mshlinger-b"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users"),
]

STEP = 4  # seconds: the first (and only) retry step of this module's configuration
SLACK = 8.0  # start-up of a process as another user on a loaded machine


def _agents(uid: int) -> list[int]:
    """Pids of delivery agents running as ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mailshim.agent" in argv:
            found.append(int(name))
    return found


def _agent(uid: int) -> int:
    """The one agent of ``uid`` (a forked child shows sendmail's argv until it execs)."""
    _until(lambda: len(_agents(uid)) == 1, 10, f"one agent of uid {uid}")
    (pid,) = _agents(uid)
    return pid


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def box():
    # The daemon's client pauses after finding the listener down: short here.
    with built_box((RUNNER, ALICE, BOB), f"{STEP}s", "retry_after_failure = 1") as system:
        yield system


@pytest.fixture
def lg(box: System):
    """The box with an empty spool and listener, and no agent left behind."""
    mu = emptied(box)
    yield mu
    for name in (ALICE, BOB, RUNNER):
        for pid in _agents(mu.users[name].uid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        state = mu.users[name].home / ".local" / "state" / "mailshim"
        if state.is_dir():
            for path in state.glob("drop-agent.*"):
                if path.is_dir():
                    for f in path.iterdir():
                        f.unlink()
                    path.rmdir()
                else:
                    path.unlink()
    if mu.listener.controller is None:
        mu.listener.start()


def _send(sys_: System, user: str, *rcpts: str):
    r = sys_.sendmail(
        sys_.users[user],
        "-i",
        *rcpts,
        input=MSG,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr == b""
    return r


def _incoming(sys_: System) -> list[str]:
    return [n for n in sys_.names("incoming") if not n.startswith(".")]


def test_listener_down_at_submission_arrives_within_the_first_step(lg):
    alice = lg.users[ALICE]
    lg.listener.stop()
    _send(lg, ALICE, "bob@example.org")
    _until(lambda: len(_incoming(lg)) == 1, 10, "the entry in incoming/")
    _agent(alice.uid)
    time.sleep(3)
    assert len(_agents(alice.uid)) == 1, "the user's agent lingers for the deferred entry"
    lg.listener.start()
    started = time.monotonic()
    (msg,) = lg.listener.wait(1, timeout=STEP + SLACK)
    print(f"delivered {time.monotonic() - started:.1f}s after the listener came back")
    assert msg.rcpt_tos == ["bob@example.org"]
    _until(lambda: _incoming(lg) == [], 10, "incoming/ to empty")
    _until(lambda: _agents(alice.uid) == [], 10, "the agent to leave")
    assert lg.names("queue") == []  # no runner ever touched it


def test_one_agent_per_user_serves_every_entry_they_submit(lg):
    alice = lg.users[ALICE]
    lg.listener.stop()
    for i in range(6):
        _send(lg, ALICE, f"r{i}@example.org")
    _until(lambda: len(_incoming(lg)) == 6, 10, "six entries in incoming/")
    _agent(alice.uid)
    lg.listener.start()
    lg.listener.wait(6, timeout=STEP + SLACK)
    time.sleep(1)
    got = sorted(r for m in lg.listener.messages for r in m.rcpt_tos)
    assert got == sorted(f"r{i}@example.org" for i in range(6))  # each once
    _until(lambda: _agents(alice.uid) == [] and _incoming(lg) == [], 10, "the agent to leave")


def test_users_do_not_interfere_and_cannot_stop_or_plant_each_others_agent(lg):
    alice, bob = lg.users[ALICE], lg.users[BOB]
    lg.listener.stop()
    _send(lg, ALICE, "for-alice@example.org")
    _send(lg, BOB, "for-bob@example.org")
    _until(lambda: len(_incoming(lg)) == 2, 10, "two entries")
    a_pid = _agent(alice.uid)
    _agent(bob.uid)
    lock = next((alice.home / ".local/state/mailshim").glob("drop-agent.*.lock"))
    # Bob can neither take Alice's lock, nor signal her agent, nor note an entry for it.
    got = lg.python(
        bob,
        f"""
        import json, os, signal
        out = []
        for attempt in (
            lambda: os.open({str(lock)!r}, os.O_RDONLY),
            lambda: os.kill({a_pid}, signal.SIGTERM),
            lambda: os.open({str(lock.parent)!r} + "/planted", os.O_CREAT | os.O_WRONLY),
        ):
            try:
                attempt()
                out.append("done")
            except PermissionError:
                out.append("denied")
        print(json.dumps(out))
        """,
    )
    assert got == ["denied", "denied", "denied"]
    assert _agents(alice.uid) == [a_pid]
    lg.listener.start()
    lg.listener.wait(2, timeout=STEP + SLACK)
    time.sleep(1)
    by_rcpt = {m.rcpt_tos[0]: m.mail_from for m in lg.listener.messages}
    assert by_rcpt == {
        "for-alice@example.org": f"{ALICE}@example.org",
        "for-bob@example.org": f"{BOB}@example.org",
    }
    _until(lambda: not _agents(alice.uid) and not _agents(bob.uid), 10, "both agents to leave")


def test_a_state_folder_another_user_can_write_is_not_used(lg, tmp_path: Path):
    alice, bob = lg.users[ALICE], lg.users[BOB]
    shared = Path("/tmp") / f"mailshim-shared-{os.getpid()}"
    (shared / "mailshim").mkdir(parents=True)
    try:
        os.chown(shared, bob.uid, bob.gid)
        os.chown(shared / "mailshim", bob.uid, bob.gid)
        os.chmod(shared / "mailshim", 0o777)
        lg.listener.stop()
        r = lg.sendmail(
            alice, "-i", "bob@example.org", input=MSG,
            XDG_STATE_HOME=str(shared),
        )  # fmt: skip
        assert r.returncode == 0 and r.stderr == b""
        _until(lambda: len(_incoming(lg)) == 1, 10, "the entry")
        time.sleep(0.5)
        # No lingering agent with a lock Bob could take: the entry waits for a runner.
        assert _agents(alice.uid) == []
        assert not list((shared / "mailshim").glob("drop-agent.*"))
        lg.listener.start()
        r = lg.mailshim(lg.users[RUNNER], "flush")
        assert r.returncode == 0, r.stderr.decode()
        assert len(lg.listener.messages) == 1 and _incoming(lg) == []
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)


def test_a_runner_that_appears_takes_over_without_a_duplicate(lg):
    alice = lg.users[ALICE]
    lg.listener.stop()
    _send(lg, ALICE, "once@example.org", "twice-never@example.org")
    _until(lambda: len(_incoming(lg)) == 1, 10, "the entry")
    _agent(alice.uid)
    lg.listener.start()
    # The runner's schedule (the units' command) picks the entry up at once: the agent's
    # next try finds it gone and leaves.
    r = lg.mailshim(lg.users[RUNNER], "run")
    assert r.returncode == 0, r.stderr.decode()
    lg.listener.wait(1, timeout=SLACK)
    _until(lambda: _agents(alice.uid) == [], STEP + SLACK, "the agent to leave")
    (msg,) = lg.listener.messages
    assert sorted(msg.rcpt_tos) == ["once@example.org", "twice-never@example.org"]
    assert _incoming(lg) == [] and lg.names("queue") == []


def test_the_daemon_takes_over_and_the_agent_leaves(lg):
    alice, runner = lg.users[ALICE], lg.users[RUNNER]
    lg.listener.stop()
    _send(lg, ALICE, "daemon@example.org")
    _until(lambda: len(_incoming(lg)) == 1, 10, "the entry")
    pid = _agent(alice.uid)
    daemon = subprocess.Popen(
        [lg_tool("mailshim"), "daemon"],
        env=lg.env(runner),
        user=runner.uid, group=runner.gid, extra_groups=[],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/",
    )  # fmt: skip
    try:
        # The daemon takes the entry into queue/ while the listener is still down; the
        # agent's next step finds it gone and it leaves without having sent anything.
        _until(lambda: _incoming(lg) == [], 20, "the daemon's pickup")
        _until(lambda: _agents(alice.uid) == [], STEP + SLACK, "the agent to leave")
        assert lg.listener.messages == []
        lg.listener.start()
        lg.listener.wait(1, timeout=STEP + SLACK)
        time.sleep(1)
        assert len(lg.listener.messages) == 1 and pid not in _agents(alice.uid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


def lg_tool(name: str) -> str:
    from conftest import tool

    return tool(name)


def test_check_says_what_retries_the_users_deferred_drop_entries(lg):
    alice = lg.users[ALICE]
    r = lg.mailshim(alice, "check")
    out = r.stdout.decode() + r.stderr.decode()
    if "nothing runs it" in out:  # (a daemon another checkout runs may be found instead)
        assert "retried only by that user's own delivery agent" in out, out
    assert "your own delivery agent" not in out
    lg.listener.stop()
    _send(lg, ALICE, "check@example.org")
    pid = _agent(alice.uid)
    state = alice.home / ".local/state/mailshim"

    def published() -> bool:  # the agent names itself once its interpreter has started
        return any(p.read_text().split()[:1] == [str(pid)] for p in state.glob("*.pid"))

    _until(published, 10, "the agent's pid file")
    r = lg.mailshim(alice, "check")
    out = r.stdout.decode() + r.stderr.decode()
    assert f"retried by your own delivery agent (pid {pid})" in out, out
    lg.listener.start()
    lg.listener.wait(1, timeout=STEP + SLACK)


def test_past_its_lifetime_the_entry_is_kept_and_retried_not_dropped(lg):
    alice = lg.users[ALICE]
    log = lg.base / "linger.log"
    log.write_text("")
    os.chmod(log, 0o666)
    cfg = lg.base / "short-life.toml"
    text = lg.config.read_text().replace("[queue]\n", '[queue]\nlifetime = "2s"\n')
    cfg.write_text(text + f'\n[log]\nfile = "{log}"\n')
    os.chmod(cfg, 0o644)
    lg.listener.stop()
    r = lg.sendmail(alice, "-i", "late@example.org", input=MSG, MAILSHIM_CONFIG=str(cfg))
    assert r.returncode == 0, r.stderr.decode()
    _agent(alice.uid)
    _until(lambda: "older than [queue] lifetime" in log.read_text(), STEP + SLACK, "the log line")
    # Only a runner bounces: the user's agent keeps the entry and goes on trying.
    assert len(_incoming(lg)) == 1 and lg.listener.messages == []
    lg.listener.start()
    (msg,) = lg.listener.wait(1, timeout=STEP + SLACK)
    assert msg.rcpt_tos == ["late@example.org"]
    _until(lambda: _agents(alice.uid) == [], 10, "the agent to leave")
