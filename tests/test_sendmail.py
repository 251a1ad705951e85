"""The real `sendmail` as a subprocess, real stdin, against a real listener: what callers see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import Listener, free_port, tool

CRON = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <root@host> run-parts /etc/cron.daily\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"\n"
    b"backup done\n"
)


def test_debian_cron_message_arrives_with_added_headers(world):
    r = world.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=CRON)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and r.stderr == b""  # silent on success
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["admin@example.org"]  # root's alias
    assert msg.mail_from == f"{_login()}@example.org"
    assert msg.header("Subject") == ["Cron <root@host> run-parts /etc/cron.daily"]
    assert len(msg.header("Date")) == 1 and len(msg.header("Message-ID")) == 1
    assert msg.header("From") == ["root@example.org (Cron Daemon)"]  # present: qualified
    assert msg.body == b"backup done\r\n"
    world.wait_queue_empty()


def _login() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def test_missing_from_is_added_with_full_name(world):
    r = world.sendmail("-F", "Backup Job", "-i", "bob", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("From") == [f"Backup Job <{_login()}@example.org>"]
    assert msg.rcpt_tos == ["bob@example.org"]


def test_t_takes_to_cc_bcc_and_removes_bcc(world):
    body = (
        b"To: Alice <alice@example.net>, bob\n"
        b'Cc: "Carol, C." <carol@example.net>\n'
        b"Bcc: secret@example.net\n"
        b"Subject: hello\n\nbody\n"
    )
    r = world.sendmail("-t", "-i", "extra@example.net", input=body)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert sorted(msg.rcpt_tos) == sorted(
        [
            "alice@example.net",
            "bob@example.org",
            "carol@example.net",
            "secret@example.net",
            "extra@example.net",
        ]
    )
    assert msg.header("Bcc") == [] and b"secret@" not in msg.data


def test_logwatch_several_to_lines(world):
    body = b"To: a@example.net\nTo: b@example.net\nSubject: logwatch\n\nreport\n"
    assert world.sendmail("-t", input=body).returncode == 0
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["a@example.net", "b@example.net"]


def test_php_crlf_headers_lf_body(world):
    body = b"To: a@example.net\r\nSubject: php\r\nX-Mailer: PHP\r\n\r\nline one\nline two\n"
    assert world.sendmail("-t", "-i", input=body).returncode == 0
    (msg,) = world.listener.wait(1)
    assert b"\r\r" not in msg.data
    assert msg.body == b"line one\r\nline two\r\n"


def test_lone_dot_ends_input_without_i(world):
    r = world.sendmail("root", input=b"Subject: dot\n\nbefore\n.\nafter\n")
    assert r.returncode == 0
    (msg,) = world.listener.wait(1)
    assert msg.body == b"before\r\n"


def test_lone_dot_is_kept_with_i(world):
    r = world.sendmail("-oi", "root", input=b"Subject: dot\n\nbefore\n.\n..\nafter\n")
    assert r.returncode == 0
    (msg,) = world.listener.wait(1)
    assert msg.body == b"before\r\n.\r\n..\r\nafter\r\n"


def test_eight_bit_and_long_lines_arrive_byte_for_byte(world):
    long_line = b"x" * 200_000
    body = b"Subject: =?UTF-8?B?w6k=?=\n\n caf\xc3\xa9 \xff\xfe\n" + long_line + b"\n"
    assert world.sendmail("-i", "root", input=body).returncode == 0
    (msg,) = world.listener.wait(1)
    assert msg.body == b" caf\xc3\xa9 \xff\xfe\r\n" + long_line + b"\r\n"
    assert "BODY=8BITMIME" in msg.options


def test_envelope_sender_f_and_null_sender(world):
    assert (
        world.sendmail("-f", "alerts@example.net", "root", input=b"Subject: a\n\n1\n").returncode
        == 0
    )
    assert world.sendmail("-f<>", "root", input=b"Subject: b\n\n2\n").returncode == 0
    msgs = world.listener.wait(2)
    assert {m.mail_from for m in msgs} == {
        "alerts@example.net",
        "<>",
    }  # aiosmtpd shows MAIL FROM:<> as "<>"


def test_bare_f_is_qualified(world):
    assert world.sendmail("-f", "root", "bob", input=b"Subject: a\n\n1\n").returncode == 0
    (msg,) = world.listener.wait(1)
    assert msg.mail_from == "root@example.org"


def test_comma_separated_recipients_in_one_word(world):
    assert world.sendmail("a@example.net,b@example.net", input=b"Subject: a\n\n1\n").returncode == 0
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["a@example.net", "b@example.net"]


def test_no_recipients_is_usage_error_and_keeps_nothing(world):
    r = world.sendmail("-i", input=b"Subject: x\n\nbody\n")
    assert r.returncode == 64
    assert b"no recipients" in r.stderr and r.stderr.count(b"\n") == 1
    assert world.queued() == []


def test_invalid_recipient_is_data_error_naming_it(world):
    r = world.sendmail("good@example.org", "bad@@example.org", input=b"Subject: x\n\n")
    assert r.returncode == 65
    assert b"bad@@example.org" in r.stderr and b"Traceback" not in r.stderr
    assert world.queued() == []


def test_unknown_flag_is_usage_error(world):
    r = world.sendmail("-W", "root")
    assert r.returncode == 64 and b"-W" in r.stderr


def test_header_injection_through_F_is_refused(world):
    r = world.sendmail("-F", "x\nBcc: victim@example.net", "root", input=b"hi\n")
    assert r.returncode == 64 and b"refused" in r.stderr
    assert world.queued() == []


def test_bad_config_spools_and_the_runner_says_78_naming_key(world):
    world.config.write_text(world.config.read_text() + "\n[[relay]]\nport = 'abc'\n")
    r = world.sendmail("root", input=b"x\n")
    assert r.returncode == 0 and len(world.queued()) == 1
    r = world.run("mailshim", ["run"])
    assert r.returncode == 78
    assert str(world.config).encode() in r.stderr, r.stderr


def test_bv_prints_rewritten_recipients(world):
    r = world.sendmail("-bv", "root", "Bob <bob>", "x@example.net")
    assert r.returncode == 0
    assert r.stdout.decode().splitlines() == [
        "root -> admin@example.org",
        "bob -> bob@example.org",
        "x@example.net -> x@example.net",
    ]
    assert world.listener.messages == []


def test_newaliases_and_bi_exit_zero(world):
    assert world.run("newaliases", []).returncode == 0
    assert world.sendmail("-bi").returncode == 0


def test_listener_down_spools_then_q_delivers_once(tmp_path):
    down = Listener(free_port())  # not started: connection refused
    from conftest import Env

    world = Env(tmp_path, down)
    r = world.sendmail("-i", "root", input=b"Subject: later\n\nqueued\n")
    assert r.returncode == 0, r.stderr  # safe in the spool is success
    time.sleep(0.5)
    assert len(world.queued()) == 1
    listing = world.run("mailq", []).stdout.decode()
    assert world.queued()[0] in listing and "admin@example.org" in listing
    down.start()
    try:
        r = world.sendmail("-q")
        assert r.returncode == 0, r.stderr
        assert len(down.messages) == 1
        assert world.queued() == []
        assert world.sendmail("-q").returncode == 0
        assert len(down.messages) == 1  # once
    finally:
        down.stop()


def test_interactive_mode_reports_refused_recipients(world):
    world.listener.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 No such user"
    r = world.sendmail("-odi", "-i", "nobody", "bob", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 67
    assert b"<nobody@example.org>" in r.stderr and b"550 5.1.1 No such user" in r.stderr
    (msg,) = world.listener.messages
    assert msg.rcpt_tos == ["bob@example.org"]
    assert world.queued() == []
    assert len(os.listdir(world.spool / "dead")) >= 1  # the refused copy is kept, not dropped


def test_interactive_deferral_keeps_entry_and_exits_zero(world):
    world.listener.handler.mail_reply = "451 4.3.0 try later"
    r = world.sendmail("-odi", "-i", "bob", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 0, r.stderr
    assert len(world.queued()) == 1


def test_verbose_shows_dialogue_on_stderr(world):
    r = world.sendmail("-v", "-i", "bob", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 0
    assert b"MAIL FROM:" in r.stderr and b"250" in r.stderr
    assert len(world.listener.messages) == 1


def test_queue_mode_only_spools(world):
    r = world.sendmail("-odq", "-i", "bob", input=b"Subject: x\n\nhi\n")
    assert r.returncode == 0
    time.sleep(0.5)
    assert len(world.queued()) == 1 and world.listener.messages == []


def test_killed_before_end_of_input_keeps_nothing(world):
    proc = subprocess.Popen(
        [tool("sendmail"), "-i", "root"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=world.env,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"Subject: half\n\npart of a body\n" * 100)
    proc.stdin.flush()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert proc.returncode == 75
    assert world.queued() == []
    assert os.listdir(world.spool / "tmp") == []
    time.sleep(0.3)
    assert world.listener.messages == []


def test_burst_starts_one_agent_and_delivers_all(world):
    for i in range(30):
        r = world.sendmail("-i", "bob", input=f"Subject: {i}\n\nmessage {i}\n".encode())
        assert r.returncode == 0
    msgs = world.listener.wait(30)
    assert sorted(m.header("Subject")[0] for m in msgs) == sorted(str(i) for i in range(30))
    world.wait_queue_empty()
    assert world.listener.handler.sessions < 30  # connections are reused


def test_q_with_an_id_delivers_only_that_entry_and_returns(world):
    for i in range(2):
        r = world.sendmail("-odq", "-i", "bob", input=f"Subject: {i}\n\nq\n".encode())
        assert r.returncode == 0
    first, second = world.queued()
    r = world.sendmail(f"-qI{first}", timeout=30)
    assert r.returncode == 0, r.stderr
    assert len(world.listener.messages) == 1
    assert world.queued() == [second]


def test_untrusted_user_setting_the_sender_gets_a_warning_header(world):
    assert (
        world.sendmail("-f", "alerts@example.net", "bob", input=b"Subject: a\n\n1\n").returncode
        == 0
    )
    (trusted,) = world.listener.wait(1)
    assert trusted.header("X-Authentication-Warning") == []  # root is in trusted_users
    world.reconfigure(extra='[submission]\ntrusted_users = ["operator"]\n')
    assert (
        world.sendmail("-f", "alerts@example.net", "bob", input=b"Subject: b\n\n2\n").returncode
        == 0
    )
    assert world.sendmail("-f", _login(), "bob", input=b"Subject: c\n\n3\n").returncode == 0
    msgs = {m.header("Subject")[0]: m for m in world.listener.wait(3)}
    (warning,) = msgs["b"].header("X-Authentication-Warning")
    assert warning.endswith(f": {_login()} set sender to alerts@example.net using -f")
    assert msgs["c"].header("X-Authentication-Warning") == []  # one's own address is no forgery


def test_while_the_listener_is_down_submissions_start_no_more_agents(tmp_path):
    from conftest import Env

    down = Listener(free_port())
    world = Env(tmp_path, down)
    assert world.sendmail("-i", "bob", input=b"Subject: 0\n\nfirst\n").returncode == 0
    lock = world.spool / "agent.lock"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (lock.exists() and lock.stat().st_size):
        time.sleep(0.05)
    marked = lock.stat().st_mtime_ns
    assert lock.stat().st_size > 0  # the agent found no relay and said so
    for i in range(1, 6):
        assert world.sendmail("-i", "bob", input=f"Subject: {i}\n\nq\n".encode()).returncode == 0
    time.sleep(0.5)
    assert lock.stat().st_mtime_ns == marked  # no new agent tried (and failed) again
    assert len(world.queued()) == 6
    down.start()
    try:
        assert world.sendmail("-q").returncode == 0
        assert len(down.messages) == 6 and world.queued() == []
    finally:
        down.stop()


def test_once_a_flush_gets_through_submissions_start_agents_again(tmp_path):
    from conftest import Env

    lst = Listener(free_port())
    world = Env(tmp_path, lst)
    assert world.sendmail("-i", "bob", input=b"Subject: 0\n\nwhile down\n").returncode == 0
    lock = world.spool / "agent.lock"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (lock.exists() and lock.stat().st_size):
        time.sleep(0.05)
    lst.start()
    try:
        assert world.sendmail("-q").returncode == 0
        assert lock.stat().st_size == 0  # the flush got through and said so
        assert world.sendmail("-i", "bob", input=b"Subject: 1\n\nafter\n").returncode == 0
        lst.wait(2)  # delivered by a new agent, with no flush
    finally:
        lst.stop()


SIGNAL_AT_RENAME = """
import os, signal, sys
real_rename = os.rename
def rename(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    if os.sep + {folder!r} + os.sep in str(dst):
        os.kill(os.getpid(), signal.{sig})  # a real signal, just after the entry is in place
os.rename = rename
from mailshim.cli.sendmail import main
sys.argv[0] = "sendmail"
main()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_during_commit_never_says_nothing_was_kept(world, sig):
    """Issue 12 item 9: a signal between the rename into the spool and the end of commit
    used to give exit 75 ("nothing was sent or kept") while the entry went out: the caller
    sends again and the mail arrives twice. Signals are now ignored from before the rename."""

    world.reconfigure(mode="queue")
    code = SIGNAL_AT_RENAME.format(folder="queue", sig=sig)
    done = subprocess.run(
        [sys.executable, "-c", code, "-i", "bob"],
        input=b"Subject: signalled\n\nbody\n",
        env=world.env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert b"nothing was" not in done.stderr
    assert len(world.queued()) == 1
