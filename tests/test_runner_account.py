"""The runner account as the attacker: a compromised ``mailshim`` user must not become root.

Real users (useradd), the system spool set up by ``mailshim setup-spool``, the attacks made as
the runner user (links at ``state/limits``, a FIFO or a stranger's pid at ``state/agent.pid``),
and real root commands (``mailshim flush``, ``run``, ``daemon``, ``check``, ``setup-spool``,
``sendmail -q``). Nothing outside the spool may be created or change owner, mode or content.
Also: signals go only to the proven holder of the agent lock; send-limit counters are exact
under concurrent runners. Skipped when not root.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tool
from mailshim import sendlimits, serving, spool
from test_multiuser import System, built_box, emptied, stop_processes

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and chown files"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed"),
]

RUNNER, ALICE, BOB = "mshsec-run", "mshsec-a", "mshsec-b"
MSG = b"Subject: attack\n\nhello\n"


@pytest.fixture(scope="module")
def box():
    with built_box((RUNNER, ALICE, BOB)) as system:
        yield system


@pytest.fixture
def sb(box):
    system = emptied(box)
    limits = system.spool / "state" / "limits"
    if limits.is_symlink() or limits.is_file():
        limits.unlink()
    elif limits.exists():
        shutil.rmtree(limits)
    return system


def snapshot(folder: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every name under ``folder`` (the folder too) with owner, group, mode and content."""
    out = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        out[str(path.relative_to(folder))] = (st.st_uid, st.st_gid, st.st_mode, data)
    return out


def outside_folder(sb: System, uid: int) -> Path:
    """A root-owned folder outside the spool holding a root-owned file named like a counter."""
    outside = sb.base / "outside"
    if outside.exists():
        shutil.rmtree(outside)
    outside.mkdir(mode=0o755)
    (outside / str(uid)).write_bytes(b"precious root data\n")
    os.chmod(outside / str(uid), 0o644)
    return outside


def as_runner(sb: System, *argv: str) -> None:
    r = sb.run(sb.users[RUNNER], list(argv))
    assert r.returncode == 0, r.stderr.decode()


def plant_limits_link(sb: System, target: Path) -> None:
    """The runner account replaces its state/limits with a link to ``target``."""
    limits = sb.spool / "state" / "limits"
    as_runner(sb, "/bin/rm", "-rf", str(limits))
    as_runner(sb, "/bin/ln", "-s", str(target), str(limits))
    assert limits.is_symlink() and limits.lstat().st_uid == sb.users[RUNNER].uid


def drop(sb: System) -> None:
    r = sb.sendmail(sb.users[ALICE], "-odq", "-i", "bob@example.org", input=MSG)
    assert r.returncode == 0, r.stderr.decode()


def root_daemon_delivers(sb: System, count: int) -> None:
    proc = subprocess.Popen(
        [tool("mailshim"), "daemon"],
        env=sb.env(None),
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        sb.wait_delivered(count, 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


ROOT_PASSES = {
    "flush": lambda sb: sb.mailshim(None, "flush"),
    "run": lambda sb: sb.mailshim(None, "run"),
    "sendmail -q": lambda sb: sb.sendmail(None, "-q"),
}


@pytest.mark.parametrize("command", sorted(ROOT_PASSES))
def test_root_pass_never_writes_through_a_limits_link(sb, command):
    alice = sb.users[ALICE]
    outside = outside_folder(sb, alice.uid)
    before = snapshot(outside)
    plant_limits_link(sb, outside)
    drop(sb)
    r = ROOT_PASSES[command](sb)
    assert r.returncode == 0, r.stderr.decode()
    sb.wait_delivered(1)  # the mail goes on, uncounted: a limit never strands mail
    assert snapshot(outside) == before
    assert (sb.spool / "state" / "limits").is_symlink()  # left alone, not followed


def test_root_daemon_never_writes_through_a_limits_link(sb):
    alice = sb.users[ALICE]
    outside = outside_folder(sb, alice.uid)
    before = snapshot(outside)
    plant_limits_link(sb, outside)
    drop(sb)
    root_daemon_delivers(sb, 1)
    assert snapshot(outside) == before


def test_a_limits_link_to_an_empty_root_folder_gets_nothing_created(sb):
    outside = outside_folder(sb, 1)  # no file named after alice's uid: a create would show
    before = snapshot(outside)
    plant_limits_link(sb, outside)
    drop(sb)
    assert sb.mailshim(None, "flush").returncode == 0
    sb.wait_delivered(1)
    assert snapshot(outside) == before


def test_counters_root_creates_go_to_the_runner_and_nothing_else_is_chowned(sb):
    alice, run = sb.users[ALICE], sb.users[RUNNER]
    drop(sb)
    assert sb.mailshim(None, "flush").returncode == 0
    sb.wait_delivered(1)
    limits = sb.spool / "state" / "limits"
    for path in (limits, limits / str(alice.uid)):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (run.uid, run.gid)
    # a counter the runner account replaced by a link (to a root file) is refused, not chowned
    outside = outside_folder(sb, alice.uid)
    before = snapshot(outside)
    as_runner(sb, "/bin/rm", "-f", str(limits / str(alice.uid)))
    as_runner(sb, "/bin/ln", "-s", str(outside / str(alice.uid)), str(limits / str(alice.uid)))
    drop(sb)
    assert sb.mailshim(None, "flush").returncode == 0
    sb.wait_delivered(2)
    assert snapshot(outside) == before


def test_root_check_and_setup_spool_with_planted_links_and_fifos(sb):
    run = sb.users[RUNNER]
    outside = outside_folder(sb, sb.users[ALICE].uid)
    before = snapshot(outside)
    plant_limits_link(sb, outside)
    for folder in ("tmp", "state", "dead", "corrupt", "queue"):
        as_runner(sb, "/bin/ln", "-s", str(outside / str(sb.users[ALICE].uid)),
                  str(sb.spool / folder / "planted"))  # fmt: skip
    pid_file = sb.spool / "state" / serving.PID_FILE
    as_runner(sb, "/usr/bin/mkfifo", str(pid_file))
    # someone holds the agent lock, so check believes the pid file and reads it
    with open(sb.spool / "agent.lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = sb.mailshim(None, "check", timeout=60)
    assert r.returncode in (0, 1, 2), r.stderr.decode()  # it finished: the FIFO was not opened
    r = sb.mailshim(None, "setup-spool", "--user", RUNNER)
    assert r.returncode == 0, r.stderr.decode()
    assert snapshot(outside) == before
    assert (sb.spool / "tmp" / "planted").lstat().st_uid == run.uid
    pid_file.unlink()


# --- signals only to the proven lock holder ---------------------------------------------------


def _holder(sb: System) -> subprocess.Popen:
    """A process holding the agent lock, as an agent would (the lock file open and flocked)."""
    code = (
        "import fcntl, sys, time\n"
        f"f = open({str(sb.spool / 'agent.lock')!r}, 'rb')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
    return proc


def test_a_stale_pid_file_never_aims_a_signal_at_a_stranger(sb):
    target = spool.Spool(str(sb.spool))
    holder = _holder(sb)
    stranger = subprocess.Popen(["sleep", "120"])  # a pid reused by an unrelated process
    try:
        pid_file = sb.spool / "state" / serving.PID_FILE
        pid_file.write_text(f"{stranger.pid} agent\n")
        assert serving.holder(target) == (stranger.pid, "agent")
        assert serving.poke(target) is False
        assert serving.stop_lingering(target) is None  # no SIGTERM sent, lock still held
        time.sleep(0.2)
        assert stranger.poll() is None and holder.poll() is None
        # the real holder, named in the pid file, is signalled
        pid_file.write_text(f"{holder.pid} agent\n")
        fd = serving.stop_lingering(target)
        assert fd is not None  # it left when asked (SIGTERM), and the lock is ours
        os.close(fd)
        assert holder.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None
    finally:
        for proc in (holder, stranger):
            proc.kill()
            proc.wait()


# --- send-limit counters under concurrent runners --------------------------------------------


def test_concurrent_runners_count_every_message_once(sb):
    alice = sb.users[ALICE]
    target = spool.Spool(str(sb.spool))
    n = 40
    for i in range(n):
        w = target.new_entry("mshsec-a@example.org", ["bob@example.org"], alice.uid)
        w.write(b"Subject: %d\r\n\r\nx\r\n" % i)
        w.commit(False)
    runner = sb.users[RUNNER]
    procs = [
        subprocess.Popen(
            [tool("mailshim"), "flush"],
            env=sb.env(runner),
            user=runner.uid,
            group=runner.gid,
            extra_groups=[],
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    sb.wait_delivered(n)
    subjects = [re.search(rb"Subject: \d+", m.data)[0] for m in sb.listener.messages]
    assert sorted(subjects) == sorted(b"Subject: %d" % i for i in range(n))  # each once
    folder = str(sb.spool / "state" / "limits")
    lim = sendlimits.Limiter(folder, 100, 500, 3600, frozenset({0}), (runner.uid, runner.gid))
    used = lim.usage(alice.uid)
    assert (used.messages, used.recipients) == (n, n)


def teardown_module():
    stop_processes([])


# --- a user's own domain is not their own address ---------------------------------------------


def test_a_users_own_domain_gets_the_warning_like_f(sb):
    alice = sb.users[ALICE]
    own = alice.home / "config.toml"
    text = sb.config.read_text().replace('domain = "example.org"', 'domain = "bank.example"')
    assert "bank.example" in text
    own.write_text(text)
    os.chown(own, alice.uid, alice.gid)
    # under the system's (root-controlled) configuration: her own address, no warning
    r = sb.sendmail(alice, "-odi", "-i", "bob@example.org", input=MSG)
    assert r.returncode == 0, r.stderr.decode()
    # under her own configuration, no -f: the envelope says bank.example, and a warning
    r = sb.sendmail(alice, "-odi", "-i", "bob@example.org", input=MSG, MAILSHIM_CONFIG=str(own))
    assert r.returncode == 0, r.stderr.decode()
    first, second = sb.listener.wait(2, 30)
    assert first.mail_from == f"{ALICE}@example.org"
    assert b"X-Authentication-Warning" not in first.data
    assert second.mail_from == f"{ALICE}@bank.example"
    warnings = [ln for ln in second.data.split(b"\r\n") if ln.startswith(b"X-Authentication")]
    assert len(warnings) == 1
    assert warnings[0].endswith(
        f"{ALICE} set sender to {ALICE}@bank.example using its own configuration".encode()
    )


def test_own_domain_entry_picked_up_by_root_warns_once(sb):
    alice = sb.users[ALICE]
    own = alice.home / "config.toml"
    own.write_text(
        sb.config.read_text().replace('domain = "example.org"', 'domain = "bank.example"')
    )
    os.chown(own, alice.uid, alice.gid)
    r = sb.sendmail(alice, "-odq", "-i", "bob@example.org", input=MSG, MAILSHIM_CONFIG=str(own))
    assert r.returncode == 0, r.stderr.decode()
    assert sb.mailshim(None, "flush").returncode == 0
    (got,) = sb.listener.wait(1, 30)
    assert got.mail_from == f"{ALICE}@bank.example"
    assert got.data.count(b"X-Authentication-Warning") == 1
    assert b"mailshim pickup, from userid" in got.data


# --- dead letters and the spool budget --------------------------------------------------------


def test_dead_letters_do_not_lock_a_user_out_and_a_held_user_is_told(sb):
    alice = sb.users[ALICE]
    text = sb.config.read_text()
    sb.config.write_text(text + "\n[limits]\nuser_spool_entries = 1\n")
    try:
        sb.listener.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user"
        for _ in range(2):  # two dead letters: over the budget of 1, were they counted
            r = sb.sendmail(alice, "-odq", "-i", "nobody@example.org", input=MSG)
            assert r.returncode == 0 and r.stderr == b""
            sb.flush()
        assert len([n for n in sb.names("dead") if "." not in n]) == 2
        r = sb.sendmail(alice, "-odq", "-i", "bob@example.org", input=MSG)
        assert r.returncode == 0 and r.stderr == b""
        sb.flush()
        assert sb.names("incoming") == []  # taken in, dead letters notwithstanding
        # the listener is down: one entry fills the budget, the next waits, and alice hears
        sb.listener.stop()
        for i in range(2):
            r = sb.sendmail(alice, "-odq", "-i", f"c{i}@example.org", input=MSG)
            assert r.returncode == 0 and r.stderr == b""
            sb.flush()
        assert len([n for n in sb.names("incoming") if not n.startswith(".")]) == 1
        r = sb.sendmail(alice, "-odq", "-i", "d@example.org", input=MSG)
        assert r.returncode == 0
        note = r.stderr.decode()
        assert note.count("\n") == 1 and note.startswith("sendmail: note: your mail waits")
        assert "user_spool_entries = 1" in note
        # mailq says why, to her and to root
        for who in (alice, None):
            r = sb.run(who, [tool("mailq")])
            assert f"-- uid {alice.uid}: mail waits in the drop folder: ".encode() in r.stdout
        # bob is not told anything
        r = sb.sendmail(sb.users[BOB], "-odq", "-i", "e@example.org", input=MSG)
        assert r.returncode == 0 and r.stderr == b""
        # once alice's mail gets in, the notice goes
        sb.listener.start()
        for _ in range(4):
            sb.flush()
        assert not (sb.incoming / f".held.{alice.uid}").exists()
        r = sb.sendmail(alice, "-odq", "-i", "f@example.org", input=MSG)
        assert r.returncode == 0 and r.stderr == b""
    finally:
        sb.config.write_text(text)
        sb.listener.handler.rcpt_replies.clear()
        if sb.listener.controller is None:
            sb.listener.start()
