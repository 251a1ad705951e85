"""Many users, one system spool, no set-id: invariant 4 with real unprivileged users.

As root, the test creates a runner user and two submitters (useradd), sets the spool up with
``mailshim setup-spool --user``, and runs ``sendmail``, ``mailshim flush`` and ``mailshim
daemon`` as those users. Skipped with a reason when not root (CI runs as root).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Listener, free_port, message_queue_id, others_can_run, tool
from mailshim import spool, spoolentry, spoolfmt

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and chown files"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed"),
]

RUNNER, ALICE, BOB = "mshtest-run", "mshtest-a", "mshtest-b"


class User:
    def __init__(self, name: str, home: Path) -> None:
        pw = pwd.getpwnam(name)
        self.name = name
        self.uid = pw.pw_uid
        self.gid = pw.pw_gid
        self.home = home


class System:
    """The box: users, a spool under a folder everyone may traverse, a config, a listener."""

    def __init__(
        self, base: Path, listener: Listener, users: dict[str, User], runner: str = RUNNER
    ) -> None:
        self.base = base
        self.runner = runner
        self.listener = listener
        self.users = users
        self.spool = base / "spool"
        self.config = base / "config.toml"

    @property
    def incoming(self) -> Path:
        return self.spool / "incoming"

    def env(self, user: User | None, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "MAILSHIM_CONFIG": str(self.config),
            "MAILSHIM_NO_SYSLOG": "1",
            "HOME": str(user.home) if user else str(self.base / "roothome"),
            "LANG": "C.UTF-8",
        }
        env.update(extra)
        return env

    def run(self, user: User | None, argv: list[str], input: bytes = b"", timeout=60, **env):
        kw = {}
        if user is not None:
            kw = {"user": user.uid, "group": user.gid, "extra_groups": []}
        return subprocess.run(
            argv,
            input=input,
            capture_output=True,
            env=self.env(user, **env),
            timeout=timeout,
            cwd="/",
            **kw,
        )

    def sendmail(self, user: User | None, *args: str, input: bytes = b"", **env):
        return self.run(user, [tool("sendmail"), *args], input=input, **env)

    def mailshim(self, user: User | None, *args: str, **env):
        return self.run(user, [tool("mailshim"), *args], **env)

    def python(self, user: User | None, code: str):
        """Run ``code`` as ``user``; it prints one JSON value, returned."""
        r = self.run(user, [sys.executable, "-c", textwrap.dedent(code)])
        assert r.returncode == 0, r.stderr.decode()
        return json.loads(r.stdout)

    def flush(self, **env):
        r = self.mailshim(self.users[self.runner], "flush", **env)
        assert r.returncode == 0, r.stderr.decode()
        return r

    def names(self, folder: str) -> list[str]:
        return sorted(os.listdir(self.spool / folder))

    def wait_delivered(self, count: int, timeout: float = 20.0) -> None:
        self.listener.wait(count, timeout)

    def daemon(self) -> subprocess.Popen:
        """``mailshim daemon`` as the runner user, in the background, once it serves the spool
        (its pid file names it): a SIGTERM before it set up its handlers would kill it, where
        the tests expect it to finish and exit 0."""
        run = self.users[self.runner]
        proc = subprocess.Popen(
            [tool("mailshim"), "daemon"],
            env=self.env(run),
            user=run.uid,
            group=run.gid,
            extra_groups=[],
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        pid_file = self.spool / "state" / "agent.pid"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if pid_file.read_text().split() == [str(proc.pid), "daemon"]:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        return proc


def stop_processes(users) -> None:
    """Kill what the test users still run (a delivery agent lingering for a deferred entry,
    dropagent.py), found by uid in /proc: they would carry a test's entries and config into
    the next test, and keep userdel from removing the user."""
    uids = {u.uid for u in users}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in uids:
                    os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


def _useradd(name: str, home: Path) -> None:
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)
    subprocess.run(
        ["useradd", "-M", "-U", "-d", str(home), "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def built_box(
    names: tuple[str, str, str] = (RUNNER, ALICE, BOB), retry: str = "1s", relay: str = ""
):
    """Users ``names`` (runner, two submitters), a spool set up for the runner, a listener
    and a config (``retry``; ``relay``: more [relay] lines); all removed afterwards."""
    if not others_can_run():
        pytest.skip(f"other users cannot run {sys.executable} (its folder is private)")
    with users_in_tmp("mailshim-mu-", names) as (base, users):
        listener = Listener(free_port())
        listener.start()
        system = System(base, listener, users, runner=names[0])
        system.config.write_text(
            textwrap.dedent(
                f"""
                [relay]
                host = "127.0.0.1"
                port = {listener.port}
                timeout = 5
                helo = "client.example.org"
                {relay}

                [addresses]
                domain = "example.org"

                [queue]
                dir = "{system.spool}"
                retry = ["{retry}"]
                """
            )
        )
        os.chmod(system.config, 0o644)
        r = system.mailshim(None, "setup-spool", "--user", names[0])
        assert r.returncode == 0, r.stderr.decode()
        yield system
        listener.stop()


@contextlib.contextmanager
def users_in_tmp(prefix: str, names: tuple[str, ...]) -> Iterator[tuple[Path, dict[str, User]]]:
    """A folder under /tmp everyone may traverse, and real users with private homes in it;
    what they still run, the users and the folder are removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    users: dict[str, User] = {}
    try:
        for name in names:
            home = base / f"home-{name}"
            _useradd(name, home)
            users[name] = User(name, home)
            home.mkdir()
            os.chown(home, users[name].uid, users[name].gid)
            os.chmod(home, 0o700)
        yield base, users
    finally:
        stop_processes(users.values())
        for name in users:
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def box():
    with built_box() as system:
        yield system


@pytest.fixture
def mu(box):
    """The box with an empty spool and listener, for one test."""
    return emptied(box)


def emptied(box: System) -> System:
    """``box`` with nothing its users run, an empty spool and a listener that accepts all."""
    stop_processes(box.users.values())
    for folder in ("incoming", "queue", "state", "tmp", "dead", "corrupt"):
        for name in os.listdir(box.spool / folder):
            path = box.spool / folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    box.listener.handler.messages.clear()
    box.listener.handler.rcpt_replies.clear()
    box.listener.handler.data_reply = None
    box.listener.handler.mail_reply = None
    if box.listener.controller is None:
        box.listener.start()
    return box


MSG = b"Subject: multi-user\n\nhello\n"


# --- setup-spool -------------------------------------------------------------------------------


def test_setup_spool_owners_and_modes(mu):
    run = mu.users[RUNNER]
    st = mu.spool.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)
    st = mu.incoming.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (run.uid, run.gid, 0o3733)
    for folder in spool.SUBDIRS:
        st = (mu.spool / folder).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (run.uid, 0o700)
    again = mu.mailshim(None, "setup-spool", "--user", RUNNER)
    assert again.returncode == 0 and again.stdout.decode().splitlines() == [
        f"spool ready: {mu.spool} (runner user {RUNNER})"
    ]


def test_setup_spool_needs_root_and_an_existing_user(mu):
    r = mu.mailshim(mu.users[ALICE], "setup-spool", "--user", RUNNER)
    assert r.returncode == 77 and r.stderr.count(b"\n") == 1
    r = mu.mailshim(None, "setup-spool", "--user", "mshtest-nosuchuser")
    assert r.returncode == 67 and b"does not exist" in r.stderr and r.stderr.count(b"\n") == 1


# --- submission through the drop folder -----------------------------------------------------


def test_a_user_submits_and_their_own_agent_delivers(mu):
    alice = mu.users[ALICE]
    r = mu.sendmail(alice, "-i", "bob@example.org", input=MSG)
    assert (r.returncode, r.stderr) == (0, b"")
    (msg,) = mu.listener.wait(1)
    assert msg.rcpt_tos == ["bob@example.org"]
    assert msg.mail_from == f"{ALICE}@example.org"
    deadline = time.monotonic() + 10
    while mu.names("incoming") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mu.names("incoming") == [] and mu.names("queue") == []


def test_the_runner_records_the_file_owner_not_the_uid_record(mu):
    alice = mu.users[ALICE]
    mu.listener.stop()
    r = mu.sendmail(alice, "-odq", "-i", "bob@example.org", input=MSG)
    assert r.returncode == 0
    (qid,) = mu.names("incoming")
    st = (mu.incoming / qid).stat()
    run = mu.users[RUNNER]
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (alice.uid, run.gid, 0o640)
    # alice also crafts an entry by hand claiming to be root
    forged = spoolentry.new_queue_id()
    mu.python(
        alice,
        f"""
        import json, os
        from mailshim import spoolfmt
        env = spoolfmt.Envelope({forged!r}, "root@example.org", ["bob@example.org"],
                                1, 0, False, 14)
        data = spoolfmt.encode_envelope(env).data + b"Subject: x\\r\\n\\r\\n"
        fd = os.open({str(mu.incoming / forged)!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.close(fd)
        print(json.dumps(True))
        """,
    )
    mu.flush()  # the listener is down: picked up into the queue and deferred
    assert mu.names("incoming") == []
    queued = mu.names("queue")
    assert len(queued) == 2 and not {qid, forged} & set(queued)  # fresh ids, the runner's
    for name in queued:
        env = spool.Spool(str(mu.spool)).read_envelope(name)
        assert env.uid == alice.uid and env.arrival > 1
        assert (mu.spool / "queue" / name).stat().st_uid == run.uid
    mu.listener.start()
    mu.flush()
    got = {m.mail_from: m.data for m in mu.listener.wait(2)}
    assert sorted(got) == sorted([f"{ALICE}@example.org", "root@example.org"])
    # the forged sender is flagged at pickup, under the runner's configuration, with the uid
    forged_msg = got["root@example.org"]
    assert f": {ALICE} set sender to root@example.org using -f".encode() in forged_msg
    assert f"(mailshim pickup, from userid {alice.uid})".encode() in forged_msg
    assert b"X-Authentication-Warning" not in got[f"{ALICE}@example.org"]
    assert mu.names("queue") == []


def test_others_cannot_list_read_remove_or_take_an_entry(mu):
    alice, bob = mu.users[ALICE], mu.users[BOB]
    r = mu.sendmail(
        alice, "-odq", "-i", "carol@example.org", input=b"Subject: secret\n\nPIN 1234\n"
    )
    assert r.returncode == 0
    (qid,) = mu.names("incoming")
    path = str(mu.incoming / qid)
    got = mu.python(
        bob,
        f"""
        import json, os, fcntl
        out = {{}}
        def attempt(name, fn):
            try:
                fn()
                out[name] = "allowed"
            except OSError as exc:
                out[name] = exc.errno
        attempt("list", lambda: os.listdir({str(mu.incoming)!r}))
        attempt("read", lambda: open({path!r}, "rb").read())
        attempt("unlink", lambda: os.unlink({path!r}))
        attempt("rename", lambda: os.rename({path!r}, {path!r} + "x"))
        attempt("replace", lambda: os.rename("/dev/null", {path!r}))
        attempt("chmod", lambda: os.chmod({path!r}, 0o644))
        attempt("queue", lambda: os.listdir({str(mu.spool / "queue")!r}))
        attempt("state", lambda: os.listdir({str(mu.spool / "state")!r}))
        attempt("lock", lambda: fcntl.flock(os.open({path!r}, os.O_RDONLY), fcntl.LOCK_EX))
        print(json.dumps(out))
        """,
    )
    assert "allowed" not in got.values(), got
    assert (mu.incoming / qid).exists()
    r = mu.run(bob, [tool("mailq")])
    assert r.returncode == 0 and qid.encode() not in r.stdout
    mu.flush()
    (msg,) = mu.listener.wait(1)
    assert b"PIN 1234" in msg.data and msg.rcpt_tos == ["carol@example.org"]


def test_planted_links_fifos_and_huge_files_change_nothing(mu, tmp_path):
    alice, bob = mu.users[ALICE], mu.users[BOB]
    secret = mu.base / "root-secret"
    secret.write_bytes(b"root's secret\n")
    os.chmod(secret, 0o600)
    # alice has a message in the queue that bob will aim at
    mu.listener.stop()
    assert mu.sendmail(alice, "-odq", "-i", "x@example.org", input=MSG).returncode == 0
    (submitted,) = mu.names("incoming")  # sendmail's id, in the Message-ID
    mu.flush()
    (alices,) = mu.names("queue")  # the runner's own id for it
    alices_bytes = (mu.spool / "queue" / alices).read_bytes()
    ids = [spoolentry.new_queue_id() for _ in range(8)]
    planted = mu.python(
        bob,
        f"""
        import json, os
        inc = {str(mu.incoming)!r}
        ids = {ids!r}
        out = {{}}
        os.symlink({str(secret)!r}, os.path.join(inc, ids[0]))
        os.symlink("../queue/{alices}", os.path.join(inc, ids[1]))
        os.mkfifo(os.path.join(inc, ids[2]))
        with open(os.path.join(inc, ids[3]), "wb") as f:
            f.truncate(20 * 1024**3)
        os.mkdir(os.path.join(inc, ids[4]))
        try:
            os.link({str(secret)!r}, os.path.join(inc, ids[5]))
            out["hardlink"] = "allowed"
        except OSError as exc:
            out["hardlink"] = exc.errno
        own = os.path.join(inc, ids[6])
        with open(own, "wb") as f:
            f.write(b"mine")
        os.link(own, os.path.join(inc, ids[7]))
        os.symlink({str(secret)!r}, os.path.join(inc, "." + ids[0] + ".tmp"))
        print(json.dumps(out))
        """,
    )
    # protected_hardlinks stops bob linking root's file; plant it as root to be sure the
    # runner copes on a system without that protection
    assert planted["hardlink"] != "allowed"
    os.link(secret, mu.incoming / ids[5])
    before = secret.stat()
    mu.listener.start()
    started = time.monotonic()
    mu.flush()
    assert time.monotonic() - started < 30  # no FIFO or huge file held it up
    left = set(mu.names("incoming"))
    assert not (left & set(ids)) and not any(n.endswith(".tmp") for n in left), left
    after = secret.stat()
    assert secret.read_bytes() == b"root's secret\n"
    assert (after.st_uid, after.st_mode, after.st_nlink) == (before.st_uid, before.st_mode, 1)
    (msg,) = mu.listener.messages  # only alice's message went out ...
    assert message_queue_id(msg) == submitted and b"secret" not in msg.data
    assert alices_bytes.endswith(msg.data[-10:])  # ... as she wrote it
    assert mu.names("queue") == []


def test_an_entry_named_like_a_queued_one_does_not_replace_it(mu):
    alice, bob = mu.users[ALICE], mu.users[BOB]
    mu.listener.stop()
    assert mu.sendmail(alice, "-odq", "-i", "x@example.org", input=MSG).returncode == 0
    mu.flush()
    (qid,) = mu.names("queue")
    mu.python(
        bob,
        f"""
        import json, os
        from mailshim import spoolfmt
        env = spoolfmt.Envelope({qid!r}, "b@example.org", ["evil@example.org"], 1, 0, False, 3)
        with open({str(mu.incoming / qid)!r}, "wb") as f:
            f.write(spoolfmt.encode_envelope(env).data + b"x\\r\\n")
        print(json.dumps(True))
        """,
    )
    mu.flush()
    queued = mu.names("queue")
    assert len(queued) == 2 and qid in queued
    s = spool.Spool(str(mu.spool))
    assert s.read_envelope(qid).uid == alice.uid
    (other,) = set(queued) - {qid}
    assert s.read_envelope(other).uid == bob.uid


def test_interactive_delivery_from_the_drop_folder(mu):
    alice = mu.users[ALICE]
    mu.listener.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 No such user"
    r = mu.sendmail(alice, "-odi", "-i", "nobody@example.org", "bob@example.org", input=MSG)
    assert r.returncode == 67 and b"<nobody@example.org>" in r.stderr
    (msg,) = mu.listener.messages
    assert msg.rcpt_tos == ["bob@example.org"]
    assert mu.names("incoming") == [] and mu.names("queue") == []


def test_the_agent_leaves_undelivered_recipients_to_the_runner(mu):
    alice = mu.users[ALICE]
    mu.listener.handler.rcpt_replies["later@example.org"] = "451 4.3.0 later"
    r = mu.sendmail(alice, "-i", "ok@example.org", "later@example.org", input=MSG)
    assert r.returncode == 0
    mu.listener.wait(1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = mu.names("incoming")
        if len(names) == 1 and not names[0].startswith("."):
            env = mu.python(
                mu.users[RUNNER],
                f"""
                import json
                from mailshim import spoolfmt
                with open({str(mu.incoming / names[0])!r}, "rb") as f:
                    env, _ = spoolfmt.decode_envelope(f)
                print(json.dumps(env.recipients))
                """,
            )
            if env == ["later@example.org"]:
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"incoming holds {mu.names('incoming')}")
    del mu.listener.handler.rcpt_replies["later@example.org"]
    mu.flush()
    first, second = mu.listener.messages
    assert first.rcpt_tos == ["ok@example.org"] and second.rcpt_tos == ["later@example.org"]
    assert mu.names("incoming") == [] and mu.names("queue") == []


def test_without_a_state_folder_the_runner_delivers(mu):
    alice = mu.users[ALICE]
    r = mu.sendmail(alice, "-i", "bob@example.org", input=MSG, HOME="/nonexistent")
    assert r.returncode == 0
    time.sleep(0.3)
    assert len(mu.names("incoming")) == 1 and mu.listener.messages == []
    mu.flush()
    assert len(mu.listener.messages) == 1 and mu.names("incoming") == []


def test_root_writes_the_queue_and_its_agent_runs_as_the_runner_user(mu):
    r = mu.sendmail(None, "-i", "bob@example.org", input=MSG)
    assert r.returncode == 0
    (msg,) = mu.listener.wait(1)
    run = mu.users[RUNNER]
    time.sleep(0.3)
    assert mu.names("queue") == []
    # nothing root-owned is left behind for the runner user to trip over
    for folder in ("queue", "state", "tmp"):
        for name in mu.names(folder):
            assert (mu.spool / folder / name).stat().st_uid == run.uid
    assert message_queue_id(msg)


def test_root_entries_are_readable_by_the_runner_user(mu):
    mu.listener.stop()
    assert mu.sendmail(None, "-odq", "-i", "bob@example.org", input=MSG).returncode == 0
    (qid,) = mu.names("queue")
    assert (mu.spool / "queue" / qid).stat().st_uid == mu.users[RUNNER].uid
    mu.listener.start()
    mu.flush()
    assert len(mu.listener.messages) == 1 and mu.names("queue") == []


def test_the_daemon_as_the_runner_user_picks_up_the_drop_folder(mu):
    alice = mu.users[ALICE]
    daemon = mu.daemon()
    try:
        for i in range(3):
            r = mu.sendmail(alice, "-i", f"r{i}@example.org", input=MSG, HOME="/nonexistent")
            assert r.returncode == 0
        mu.listener.wait(3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert mu.names("incoming") == [] and mu.names("queue") == []


def test_a_user_holding_their_own_entry_delays_only_themselves(mu):
    alice, bob = mu.users[ALICE], mu.users[BOB]
    mu.listener.stop()
    assert mu.sendmail(alice, "-odq", "-i", "a@example.org", input=MSG).returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                from mailshim import spoolfmt
                env = spoolfmt.Envelope({spoolentry.new_queue_id()!r}, "b@example.org",
                                        ["b@example.org"], 1, 0, False, 3)
                path = {str(mu.incoming)!r} + "/" + env.queue_id
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
                os.write(fd, spoolfmt.encode_envelope(env).data + b"x\\r\\n")
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        env=mu.env(bob),
        user=bob.uid,
        group=bob.gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        mu.listener.start()
        mu.flush()
        (msg,) = mu.listener.messages  # alice's went; bob's waits while he holds it
        assert msg.rcpt_tos == ["a@example.org"]
        assert len(mu.names("incoming")) == 1
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    mu.flush()
    assert len(mu.listener.messages) == 2 and mu.names("incoming") == []


def test_spoolfmt_of_user_entries_is_checked_again(mu):
    """A drop-folder entry with a wrong size goes to corrupt/, with its owner named."""
    bob = mu.users[BOB]
    name = spoolentry.new_queue_id()
    mu.python(
        bob,
        f"""
        import json
        from mailshim import spoolfmt
        env = spoolfmt.Envelope({name!r}, "b@example.org", ["x@example.org"], 1, 0, False, 999)
        with open({str(mu.incoming / name)!r}, "wb") as f:
            f.write(spoolfmt.encode_envelope(env).data + b"short\\r\\n")
        print(json.dumps(True))
        """,
    )
    mu.flush()
    assert mu.names("incoming") == [] and mu.listener.messages == []
    reason = (mu.spool / "corrupt" / f"incoming.{name}.reason").read_text()
    assert f"uid {bob.uid}" in reason and "envelope says 999" in reason
    with contextlib.suppress(FileNotFoundError):
        assert spoolfmt.valid_id(name)


def test_a_user_flooding_the_drop_folder_does_not_hold_back_others(mu):
    box = mu
    """Invariant 4 (delay): each pickup takes at most a fair share of one owner's entries."""
    alice, bob = box.users[ALICE], box.users[BOB]
    # An agent an earlier test started may still linger and pick the drop folder up: wait
    # for it, and hold the spool's agent lock so that none starts while we look.
    lock = os.open(box.spool / "agent.lock", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    before = set(box.names("incoming"))
    for i in range(8):
        r = box.sendmail(
            alice, "-odq", "-i", "x@example.org", input=f"Subject: a{i}\n\n.\n".encode()
        )
        assert r.returncode == 0, r.stderr.decode()
    r = box.sendmail(bob, "-odq", "-i", "y@example.org", input=b"Subject: from bob\n\nhi\n")
    assert r.returncode == 0, r.stderr.decode()
    dropped = set(box.names("incoming")) - before
    owners = {n: os.stat(box.incoming / n).st_uid for n in dropped}
    assert sorted(owners.values()).count(alice.uid) == 8 and bob.uid in owners.values()
    picked = box.python(
        box.users[RUNNER],
        f"""
        import json
        from mailshim import configload, pickup, spool
        cfg = configload.load({str(box.config)!r})
        results = pickup.pickup(spool.Spool({str(box.spool)!r}), cfg, per_user=3)
        print(json.dumps([p.name for p in results if p.status == "picked"]))
        """,
    )
    os.close(lock)
    assert len(picked) == 4  # three of alice's, and bob's although it came last
    assert any(owners[n] == bob.uid for n in picked)
    left = set(box.names("incoming")) & set(dropped)
    assert len(left) == 5 and all(owners[n] == alice.uid for n in left)
    start = len(box.listener.messages)
    box.flush()
    box.wait_delivered(start + 9)
    assert not set(box.names("incoming")) & dropped


# --- issue 12: the drop folder under attack -----------------------------------------------------


def _drop_envelope(mu, user: User, name: str, sender: str, rcpts: list[str], body: bytes, **kw):
    """``user`` writes an entry by hand into incoming/ (as a hostile user would)."""
    size = kw.get("size", len(body))
    mu.python(
        user,
        f"""
        import json, os
        from mailshim import spoolfmt
        env = spoolfmt.Envelope({name!r}, {sender!r}, {rcpts!r}, {kw.get("arrival", 1)!r},
                                0, False, {size!r})
        fd = os.open({str(mu.incoming / name)!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, spoolfmt.encode_envelope(env).data + {body!r})
        if {kw.get("sparse", False)!r}:
            os.ftruncate(fd, os.fstat(fd).st_size + {size!r} - {len(body)!r})
        os.close(fd)
        print(json.dumps(True))
        """,
    )


def _wait_for_incoming(mu, predicate, timeout: float = 15.0) -> list[str]:
    """Wait until the drop folder holds only complete entries and ``predicate(names)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = mu.names("incoming")
        if not any(n.startswith(".") for n in names) and predicate(names):
            return names
        time.sleep(0.05)
    raise AssertionError(f"incoming holds {mu.names('incoming')}")


def _queued(mu, folder: str = "queue") -> dict[str, spoolfmt.Envelope]:
    s = spool.Spool(str(mu.spool))
    out = {}
    for name in mu.names(folder):
        if spoolfmt.valid_id(name):
            with open(os.path.join(s.root, folder, name), "rb") as f:
                out[name] = spoolfmt.decode_envelope(f)[0]
    return out


@pytest.fixture
def small(box, tmp_path):
    """A second system spool on a 24 MB tmpfs, set up for the same runner user."""
    mnt = Path(tempfile.mkdtemp(prefix="mailshim-small-", dir="/tmp"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        system = System(box.base, box.listener, box.users)
        system.spool = mnt / "spool"
        system.config = mnt / "config.toml"
        text = box.config.read_text().replace(str(box.spool), str(system.spool))
        system.config.write_text(text)
        os.chmod(system.config, 0o644)
        r = system.mailshim(None, "setup-spool", "--user", RUNNER)
        assert r.returncode == 0, r.stderr.decode()
        box.listener.handler.messages.clear()
        if box.listener.controller is None:
            box.listener.start()
        yield system
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


def test_an_entry_that_does_not_fit_never_stops_the_queue(small):
    """Item 1/2: a sparse 45 MB entry and a real one too big for the room left wait or go to
    corrupt/ one by one; the queue is delivered; flush exits 0."""
    mu = small
    alice, bob = mu.users[ALICE], mu.users[BOB]
    mu.listener.stop()
    assert mu.sendmail(bob, "-odq", "-i", "carol@example.org", input=MSG).returncode == 0
    mu.flush()  # bob's message is now in queue/, deferred
    assert len(mu.names("queue")) == 1
    sparse = spoolentry.new_queue_id()
    _drop_envelope(
        mu, alice, sparse, f"{ALICE}@example.org", ["x@example.org"], b"Subject: s\r\n\r\n",
        size=45 * 1000 * 1000, sparse=True,
    )  # fmt: skip
    big = b"Subject: big\n\n" + b"x" * 1000 + b"\n"
    r = mu.sendmail(alice, "-odq", "-i", "y@example.org", input=big * 14000)  # 14 MB
    assert r.returncode == 0, r.stderr.decode()
    (waiting,) = set(mu.names("incoming")) - {sparse}
    mu.listener.start()
    r = mu.flush()
    (msg,) = mu.listener.wait(1)
    assert msg.rcpt_tos == ["carol@example.org"] and mu.names("queue") == []
    assert mu.names("incoming") == [waiting]  # waits for room, on alice's own quota
    assert r.returncode == 0
    reason = (mu.spool / "corrupt" / f"incoming.{sparse}.reason").read_text()
    assert "sparse" in reason and f"uid {alice.uid}" in reason
    assert (mu.spool / "corrupt" / f"incoming.{sparse}").stat().st_blocks < 64


def test_a_users_spool_budget_holds_their_mail_in_the_drop_folder(mu):
    """Item 2: over [limits] user_spool_entries, a user's entries wait in incoming/ (logged
    with the reason); another user's mail is not affected."""
    alice, bob = mu.users[ALICE], mu.users[BOB]
    text = mu.config.read_text()
    log = mu.base / "budget.log"
    log.write_text("")
    os.chown(log, mu.users[RUNNER].uid, mu.users[RUNNER].gid)
    mu.config.write_text(text + f'\n[limits]\nuser_spool_entries = 2\n[log]\nfile = "{log}"\n')
    try:
        mu.listener.stop()
        for i in range(4):
            r = mu.sendmail(alice, "-odq", "-i", f"a{i}@example.org", input=MSG)
            assert r.returncode == 0
        assert mu.sendmail(bob, "-odq", "-i", "b@example.org", input=MSG).returncode == 0
        r = mu.flush()
        owners = sorted(e.uid for e in _queued(mu).values())
        assert owners == sorted([alice.uid, alice.uid, bob.uid])
        left = [n for n in mu.names("incoming") if not n.startswith(".held.")]
        assert len(left) == 2 and {(mu.incoming / n).stat().st_uid for n in left} == {alice.uid}
        assert (mu.incoming / f".held.{alice.uid}").stat().st_uid == mu.users[RUNNER].uid
        assert r.returncode == 0
        # the refusal is logged, once per entry, with the reason and the key to change
        why = [line for line in log.read_text().splitlines() if " waits: " in line]
        assert len(why) == 2 and all(f"uid {alice.uid} already has 2 entries" in w for w in why)
        assert all("user_spool_entries = 2" in w for w in why)
        mu.listener.start()
        mu.flush()  # two delivered: room for the other two, which a later pass delivers
        mu.flush()
        mu.listener.wait(5)
        assert mu.names("incoming") == [] and mu.names("queue") == []
    finally:
        mu.config.write_text(text)


def test_a_planted_dead_letter_name_is_never_replaced(mu):
    """Item 5: an entry dropped under the id of another user's dead letter gets a fresh id;
    dead/<id>, .reason and .state stay as they were."""
    alice, bob = mu.users[ALICE], mu.users[BOB]
    mu.listener.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user"
    assert mu.sendmail(alice, "-odq", "-i", "nobody@example.org", input=MSG).returncode == 0
    mu.flush()
    (dead,) = [n for n in mu.names("dead") if spoolfmt.valid_id(n)]
    before = {s: (mu.spool / "dead" / (dead + s)).read_bytes() for s in ("", ".reason", ".state")}
    _drop_envelope(mu, bob, dead, "b@example.org", ["nobody@example.org"], b"Subject: x\r\n\r\n")
    mu.flush()
    after = {s: (mu.spool / "dead" / (dead + s)).read_bytes() for s in ("", ".reason", ".state")}
    assert after == before
    buried = _queued(mu, "dead")
    assert buried[dead].uid == alice.uid
    assert sorted(e.uid for e in buried.values()) == sorted([alice.uid, bob.uid])
    # b@example.org is not bob's address: its failure report (to b@, as Postfix does) says
    # so in the returned headers, with the uid that really sent it
    (report,) = [m for m in mu.listener.wait(2) if m.rcpt_tos == ["b@example.org"]]
    assert report.mail_from == "<>" and b"X-Authentication-Warning: " in report.data
    assert f"{BOB} set sender to b@example.org".encode() in report.data
    assert f"from userid {bob.uid}".encode() in report.data


def test_planted_temp_names_do_not_make_a_message_go_twice(mu):
    """Item 6: bob plants the names alice's agent used to create (.<id>.tmp, .<id>.poke);
    her partly deferred message still goes to each recipient once."""
    alice, bob = mu.users[ALICE], mu.users[BOB]
    mu.listener.handler.rcpt_replies["later@example.org"] = "451 4.3.0 later"
    r = mu.sendmail(alice, "-odq", "-i", "ok@example.org", "later@example.org", input=MSG)
    assert r.returncode == 0
    (qid,) = mu.names("incoming")
    mu.python(
        bob,
        f"""
        import json, os
        for name in (".{qid}.tmp", ".{qid}.poke"):
            fd = os.open(os.path.join({str(mu.incoming)!r}, name), os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        print(json.dumps(True))
        """,
    )
    # alice's own agent, as sendmail starts it: one attempt at her locked drop entry
    mu.python(
        alice,
        f"""
        import fcntl, json, os
        from mailshim import configload, delivery, spool, spoolentry
        s = spool.Spool({str(mu.spool)!r}, drop=True)
        fd = os.open(os.path.join(s.incoming, {qid!r}), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        entry = spoolentry.open_drop_entry(s, {qid!r}, fd)
        status, _ = delivery.deliver_now(configload.load(), entry)
        print(json.dumps(status))
        """,
    )
    assert [m.rcpt_tos for m in mu.listener.messages] == [["ok@example.org"]]
    assert sorted(mu.names("incoming")) == sorted([qid, f".{qid}.tmp", f".{qid}.poke"])
    del mu.listener.handler.rcpt_replies["later@example.org"]
    mu.flush()
    assert [m.rcpt_tos for m in mu.listener.wait(2)] == [
        ["ok@example.org"],
        ["later@example.org"],
    ]
    assert mu.names("queue") == []


def test_refusals_the_caller_was_not_told_are_bounced_not_resent(mu):
    """Item 11: alice's background agent gets a 550 for one recipient; the runner bounces it
    from the failed record and never offers the message to that recipient again."""
    alice = mu.users[ALICE]
    mu.listener.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user"
    r = mu.sendmail(alice, "-i", "ok@example.org", "nobody@example.org", input=MSG)
    assert r.returncode == 0
    mu.listener.wait(1)
    _wait_for_incoming(mu, lambda names: len(names) == 1)
    # were the runner to send the message again, the listener would now take it
    del mu.listener.handler.rcpt_replies["nobody@example.org"]
    mu.flush()
    msgs = mu.listener.wait(2)
    assert [m.rcpt_tos for m in msgs] == [["ok@example.org"], [f"{ALICE}@example.org"]]
    assert msgs[1].mail_from == "<>" and b"550 5.1.1 no such user" in msgs[1].data
    assert mu.names("incoming") == [] and mu.names("queue") == []


def test_a_backdated_drop_entry_does_not_expire_at_its_first_deferral(mu):
    """Item 8: the arrival record of a drop entry is ignored; pickup's time counts."""
    alice = mu.users[ALICE]
    mu.listener.stop()
    name = spoolentry.new_queue_id()
    _drop_envelope(mu, alice, name, f"{ALICE}@example.org", ["x@example.org"], b"S: x\r\n\r\n")
    started = time.time()
    mu.flush()
    (env,) = _queued(mu).values()
    assert env.arrival >= int(started) and [n for n in mu.names("dead")] == []


def test_folders_planted_in_the_drop_folder_are_removed(mu):
    """Item 8: a non-empty folder, named like an entry or not, does not stay forever."""
    bob = mu.users[BOB]
    names = [spoolentry.new_queue_id(), "junk"]
    mu.python(
        bob,
        f"""
        import json, os
        for name in {names!r}:
            d = os.path.join({str(mu.incoming)!r}, name)
            os.mkdir(d)
            os.mkdir(os.path.join(d, "sub"))
            with open(os.path.join(d, "sub", "f"), "w") as f:
                f.write("x" * 1000)
            os.symlink("/etc/passwd", os.path.join(d, "link"))
            for p in (os.path.join(d, "sub"), d):
                os.chmod(p, 0o777)  # bob lets others in: the runner may empty it
        print(json.dumps(True))
        """,
    )
    mu.flush()
    assert mu.names("incoming") == [] and os.path.exists("/etc/passwd")


def test_one_users_heavy_entries_do_not_hold_another_users_message(mu):
    """Item 3: fairness by work: 12 entries of 300 recipients from alice, then one message
    from bob; with a 4 KiB round, bob's message goes first, not after alice's 3,600 RCPTs."""
    alice, bob = mu.users[ALICE], mu.users[BOB]
    text = mu.config.read_text()
    # (no sending limit here: 3,600 recipients from alice are the point)
    mu.config.write_text(text + "\n[limits]\nuser_round_bytes = 4096\nuser_recipients = 0\n")
    try:
        mu.listener.stop()
        rcpts = [f"r{i}@example.org" for i in range(300)]
        for _ in range(12):
            assert mu.sendmail(alice, "-odq", "-i", *rcpts, input=MSG).returncode == 0
        assert mu.sendmail(bob, "-odq", "-i", "b@example.org", input=MSG).returncode == 0
        mu.flush()  # picked up in name order: bob's got the newest queue id
        mu.listener.start()
        mu.flush()
        msgs = mu.listener.wait(13, timeout=60)
        first = [m.mail_from for m in msgs[:2]]
        assert f"{BOB}@example.org" in first, [m.mail_from for m in msgs]
    finally:
        mu.config.write_text(text)


def test_terminal_escapes_in_a_subject_never_reach_roots_terminal(mu):
    """Item 7 / issue 17 item 4: OSC 0 (title), OSC 52 (clipboard), CSI, C1 CSI and a bidi
    override in alice's Subject and sender name are shown as "?" by ``mailshim queue show``
    and ``mailq`` run by root."""
    alice = mu.users[ALICE]
    mu.listener.stop()
    subject = (
        "hi \x1b]0;pwned\x07 \x1b]52;c;cm0gLXJmIH4=\x07 \x1b[2J\x1b[31mred \u009b31m"
        " \u202eevil\u2066x\u2069"
    )
    msg = f"Subject: {subject}\nX-Note: \u009d8;;http://evil\u009c\n\nbody\n".encode()
    r = mu.sendmail(alice, "-odq", "-i", "-F", "Al\x1b[1mice", "x@example.org", input=msg)
    assert r.returncode == 0, r.stderr.decode()
    mu.flush()
    assert len(mu.names("queue")) == 1
    for argv in (["mailshim", "queue", "show", "--all"], ["mailq"]):
        r = mu.run(None, [tool(argv[0]), *argv[1:]])
        assert r.returncode == 0, r.stderr.decode()
        out = r.stdout.decode("utf-8")
        bad = [c for c in out if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0]
        bad += [c for c in out if 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069]
        assert bad == [], (argv, out)
    assert (
        "?]0;pwned?" in mu.run(None, [tool("mailshim"), "queue", "show", "--all"]).stdout.decode()
    )


def test_trust_comes_only_from_a_file_root_controls(mu):
    """Item 4: bob's own file (-C or $MAILSHIM_CONFIG) cannot make him trusted or set
    everyone's sender; his mail as alice carries the warning, and mailq shows it is his."""
    alice, bob = mu.users[ALICE], mu.users[BOB]
    text = mu.config.read_text()
    trusted = bob.home / "trusted.toml"
    trusted.write_text(text.replace("[addresses]", '[addresses]\n') + (
        f'\n[submission]\ntrusted_users = ["{BOB}"]\n'
    ))  # fmt: skip
    as_alice = bob.home / "sender.toml"
    as_alice.write_text(text.replace("[addresses]", f'[addresses]\nsender = "{ALICE}@example.org"'))
    for path in (trusted, as_alice):
        os.chown(path, bob.uid, bob.gid)
    r = mu.sendmail(
        bob, "-C", str(trusted), "-odi", "-i", "-f", f"{ALICE}@example.org", "x@example.org",
        input=MSG,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    r = mu.sendmail(bob, "-odi", "-i", "y@example.org", input=MSG, MAILSHIM_CONFIG=str(as_alice))
    assert r.returncode == 0, r.stderr.decode()
    first, second = mu.listener.wait(2)
    assert first.mail_from == f"{ALICE}@example.org"
    assert f": {BOB} set sender to {ALICE}@example.org using -f".encode() in first.data
    assert second.mail_from == f"{BOB}@example.org"
    r = mu.mailshim(bob, "-C", str(trusted), "config")
    assert b"ignored in" in r.stdout, r.stdout.decode()
    # the system file (root's) still grants trust: alice is trusted there
    mu.config.write_text(text + f'\n[submission]\ntrusted_users = ["root", "{ALICE}"]\n')
    try:
        r = mu.sendmail(alice, "-odi", "-i", "-f", "ops@example.org", "z@example.org", input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        (third,) = mu.listener.wait(3)[2:]
        assert third.mail_from == "ops@example.org"
        assert b"X-Authentication-Warning" not in third.data
        # mailq shows whose a queued sender that is not theirs is
        mu.listener.stop()
        r = mu.sendmail(bob, "-odq", "-i", "-f", f"{ALICE}@example.org", "q@example.org",
                        input=MSG)  # fmt: skip
        assert r.returncode == 0
        mu.flush()
        out = mu.run(None, [tool("mailq")]).stdout.decode()
        assert f"{ALICE}@example.org (from {BOB})" in out, out
    finally:
        mu.config.write_text(text)


def test_the_agents_argv_does_not_show_the_queue_id(mu):
    """Item 5: /proc/PID/cmdline is public; alice's agent does not carry her entry's id."""
    import socket

    alice = mu.users[ALICE]
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never greets: the agent waits
    text = mu.config.read_text()
    mu.config.write_text(
        text.replace(f"port = {mu.listener.port}", f"port = {silent.getsockname()[1]}")
    )
    seen: dict[str, list[bytes]] = {}
    try:
        r = mu.sendmail(alice, "-i", "x@example.org", input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        (qid,) = _wait_for_incoming(mu, lambda names: len(names) == 1)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"--incoming" in argv and os.stat(f"/proc/{pid}").st_uid == alice.uid:
                        seen[pid] = argv
            time.sleep(0.02)
        assert seen, "the agent was not seen"
        assert all(qid.encode() not in b" ".join(argv) for argv in seen.values()), seen
    finally:
        mu.config.write_text(text)
        silent.close()  # resets the agent's connection: it gives up and exits
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{pid}") for pid in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
