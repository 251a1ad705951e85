"""Who retries deferred mail (issue 22 items 2, 3, 5, 7, 8; issue 23 item 5).

Real `sendmail` and `mailshim` processes, a real listener stopped and started, real agents
found through /proc; nobody runs `flush` unless the test says so. The drop-folder cases run
as real users (useradd, as in test_multiuser.py) and are skipped when not root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

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


def test_check_names_the_agent_without_taking_its_lock(down_world, tmp_path):
    """`mailshim check` says which agent serves the spool without opening agent.lock at all
    (a sendmail finding the lock taken by check for that moment started no agent and had
    no second look): the agent is found through /proc/locks. Traced with strace, so that
    the agent's own touches of its lock (its retries while the listener is down) are not
    taken for check's."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (make test installs it)")
    world = down_world
    configure(world, retry='["10m"]')
    assert world.sendmail("-i", "bob@example.org", input=MESSAGE % 0).returncode == 0
    wait_for(lambda: agents(world.spool), what="an agent")
    wait_for(lambda: (world.spool / "state" / "agent.pid").exists(), what="its pid file")
    (pid,) = agents(world.spool)
    lock = str(world.spool / "agent.lock")

    def traced_check() -> str:
        trace = tmp_path / "check.trace"
        r = world.run(strace, ["-f", "-qq", "-o", str(trace), "-e", "trace=open,openat",
                               tool("mailshim"), "check"])  # fmt: skip
        opened = trace.read_text()
        assert "agent.pid" in opened  # the trace sees check's opens (it reads the pid file)
        assert lock not in opened, "check opened agent.lock"
        return r.stdout.decode()

    report = traced_check()
    assert f"a lingering delivery agent (pid {pid})" in report, report
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not agents(world.spool), what="the agent to stop")
    report = traced_check()
    assert "lingering delivery agent" not in report, report


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


# --- item 7: `mailshim retrier install` for installs with no runner -------------------------


def _user_config(base, port: int, retry: str) -> str:
    cfg = base / "user.toml"
    cfg.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {port}
timeout = 5
retry_after_failure = 1

[addresses]
domain = "example.org"

[queue]
dir = "{base}/root-only/spool"
retry = ["{retry}"]
"""
    )
    cfg.chmod(0o644)
    (base / "root-only").mkdir(mode=0o700)
    return str(cfg)


def _as(user, argv: list[str], env: dict[str, str], input: bytes = b""):
    return subprocess.run(
        argv, input=input, env=env, user=user.uid, group=user.gid, extra_groups=[],
        cwd="/", capture_output=True, timeout=60,
    )  # fmt: skip


def _cron_lines(user, env) -> list[str]:
    got = _as(user, ["crontab", "-l"], env)
    assert got.returncode == 0, got.stderr
    return got.stdout.decode().splitlines()


@pytest.mark.root
def test_cron_retrier_as_a_real_user_delivers_what_the_dead_agent_left():
    """pip/pipx as a real user, the per-user spool: the agent is SIGKILLed (the OOM killer)
    with a message deferred; `check` says nothing retries it and names `mailshim retrier
    install`; the command writes @reboot and every-minute lines into the user's crontab
    (seen with `crontab -l` as the user), keeps the user's own lines, does not add them
    twice; the command those lines run, run as cron would (the user, cron's environment),
    delivers the message; `remove` takes only its own lines out."""
    from conftest import others_can_run

    if os.geteuid() != 0 or not others_can_run():
        pytest.skip("needs root, and an interpreter other users can run")
    import shlex
    import shutil as sh

    if sh.which("crontab") is None:
        pytest.skip("crontab is not installed (apt-get install cron)")
    from test_multiuser import users_in_tmp

    lst = FaultListener(free_port())
    with users_in_tmp("mailshim-retrier-", ("mshretrier-u",)) as (base, users):
        user = users["mshretrier-u"]
        cfg = _user_config(base, lst.port, "3s")
        env = {
            "PATH": "/usr/bin:/bin", "HOME": str(user.home), "LOGNAME": user.name,
            "MAILSHIM_CONFIG": cfg, "MAILSHIM_NO_SYSLOG": "1",
        }  # fmt: skip
        user_spool = user.home / ".local" / "state" / "mailshim" / "spool"
        try:
            mine = "# the user's own job\n0 3 * * * true\n"
            assert _as(user, ["crontab", "-"], env, mine.encode()).returncode == 0
            sent = _as(user, [tool("sendmail"), "-i", "bob@example.org"], env, b"Subject: s\n\nb\n")
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: agents(user_spool), what="the user's agent")
            wait_for(
                lambda: b"deferred" in _as(user, [tool("mailshim"), "queue"], env).stdout,
                what="the first attempt to fail",
            )
            for pid in agents(user_spool):
                os.kill(pid, signal.SIGKILL)  # the OOM killer
            wait_for(lambda: not agents(user_spool), what="the agent to die")
            report = _as(user, [tool("mailshim"), "check"], env).stdout.decode()
            assert "1 deferred message(s) and nothing retries them" in report, report
            assert "mailshim retrier install" in report, report

            for _ in range(2):  # a second install replaces the first
                done = _as(user, [tool("mailshim"), "retrier", "install", "--cron"], env)
                assert done.returncode == 0, done.stderr
                assert b"crontab" in done.stdout
            lines = _cron_lines(user, env)
            assert lines[:2] == ["# the user's own job", "0 3 * * * true"]
            boot = [ln for ln in lines if ln.startswith("@reboot ")]
            every = [ln for ln in lines if ln.startswith("* * * * * ")]
            assert len(boot) == 1 and len(every) == 1, lines
            command = boot[0].removeprefix("@reboot ")
            assert command == every[0].removeprefix("* * * * * ")
            assert command.endswith(" run >/dev/null 2>&1")
            assert shlex.split(command)[:3] == [tool("mailshim"), "-C", cfg]
            report = _as(user, [tool("mailshim"), "check"], env).stdout.decode()
            assert "retried by your crontab (mailshim retrier)" in report, report

            lst.start()
            time.sleep(3)  # the entry falls due
            cron_env = {"HOME": str(user.home), "LOGNAME": user.name, "SHELL": "/bin/sh",
                        "PATH": "/usr/bin:/bin", "MAILSHIM_NO_SYSLOG": "1"}  # fmt: skip
            ran = _as(user, ["/bin/sh", "-c", command.replace("\\%", "%")], cron_env)
            assert ran.returncode == 0, ran.stderr
            (msg,) = lst.wait(1, timeout=SLACK)
            assert msg.rcpt_tos == ["bob@example.org"]
            assert os.listdir(user_spool / "queue") == []

            gone = _as(user, [tool("mailshim"), "retrier", "remove"], env)
            assert gone.returncode == 0, gone.stderr
            assert _cron_lines(user, env) == ["# the user's own job", "0 3 * * * true"]
        finally:
            lst.stop()
            for pid in agents(user_spool):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["crontab", "-r", "-u", user.name], capture_output=True)


@pytest.mark.root
def test_retrier_keeps_a_real_users_lines_after_a_lone_begin_marker():
    """The user edited the block by hand (crontab -e): the END marker deleted, her own job
    added below it. A second `install` and then `remove`, as that real user through
    crontab(1), keep every line of hers and leave exactly one block after install, none
    after remove (before: every line after a BEGIN with no END was taken for the block's
    and dropped)."""
    from conftest import others_can_run

    if os.geteuid() != 0 or not others_can_run():
        pytest.skip("needs root, and an interpreter other users can run")
    import shutil as sh

    if sh.which("crontab") is None:
        pytest.skip("crontab is not installed (apt-get install cron)")
    from test_multiuser import users_in_tmp

    with users_in_tmp("mailshim-cronedit-", ("mshra-cron",)) as (_base, users):
        user = users["mshra-cron"]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(user.home), "LOGNAME": user.name}
        try:
            mine = "# the user's own job\n0 3 * * * true\n"
            assert _as(user, ["crontab", "-"], env, mine.encode()).returncode == 0
            done = _as(user, [tool("mailshim"), "retrier", "install", "--cron"], env)
            assert done.returncode == 0, done.stderr
            text = _as(user, ["crontab", "-l"], env).stdout.decode()
            text = text.replace("# mailshim retrier: end\n", "")
            text += "0 4 * * * /usr/local/bin/backup\n"
            own = ["# the user's own job", "0 3 * * * true", "0 4 * * * /usr/local/bin/backup"]
            assert _as(user, ["crontab", "-"], env, text.encode()).returncode == 0

            done = _as(user, [tool("mailshim"), "retrier", "install", "--cron"], env)
            assert done.returncode == 0, done.stderr
            lines = _cron_lines(user, env)
            assert [ln for ln in lines if "mailshim" not in ln] == own, lines
            assert sum(ln.startswith("# mailshim retrier: begin") for ln in lines) == 1, lines
            assert sum(ln.startswith("@reboot ") for ln in lines) == 1, lines

            gone = _as(user, [tool("mailshim"), "retrier", "remove"], env)
            assert gone.returncode == 0, gone.stderr
            assert _cron_lines(user, env) == own
        finally:
            subprocess.run(["crontab", "-r", "-u", user.name], capture_output=True)


def _mailshim(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([tool("mailshim"), *args], env=env, capture_output=True, timeout=60)


FAKE_USER_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case $2 in is-active) echo active ;; esac
exit 0
"""


def test_systemd_user_timer_units_verify_and_run(world, tmp_path):
    """No user manager runs on the test machines: `install --systemd` runs against a fake
    `systemctl` (which records its calls) and a runtime folder holding the manager's socket
    name. The unit files it writes pass `systemd-analyze verify --user` (the real one), and
    the service's ExecStart, run as written, delivers what is due."""
    import shlex
    import shutil as sh

    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "systemctl").write_text(FAKE_USER_SYSTEMCTL)
    (bindir / "systemctl").chmod(0o755)
    runtime = tmp_path / "run"
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd" / "private").write_text("")
    log = tmp_path / "systemctl.log"
    env = dict(
        world.env, PATH=f"{bindir}:/usr/bin:/bin", XDG_RUNTIME_DIR=str(runtime),
        XDG_CONFIG_HOME=str(tmp_path / "config"), FAKE_LOG=str(log),
    )  # fmt: skip
    done = _mailshim(["retrier", "install"], env)
    assert done.returncode == 0, done.stderr
    assert b"mailshim-retry.timer runs `mailshim run` every minute" in done.stdout
    units = tmp_path / "config" / "systemd" / "user"
    service = (units / "mailshim-retry.service").read_text()
    timer = (units / "mailshim-retry.timer").read_text()
    assert log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user enable --now mailshim-retry.timer",
    ]
    assert "OnUnitInactiveSec=1min" in timer and "WantedBy=timers.target" in timer
    assert "LogLevelMax=notice" in service
    (exec_start,) = [ln for ln in service.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("%%", "%"))
    assert argv == [tool("mailshim"), "-C", str(world.config), "run"]

    if sh.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--user", "--man=no",
             str(units / "mailshim-retry.service"), str(units / "mailshim-retry.timer")],
            env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)), capture_output=True, timeout=60,
        )  # fmt: skip
        assert verify.returncode == 0 and verify.stderr == b"", verify.stderr

    queued = world.sendmail("-odq", "-i", "bob@example.org", input=MESSAGE % 0)
    assert queued.returncode == 0
    ran = subprocess.run(argv, env=world.env, capture_output=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    world.listener.wait(1)
    assert world.queued() == []

    from mailshim import check as check_mod

    if not check_mod.daemon_pids():  # check counts any running daemon for the configured spool
        check = _mailshim(["check"], env).stdout.decode()
        assert "retried by mailshim-retry.timer (active) (mailshim retrier)" in check, check
    gone = _mailshim(["retrier", "remove"], env)
    assert gone.returncode == 0, gone.stderr
    assert not (units / "mailshim-retry.timer").exists()
    assert "--user disable --now mailshim-retry.timer" in log.read_text()


def test_install_systemd_without_a_user_manager_is_one_line_and_69(world, tmp_path):
    env = dict(world.env, XDG_RUNTIME_DIR=str(tmp_path / "none"))
    done = _mailshim(["retrier", "install", "--systemd"], env)
    assert done.returncode == 69
    assert done.stderr.decode().count("\n") == 1
    assert b"no systemd user manager" in done.stderr


# --- item 7, containers: `mailshim daemon` as the init of its own container -----------------


def _pid1_daemon(world: Env) -> tuple[subprocess.Popen[bytes], int]:
    """`mailshim daemon` as PID 1 of a new pid namespace (a container's init); the pid of
    that init as seen from here."""
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", tool("mailshim"), "daemon"],
        env=world.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    found: list[int] = []

    def child() -> bool:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                found[:] = [int(p) for p in f.read().split()]
        except OSError:
            return False
        return bool(found)

    wait_for(child, what="the container's init")
    wait_for(lambda: (world.spool / "state" / "agent.pid").exists(), what="the daemon's pid")
    return proc, found[0]


def test_daemon_as_a_containers_init_retries_and_survives_a_restart(down_world):
    """The container way: `mailshim daemon` as PID 1 (unshare --pid, as a container runtime
    starts its entry point) retries deferred mail; killed (SIGKILL: OOM, `docker kill`) and
    started again (the restart policy) it sends what the first left; a submission beside it
    starts no agent; SIGTERM, which PID 1 gets no default action for, stops it cleanly."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a pid namespace")
    world = down_world
    configure(world, retry='["2s"]')
    world.spool.mkdir()
    first, init = _pid1_daemon(world)
    try:
        done = world.sendmail("-i", "bob@example.org", input=MESSAGE % 0)
        assert done.returncode == 0, done.stderr
        wait_for(
            lambda: b"deferred" in world.run("mailshim", ["queue"]).stdout,
            what="the daemon's first attempt",
        )
        assert agents(world.spool) == []  # beside a daemon, sendmail starts no agent
        os.kill(init, signal.SIGKILL)
        first.wait(timeout=SLACK)
    finally:
        if first.poll() is None:
            first.kill()
    world.listener.start()
    second, init = _pid1_daemon(world)
    try:
        (msg,) = world.listener.wait(1, timeout=SLACK)
        assert msg.rcpt_tos == ["bob@example.org"]
        world.wait_queue_empty()
        os.kill(init, signal.SIGTERM)
        assert second.wait(timeout=SLACK) == 0, second.stderr.read() if second.stderr else ""
    finally:
        if second.poll() is None:
            second.kill()
    assert agents(world.spool) == []


# --- issue 23 item 5: where the units or the daemon serve the spool, sendmail leaves it to them


UNIT_DIR = Path(__file__).resolve().parent.parent / "packaging/systemd"


def _unit_lines(unit: str) -> list[str]:
    """The unit file's settings (comments and blank lines left out)."""
    lines = (UNIT_DIR / unit).read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def _started_by(unit: str) -> str:
    """The service that ``unit`` (a .timer or .path) starts: its Unit=, else its own name."""
    for line in _unit_lines(unit):
        if line.startswith("Unit="):
            return line.removeprefix("Unit=")
    return unit.rsplit(".", 1)[0] + ".service"


def _unit_run(
    world: Env, unit: str = "mailshim-flush.service"
) -> subprocess.CompletedProcess[bytes]:
    """`mailshim run` as ``unit`` starts it (its Environment= lines; stdout a pipe, as the
    journal is); the command itself is read from the packaged unit."""
    env = dict(world.env)
    argv: list[str] = []
    for line in _unit_lines(unit):
        if line.startswith("Environment=MAILSHIM_SERVED="):
            key, value = line.removeprefix("Environment=").split("=", 1)
            env[key] = value
        if line.startswith("ExecStart="):
            argv = line.removeprefix("ExecStart=").split()
    assert argv[:1] == ["/usr/bin/mailshim"], unit
    return subprocess.run([tool("mailshim"), *argv[1:]], env=env, capture_output=True, timeout=60)


def _made_spool(world: Env) -> None:
    """The spool exists (setup-spool or an earlier message made it), and is empty."""
    assert world.sendmail("-odq", "-i", "prime@example.org", input=b"x\n").returncode == 0
    assert world.run("mailshim", ["flush"]).returncode == 0
    world.listener.wait(1)
    world.listener.handler.messages.clear()


def test_a_spool_the_units_serve_gets_no_agent_from_sendmail(world):
    """After a timer-started run marked the spool, a background submission (and an -odi
    deferral) starts no agent: the path unit's or the timer's next run delivers it. Once
    the mark is stale (the timer stopped), sendmail starts agents again."""
    _made_spool(world)
    first = _unit_run(world)
    assert first.returncode == 0, first.stderr
    assert (world.spool / "served").read_bytes() == b"units\n"
    assert world.sendmail("-i", "bob@example.org", input=MESSAGE % 0).returncode == 0
    time.sleep(2)
    assert agents(world.spool) == [] and world.listener.messages == []
    assert len(world.queued()) == 1
    assert _unit_run(world, _started_by("mailshim-flush.path")).returncode == 0
    world.listener.wait(1)
    assert world.queued() == []

    world.listener.stop()
    done = world.sendmail("-odi", "-i", "bob@example.org", input=MESSAGE % 1)
    assert done.returncode == 0, done.stderr
    time.sleep(2)
    assert agents(world.spool) == [] and len(world.queued()) == 1
    world.listener.start()

    stale = time.time() - 200
    os.utime(world.spool / "served", (stale, stale))
    assert world.sendmail("-i", "carol@example.org", input=MESSAGE % 2).returncode == 0
    wait_for(lambda: world.listener.messages[1:], what="the new agent's delivery")


def test_only_the_timers_runs_mark_the_spool(world):
    """The path unit starts its own service, whose runs do not refresh the mark: with the
    timer stopped, the mark goes stale though new mail still starts runs. The timer's
    service marks. (Not told apart by TRIGGER_UNIT: systemd 252 keeps the first trigger's
    for every later activation, seen in a booted bookworm.)"""
    timers, paths = _started_by("mailshim-flush.timer"), _started_by("mailshim-flush.path")
    assert timers != paths, "the path unit's runs would mark the spool and push the timer back"
    _made_spool(world)
    assert _unit_run(world, paths).returncode == 0
    assert not (world.spool / "served").exists()
    assert _unit_run(world, timers).returncode == 0
    assert (world.spool / "served").read_bytes() == b"units\n"


def test_the_path_units_service_is_the_timers_without_the_mark():
    """mailshim-pickup.service repeats mailshim-flush.service (command, user, sandbox) but
    for its description and the mark: a sandbox setting added to one only would differ."""
    timers = _unit_lines(_started_by("mailshim-flush.timer"))
    paths = _unit_lines(_started_by("mailshim-flush.path"))
    assert "Environment=MAILSHIM_SERVED=units" in timers
    assert not any(line.startswith("Environment=MAILSHIM_SERVED") for line in paths)
    mark = {"Environment=MAILSHIM_SERVED=units"}
    assert [x for x in timers if x not in mark and not x.startswith("Description=")] == [
        x for x in paths if not x.startswith("Description=")
    ]


def test_a_mark_from_someone_else_is_not_believed(world, tmp_path):
    """Only the spool's owner (or root) may say that the units serve it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    assert world.sendmail("-odq", "-i", "bob@example.org", input=b"x\n").returncode == 0
    mark = world.spool / "served"
    mark.write_bytes(b"units\n")
    os.chown(mark, 65534, 65534)
    assert world.sendmail("-i", "bob@example.org", input=MESSAGE % 0).returncode == 0
    world.listener.wait(2)  # an agent was started and sent both


def test_an_idle_scheduled_run_says_nothing(world):
    """The timer's run on an idle host: nothing on stdout (the journal), nothing logged; a
    run that delivers still says so, and `flush` always does."""
    _made_spool(world)
    world.reconfigure(f'[log]\nfile = "{world.tmp}/mail.log"')
    idle = _unit_run(world)
    assert idle.returncode == 0 and idle.stdout == b"" and idle.stderr == b""
    assert not (world.tmp / "mail.log").exists() or (world.tmp / "mail.log").read_text() == ""
    assert world.sendmail("-odq", "-i", "bob@example.org", input=b"x\n").returncode == 0
    busy = _unit_run(world)
    assert busy.stdout.endswith(b": delivered\n1 delivered.\n"), busy.stdout
    assert world.run("mailshim", ["flush"]).stdout == b"Nothing to deliver.\n"


@pytest.mark.root
def test_a_users_mail_goes_to_the_daemon_not_to_an_agent_of_theirs(dropbox):
    """The system spool served by `mailshim daemon` (as the runner user): a real user's
    background submission starts no drop agent of theirs (it used to linger in their session
    beside the daemon); the daemon delivers it. When the daemon stops, the mark is cleared
    and the user's next submission starts their agent again."""
    from test_drop_linger import _agents

    mu = dropbox
    alice = mu.users[DROP_ALICE]
    daemon = mu.daemon()
    try:
        wait_for(lambda: (mu.spool / "served").read_bytes() == b"daemon\n", what="the mark")
        mu.listener.stop()
        done = mu.sendmail(alice, "-i", "bob@example.org", input=MESSAGE % 1)
        assert done.returncode == 0, done.stderr.decode()
        time.sleep(2)
        assert _agents(alice.uid) == []
        mu.listener.start()
        (msg,) = mu.listener.wait(1, timeout=STEP + SLACK + 60)
        assert msg.mail_from == f"{DROP_ALICE}@example.org"
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0
    assert (mu.spool / "served").read_bytes() == b""
    mu.listener.stop()
    assert mu.sendmail(alice, "-i", "carol@example.org", input=MESSAGE % 2).returncode == 0
    wait_for(lambda: len(_agents(alice.uid)) == 1, what="the user's own agent again")


# --- a long-lived retrier reads a changed configuration ---------------------------------------


def _relay_config(world: Env, port: int) -> None:
    world.config.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {port}
timeout = 5
retry_after_failure = 1

[addresses]
domain = "example.org"

[queue]
dir = "{world.spool}"
retry = ["2s"]
"""
    )


@pytest.mark.parametrize("who", ["agent", "daemon"])
def test_a_fixed_relay_is_used_by_the_retrier_already_running(world, who):
    """The relay was wrong (nothing listens there); the mail is deferred and the lingering
    agent (or `mailshim daemon`) retries it. The administrator fixes `[relay] port`: the
    next retry goes to the fixed relay. Before, the process kept the file it read at start
    and retried the old relay until it left, which it never did while that relay refused."""
    _relay_config(world, free_port())  # the old relay: nothing listens there
    daemon = None
    if who == "daemon":
        daemon = subprocess.Popen(
            [tool("mailshim"), "daemon"], env=world.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        sent = world.sendmail("-i", "bob@example.org", input=b"Subject: fixed\n\nbody\n")
        assert sent.returncode == 0, sent.stderr
        if who == "agent":
            wait_for(lambda: agents(world.spool), what="the lingering agent")
        wait_for(
            lambda: b"Connection refused" in world.run("mailshim", ["queue"]).stdout,
            what="the first attempt at the old relay",
        )
        _relay_config(world, world.listener.port)
        (msg,) = world.listener.wait(1, timeout=30)
        assert msg.rcpt_tos == ["bob@example.org"]
        world.wait_queue_empty()
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=60)
