"""The lingering delivery agent (issue 11, item 2): no stranded mail without a runner.

Real `sendmail` processes start real detached agents against a real listener that goes
down and comes back; nobody runs `flush`. Agents are found through /proc, as an
administrator would find them.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import time

import pytest

from conftest import Env, FaultListener, free_port, tool
from mailshim import serving, spool

MESSAGE = b"Subject: %d\n\nwhile the listener was away\n"


def configure(world: Env, retry: str = '["4s", "10m"]', pause: float = 1.0) -> None:
    world.config.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {world.listener.port}
timeout = 5
helo = "client.example.org"
retry_after_failure = {pause}

[addresses]
domain = "example.org"

[queue]
dir = "{world.spool}"
retry = {retry}

[delivery]
mode = "background"
"""
    )


def agents(world: Env) -> list[int]:
    """Live agent processes serving this test's spool (zombies are not agents)."""
    found = []
    root = str(world.spool).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                status = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if b"mailshim.agent" in cmd and root in cmd and status != b"Z":
            found.append(int(name))
    return found


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def submit(world: Env, i: int = 0) -> None:
    done = world.sendmail("-i", "bob@example.org", input=MESSAGE % i)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def down_world(tmp_path):
    lst = FaultListener(free_port())  # not started: the listener is down
    world = Env(tmp_path, lst)
    configure(world)
    yield world
    lst.stop()


def test_submitted_while_down_is_delivered_within_the_first_step(down_world):
    """Listener down at submission, up 3 s later, no flush by anyone: the message arrives
    within the first retry step (4 s here) plus a few seconds."""
    world = down_world
    submit(world)
    wait_for(lambda: agents(world), what="an agent")
    time.sleep(3)
    world.listener.start()
    back = time.monotonic()
    world.listener.wait(1, timeout=4 + 10)
    assert time.monotonic() - back < 4 + 10
    wait_for(lambda: not agents(world), what="the agent to leave once the queue is empty")
    assert world.queued() == []


def test_submissions_during_the_down_pause_are_covered(down_world):
    """Issue 11: submissions made while the listener was marked down started no agent and
    stayed `new` for ever. Now the lingering agent holds them too."""
    world = down_world
    configure(world, pause=30.0)  # the "listener down" pause outlasts the test's outage
    submit(world, 0)
    wait_for(lambda: (world.spool / "agent.lock").stat().st_size > 0, what="the down mark")
    for i in range(1, 4):
        submit(world, i)
    assert len(agents(world)) == 1
    world.listener.start()
    world.listener.wait(4, timeout=45)
    wait_for(lambda: not agents(world), what="the agent to leave")


def test_a_burst_while_down_leaves_exactly_one_agent(down_world):
    world = down_world
    configure(world, retry='["10m"]', pause=30.0)
    procs = []
    for i in range(200):
        p = subprocess.Popen(
            [tool("sendmail"), "-i", "bob@example.org"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=world.env,
        )
        p.stdin.write(MESSAGE % i)  # type: ignore[union-attr]
        p.stdin.close()  # type: ignore[union-attr]
        procs.append(p)
        if len(procs) >= 16:
            assert procs.pop(0).wait(60) == 0
    for p in procs:
        assert p.wait(60) == 0
    assert len(world.queued()) == 200
    time.sleep(1)  # any second agent would have been started by now
    assert len(agents(world)) == 1
    holder = serving.holder(spool.Spool(str(world.spool)))
    assert holder is not None and holder[1] == serving.AGENT and holder[0] in agents(world)


def _wakeups(pid: int) -> int:
    """Context switches of a process so far: each wake-up from its sleep adds at least one."""
    with open(f"/proc/{pid}/status", "rb") as f:
        lines = [line.split() for line in f if b"ctxt_switches" in line]
    return sum(int(words[1]) for words in lines)


def _mailshim_modules(result: subprocess.CompletedProcess[bytes]) -> set[str]:
    from test_imports import parse_importtime

    assert result.returncode == 0, result.stderr[-2000:]
    names = {row.name for row in parse_importtime(result.stderr)}
    assert "mailshim.submit" in names, "no import tree on stderr: is -X importtime working?"
    return {n for n in names if n.startswith("mailshim")}


def test_while_down_a_submission_does_no_more_than_queue_mode(down_world):
    """Issue 14 item 3: while an agent serves the spool and has just found the listener
    down, a background-mode submission spools its entry and leaves it to that agent: no
    second agent, no poke (the agent is not woken), and not even the agent's modules are
    imported (the same mailshim modules as a queue-mode submission)."""
    from test_imports import run_sendmail

    world = down_world
    configure(world, retry='["10m"]', pause=60.0)
    submit(world, 0)
    wait_for(lambda: (world.spool / "agent.lock").stat().st_size > 0, what="the down mark")
    [agent] = agents(world)
    wait_for(lambda: serving.holder(spool.Spool(str(world.spool))) is not None, what="pid file")
    before = _wakeups(agent)
    time.sleep(0.3)
    if _wakeups(agent) != before:  # still settling into its sleep: wait once more
        before = _wakeups(agent)
        time.sleep(0.3)
        assert _wakeups(agent) == before, "the agent does not sleep while nothing is due"
    down = _mailshim_modules(run_sendmail(world, ["-i", "bob@example.org"], MESSAGE % 1))
    queued = _mailshim_modules(run_sendmail(world, ["-odq", "-i", "bob@example.org"], MESSAGE))
    assert "mailshim.agent" not in down and "mailshim.dropagent" not in down
    assert down - queued <= {"mailshim.serving"}, down - queued
    for i in range(2, 6):
        submit(world, i)
    time.sleep(0.5)  # a poke would have woken it by now
    assert _wakeups(agent) == before, "a submission woke the agent while the listener was down"
    assert agents(world) == [agent]
    assert len(world.queued()) == 7
    # and the entries are the agent's: once the listener is back, the poke the first
    # submission after the pause sends makes it deliver them all (the first, deferred in 10 m
    # only because the listener was down, goes with the new ones: issue 23 item 2)
    world.listener.start()
    os.kill(agent, signal.SIGURG)
    world.listener.wait(7, timeout=30)
    wait_for(lambda: world.queued() == [], what="the entries to be delivered")
    wait_for(lambda: not agents(world), what="the agent to leave")  # nothing left to retry


def test_three_forced_flushes_while_down_do_not_delay_the_automatic_retry(down_world):
    world = down_world
    configure(world, retry='["5s", "10m"]', pause=1.0)
    submit(world)
    wait_for(lambda: (world.spool / "agent.lock").stat().st_size > 0, what="a failed attempt")
    for _ in range(3):
        assert world.sendmail("-q").returncode == 0
    [qid] = world.queued()
    state = spool.Spool(str(world.spool)).load_state(qid)
    assert state.attempts == 1  # the flushes came before the entry was due: not counted
    world.listener.start()
    # Due 5 s after the first attempt, whatever the flushes met: no "next in 10m".
    world.listener.wait(1, timeout=5 + 10)
    wait_for(lambda: not agents(world), what="the agent to leave")


def test_the_agent_survives_its_callers_terminal_closing(down_world):
    """sendmail runs on a terminal (a session leader with a controlling tty); the terminal
    closes (SIGHUP to its session) while the agent waits for the listener."""
    world = down_world
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs
        os.execve(tool("sendmail"), ["sendmail", "-i", "bob@example.org"], world.env)
    os.write(master, b"Subject: from a terminal\n\nbody\n\x04")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: agents(world), what="an agent")
    lingering = agents(world)
    os.close(master)  # the terminal goes away
    time.sleep(0.5)
    assert agents(world) == lingering
    with open(f"/proc/{lingering[0]}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    assert fields[4] == b"0"  # tty_nr: no controlling terminal
    world.listener.start()
    world.listener.wait(1, timeout=20)
    wait_for(lambda: not agents(world), what="the agent to leave")


def test_the_agent_is_not_duplicated_when_the_daemon_starts(down_world):
    world = down_world
    configure(world, retry='["10m"]', pause=30.0)
    submit(world)
    wait_for(lambda: (world.spool / "agent.lock").stat().st_size > 0, what="a failed attempt")
    assert len(agents(world)) == 1
    daemon = subprocess.Popen(
        [tool("mailshim"), "daemon"], env=world.env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: not agents(world), what="the agent to hand over to the daemon")
        target = spool.Spool(str(world.spool))
        wait_for(lambda: serving.holder(target) == (daemon.pid, serving.DAEMON), what="daemon")
        world.listener.start()
        # The daemon retries on the schedule (10 min away): make it due, as `queue retry` does.
        assert world.run("mailshim", ["queue", "retry", "--all"]).returncode == 0
        world.listener.wait(1, timeout=20)
        submit(world, 1)  # with the daemon serving, sendmail starts no agent
        world.listener.wait(2, timeout=20)
        assert agents(world) == []
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and b"Traceback" not in err


def test_a_new_submission_wakes_a_sleeping_agent(tmp_path, faulty):
    """An agent lingering for a deferred message (451, retry in 10 minutes) is poked by the
    next submission: the new message goes at once, the deferred one keeps its schedule."""
    world = Env(tmp_path, faulty)
    configure(world, retry='["10m"]')
    faulty.handler.rcpt_replies = {"later@example.org": "451 4.3.0 try later"}
    done = world.sendmail("-i", "later@example.org", input=MESSAGE % 0)
    assert done.returncode == 0
    wait_for(lambda: agents(world) and len(world.queued()) == 1, what="a deferral")
    wait_for(lambda: serving.holder(spool.Spool(str(world.spool))) is not None, what="pid file")
    submit(world, 1)
    faulty.wait(1, timeout=10)
    # The listener has the message a moment before the agent removes its entry.
    wait_for(lambda: len(world.queued()) == 1, what="the delivered entry's removal")
    assert len(agents(world)) == 1


def test_no_queue_id_in_any_agents_argv(tmp_path, faulty):
    world = Env(tmp_path, faulty)
    configure(world, retry='["10m"]')
    faulty.handler.rcpt_replies = {"bob@example.org": "451 4.3.0 try later"}
    submit(world)
    wait_for(lambda: agents(world), what="an agent")
    [qid] = world.queued()
    for pid in agents(world):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert qid.encode() not in f.read()


def test_the_agent_leaves_when_the_queue_empties(world):
    """With the listener up, the agent delivers and is gone: nothing deferred, nothing to
    linger for."""
    submit(world)
    world.listener.wait(1)
    wait_for(lambda: not agents(world), what="the agent to leave")
    assert world.queued() == []


def test_a_users_own_spool_is_retried_by_their_agent():
    """The per-user spool (no system spool this user may write: pip/pipx as a user): the
    agent runs as that user, lingers through the outage and delivers with no runner."""
    from conftest import others_can_run

    if os.geteuid() != 0 or not others_can_run():
        pytest.skip("needs root, and an interpreter other users can run")
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="mailshim-own-spool-"))  # pytest's is root-only
    os.chmod(tmp_path, 0o755)
    try:
        _own_spool(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _own_spool(tmp_path) -> None:
    lst = FaultListener(free_port())
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    cfg = tmp_path / "user.toml"
    cfg.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {lst.port}
timeout = 5
retry_after_failure = 1

[addresses]
domain = "example.org"

[queue]
dir = "{tmp_path}/root-only/spool"
retry = ["4s"]
"""
    )
    (tmp_path / "root-only").mkdir(mode=0o700)
    cfg.chmod(0o644)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "MAILSHIM_CONFIG": str(cfg),
        "MAILSHIM_NO_SYSLOG": "1",
    }
    done = subprocess.run(
        [tool("sendmail"), "-i", "bob@example.org"],
        input=b"Subject: mine\n\nbody\n",
        env=env,
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    user_spool = home / ".local" / "state" / "mailshim" / "spool"
    assert len(os.listdir(user_spool / "queue")) == 1

    def user_agents() -> list[int]:
        return [
            p
            for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if _agent_for(p, user_spool) and os.stat(f"/proc/{p}").st_uid == 65534
        ]

    try:
        wait_for(user_agents, what="the user's agent")
        time.sleep(3)
        lst.start()
        lst.wait(1, timeout=20)
        wait_for(lambda: not user_agents(), what="the user's agent to leave")
    finally:
        lst.stop()
        for pid in user_agents():
            os.kill(pid, signal.SIGTERM)
    assert os.listdir(user_spool / "queue") == []


def _agent_for(pid: int, root) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"mailshim.agent" in cmd and str(root).encode() in cmd


def test_check_names_what_retries_each_spool(down_world):
    world = down_world
    configure(world, retry='["10m"]', pause=30.0)
    idle = world.run("mailshim", ["check"]).stdout.decode()
    assert "no delivery agent is waiting now" in idle
    submit(world)
    wait_for(lambda: (world.spool / "agent.lock").stat().st_size > 0, what="a failed attempt")
    [pid] = agents(world)
    out = world.run("mailshim", ["check"]).stdout.decode()
    said = f"{world.spool}: deferred mail is retried by a lingering delivery agent (pid {pid})"
    assert said in out
    assert agents(world) == [pid]  # looking did not disturb it
