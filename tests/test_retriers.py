"""Who retries deferred mail (issue 22 items 2, 3, 5, 7, 8; issue 23 item 5).

Real `sendmail` and `mailshim` processes, a real listener stopped and started, real agents
found through /proc; nobody runs `flush` unless the test says so. The drop-folder cases run
as real users (useradd, as in test_multiuser.py) and are skipped when not root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import Env, FaultListener, free_port, tool

MESSAGE = b"Subject: %d\n\nwhile the listener was away\n"
STEP = 6  # seconds: the first retry step (the listener comes back 3 s in, before it)
SLACK = 10.0  # process start-up on a loaded machine


def configure(world: Env, retry: str = f'["{STEP}s", "10m"]', mode: str = "background") -> None:
    world.config.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {world.listener.port}
timeout = 5
helo = "client.example.org"
retry_after_failure = 1

[addresses]
domain = "example.org"

[queue]
dir = "{world.spool}"
retry = {retry}

[delivery]
mode = "{mode}"
"""
    )


def agents(root) -> list[int]:
    """Live agent processes serving the spool at ``root`` (zombies are not agents)."""
    found = []
    key = str(root).encode()
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
        if b"mailshim.agent" in cmd and key in cmd and status != b"Z":
            found.append(int(name))
    return found


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def down_world(tmp_path):
    lst = FaultListener(free_port())  # not started: the listener is down
    world = Env(tmp_path, lst)
    configure(world)
    yield world
    lst.stop()


def _bs_odi(world: Env) -> subprocess.CompletedProcess[bytes]:
    dialogue = (
        b"EHLO client\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
        b"DATA\r\nSubject: 0\r\n\r\nwhile the listener was away\r\n.\r\nQUIT\r\n"
    )
    return world.sendmail("-bs", "-odi", input=dialogue)


# --- item 2: -odi, -v, -bs -odi deferrals are handed to a retrier ---------------------------


@pytest.mark.parametrize("how", ["-odi", "-v", "-bs -odi"])
def test_an_interactive_deferral_goes_out_on_the_schedule(down_world, how):
    """Listener down, `sendmail -odi` (or -v, or -bs -odi) exits 0 with the message kept;
    the listener comes back 3 s later: the message arrives within the first step, with no
    other submission and no flush."""
    world = down_world
    if how == "-bs -odi":
        done = _bs_odi(world)
        assert b"250" in done.stdout.split(b"\r\n")[-3], done.stdout
    else:
        done = world.sendmail(how, "-i", "bob@example.org", input=MESSAGE % 0)
    assert done.returncode == 0, done.stderr
    assert len(world.queued()) == 1
    wait_for(lambda: agents(world.spool), what="an agent for the deferred entry")
    time.sleep(3)
    world.listener.start()
    (msg,) = world.listener.wait(1, timeout=STEP + SLACK)
    assert msg.rcpt_tos == ["bob@example.org"]
    wait_for(lambda: not agents(world.spool), what="the agent to leave")
    assert world.queued() == []
    time.sleep(1)
    assert len(world.listener.messages) == 1


def test_an_interactive_deferral_waits_for_its_step_not_sent_again_at_once(down_world):
    """The agent handed an -odi deferral does not try it again at once: its first retry is
    one step after the submission's own attempt (here 10 minutes: nothing arrives), and a
    new background submission later wakes it without sending the deferred one early."""
    world = down_world
    configure(world, retry='["10m"]')
    done = world.sendmail("-odi", "-i", "bob@example.org", input=MESSAGE % 0)
    assert done.returncode == 0, done.stderr
    world.listener.start()
    wait_for(lambda: agents(world.spool), what="an agent")
    time.sleep(3)
    assert world.listener.messages == []
    assert len(agents(world.spool)) == 1
    assert len(world.queued()) == 1


def test_queue_mode_config_starts_no_agent_after_an_odi_deferral(down_world):
    """[delivery] mode = "queue": the administrator wants only the runner to deliver; an
    -odi attempt that defers leaves the entry to it."""
    world = down_world
    configure(world, mode="queue")
    done = world.sendmail("-odi", "-i", "bob@example.org", input=MESSAGE % 0)
    assert done.returncode == 0, done.stderr
    time.sleep(2)
    assert agents(world.spool) == []
    assert len(world.queued()) == 1


def test_a_per_user_spools_odi_deferral_is_retried_as_that_user():
    """As deployed with pip/pipx: a user with no system spool they may write (their own
    spool under ~/.local/state), listener down, `sendmail -odi` exit 0; the listener back:
    the user's own agent sends it on the schedule."""
    from conftest import others_can_run

    if os.geteuid() != 0 or not others_can_run():
        pytest.skip("needs root, and an interpreter other users can run")
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="mailshim-odi-own-"))
    os.chmod(base, 0o755)
    lst = FaultListener(free_port())
    home = base / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    cfg = base / "user.toml"
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
dir = "{base}/root-only/spool"
retry = ["{STEP}s"]
"""
    )
    (base / "root-only").mkdir(mode=0o700)
    cfg.chmod(0o644)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "MAILSHIM_CONFIG": str(cfg),
        "MAILSHIM_NO_SYSLOG": "1",
    }
    user_spool = home / ".local" / "state" / "mailshim" / "spool"
    try:
        done = subprocess.run(
            [tool("sendmail"), "-odi", "-i", "bob@example.org"],
            input=b"Subject: mine\n\nbody\n",
            env=env, user=65534, group=65534, extra_groups=[], cwd="/",
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert len(os.listdir(user_spool / "queue")) == 1
        wait_for(lambda: agents(user_spool), what="the user's agent")
        assert all(os.stat(f"/proc/{p}").st_uid == 65534 for p in agents(user_spool))
        time.sleep(3)
        lst.start()
        lst.wait(1, timeout=STEP + SLACK)
        wait_for(lambda: not agents(user_spool), what="the user's agent to leave")
        assert os.listdir(user_spool / "queue") == []
    finally:
        lst.stop()
        for pid in agents(user_spool):
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)


# --- item 2 through the system spool's drop folder, as a real non-root user -----------------

DROP_RUNNER, DROP_ALICE, DROP_BOB = "mshretr-run", "mshretr-a", "mshretr-b"


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("needs root to create users")
    from test_multiuser import built_box

    names = (DROP_RUNNER, DROP_ALICE, DROP_BOB)
    with built_box(names, f"{STEP}s", "retry_after_failure = 1") as sy:
        yield sy


@pytest.fixture
def dropbox(box):
    from test_drop_linger import _agents
    from test_multiuser import emptied

    mu = emptied(box)
    yield mu
    for name in (DROP_ALICE, DROP_BOB, DROP_RUNNER):
        for pid in _agents(mu.users[name].uid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if mu.listener.controller is None:
        mu.listener.start()


@pytest.mark.root
@pytest.mark.parametrize("how", ["-odi", "-v"])
def test_a_users_interactive_drop_deferral_is_retried_by_their_agent(dropbox, how):
    """A real user, the system spool (setup-spool), no runner: `sendmail -odi` (or -v) tries
    the drop entry itself, the listener is down, exit 0 with the entry kept; the user's own
    drop agent retries it on the schedule once the listener is back; no runner touches it."""
    from test_drop_linger import _agents

    mu = dropbox
    alice = mu.users[DROP_ALICE]
    mu.listener.stop()
    done = mu.sendmail(alice, how, "-i", "bob@example.org", input=MESSAGE % 1)
    assert done.returncode == 0, done.stderr.decode()
    assert [n for n in mu.names("incoming") if not n.startswith(".")] != []
    wait_for(lambda: len(_agents(alice.uid)) == 1, what="the user's drop agent")
    time.sleep(3)
    mu.listener.start()
    (msg,) = mu.listener.wait(1, timeout=STEP + SLACK)
    assert msg.rcpt_tos == ["bob@example.org"]
    assert msg.mail_from == f"{DROP_ALICE}@example.org"
    wait_for(lambda: not _agents(alice.uid), what="the agent to leave")
    assert [n for n in mu.names("incoming") if not n.startswith(".")] == []
    assert mu.names("queue") == []  # no runner took it: the user's agent delivered it
    time.sleep(1)
    assert len(mu.listener.messages) == 1


# --- item 3: `mailshim queue release` and `retry` start or wake an agent --------------------


def test_release_after_the_agent_left_sends_the_mail(down_world):
    """hold --all while deferred: the agent leaves (nothing it may retry); the listener comes
    back; `queue release --all` alone (no submission, no flush) gets the mail out."""
    world = down_world
    done = world.sendmail("-i", "bob@example.org", input=MESSAGE % 0)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: agents(world.spool), what="an agent")
    held = world.run("mailshim", ["queue", "hold", "--all"])
    assert held.returncode == 0, held.stderr
    wait_for(lambda: not agents(world.spool), timeout=STEP + SLACK, what="the agent to leave")
    world.listener.start()
    time.sleep(1)
    assert world.listener.messages == []  # held: nothing goes
    released = world.run("mailshim", ["queue", "release", "--all"])
    assert released.returncode == 0, released.stderr
    assert released.stdout == b"release: 1 entry\n"
    (msg,) = world.listener.wait(1, timeout=SLACK)
    assert msg.rcpt_tos == ["bob@example.org"]
    world.wait_queue_empty()


def test_retry_wakes_the_agent_sleeping_until_a_later_step(down_world):
    """An agent sleeps until a deferred entry's next step (10 minutes away); the listener
    comes back and `queue retry --all` makes it due: the agent is woken and sends it now."""
    world = down_world
    configure(world, retry='["10m"]')
    done = world.sendmail("-i", "bob@example.org", input=MESSAGE % 0)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: agents(world.spool), what="an agent")
    wait_for(
        lambda: b"deferred" in world.run("mailshim", ["queue"]).stdout,
        what="the first attempt to fail",
    )
    world.listener.start()
    time.sleep(1)
    assert world.listener.messages == []
    retried = world.run("mailshim", ["queue", "retry", "--all"])
    assert retried.returncode == 0, retried.stderr
    (msg,) = world.listener.wait(1, timeout=SLACK)
    assert msg.rcpt_tos == ["bob@example.org"]
    world.wait_queue_empty()


def test_release_in_queue_mode_leaves_the_mail_to_the_runner(down_world):
    world = down_world
    configure(world, mode="queue")
    world.listener.start()
    assert world.sendmail("-i", "bob@example.org", input=MESSAGE % 0).returncode == 0
    assert world.run("mailshim", ["queue", "hold", "--all"]).returncode == 0
    assert world.run("mailshim", ["queue", "release", "--all"]).returncode == 0
    time.sleep(2)
    assert agents(world.spool) == [] and world.listener.messages == []
    assert len(world.queued()) == 1


# --- item 5: `mailshim check` never takes agent.lock ---------------------------------------


def _opens_of(path) -> int:
    """An inotify fd that becomes readable when anyone opens ``path`` (IN_OPEN)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0
    assert libc.inotify_add_watch(fd, str(path).encode(), 0x20) >= 0  # IN_OPEN
    return fd


def _opened(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def test_check_names_the_agent_without_taking_its_lock(down_world):
    """`mailshim check` says which agent serves the spool without opening agent.lock at all
    (a sendmail finding the lock taken by check for that moment started no agent and had
    no second look): the agent is found through /proc/locks."""
    world = down_world
    configure(world, retry='["10m"]')
    assert world.sendmail("-i", "bob@example.org", input=MESSAGE % 0).returncode == 0
    wait_for(lambda: agents(world.spool), what="an agent")
    wait_for(lambda: (world.spool / "state" / "agent.pid").exists(), what="its pid file")
    (pid,) = agents(world.spool)
    fd = _opens_of(world.spool / "agent.lock")
    try:
        report = world.run("mailshim", ["check"]).stdout.decode()
        assert f"a lingering delivery agent (pid {pid})" in report, report
        assert not _opened(fd), "check opened agent.lock"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not agents(world.spool), what="the agent to stop")
        _opened(fd)  # the agent's own last touches
        report = world.run("mailshim", ["check"]).stdout.decode()
        assert "lingering delivery agent" not in report, report
        assert not _opened(fd), "check opened agent.lock"
    finally:
        os.close(fd)


# --- item 8: an enabled unit that is stopped or failed retries nothing ----------------------
# No real systemd runs on the test machines (PID 1 is not systemd): `mailshim check` runs in
# a private mount namespace where /run/systemd/system exists, with a fake `systemctl` first
# on PATH answering is-enabled / is-active from $FAKE_UNITS. The unit states a real systemd
# reports are the ones `systemctl` documents (enabled, disabled; active, inactive, failed).

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl VERB UNIT: answers from FAKE_UNITS ("unit=enabled:active ...")
for pair in $FAKE_UNITS; do
    unit=${pair%%=*}; states=${pair#*=}
    if [ "$unit" = "$2" ]; then
        case $1 in
            is-enabled) echo "${states%%:*}"; [ "${states%%:*}" = enabled ]; exit $? ;;
            is-active) echo "${states#*:}"; [ "${states#*:}" = active ]; exit $? ;;
        esac
    fi
done
case $1 in is-enabled) echo disabled ;; *) echo inactive ;; esac
exit 1
"""


def _check_under_fake_systemd(world: Env, tmp_path, units: str) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    env = dict(world.env, FAKE_UNITS=units, PATH=f"{bindir}:{world.env.get('PATH', '')}")
    script = (
        "mount -t tmpfs tmpfs /run/systemd 2>/dev/null || mount -t tmpfs tmpfs /run"
        ' && mkdir -p /run/systemd/system && exec "$@"'
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", tool("mailshim"), "check"],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert b"Traceback" not in done.stderr, done.stderr
    return done.stdout.decode()


def test_check_says_an_enabled_but_stopped_timer_retries_nothing(down_world, tmp_path):
    world = down_world
    out = _check_under_fake_systemd(
        world, tmp_path, "mailshim-flush.timer=enabled:inactive mailshim-flush.path=enabled:active"
    )
    assert "mailshim-flush.timer is enabled but inactive" in out, out
    assert "systemctl start mailshim-flush.timer" in out, out
    assert "retried by mailshim-flush.timer" not in out, out


def test_check_says_a_failed_daemon_unit_retries_nothing(down_world, tmp_path):
    world = down_world
    out = _check_under_fake_systemd(world, tmp_path, "mailshim-daemon.service=enabled:failed")
    assert "mailshim-daemon.service is enabled but failed" in out, out
    assert "systemctl reset-failed mailshim-daemon.service" in out, out
    assert "retried by mailshim-daemon.service" not in out, out


def test_check_counts_an_enabled_and_active_timer(down_world, tmp_path):
    world = down_world
    out = _check_under_fake_systemd(
        world, tmp_path, "mailshim-flush.timer=enabled:active mailshim-flush.path=enabled:active"
    )
    assert "retried by mailshim-flush.timer (enabled, active)" in out, out
    assert "but inactive" not in out, out
