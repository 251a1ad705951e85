"""Sealed mode and sending limits with real users, a real runner and a listener that requires
AUTH (aiosmtpd): a user's mail is delivered by the runner (daemon) with no word on stderr; the
user cannot read the secret; a direct unauthenticated SMTP attempt is refused; `mailshim
check` tells sealed from unsealed; a burst over the limit is delivered window by window while
another user's mail goes on.

As root, the test creates a runner user and two submitters (useradd; names of their own so
that test_multiuser.py may run at the same time), sets the spool up with ``mailshim
setup-spool --user``, and runs everything as those users. Skipped when not root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import others_can_run, tool
from mailshim import check as mailshim_check
from relayhelpers import Listener
from test_multiuser import System, User, mu, users_in_tmp  # noqa: F401 (mu: a fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and chown files"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed"),
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),
]

RUNNER, ALICE, BOB = "mshseal-run", "mshseal-a", "mshseal-b"
PASSWORD = "relay-pass-4f1c"
OPEN_WORDS = "any local process can send mail as anyone through this listener"
MSG = b"Subject: sealed\n\nhello\n"
WINDOW = 6  # seconds: the tests' sending-limit window
LIMIT = 3  # messages per window per user


class Box(System):
    """The multi-user box with a listener that requires AUTH and a secret only the runner
    can read."""

    def __init__(self, base: Path, listener: Listener, users: dict[str, User]) -> None:
        super().__init__(base, listener, users, runner=RUNNER)
        self.secret = base / "relay.secret"

    def write_config(self, port: int, sealed: bool = True) -> None:
        auth = f'username = "mailshim"\npassword_file = "{self.secret}"' if sealed else ""
        self.config.write_text(
            textwrap.dedent(
                f"""
                [relay]
                host = "127.0.0.1"
                port = {port}
                timeout = 5
                helo = "client.example.org"
                {{auth}}

                [addresses]
                domain = "example.org"

                [aliases]
                root = "admin@example.org"

                [queue]
                dir = "{self.spool}"
                retry = ["1s"]

                [limits]
                user_messages = {LIMIT}
                user_window = "{WINDOW}s"
                """
            ).replace("{auth}", auth)
        )
        os.chmod(self.config, 0o644)

    def received(self) -> list:
        return list(self.listener.handler.messages)

    def wait_received(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"listener got {len(self.received())} messages, wanted {count}")


def stop(daemon: subprocess.Popen) -> bytes:
    daemon.send_signal(signal.SIGTERM)
    _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    return err


@pytest.fixture(scope="module")
def box():
    if not others_can_run():
        pytest.skip(f"other users cannot run {sys.executable} (its folder is private)")
    listener = Listener(auth={"mailshim": PASSWORD}, auth_required=True)
    with users_in_tmp("mailshim-sealed-", (RUNNER, ALICE, BOB)) as (base, users):
        listener.start()
        try:
            system = Box(base, listener, users)
            system.secret.write_text(PASSWORD + "\n")
            os.chown(system.secret, users[RUNNER].uid, users[RUNNER].gid)
            os.chmod(system.secret, 0o600)
            system.write_config(listener.port)
            r = system.mailshim(None, "setup-spool", "--user", RUNNER)
            assert r.returncode == 0, r.stderr.decode()
            yield system
        finally:
            listener.stop()


@pytest.fixture
def sb(request):
    """The box emptied for one test (test_multiuser's ``mu``, over this module's ``box``),
    with the sealed configuration written again."""
    box = request.getfixturevalue("mu")
    box.write_config(box.listener.port)
    return box


# --- sealed mode -----------------------------------------------------------------------


def test_a_sealed_user_never_talks_to_the_listener(sb):
    # No runner yet: background and interactive submissions alike wait in the drop folder,
    # silently, and the user's sendmail opens no connection to the listener.
    alice = sb.users[ALICE]
    before = sb.listener.handler.connections
    for mode in ("-odb", "-odi", "-v"):
        r = sb.sendmail(alice, mode, "-i", "waits@example.org", input=MSG)
        assert (r.returncode, r.stderr) == (0, b""), mode
    # an interactive -bs session (Symfony Mailer's way) is answered from the spool
    dialogue = (
        b"HELO [127.0.0.1]\r\nMAIL FROM:<" + ALICE.encode() + b"@example.org>\r\n"
        b"RCPT TO:<bs@example.org>\r\nDATA\r\nSubject: bs\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    r = sb.sendmail(alice, "-bs", "-odi", input=dialogue)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert b"250 2.0.0 Ok: queued as" in r.stdout
    time.sleep(0.5)  # an agent, had one been started, would have connected by now
    assert sb.listener.handler.connections == before
    assert len(sb.names("incoming")) == 4
    daemon = sb.daemon()
    try:
        got = sb.wait_received(4)
    finally:
        stop(daemon)
    assert all(m.login == b"mailshim" for m in got)


def test_a_users_mail_is_delivered_by_the_runner_without_a_word(sb):
    alice = sb.users[ALICE]
    daemon = sb.daemon()
    try:
        latencies = []
        for i in range(5):
            start = time.monotonic()
            r = sb.sendmail(alice, "-i", f"r{i}@example.org", input=MSG)
            assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
            sb.wait_received(i + 1)
            latencies.append(time.monotonic() - start)
        # interactive and -v too: the user cannot deliver, so the runner does, silently
        r = sb.sendmail(alice, "-odi", "-i", "r5@example.org", input=MSG)
        assert (r.returncode, r.stderr) == (0, b"")
        got = sb.wait_received(6)
    finally:
        stop(daemon)
    assert all(m.login == b"mailshim" for m in got)  # every one went out authenticated
    assert sorted(m.rcpt_tos[0] for m in got) == [f"r{i}@example.org" for i in range(6)]
    assert sb.names("incoming") == [] and sb.names("queue") == [] and sb.names("dead") == []
    print(f"sealed, daemon: submit-to-listener median {statistics.median(latencies):.3f}s")


def test_roots_mail_goes_straight_to_the_queue_and_out(sb):
    r = sb.sendmail(None, "-odi", "-i", "root-direct@example.org", input=MSG)
    assert r.returncode == 0, r.stderr
    (got,) = sb.wait_received(1)
    assert got.login == b"mailshim" and sb.names("incoming") == []


def test_the_user_cannot_read_the_secret_nor_relay_directly(sb):
    alice = sb.users[ALICE]
    found = sb.python(
        alice,
        f"""
        import json, smtplib
        try:
            open({str(sb.secret)!r}).read()
            secret = "read"
        except PermissionError:
            secret = "denied"
        smtp = smtplib.SMTP("127.0.0.1", {sb.listener.port}, timeout=10)
        smtp.ehlo("evil.example")
        code, text = smtp.mail("ceo@example.org")
        if code == 250:
            code, text = smtp.rcpt("victim@example.net")
        smtp.rset()
        smtp.quit()
        print(json.dumps([secret, code, text.decode()]))
        """,
    )
    assert found[0] == "denied"
    assert found[1] == 530 and "authentication required" in found[2].lower()
    assert sb.received() == []


def check(sb, user: User | None, *args: str) -> subprocess.CompletedProcess:
    return sb.mailshim(user, "check", *args)


def test_check_reports_sealed_as_the_user_and_as_root(sb):
    alice = sb.users[ALICE]
    daemon = sb.daemon()
    try:
        as_user = check(sb, alice)
    finally:
        stop(daemon)
    out = as_user.stdout.decode()
    assert as_user.returncode == 0, out
    assert f"readable by only {RUNNER} (sealed)" in out
    assert "without authentication the listener refuses (530" in out
    assert OPEN_WORDS not in out
    as_root = check(sb, None, "--json")
    doc = json.loads(as_root.stdout)
    assert doc["exit"] == 0, doc
    assert doc["relays"][0]["sealed"] is True
    assert doc["relays"][0]["authenticated_as"] == "mailshim"
    texts = [f["text"] for f in doc["findings"]]
    assert any(f"readable by only {RUNNER}" in t for t in texts)
    assert sb.received() == []  # check sends nothing


def test_check_reports_unsealed(sb):
    with Listener() as open_listener:
        sb.write_config(open_listener.port, sealed=False)
        r = check(sb, sb.users[ALICE])
        assert open_listener.handler.messages == []
    out = r.stdout.decode()
    assert r.returncode == 0, out
    (line,) = [x for x in out.splitlines() if " sealed " in x]
    assert line.startswith("warning") and OPEN_WORDS in line


# --- sending limits ----------------------------------------------------------------------


def test_a_burst_over_the_limit_goes_window_by_window_and_others_are_unaffected(sb):
    alice, bob = sb.users[ALICE], sb.users[BOB]
    burst = 2 * LIMIT + 1
    daemon = sb.daemon()
    try:
        for i in range(burst):
            r = sb.sendmail(alice, "-i", f"a{i}@example.org", input=MSG)
            assert (r.returncode, r.stderr) == (0, b"")
        sb.wait_received(LIMIT)
        # Bob is not held behind Alice
        for i in range(2):
            r = sb.sendmail(bob, "-i", f"b{i}@example.org", input=MSG)
            assert r.returncode == 0
        got = sb.wait_received(LIMIT + 2)
        assert sorted(m.mail_from for m in got).count(f"{BOB}@example.org") == 2
        # the rest of Alice's burst waits, and mailq (as root) says why
        held = sb.names("queue")
        assert len(held) == burst - LIMIT
        listing = sb.run(None, [tool("mailq")]).stdout.decode()
        assert f"{ALICE} (uid {alice.uid}) reached its sending limit" in listing
        report = check(sb, None).stdout.decode()
        assert f"{ALICE} (uid {alice.uid}) is at its sending limit" in report
        # the next windows deliver the rest, LIMIT at a time
        got = sb.wait_received(burst + 2, timeout=WINDOW * 5)
    finally:
        stop(daemon)
    from_alice = [m for m in got if m.mail_from == f"{ALICE}@example.org"]
    assert sorted(m.rcpt_tos[0] for m in from_alice) == sorted(
        f"a{i}@example.org" for i in range(burst)
    )  # each once: nothing lost, nothing twice
    assert len(got) == burst + 2
    assert sb.names("queue") == [] and sb.names("dead") == []


def test_check_as_a_sealed_user_with_no_runner_is_an_error(sb):
    if mailshim_check.daemon_pids() or mailshim_check.systemd_running():
        pytest.skip("a mailshim runner (or systemd) is active on this machine")
    r = check(sb, sb.users[ALICE])
    out = r.stdout.decode()
    assert r.returncode == 69, out
    (line,) = [x for x in out.splitlines() if x.startswith("error")]
    assert "sealed: only the runner can deliver this user's mail, and nothing runs it" in line


def test_a_client_key_only_the_runner_reads_seals_too(sb):
    from test_sealed import ClientCertCerts, client_cert_relay

    alice, run = sb.users[ALICE], sb.users[RUNNER]
    certs = ClientCertCerts()
    folder = sb.base / "tls"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o755)
    with Listener(tls="tls", certs=certs) as cert_listener:
        relay = client_cert_relay(folder, certs, cert_listener.port)
        key = folder / "client.key"
        os.chown(key, run.uid, run.gid)
        os.chmod(folder / "ca.pem", 0o644)
        os.chmod(folder / "client.pem", 0o644)
        text = sb.config.read_text()
        start = text.index("[relay]")
        end = text.index("[addresses]")
        sb.config.write_text(text[:start] + relay + "\n\n" + text[end:])
        try:
            r = sb.sendmail(alice, "-odi", "-i", "cert@example.org", input=MSG)
            assert (r.returncode, r.stderr) == (0, b"")
            time.sleep(0.5)
            assert cert_listener.handler.connections == 0  # alice never tried
            assert len(sb.names("incoming")) == 1
            out = check(sb, alice).stdout.decode()
            assert f"client_key {key} is readable by only {RUNNER} (sealed)" in out
            assert "without a client certificate the listener refuses" in out
            daemon = sb.daemon()
            try:
                deadline = time.monotonic() + 30
                while not cert_listener.handler.messages and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop(daemon)
            (got,) = cert_listener.handler.messages
            assert got.rcpt_tos == ["cert@example.org"] and got.tls
        finally:
            sb.write_config(sb.listener.port)
