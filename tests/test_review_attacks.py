"""A hostile review of issue 24's boundary (root against the runner account and local users).

Each test is an attack made as a real account (useradd users ``mshrev-*``, the system spool
set up by ``setup-spool``) against a real root command; each failed before its fix. Skipped
when not root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tool
from test_multiuser import System, built_box, emptied

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and chown files"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed"),
]

RUNNER, ALICE, BOB = "mshrev-run", "mshrev-a", "mshrev-b"
MSG = b"Subject: review\n\nhello\n"


@pytest.fixture(scope="module")
def box():
    with built_box((RUNNER, ALICE, BOB)) as system:
        yield system


@pytest.fixture
def sb(box):
    return emptied(box)


def as_user(sb: System, who: str, *argv: str) -> None:
    r = sb.run(sb.users[who], list(argv))
    assert r.returncode == 0, r.stderr.decode()


def dead_letter(sb: System) -> str:
    """One of alice's messages refused for good, in dead/ with its reason and state."""
    sb.listener.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user"
    r = sb.sendmail(sb.users[ALICE], "-odq", "-i", "nobody@example.org", input=MSG)
    assert r.returncode == 0, r.stderr.decode()
    sb.flush()
    sb.listener.handler.rcpt_replies.clear()
    (qid,) = [n for n in sb.names("dead") if "." not in n]
    assert f"{qid}.state" in sb.names("dead")
    return qid


# --- requeue: dead/ is the runner account's ----------------------------------------------------


def test_root_requeue_never_blocks_on_a_fifo_planted_as_the_dead_state(sb):
    """``mailshim queue requeue`` as root opened ``dead/<id>.state`` with a plain ``open()``:
    the runner account made it a FIFO and root's command hung for ever (or a link, read)."""
    qid = dead_letter(sb)
    state = sb.spool / "dead" / f"{qid}.state"
    as_user(sb, RUNNER, "/bin/rm", "-f", str(state))
    as_user(sb, RUNNER, "/usr/bin/mkfifo", "-m", "0600", str(state))
    try:
        r = sb.mailshim(None, "queue", "requeue", qid, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("root's requeue blocked on a FIFO in dead/")
    assert r.returncode == 0, r.stderr.decode()
    assert qid in sb.names("queue") and qid not in sb.names("dead")


# --- the config cache: root with a user's HOME or XDG_CACHE_HOME -------------------------------


def root_folder(sb: System, name: str) -> Path:
    """A folder only root may write, outside the spool (like /etc/logrotate.d)."""
    folder = sb.base / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(mode=0o755)
    return folder


@pytest.mark.parametrize("plant", ["cache-folder", "cache-parent"])
def test_root_never_writes_its_config_cache_where_a_user_points(sb, plant):
    """Root run with a user's HOME (``sudo -E``, ``su -m``) or XDG_CACHE_HOME (kept by ``su``)
    wrote its config cache under a path that user controls; the check (``os.stat`` of the
    folder, which follows links) let a link to any root folder through: root created
    ``config.marshal`` there (or, with ``~/.cache`` a link, made folders) outside the spool."""
    alice = sb.users[ALICE]
    outside = root_folder(sb, "outside-etc")
    cache = alice.home / ".cache"
    as_user(sb, ALICE, "/bin/rm", "-rf", str(cache))
    # root's own HOME still gets its cache (the check refuses what a user controls, no more)
    home = root_folder(sb, "roothome")
    r = sb.run(None, [tool("mailq")], HOME=str(home))
    assert r.returncode == 0, r.stderr.decode()
    assert (home / ".cache" / "mailshim" / "config.marshal").is_file()
    if plant == "cache-folder":
        as_user(sb, ALICE, "/bin/mkdir", str(cache))
        as_user(sb, ALICE, "/bin/ln", "-s", str(outside), str(cache / "mailshim"))
    else:
        as_user(sb, ALICE, "/bin/ln", "-s", str(outside), str(cache))
    for env in ({"HOME": str(alice.home)}, {"XDG_CACHE_HOME": str(cache)}):
        r = sb.run(None, [tool("mailq")], **env)
        assert r.returncode == 0, r.stderr.decode()
        assert sorted(os.listdir(outside)) == [], env
    as_user(sb, ALICE, "/bin/rm", "-rf", str(cache))
    # root's own HOME still gets its cache (the check refuses what a user controls, no more)
    home = root_folder(sb, "roothome")
    r = sb.run(None, [tool("mailq")], HOME=str(home))
    assert r.returncode == 0, r.stderr.decode()
    assert (home / ".cache" / "mailshim" / "config.marshal").is_file()


# --- a user held out of the queue is told, whoever runs the pickup ------------------------------


def test_a_held_user_is_told_when_root_runs_the_pickup(sb):
    """Root's pickup (``mailshim flush`` from root's cron, a root daemon) wrote the notice
    ``incoming/.held.<uid>`` as a root file, which ``sendmail`` and ``mailq`` believe only
    from the drop folder's owner: the user was never told why their mail waited."""
    alice = sb.users[ALICE]
    text = sb.config.read_text()
    sb.config.write_text(text + "\n[limits]\nuser_spool_entries = 1\n")
    sb.listener.stop()
    try:
        for i in range(2):
            r = sb.sendmail(alice, "-odq", "-i", f"c{i}@example.org", input=MSG)
            assert r.returncode == 0 and r.stderr == b""
            r = sb.mailshim(None, "flush")
            assert r.returncode == 0, r.stderr.decode()
        assert len([n for n in sb.names("incoming") if not n.startswith(".")]) == 1
        notice = sb.incoming / f".held.{alice.uid}"
        assert notice.lstat().st_uid == sb.users[RUNNER].uid  # the drop folder's owner's
        r = sb.sendmail(alice, "-odq", "-i", "d@example.org", input=MSG)
        assert r.returncode == 0
        assert r.stderr.decode().startswith("sendmail: note: your mail waits"), r.stderr
        r = sb.run(alice, [tool("mailq")])
        assert f"-- uid {alice.uid}: mail waits in the drop folder: ".encode() in r.stdout
        # the runner account's own pickup keeps the notice root handed it, and clears it
        sb.listener.start()
        for _ in range(4):
            sb.flush()
        assert not notice.exists()
    finally:
        sb.config.write_text(text)
        if sb.listener.controller is None:
            sb.listener.start()


# --- the send-limit counters: the runner account holds a counter's flock ------------------------


def test_a_held_counter_stalls_a_root_pass_once_not_per_message(sb):
    """Each message of a user whose counter the runner account keeps locked made root's pass
    wait ``LOCK_WAIT`` (5 s) before going on uncounted, with the event loop (and so every
    parallel session) stopped: 1000 such messages held ``mailshim flush`` for 83 minutes.
    The wait is now paid once per counter and pass: the counter is known to be held."""
    alice = sb.users[ALICE]
    text = sb.config.read_text()
    log = sb.base / "review.log"
    log.write_text("")
    sb.config.write_text(text + f'\n[log]\nfile = "{log}"\n')
    run = sb.users[RUNNER]
    limits = sb.spool / "state" / "limits"
    holder = None
    try:
        r = sb.sendmail(alice, "-odq", "-i", "first@example.org", input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        sb.flush()  # alice's counter exists, the runner's
        sb.wait_delivered(1)
        counter = limits / str(alice.uid)
        assert counter.lstat().st_uid == run.uid
        code = (
            "import fcntl, time\n"
            f"f = open({str(counter)!r}, 'rb')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, user=run.uid, group=run.gid,
            extra_groups=[], cwd="/",
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        n = 3
        for i in range(n):
            r = sb.sendmail(alice, "-odq", "-i", f"m{i}@example.org", input=MSG)
            assert r.returncode == 0, r.stderr.decode()
        r = sb.mailshim(None, "flush", timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        sb.wait_delivered(1 + n)  # never stranded: the messages go, uncounted
        stuck = [ln for ln in log.read_text().splitlines() if "stays locked" in ln]
        assert len(stuck) == 1, stuck
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        sb.config.write_text(text)


# --- a half-made system spool completed by root ---------------------------------------------------


def test_root_completing_a_half_made_system_spool_leaves_it_usable_by_the_runner(sb):
    """Issue 27's fix completes a spool whose creation a crash cut short when the process
    may write its root; for the system spool that is root, which made the missing folder
    its own (0700): the runner user could then no longer write it, and every run of the
    packaged units failed until someone ran setup-spool."""
    run = sb.users[RUNNER]
    shutil.rmtree(sb.spool / "state")
    try:
        r = sb.sendmail(sb.users[ALICE], "-odq", "-i", "bob@example.org", input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        r = sb.mailshim(None, "flush")
        assert r.returncode == 0, r.stderr.decode()
        st = (sb.spool / "state").lstat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (run.uid, run.gid, 0o700)
        sb.listener.handler.rcpt_replies["later@example.org"] = "451 4.3.0 try later"
        r = sb.sendmail(sb.users[ALICE], "-odq", "-i", "later@example.org", input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        sb.flush()  # the runner user records the deferral in state/
        assert len(sb.names("state")) >= 1
    finally:
        if not (sb.spool / "state").exists():
            (sb.spool / "state").mkdir(mode=0o700)
        os.chown(sb.spool / "state", run.uid, run.gid)
