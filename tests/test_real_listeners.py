"""mailshim against real listeners nobody here wrote: Dovecot LMTP and Haraka (issue 16).

Every other test talks to aiosmtpd. Here the real `sendmail` runs against a private Dovecot
(LMTP over a unix socket and TCP, Maildir delivery, per-recipient replies after DATA: a quota
refusal and an internal error) and a private Haraka (PIPELINING, STARTTLS with a private CA,
AUTH over TLS, a SIZE limit). `tests/reallisteners.py` starts and stops them; what arrives is
checked byte for byte in the Maildir or in Haraka's store. The first tests hold the fixes
these servers showed (refusal at MAIL FROM; DSN status without an enhanced code) against
aiosmtpd as well, so they run everywhere.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import pytest
import trustme

from conftest import Env, free_port, queue_config
from mailshim import bounce, spoolfmt
from mailshim.constants import STAGE_MAIL, STAGE_SIZE
from mailshim.reply import Reply
from reallisteners import HARAKA_PASSWORD, HARAKA_USER, Dovecot, Haraka, strip_lmtp_trace

# Dot-led lines, a lone dot (kept with -i), 8-bit UTF-8 and trailing spaces: what a client
# most easily mangles on its way to a mailbox.
BODY = (
    "Subject: real listeners\n"
    "From: Cron Daemon <root@example.org>\n"
    "Date: Wed, 02 Dec 2026 01:00:00 +0000\n"
    "Message-ID: <real-listeners@example.org>\n"
    "\n"
    ".leading dot\n"
    ".\n"
    "..two dots\n"
    "caf\u00e9 \u2014 8-bit UTF-8, trailing space \n"
    "last line\n"
).encode()


# sendmail's envelope sender, who gets the bounces: the user running the tests
LOGIN = pwd.getpwuid(os.getuid()).pw_name


class Port:
    """What conftest.Env wants of a listener: a port (the real server is elsewhere)."""

    def __init__(self, port: int) -> None:
        self.port = port


def body_of(message: bytes, eol: bytes = b"\r\n") -> bytes:
    return message.split(eol + eol, 1)[1]


def dead(env: Env) -> list[str]:
    folder = env.spool / "dead"
    return sorted(n for n in os.listdir(folder) if spoolfmt.valid_id(n)) if folder.exists() else []


def wait_until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- fix 1: a refusal at MAIL FROM is the message's, not a recipient's ---------------------


def test_refusal_at_mail_from_exits_69_with_one_line_naming_the_message(world):
    world.listener.handler.mail_reply = "550 Message too big!"
    r = world.sendmail("-odi", "-i", "bob", "carol", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 69, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert "message " in line and "550 Message too big! (in reply to MAIL FROM)" in line
    assert "bob@" not in line and "carol@" not in line
    assert world.queued() == [] and len(dead(world)) == 1  # kept, not dropped


def test_refusal_at_rcpt_still_exits_67_naming_the_recipient(world):
    world.listener.handler.rcpt_replies["bob@example.org"] = "550 5.1.1 No such user"
    r = world.sendmail("-odi", "-i", "bob", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 67
    assert r.stderr.decode().splitlines() == [
        "sendmail: <bob@example.org>: refused by the listener: 550 5.1.1 No such user"
    ]


def test_bs_session_exits_69_for_a_refusal_at_mail_from(world):
    world.listener.handler.mail_reply = "550 5.7.1 sender blocked"
    dialogue = (
        b"EHLO client\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
        b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    # -odi: only an interactive -bs session waits for the listener's verdict (issue 11 item 4)
    r = world.sendmail("-bs", "-odi", input=dialogue)
    assert r.returncode == 69, (r.stdout, r.stderr)
    assert b"550 5.7.1 sender blocked (in reply to MAIL FROM)\r\n" in r.stdout


# --- fix 2: the DSN status when the listener gives no enhanced code ------------------------


def test_a_refusal_at_mail_from_is_marked_as_the_message_s():
    reply = Reply(550, "Message too big!").at(STAGE_MAIL)
    assert str(reply) == "550 Message too big! (in reply to MAIL FROM)"
    assert reply.at_mail and not Reply(550, "no").at_mail


@pytest.mark.parametrize(
    ("code", "text", "stage", "status"),
    [
        (550, "Message too big!", STAGE_SIZE, "5.3.4"),
        (552, "Message size exceeds fixed maximum", "", "5.3.4"),
        (552, "too big", STAGE_MAIL, "5.3.4"),
        (553, "sender not allowed", STAGE_MAIL, "5.1.7"),
        (553, "recipient not allowed", "", "5.1.3"),
        (530, "Authentication required", STAGE_MAIL, "5.7.0"),
        (535, "bad credentials", "", "5.7.8"),
        (550, "no reason given", STAGE_MAIL, "5.0.0"),
        (550, "no such user", "", "5.0.0"),
        (554, "5.7.1 the listener's own code wins", STAGE_MAIL, "5.7.1"),
        (552, "5.2.2 quota: the listener's own code wins", "", "5.2.2"),
        (451, "try again later", "", "4.0.0"),
    ],
)
def test_status_derived_from_stage_and_code(code, text, stage, status):
    assert bounce.status_of(Reply(code, text, stage=stage)) == status


# --- Dovecot LMTP --------------------------------------------------------------------------


@pytest.fixture
def dovecot():
    server = Dovecot(free_port())
    try:
        server.start()
        yield server
    finally:
        server.remove()


def lmtp_world(tmp_path: Path, dovecot: Dovecot, over: str) -> Env:
    env = Env(tmp_path, Port(dovecot.port))
    where = f'socket = "{dovecot.socket}"' if over == "socket" else ""
    queue_config(env, relay=f'protocol = "lmtp"\n{where}')
    return env


@pytest.mark.parametrize("over", ["socket", "tcp"])
def test_dovecot_maildir_holds_the_message_byte_for_byte(tmp_path, dovecot, over):
    env = lmtp_world(tmp_path, dovecot, over)
    r = env.sendmail("-odi", "-i", "alice", "bob", input=BODY)
    assert (r.returncode, r.stderr) == (0, b"")
    for user in ("alice", "bob"):
        (stored,) = dovecot.maildir(user)
        message = strip_lmtp_trace(stored)
        # Maildir keeps LF line ends; everything else is exactly what the caller wrote.
        assert body_of(message, b"\n") == body_of(BODY, b"\n")
        for line in BODY.split(b"\n\n", 1)[0].split(b"\n"):
            assert line + b"\n" in message.split(b"\n\n", 1)[0] + b"\n"
    assert env.queued() == []


def test_dovecot_per_recipient_replies_after_data(tmp_path, dovecot):
    """alice gets it, full's quota answers 552 5.2.2, readonly's Maildir answers 451 4.2.0:
    one refused recipient named on stderr, one kept for a retry that succeeds once the
    Maildir is writable again, and nobody gets the message twice."""
    env = lmtp_world(tmp_path, dovecot, "tcp")
    big = BODY + b"x" * 2000 + b"\n"  # over full's 1 KB quota
    r = env.sendmail("-odi", "-i", "alice", "full", "readonly", input=big)
    assert r.returncode == 67, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert "<full@example.org>: refused by the listener: 552 5.2.2" in line
    assert len(dovecot.maildir("alice")) == 1 and dovecot.maildir("full") == []
    assert dovecot.maildir("readonly") == []
    (qid,) = env.queued()
    st = spoolfmt.decode_state((env.spool / "state" / qid).read_bytes())
    assert list(st.pending) == ["readonly@example.org"]
    assert str(st.pending["readonly@example.org"]).startswith("451 4.2.0 <readonly@example.org>")
    assert list(st.failed) == ["full@example.org"] and list(st.done) == ["alice@example.org"]

    readonly = dovecot.mail / "readonly"
    for path in [readonly, *readonly.rglob("*")]:
        path.chmod(0o755)
    r = env.sendmail("-q")
    assert (r.returncode, r.stderr) == (0, b"")
    assert env.queued() == []
    (stored,) = dovecot.maildir("readonly")
    assert body_of(strip_lmtp_trace(stored), b"\n") == body_of(big, b"\n")
    assert len(dovecot.maildir("alice")) == 1 and dovecot.maildir("full") == []


def test_dovecot_quota_refusal_in_the_background_bounces_once_with_its_status(tmp_path, dovecot):
    env = lmtp_world(tmp_path, dovecot, "socket")
    r = env.sendmail("-odq", "-i", "full", input=BODY + b"x" * 2000 + b"\n")
    assert (r.returncode, r.stderr) == (0, b"")
    assert env.sendmail("-q").returncode == 0
    (dsn,) = dovecot.maildir(LOGIN)  # the envelope sender gets the bounce
    assert b"Final-Recipient: rfc822; full@example.org" in dsn
    assert b"Status: 5.2.2" in dsn and b"Diagnostic-Code: smtp; 552 5.2.2" in dsn
    assert env.queued() == [] and len(dead(env)) == 1
    assert env.sendmail("-q").returncode == 0
    assert len(dovecot.maildir(LOGIN)) == 1


def test_dovecot_stopped_then_restarted_gets_each_message_once(tmp_path, dovecot):
    env = lmtp_world(tmp_path, dovecot, "socket")
    dovecot.stop()
    for n in range(3):
        r = env.sendmail("-i", "alice", input=BODY.replace(b"last line", b"message %d" % n))
        assert (r.returncode, r.stderr) == (0, b"")  # safe in the spool is success
    assert len(env.queued()) == 3
    dovecot.start()
    r = env.sendmail("-q")
    assert (r.returncode, r.stderr) == (0, b"")
    # an agent started by a submission may still be at work: it and -q share the entries
    wait_until(lambda: env.queued() == [], "an empty queue")
    assert env.sendmail("-q").returncode == 0
    got = sorted(body_of(strip_lmtp_trace(m), b"\n") for m in dovecot.maildir("alice"))
    assert got == sorted(
        body_of(BODY.replace(b"last line", b"message %d" % n), b"\n") for n in range(3)
    )


# --- Haraka ---------------------------------------------------------------------------------


@pytest.fixture
def haraka(tmp_path):
    server = Haraka(free_port(), tmp_path / "haraka", max_bytes=20_000)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def haraka_world(tmp_path: Path, haraka: Haraka, *, auth: bool = True, ca: Path | None = None):
    env = Env(tmp_path, Port(haraka.port))
    lines = f'tls = "starttls"\nca_file = "{ca or haraka.ca_file}"'
    if auth:
        secret = tmp_path / "secret"
        secret.write_text(HARAKA_PASSWORD + "\n")
        secret.chmod(0o600)
        lines += f'\nusername = "{HARAKA_USER}"\npassword_file = "{secret}"'
    queue_config(env, relay=lines)
    return env


def test_haraka_starttls_with_a_private_ca_and_auth_byte_for_byte(tmp_path, haraka):
    env = haraka_world(tmp_path, haraka)
    r = env.sendmail("-odi", "-i", "bob", input=BODY)
    assert (r.returncode, r.stderr) == (0, b"")
    ((seen, message),) = haraka.wait(1)
    assert seen["tls"] is True and seen["auth_user"] == HARAKA_USER
    assert seen["rcpt_to"] == ["bob@example.org"]
    assert body_of(message) == body_of(BODY, b"\n").replace(b"\n", b"\r\n")


def test_haraka_certificate_from_another_ca_is_refused_and_the_message_kept(tmp_path, haraka):
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    env = haraka_world(tmp_path, haraka, ca=stranger)
    r = env.sendmail("-odi", "-v", "-i", "bob", input=BODY)
    assert r.returncode == 0, r.stderr  # kept in the spool: success for the caller
    assert b"certificate verif" in r.stderr
    assert haraka.received() == [] and len(env.queued()) == 1


def test_haraka_offers_pipelining_and_a_flush_delivers_each_message_once(tmp_path, haraka):
    """The server a pipelining client (issue 14) is proven against; today's lock-step
    dialogue must deliver every queued message exactly once through it."""
    env = haraka_world(tmp_path, haraka)
    r = env.sendmail("-odi", "-v", "-i", "bob", input=BODY)
    assert r.returncode == 0 and b"PIPELINING" in r.stderr
    bodies = [BODY.replace(b"last line", b"queued %d" % n) for n in range(20)]
    for body in bodies:
        assert env.sendmail("-odq", "-i", "bob", "carol", input=body).returncode == 0
    assert env.sendmail("-q").returncode == 0
    got = haraka.wait(21)
    assert env.queued() == [] and len(got) == 21
    assert sorted(body_of(m) for _, m in got[1:]) == sorted(
        body_of(b, b"\n").replace(b"\n", b"\r\n") for b in bodies
    )
    assert all(seen["rcpt_to"] == ["bob@example.org", "carol@example.org"] for seen, _ in got[1:])


def test_haraka_size_refusal_exits_69_naming_the_message(tmp_path, haraka):
    env = haraka_world(tmp_path, haraka)
    big = BODY + b"y" * 30_000 + b"\n"
    r = env.sendmail("-odi", "-i", "bob", input=big)
    assert r.returncode == 69, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert "550 Message too big! (in reply to MAIL FROM; SIZE over the listener's limit)" in line
    assert "bob@" not in line
    assert haraka.received() == [] and env.queued() == []


def test_haraka_size_refusal_in_the_background_bounces_once_with_5_3_4(tmp_path, haraka):
    env = haraka_world(tmp_path, haraka)
    r = env.sendmail("-odq", "-i", "bob", input=BODY + b"y" * 30_000 + b"\n")
    assert (r.returncode, r.stderr) == (0, b"")
    assert env.sendmail("-q").returncode == 0
    ((seen, dsn),) = haraka.wait(1)
    assert seen["mail_from"] == "" and seen["rcpt_to"] == [f"{LOGIN}@example.org"]
    assert b"Status: 5.3.4" in dsn and b"Final-Recipient: rfc822; bob@example.org" in dsn
    assert b"Diagnostic-Code: smtp; 550 Message too big!" in dsn
    assert env.queued() == [] and len(dead(env)) == 1
    assert env.sendmail("-q").returncode == 0
    assert len(haraka.received()) == 1
