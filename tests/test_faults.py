"""Proof under faults: real processes, a real listener switched between states, kills,
concurrency, a full disk and a read-only spool.

Every message ends delivered once, deferred (kept), or bounced, as docs/spool.md says; the
only duplicates are those of the documented window (a crash between the listener's reply
and the spool update), and the crash test counts and explains each one.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import Env, message_queue_id, others_can_run, queue_config, tool
from mailshim import configload, spool, spoolfmt
from relayhelpers import Listener

MSG = b"Subject: fault test\n\nkeep me\n"


def one_line(stderr: bytes) -> bool:
    return stderr.count(b"\n") == 1 and b"Traceback" not in stderr


def dead(world: Env) -> list[str]:
    folder = world.spool / "dead"
    return sorted(n for n in os.listdir(folder) if spoolfmt.valid_id(n)) if folder.exists() else []


def state(world: Env, qid: str) -> spoolfmt.State:
    return spoolfmt.decode_state((world.spool / "state" / qid).read_bytes())


def submit(world: Env, *rcpts: str, mode: str = "-odq") -> str:
    before = set(world.queued())
    r = world.sendmail(mode, "-i", *(rcpts or ("bob@example.org",)), input=MSG)
    assert (r.returncode, r.stderr) == (0, b"")
    (qid,) = set(world.queued()) - before
    return qid


def q(world: Env) -> subprocess.CompletedProcess[bytes]:
    r = world.sendmail("-q")
    assert (r.returncode, r.stderr) == (0, b""), r.stderr
    return r


# --- the listener's states ------------------------------------------------------------------


def test_up_delivers_once_in_the_background(fworld):
    r = fworld.sendmail("-i", "bob@example.org", input=MSG)
    assert (r.returncode, r.stderr) == (0, b"")
    (msg,) = fworld.listener.wait(1)
    fworld.wait_queue_empty()
    q(fworld)
    assert len(fworld.listener.messages) == 1 and msg.rcpt_tos == ["bob@example.org"]


def test_down_is_kept_then_delivered_once(fworld):
    fworld.listener.stop()
    qid = submit(fworld, mode="-odb")  # the agent finds nobody and leaves it
    time.sleep(0.5)
    assert fworld.queued() == [qid]
    q(fworld)
    assert (
        state(fworld, qid).attempts >= 1 and "Connection refused" in state(fworld, qid).last_error
    )
    fworld.listener.start()
    q(fworld)
    (msg,) = fworld.listener.messages
    assert message_queue_id(msg) == qid and fworld.queued() == []


@pytest.mark.parametrize(
    "where, reply",
    [("rcpt", "451 4.3.0 Try again later"), ("data", "451 4.3.0 Queue full"),
     ("mail", "421 4.3.2 Shutting down")],
)  # fmt: skip
def test_4xx_defers_then_delivers_once(fworld, where, reply):
    h = fworld.listener.handler
    qid = submit(fworld)
    if where == "rcpt":
        h.rcpt_replies = {"bob@example.org": reply}
    elif where == "data":
        h.data_reply = reply
    else:
        h.mail_reply = reply
    q(fworld)
    st = state(fworld, qid)
    assert fworld.queued() == [qid] and {r: str(v) for r, v in st.pending.items()} == {
        "bob@example.org": reply
    }
    assert st.attempts == 1 and not st.done and not st.failed
    h.rcpt_replies, h.data_reply, h.mail_reply = {}, None, None
    q(fworld)
    assert [message_queue_id(m) for m in fworld.listener.messages] == [qid]
    assert fworld.queued() == []


def test_rate_limits_delay_but_deliver_each_once(fworld):
    h = fworld.listener.handler
    h.per_second = 2
    h.per_session = 3
    ids = [submit(fworld) for _ in range(7)]
    for _ in range(10):
        q(fworld)
        if not fworld.queued():
            break
    assert sorted(message_queue_id(m) for m in fworld.listener.messages) == sorted(ids)
    assert h.throttled > 0


def test_5xx_bounces_to_the_sender_and_keeps_the_entry_in_dead(fworld):
    fworld.listener.handler.rcpt_replies = {"bob@example.org": "550 5.1.1 No such user"}
    qid = submit(fworld)
    q(fworld)
    assert fworld.queued() == [] and dead(fworld) == [qid]
    assert "550 5.1.1" in (fworld.spool / "dead" / f"{qid}.reason").read_text()
    (dsn,) = fworld.listener.messages
    assert dsn.mail_from == "<>" and b"multipart/report" in dsn.data
    assert b"Status: 5.1.1" in dsn.data


def test_partial_rejection_delivers_the_rest_and_bounces_the_refused(fworld):
    fworld.listener.handler.rcpt_replies = {"bad@example.org": "550 5.1.1 No such user"}
    qid = submit(fworld, "good@example.org", "bad@example.org")
    q(fworld)
    msgs = fworld.listener.messages
    assert msgs[0].rcpt_tos == ["good@example.org"] and message_queue_id(msgs[0]) == qid
    (dsn,) = [m for m in msgs if m.mail_from == "<>"]
    assert b"bad@example.org" in dsn.data and b"Final-Recipient: rfc822; good" not in dsn.data
    assert dead(fworld) == [qid] and fworld.queued() == []


def test_connection_dropped_mid_data_is_deferred_then_delivered_once(fworld):
    fworld.listener.handler.drop_mid_data = 1
    qid = submit(fworld)
    q(fworld)
    assert fworld.queued() == [qid] and fworld.listener.messages == []
    assert state(fworld, qid).attempts == 1
    q(fworld)
    assert [message_queue_id(m) for m in fworld.listener.messages] == [qid]


def test_connection_dropped_after_the_dot_is_the_documented_window(fworld):
    """The listener took the message but the reply never came: sent again (at least once)."""
    fworld.listener.handler.drop_after_dot = 1
    qid = submit(fworld)
    q(fworld)
    assert fworld.queued() == [qid]
    assert "may have been delivered" in state(fworld, qid).last_error
    q(fworld)
    assert [message_queue_id(m) for m in fworld.listener.messages] == [qid, qid]
    assert fworld.queued() == []


def test_no_reply_after_the_dot_waits_for_the_same_relay_and_never_fails_over(fworld):
    """Issue 12 item 10: two listeners in front of one store. The first takes the message and
    drops the connection before its reply: the second must not get it in the same attempt
    (that would be a near-certain duplicate); the entry waits, and the retry sends exactly
    one more copy, again to the first."""
    with Listener() as second:
        fworld.config.write_text(
            f"""
[[relay]]
name = "first"
host = "127.0.0.1"
port = {fworld.listener.port}
timeout = 5
helo = "client.example.org"

[[relay]]
name = "second"
host = "127.0.0.1"
port = {second.port}
timeout = 5
helo = "client.example.org"

[addresses]
domain = "example.org"

[queue]
dir = "{fworld.spool}"
retry = ["1s"]
"""
        )
        fworld.listener.handler.drop_after_dot = 1
        qid = submit(fworld)
        q(fworld)
        assert [message_queue_id(m) for m in fworld.listener.messages] == [qid]
        assert second.handler.messages == [] and fworld.queued() == [qid]
        pending = state(fworld, qid).pending["bob@example.org"]
        assert (pending.code, pending.kind) == (0, "unanswered")
        q(fworld)
        assert [message_queue_id(m) for m in fworld.listener.messages] == [qid, qid]
        assert second.handler.messages == [] and fworld.queued() == []


def test_a_signal_after_the_entry_is_safe_does_not_turn_success_into_failure(fworld):
    """SIGTERM while `sendmail -odi` waits for the listener: the message is already in the
    spool, so the answer stays "safe" (exit 0) and the delivery finishes."""
    h = fworld.listener.handler
    h.data_delay = 1.0
    p = subprocess.Popen(
        [tool("sendmail"), "-odi", "-i", "bob@example.org"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=fworld.env,
    )
    assert p.stdin is not None
    p.stdin.write(MSG)
    p.stdin.close()
    deadline = time.monotonic() + 20
    while h.data_started == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    assert p.stderr is not None
    err = p.stderr.read()
    p.stderr.close()
    assert (p.returncode, err) == (0, b"")
    assert len(fworld.listener.messages) == 1 and fworld.queued() == []


# --- crash safety: SIGKILL at random points -------------------------------------------------


class Crashes:
    """Kills processes at random points and keeps what is needed to explain duplicates."""

    def __init__(self, world: Env, seed: int) -> None:
        self.world = world
        self.rng = random.Random(seed)
        self.sp = spool.Spool(str(world.spool))
        self.sp.ensure()
        self.kills = 0
        self.queued: set[str] = set()  # queue ids put in the spool for the runners
        self.serial = 0

    def in_spool(self) -> set[str]:
        names = set(os.listdir(self.world.spool / "queue"))
        return {n for n in names if spoolfmt.valid_id(n)}

    def settle(self) -> None:
        """After a kill: every connection closed, so all the dead client sent is handled."""
        self.world.listener.wait_idle()

    def fill(self, target: int) -> None:
        """Queue entries directly until ``target`` are waiting."""
        for _ in range(target - len(self.in_spool())):
            w = self.sp.new_entry("crash@example.org", ["bob@example.org"], 0)
            self.serial += 1
            w.write(
                b"Subject: crash %d\r\nMessage-ID: <%s@example.org>\r\n\r\nbody\r\n"
                % (self.serial, w.queue_id.encode())
            )
            w.commit(False)
            self.queued.add(w.queue_id)

    def kill_pair(self, argv: list[str], midflight: bool) -> None:
        """Start two runners; SIGKILL each at a random point: anywhere from start-up on, or
        (``midflight``) once messages are going out."""
        handler = self.world.listener.handler
        baseline = handler.data_started
        procs = [
            subprocess.Popen(
                argv, env=self.world.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(2)
        ]
        start = time.monotonic()
        if midflight:
            while handler.data_started == baseline and time.monotonic() - start < 10:
                time.sleep(0.005)
            start = time.monotonic()
            delays = sorted(self.rng.uniform(0.0, 0.2) for _ in procs)
        else:
            delays = sorted(self.rng.uniform(0.05, 0.6) for _ in procs)
        for p, delay in zip(procs, delays, strict=True):
            time.sleep(max(0.0, start + delay - time.monotonic()))
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
            self.kills += 1
        self.settle()

    def explained(self) -> collections.Counter[str]:
        """Extra copies the crashes explain, per queue id: a connection that ended without
        QUIT (its client was killed) may have left its last stored message unrecorded."""
        return collections.Counter(
            message_queue_id(m) for m in self.world.listener.handler.cut_short
        )


def _sendmail_phase(world: Env, crashes: Crashes, count: int) -> tuple[set[str], int]:
    """Submit ``count`` messages, each sendmail SIGKILLed at a random point. Returns the
    subjects of those that exited 0 first (a promise), and how many were killed."""
    promised: set[str] = set()
    killed = 0
    rng = crashes.rng
    for start in range(0, count, 10):
        procs = []
        for i in range(start, min(count, start + 10)):
            subject = f"S{i}"
            p = subprocess.Popen(
                [tool("sendmail"), "-i", "bob@example.org"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=world.env,
            )
            assert p.stdin is not None
            try:
                p.stdin.write(b"Subject: %s\n\nbody\n" % subject.encode())
                p.stdin.close()
            except BrokenPipeError:
                pass
            procs.append((p, subject))
        time.sleep(rng.uniform(0.0, 0.15))
        for p, subject in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                killed += 1
            p.wait()
            if p.returncode == 0:
                promised.add(subject)
        crashes.kills += len(procs)
    return promised, killed


def _wait_agents_gone(world: Env, timeout: float = 30.0) -> None:
    sp = spool.Spool(str(world.spool))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fd = sp.try_agent_lock()
        if fd is not None:
            os.close(fd)
            world.listener.wait_idle()
            return
        time.sleep(0.05)
    raise AssertionError("the delivery agent did not finish")


def run_crashes(world: Env, sendmails: int, pairs: int, seed: int) -> None:
    crashes = Crashes(world, seed)
    promised, _killed = _sendmail_phase(world, crashes, sendmails)
    _wait_agents_gone(world)
    crashes.settle()
    agent = [sys.executable, "-m", "mailshim.agent", "--spool", str(world.spool)]
    agent += ["--config", str(world.config)]
    flush = [tool("mailshim"), "flush"]
    handler = world.listener.handler
    for i in range(pairs):
        crashes.fill(40)
        # every other round the listener stores each message 20 ms before it says so: kills
        # then land in the window where a message is delivered but not yet recorded
        midflight = i % 4 >= 2
        handler.reply_delay = 0.02 if midflight else 0.0
        crashes.kill_pair(agent if i % 2 == 0 else flush, midflight)
    handler.reply_delay = 0.0
    assert crashes.kills >= sendmails + 2 * pairs

    final = world.sendmail("-q")
    assert final.returncode == 0, final.stderr
    world.listener.wait_idle()
    msgs = world.listener.messages
    # nothing lost: every promise kept, every queued entry delivered, nothing left over
    subjects = {m.header("Subject")[0] for m in msgs if m.header("Subject")}
    assert promised <= subjects, sorted(promised - subjects)
    ids = [message_queue_id(m) for m in msgs]
    assert crashes.queued <= set(ids), sorted(crashes.queued - set(ids))
    assert world.queued() == [] and dead(world) == []
    assert not (world.spool / "corrupt").exists() or os.listdir(world.spool / "corrupt") == []
    # duplicates: only in the documented window, each one explained by a kill
    positions: dict[str, list[int]] = collections.defaultdict(list)
    for index, qid in enumerate(ids):
        positions[qid].append(index)
    duplicates = {q: len(p) - 1 for q, p in positions.items() if len(p) > 1}
    explained = crashes.explained()
    unexplained = {q: n for q, n in duplicates.items() if n > explained[q]}
    assert not unexplained, (unexplained, duplicates)
    # the window was hit (the explanation above is not vacuous) ...
    assert duplicates, "no kill landed between a delivery and its record"
    # ... and is short: a copy per killed session at most (each runner has up to
    # `concurrency` sessions, each with its own message between the reply and the record)
    sessions = configload.load(str(world.config), use_cache=False).relays[0].concurrency
    assert sum(duplicates.values()) <= (crashes.kills - sendmails) * sessions
    print(
        f"crash test: {crashes.kills} kills, {len(msgs)} messages, "
        f"{sum(duplicates.values())} duplicates, all in the documented window"
    )


def test_sigkill_at_random_points_loses_nothing(fworld):
    run_crashes(fworld, sendmails=100, pairs=50, seed=3)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MAILSHIM_SLOW"),
    reason="the long version (over a minute): set MAILSHIM_SLOW=1; the short one always runs",
)
def test_sigkill_at_random_points_loses_nothing_long(fworld):
    run_crashes(fworld, sendmails=300, pairs=200, seed=int(time.time()))


# --- concurrency: 50 submitters, 2 runners, a flapping listener ----------------------------


def test_fifty_submitters_and_two_runners_while_the_listener_flaps(fworld):
    listener = fworld.listener
    h = listener.handler
    daemons = [
        subprocess.Popen(
            [tool("mailshim"), "daemon"],
            env=fworld.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    # The daemons serve the spool before the first submission (else that submission's agent
    # would, lingering, until the first daemon asks it to leave).
    pid_file = fworld.spool / "state" / "agent.pid"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and b"daemon" not in (
        pid_file.read_bytes() if pid_file.exists() else b""
    ):
        time.sleep(0.05)
    stop = threading.Event()

    def flap() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            state = rng.choice(["up", "down", "421", "451", "452"])
            h.mail_reply = {"421": "421 4.3.2 Going away", "451": "451 4.3.0 Later"}.get(state)
            h.rcpt_replies = (
                {"bob@example.org": "452 4.4.5 Rate limit exceeded"} if state == "452" else {}
            )
            if state == "down" and listener.up:
                listener.stop()
            elif state != "down" and not listener.up:
                listener.start()
            stop.wait(rng.uniform(0.1, 0.4))

    flapper = threading.Thread(target=flap)
    flapper.start()
    try:
        submitters = [
            subprocess.Popen(
                [tool("sendmail"), "-i", "bob@example.org"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=fworld.env,
            )
            for _ in range(50)
        ]
        for i, p in enumerate(submitters):
            _, err = p.communicate(b"Subject: C%d\n\nconcurrent\n" % i, timeout=60)
            assert (p.returncode, err) == (0, b""), err
        time.sleep(2)
    finally:
        stop.set()
        flapper.join()
        if not listener.up:
            listener.start()
        h.mail_reply, h.rcpt_replies = None, {}
    try:
        listener.wait(50, timeout=60)
        fworld.wait_queue_empty(timeout=30)
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        said = b""
        for d in daemons:
            _, err = d.communicate(timeout=30)
            assert d.returncode == 0 and b"Traceback" not in err, err
            said += err
    # Whether a daemon met the flapping depends on timing (the submitters' agents may take
    # every message, or wait out a "listener down" mark): nothing is asserted about it. (This
    # once matched flush's "0 deferred", which every summary printed.)
    assert b"daemon: stopped" in said, said
    subjects = collections.Counter(m.header("Subject")[0] for m in listener.messages)
    assert subjects == collections.Counter(f"C{i}" for i in range(50))


# --- disk full, read-only, permission denied ------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    """A 1 MiB tmpfs; skipped when mounting is not permitted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def tworld(tmp_path, faulty, tiny) -> Env:
    env = Env(tmp_path, faulty)
    env.spool = tiny / "spool"
    queue_config(env)
    return env


def test_disk_full_refuses_with_75_and_keeps_nothing_half_written(tworld):
    big = b"Subject: big\n\n" + (b"x" * 999 + b"\n") * 2000  # 2 MB on a 1 MiB disk
    r = tworld.sendmail("-odq", "-i", "bob@example.org", input=big)
    assert r.returncode == 75 and one_line(r.stderr), r.stderr
    assert b"No space left on device" in r.stderr
    assert tworld.queued() == [] and os.listdir(tworld.spool / "tmp") == []
    small = submit(tworld)  # the space came back: the next message is fine
    q(tworld)
    assert [message_queue_id(m) for m in tworld.listener.messages] == [small]


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_runner_on_a_full_disk_stops_with_75_and_loses_nothing(tworld):
    h = tworld.listener.handler
    qid = submit(tworld)
    h.rcpt_replies = {"bob@example.org": "451 4.3.0 later"}  # a deferral needs a state file
    filler = _fill(tworld.spool)
    r = tworld.sendmail("-q")
    assert r.returncode == 75 and one_line(r.stderr), r.stderr
    assert tworld.queued() == [qid]
    filler.unlink()
    h.rcpt_replies = {}
    q(tworld)
    assert [message_queue_id(m) for m in tworld.listener.messages] == [qid]


def test_read_only_spool_is_73_with_one_line(tworld, tiny):
    qid = submit(tworld)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny)], check=True)
    try:
        r = tworld.sendmail("-odq", "-i", "bob@example.org", input=MSG)
        assert r.returncode == 73 and one_line(r.stderr) and b"Read-only" in r.stderr
        r = tworld.sendmail("-q")
        assert r.returncode == 73 and one_line(r.stderr), r.stderr
        assert tworld.listener.messages == []  # nothing sent that could not be recorded
        listing = tworld.run("mailq", [])
        assert listing.returncode == 0 and qid.encode() in listing.stdout
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny)], check=True)
    q(tworld)
    assert [message_queue_id(m) for m in tworld.listener.messages] == [qid]


@pytest.fixture
def request_cleanup():
    folders: list[Path] = []
    yield folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run sendmail as another user")
def test_permission_denied_is_77_with_one_line(faulty, request_cleanup):
    if not others_can_run():
        pytest.skip(f"other users cannot run {sys.executable} (its folder is private)")
    import pwd

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="mailshim-perm-", dir="/tmp"))  # others may enter
    request_cleanup.append(base)
    os.chmod(base, 0o755)
    world = Env(base, faulty)
    queue_config(world)
    spool.Spool(str(world.spool)).ensure()
    for folder in ("", *spool.SUBDIRS):
        os.chown(world.spool / folder, nobody.pw_uid, nobody.pw_gid)
    os.chmod(world.spool / "tmp", 0o500)  # the owner took away their own write permission
    os.chmod(world.config, 0o644)
    env = dict(world.env, HOME=str(base / "home"), MAILSHIM_CACHE_DIR=str(base / "cache"))
    r = subprocess.run(
        [tool("sendmail"), "-i", "bob@example.org"],
        input=MSG,
        capture_output=True,
        env=env,
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
    )
    assert r.returncode == 77 and one_line(r.stderr), r.stderr
    assert b"Permission denied" in r.stderr
    assert os.listdir(world.spool / "queue") == [] and os.listdir(world.spool / "tmp") == []
