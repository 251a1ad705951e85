"""`sendmail -bs` end to end: the real command as a subprocess, SMTP on its stdin/stdout,
submitting to an in-process aiosmtpd listener (fixtures in conftest.py); plus two real
clients, swaks and a PHP script that drives it like Symfony Mailer (both installed in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Env, free_port, tool
from mailshim import bs, configload
from mailshim.errors import EX_DATAERR, EX_NOUSER, EX_OK, EX_TEMPFAIL

HERE = Path(__file__).parent
MESSAGE = b"From: app@example.org\r\nTo: user@example.net\r\nSubject: test\r\n\r\nHello.\r\n"


def lines(*items: str | bytes) -> bytes:
    """A dialogue: each item a line (CRLF added); bytes items are sent as they are."""
    return b"".join(i if isinstance(i, bytes) else i.encode() + b"\r\n" for i in items)


def transaction(sender: str, *rcpts: str, body: bytes = MESSAGE) -> bytes:
    return lines(f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{r}>" for r in rcpts], "DATA", body, ".")


def replies(stdout: bytes) -> list[str]:
    """The final line of each reply (``250 2.0.0 Ok``), checking the reply syntax."""
    out = []
    assert stdout.endswith(b"\r\n") or not stdout, stdout[-200:]
    for line in stdout.decode("ascii").split("\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (" ", "-"), line
        if line[3] == " ":
            out.append(line)
    return out


def codes(stdout: bytes) -> list[int]:
    return [int(r[:3]) for r in replies(stdout)]


def spool_files(world: Env) -> list[str]:
    """Every file in the spool but its bookkeeping (the agent's lock and pid file, the
    listener's size, the serving mark, the monitoring counters and summary, the schedule
    index): what was kept."""
    found = []
    for root, _dirs, files in os.walk(world.spool):
        if os.path.basename(root) == "schedule":
            continue  # the index, its journal and a rewrite's temp file
        skip = ("agent.lock", "agent.pid", "listener-size", "served")
        skip += ("metrics", "metrics.lock", "summary.json")
        found += [os.path.join(root, f) for f in files if f not in skip]
    return sorted(found)


def bs_run(
    world: Env, data: bytes, timeout: float = 120, *flags: str
) -> subprocess.CompletedProcess[bytes]:
    return world.sendmail("-bs", *flags, input=data, timeout=timeout)


def test_pipelined_dialogue_written_at_once(world: Env) -> None:
    r = bs_run(
        world,
        lines("EHLO client.example")
        + transaction("app@example.org", "a@example.net")
        + lines("QUIT"),
    )
    assert r.stderr == b""
    assert r.returncode == EX_OK
    assert codes(r.stdout) == [220, 250, 250, 250, 354, 250, 221]
    assert b"250-PIPELINING\r\n" in r.stdout
    assert replies(r.stdout)[0].endswith(" ESMTP mailshim")
    assert "250 2.0.0 Ok: queued as " in replies(r.stdout)[5]
    (msg,) = world.listener.wait(1)
    assert msg.mail_from == "app@example.org"
    assert msg.rcpt_tos == ["a@example.net"]
    assert msg.header("Subject") == ["test"]
    # Prepared like a piped message: Date and Message-ID added.
    assert len(msg.header("Date")) == 1
    assert len(msg.header("Message-ID")) == 1
    assert msg.body == b"Hello.\r\n"
    assert spool_files(world) == []


def test_symfony_style_helo_only(world: Env) -> None:
    r = bs_run(
        world,
        lines("HELO [127.0.0.1]") + transaction("app@example.org", "u@example.net") + lines("QUIT"),
    )
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    assert codes(r.stdout) == [220, 250, 250, 250, 354, 250, 221]
    assert len(world.listener.wait(1)) == 1


def test_several_messages_and_rset_in_the_middle(world: Env) -> None:
    data = (
        lines("EHLO c")
        + transaction("one@example.org", "r1@example.net")
        + lines("MAIL FROM:<abandoned@example.org>", "RCPT TO:<nobody@example.net>", "RSET")
        + transaction("two@example.org", "r2@example.net", "r3@example.net")
        + lines("QUIT")
    )
    r = bs_run(world, data)
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    assert codes(r.stdout) == [
        220,
        250,
        250,
        250,
        354,
        250,
        250,
        250,
        250,
        250,
        250,
        250,
        354,
        250,
        221,
    ]
    msgs = world.listener.wait(2)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [
        ("one@example.org", ["r1@example.net"]),
        ("two@example.org", ["r2@example.net", "r3@example.net"]),
    ]


def test_bad_command_order_then_a_good_message(world: Env) -> None:
    data = (
        lines(
            "RCPT TO:<a@example.net>",
            "DATA",
            "EHLO c",
            "MAIL FROM:<s@example.org>",
            "DATA",
            "MAIL FROM:<s@example.org>",
            "RSET",
        )
        + transaction("s@example.org", "a@example.net")
        + lines("QUIT")
    )
    r = bs_run(world, data)
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    got = replies(r.stdout)
    assert [g[:9] for g in got[1:8]] == [
        "503 5.5.1",
        "503 5.5.1",
        "250 HELP",
        "250 2.1.0",
        "503 5.5.1",
        "503 5.5.1",
        "250 2.0.0",
    ]
    assert codes(r.stdout)[-5:] == [250, 250, 354, 250, 221]
    assert len(world.listener.wait(1)) == 1


def test_dot_stuffed_lines_are_unstuffed_once(world: Env) -> None:
    body = b"Subject: dots\r\n\r\n..\r\n...\r\n..leading\r\n. space\r\nend.\r\n"
    r = bs_run(
        world,
        lines("EHLO c") + transaction("s@example.org", "a@example.net", body=body) + lines("QUIT"),
    )
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    (msg,) = world.listener.wait(1)
    assert msg.body == b".\r\n..\r\n.leading\r\n space\r\nend.\r\n"


def test_recipients_are_rewritten_like_argv_recipients(world: Env) -> None:
    r = bs_run(world, lines("EHLO c") + transaction("s@example.org", "root", "bob") + lines("QUIT"))
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["admin@example.org", "bob@example.org"]


def test_bad_address_gets_501_and_the_rest_goes_through(world: Env) -> None:
    data = lines(
        "EHLO c",
        "MAIL FROM:<s@example.org>",
        "RCPT TO:<not an address>",
        "RCPT TO:<>",
        "RCPT TO:<good@example.net>",
        "DATA",
        MESSAGE,
        ".",
        "QUIT",
    )
    r = bs_run(world, data)
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    assert [x[:9] for x in replies(r.stdout)[3:5]] == ["501 5.1.3", "501 5.1.3"]
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["good@example.net"]


def test_ten_megabyte_message(world: Env) -> None:
    line = b"0123456789" * 7 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (10 * 1024 * 1024 // len(line))
    r = bs_run(
        world,
        lines("EHLO c") + transaction("s@example.org", "a@example.net", body=body) + lines("QUIT"),
    )
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    assert codes(r.stdout)[-2:] == [250, 221]
    (msg,) = world.listener.wait(1)
    assert msg.body == body.split(b"\r\n\r\n", 1)[1]


# Linux carries a process's peak RSS across fork and exec, so a child of this (large) pytest
# process would report pytest's own size. A small Python parent in between measures cleanly.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)
_pid, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
sys.stderr.write(f"{proc.returncode} {usage.ru_maxrss}\\n")
"""


def run_measured(cmd: list[str], data: bytes, env: dict[str, str]) -> tuple[int, bytes, int]:
    """Run ``cmd`` with ``data`` on stdin; return its status, stdout and peak RSS (KiB)."""
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd],
        input=data,
        capture_output=True,
        env=env,
        timeout=300,
    )
    status, rss = r.stderr.split()
    return int(status), r.stdout, int(rss)


def test_memory_stays_flat_while_streaming(world: Env) -> None:
    world.reconfigure(mode="queue")
    line = b"x" * 998 + b"\r\n"

    def session(megabytes: int) -> bytes:
        body = b"Subject: s\r\n\r\n" + line * (megabytes * 1000)
        return (
            lines("EHLO c")
            + transaction("s@example.org", "a@example.net", body=body)
            + lines("QUIT")
        )

    cmd = [tool("sendmail"), "-bs"]
    rc_small, out_small, rss_small = run_measured(cmd, session(0), world.env)
    rc_big, out_big, rss_big = run_measured(cmd, session(40), world.env)
    assert (rc_small, rc_big) == (EX_OK, EX_OK)
    assert codes(out_small)[-2:] == codes(out_big)[-2:] == [250, 221]
    assert len(world.queued()) == 2
    assert world.listener.messages == []  # delivery mode "queue" is respected
    # 40 MB went through; holding it would add at least that much.
    assert rss_big - rss_small < 15 * 1024, (rss_small, rss_big)


def test_eof_in_the_middle_of_data_sends_and_keeps_nothing(world: Env) -> None:
    data = lines("EHLO c", "MAIL FROM:<s@example.org>", "RCPT TO:<a@example.net>", "DATA") + MESSAGE
    r = bs_run(world, data)
    assert r.returncode == EX_DATAERR
    assert r.stderr == b""
    assert codes(r.stdout) == [220, 250, 250, 250, 354]
    assert world.listener.messages == []
    assert spool_files(world) == []


def test_eof_without_quit_after_a_message_is_a_clean_end(world: Env) -> None:
    r = bs_run(world, lines("HELO c") + transaction("s@example.org", "a@example.net"))
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    assert codes(r.stdout) == [220, 250, 250, 250, 354, 250]
    assert len(world.listener.wait(1)) == 1


def test_listener_down_means_spooled_and_250(world: Env) -> None:
    world.reconfigure(port=free_port())
    r = bs_run(
        world, lines("EHLO c") + transaction("s@example.org", "a@example.net") + lines("QUIT")
    )
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    assert replies(r.stdout)[-2].startswith("250 2.0.0 Ok: queued as ")
    qid = replies(r.stdout)[-2].rsplit(" ", 1)[1]
    assert world.queued() == [qid]
    assert world.listener.messages == []
    # Once the listener is back, a flush delivers it exactly once.
    world.reconfigure()
    flush = world.sendmail("-q")
    assert flush.returncode == 0, flush.stderr
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["a@example.net"]
    # The agent -bs started may be the one that sent it (on a loaded machine it reads the
    # config only after the switch back): it removes the entry just after the listener's 250.
    world.wait_queue_empty()
    assert len(world.listener.messages) == 1


def test_listener_5xx_is_passed_back(world: Env) -> None:
    world.listener.handler.rcpt_replies["refused@example.net"] = "550 5.1.2 Relay not allowed."
    data = (
        lines("EHLO c")
        + transaction("s@example.org", "refused@example.net")
        + transaction("s@example.org", "fine@example.net")
        + lines("QUIT")
    )
    r = bs_run(world, data, 120, "-odi")  # interactive: the listener's verdict is the reply
    assert r.stderr == b""
    got = replies(r.stdout)
    assert got[5] == "550 5.1.2 Relay not allowed."
    assert got[9].startswith("250 2.0.0 Ok: queued as ")
    assert got[10].startswith("221 ")
    # The session went on, but not every message was accepted.
    assert r.returncode == EX_NOUSER
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["fine@example.net"]


def test_listener_5xx_leaves_nothing_in_the_spool(world: Env) -> None:
    """The client was told (5xx after the dot): no bounce, no dead/ entry."""
    world.listener.handler.rcpt_replies["refused@example.net"] = "550 5.1.1 No such user"
    data = lines("EHLO c") + transaction("s@example.org", "refused@example.net")
    r = bs_run(world, data, 120, "-odi")
    assert replies(r.stdout)[-1] == "550 5.1.1 No such user"
    assert r.returncode == EX_NOUSER
    assert spool_files(world) == []


def test_listener_4xx_means_kept_and_250(world: Env) -> None:
    world.listener.handler.data_reply = "451 4.3.0 Try again later"
    r = bs_run(
        world, lines("EHLO c") + transaction("s@example.org", "a@example.net") + lines("QUIT")
    )
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    qid = replies(r.stdout)[-2].rsplit(" ", 1)[1]
    assert replies(r.stdout)[-2].startswith("250 2.0.0 Ok: queued as ")
    assert world.queued() == [qid]


def test_size_limit(world: Env) -> None:
    world.reconfigure(extra="[submission]\nmax_size = 2000\n")
    big = b"Subject: big\r\n\r\n" + b"y" * 78 + b"\r\n"
    big = big * 40
    data = (
        lines("EHLO c", "MAIL FROM:<s@example.org> SIZE=5000")
        + transaction("s@example.org", "a@example.net", body=big)
        + transaction("s@example.org", "b@example.net")
        + lines("QUIT")
    )
    r = bs_run(world, data)
    assert r.stderr == b""
    got = replies(r.stdout)
    assert b"250-SIZE 2000\r\n" in r.stdout
    assert got[2].startswith("552 5.3.4")
    assert got[6].startswith("552 5.3.4")
    assert got[10].startswith("250 2.0.0 Ok: queued as ")
    assert r.returncode == EX_DATAERR
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["b@example.net"]
    assert spool_files(world) == []


def test_overlong_command_line_and_long_data_line(world: Env) -> None:
    world.reconfigure(mode="queue")
    long_data_line = b"z" * (2 * 1024 * 1024) + b"\r\n"
    data = (
        lines("EHLO c", b"NOOP " + b"x" * 100000 + b"\r\n", "NOOP")
        + transaction("s@example.org", "a@example.net", body=b"Subject: l\r\n\r\n" + long_data_line)
        + lines("QUIT")
    )
    r = bs_run(world, data)
    assert (r.returncode, r.stderr) == (EX_OK, b"")
    got = replies(r.stdout)
    assert got[2].startswith("500 5.5.6")
    assert got[3].startswith("250 ")
    assert got[-2].startswith("250 2.0.0 Ok: queued as ")
    assert len(world.queued()) == 1


def test_a_plain_message_piped_by_mistake_ends_with_421(world: Env) -> None:
    junk = b"".join(f"X-Header-{i}: value\r\n".encode() for i in range(100)) + b"\r\nbody\r\n"
    r = bs_run(world, junk)
    assert r.stderr == b""
    assert replies(r.stdout)[-1].startswith("421 4.7.0")
    assert r.returncode == EX_DATAERR
    assert world.listener.messages == []
    assert spool_files(world) == []


# --- the driver in-process: idle timeout on real pipes ------------------------------------


def serve_in_process(world: Env, data: bytes, idle_timeout: float) -> tuple[int, bytes]:
    cfg = configload.load(str(world.config), use_cache=False)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, data)  # small: fits in the pipe; in_w stays open, so no EOF
    got: list[bytes] = []

    def collect() -> None:
        chunks = []
        while chunk := os.read(out_r, 65536):
            chunks.append(chunk)
        got.append(b"".join(chunks))

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        status = bs.serve(cfg, in_r, out_w, idle_timeout=idle_timeout)
    finally:
        os.close(out_w)
        reader.join()
        for fd in (in_r, in_w, out_r):
            os.close(fd)
    return status, got[0]


def test_idle_timeout_between_commands(world: Env) -> None:
    status, out = serve_in_process(world, lines("EHLO c", "MAIL FROM:<s@example.org>"), 0.3)
    assert status == EX_TEMPFAIL
    assert replies(out)[-1].startswith("421 4.4.2")
    assert world.listener.messages == []


def test_idle_timeout_in_data_keeps_nothing(world: Env) -> None:
    data = lines(
        "EHLO c", "MAIL FROM:<s@example.org>", "RCPT TO:<a@example.net>", "DATA", "Subject: x"
    )
    status, out = serve_in_process(world, data, 0.3)
    assert status == EX_TEMPFAIL
    assert codes(out) == [220, 250, 250, 250, 354, 421]
    assert world.listener.messages == []
    assert spool_files(world) == []


def test_client_that_stops_reading_does_not_hang(world: Env) -> None:
    cfg = configload.load(str(world.config), use_cache=False)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # nobody reads the replies
    os.write(in_w, lines("EHLO c", "QUIT"))
    os.close(in_w)
    try:
        assert bs.serve(cfg, in_r, out_w, idle_timeout=5) == EX_OK
    finally:
        os.close(in_r)
        os.close(out_w)


# --- real clients ------------------------------------------------------------------------


def needs(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} not installed (CI installs it)")


@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipelining"])
def test_swaks_pipe(world: Env, extra: list[str]) -> None:
    needs("swaks")
    r = subprocess.run(
        [
            "swaks",
            "--pipe",
            f"{tool('sendmail')} -bs",
            "--from",
            "swaks@example.org",
            "--to",
            "user@example.net",
            "--helo",
            "client.example",
            "--header",
            "Subject: from swaks",
            "--body",
            "Hello from swaks.\n.leading dot\n",
            *extra,
        ],
        capture_output=True,
        env=world.env,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert b"250 2.0.0 Ok: queued as " in r.stdout
    (msg,) = world.listener.wait(1)
    assert msg.mail_from == "swaks@example.org"
    assert msg.rcpt_tos == ["user@example.net"]
    assert msg.header("Subject") == ["from swaks"]
    assert b"\r\n.leading dot\r\n" in msg.body


def test_php_symfony_style_client(world: Env, tmp_path: Path) -> None:
    needs("php")
    first = tmp_path / "one.eml"
    first.write_bytes(b"Subject: one\r\nFrom: app@example.org\r\n\r\nFirst.\r\n.dot line\r\n")
    second = tmp_path / "two.eml"
    second.write_bytes(b"Subject: two\r\nFrom: app@example.org\r\n\r\nSecond.")
    r = subprocess.run(
        [
            "php",
            str(HERE / "bs_php_client.php"),
            f"{tool('sendmail')} -bs",
            "app@example.org",
            "u1@example.net,root",
            str(first),
            str(second),
        ],
        capture_output=True,
        env=world.env,
        timeout=60,
    )
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert 'stderr=""' in out
    assert "exit=0" in out
    msgs = world.listener.wait(2)
    assert [m.header("Subject") for m in msgs] == [["one"], ["two"]]
    assert all(m.rcpt_tos == ["u1@example.net", "admin@example.org"] for m in msgs)
    # Symfony always ends with "\r\n.\r\n", so each message gains one empty line.
    assert msgs[0].body == b"First.\r\n.dot line\r\n\r\n"
    assert msgs[1].body == b"Second.\r\n"


def test_non_blocking_output_pipe(world: Env) -> None:
    """A client may hand us a non-blocking pipe: a burst of replies larger than the pipe
    buffer must still arrive whole, in order."""
    cfg = configload.load(str(world.config), use_cache=False)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.set_blocking(out_w, False)
    count = 6000  # 6000 replies of 14 bytes: more than a 64 KiB pipe holds
    os.write(in_w, lines("EHLO c", *["NOOP"] * count, "QUIT"))
    os.close(in_w)
    got: list[bytes] = []

    def collect() -> None:
        time.sleep(0.3)  # let the server fill the pipe first
        chunks = []
        while chunk := os.read(out_r, 4096):
            chunks.append(chunk)
        got.append(b"".join(chunks))

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        status = bs.serve(cfg, in_r, out_w, idle_timeout=5)
    finally:
        os.close(out_w)
        reader.join()
        os.close(in_r)
        os.close(out_r)
    assert status == EX_OK
    assert codes(got[0]) == [220, 250, *[250] * count, 221]


def test_background_mode_answers_once_spooled_with_a_listener_that_never_greets(world: Env) -> None:
    """Issue 11 item 4: a `-bs` session in background mode against a listener that accepts
    TCP and never greets got its 250 only after the relay timeout (30 s). It is answered
    once the message is durable; the agent waits for the listener, not the client."""
    from relayhelpers import SilentListener

    with SilentListener() as silent:
        world.reconfigure(port=silent.port)  # relay timeout 10 s (conftest)
        started = time.monotonic()
        r = bs_run(
            world, lines("EHLO c") + transaction("s@example.org", "a@example.net") + lines("QUIT")
        )
        took = time.monotonic() - started
    assert r.returncode == EX_OK and r.stderr == b""
    assert replies(r.stdout)[-2].startswith("250 2.0.0 Ok: queued as ")
    assert took < 5, f"{took:.1f}s: the session waited for the listener"  # not the 10 s timeout
    assert len(world.queued()) == 1  # kept for the agent


def test_interactive_bs_still_waits_for_the_listener_verdict(world: Env) -> None:
    world.listener.handler.rcpt_replies["refused@example.net"] = "550 5.1.1 No such user"
    data = lines("EHLO c") + transaction("s@example.org", "refused@example.net") + lines("QUIT")
    background = bs_run(world, data)
    assert replies(background.stdout)[-2].startswith("250 ")  # spooled; a bounce will follow
    for flag in ("-odi", "-v"):
        r = bs_run(world, data, 120, flag)
        assert replies(r.stdout)[-2] == "550 5.1.1 No such user", flag
