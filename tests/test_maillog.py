"""Where the log goes when there is no syslog socket: ``[log] file``, the daemon's stderr,
and ``mailshim check`` saying so; real processes against a real listener."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import Env, Listener, free_port, tool
from mailshim import maillog


def mailshim(world: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("mailshim"), *args], capture_output=True, text=True, env=world.env, timeout=60
    )


def lines_of(out: str, level: str, topic: str) -> list[str]:
    return [line for line in out.splitlines() if line.split()[:2] == [level, topic]]


def test_log_file_gets_the_story_and_mailshim_log_reads_it(world):
    log = world.tmp / "log" / "mailshim.log"
    log.parent.mkdir()
    world.reconfigure(extra=f'[log]\nfile = "{log}"\n', mode="interactive")
    r = world.sendmail("-i", "root", input=b"Subject: logged\n\nhi\n")
    assert r.returncode == 0, r.stderr
    world.listener.wait(1)
    text = log.read_text()
    qid = text.split("]: ", 1)[1].split(":", 1)[0]
    assert f"{qid}: uid={os.getuid()} from=<" in text
    assert f"{qid}: to=<admin@example.org>" in text and "status=sent" in text
    # syslog's layout: time (RFC 3339, "+HH:MM" as pflogsumm reads it), host, tag[pid]; a
    # delivery line's tag is mailshim/smtp
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d \S+ mailshim\[\d+\]: ", text)
    assert re.search(r" mailshim/smtp\[\d+\]: \S+: to=<admin@example.org>", text)
    r = mailshim(world, "log", qid)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if qid in line] == [
        line for line in text.splitlines() if qid in line
    ]
    assert os.stat(log).st_mode & 0o777 == 0o640


def test_log_file_that_cannot_be_written_never_fails_a_submission(world):
    world.reconfigure(extra=f'[log]\nfile = "{world.tmp}"\n')  # a folder, not a file
    r = world.sendmail("-i", "root", input=b"Subject: s\n\nhi\n")
    assert r.returncode == 0 and r.stderr == b""
    world.listener.wait(1)


def test_relative_log_file_is_a_config_error(world):
    world.reconfigure(extra='[log]\nfile = "mailshim.log"\n')
    r = world.sendmail("-i", "root", input=b"x\n")
    assert r.returncode == 0 and len(world.queued()) == 1  # spooled all the same
    r = world.run("mailshim", ["check"])
    assert r.returncode == 78
    assert b"[log] file: expected an absolute path" in r.stdout


@pytest.mark.skipif(maillog.available(), reason="this host has a syslog socket")
def test_check_warns_that_the_log_goes_nowhere_and_not_with_a_file(world):
    r = mailshim(world, "check")
    (line,) = lines_of(r.stdout, "warning", "log")
    assert "no syslog socket" in line and "mailshim log finds nothing" in line
    fix = r.stdout.splitlines()[r.stdout.splitlines().index(line) + 1]
    assert "[log] file" in fix
    log = world.tmp / "mailshim.log"
    world.reconfigure(extra=f'[log]\nfile = "{log}"\n')
    r = mailshim(world, "check")
    assert lines_of(r.stdout, "warning", "log") == []
    (line,) = lines_of(r.stdout, "ok", "log")
    assert str(log) in line


def test_daemon_writes_the_log_to_stderr_without_syslog_or_file(world):
    world.reconfigure(mode="queue")
    err = world.tmp / "daemon.err"
    with open(err, "wb") as stderr:
        daemon = subprocess.Popen(
            [tool("mailshim"), "daemon"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, env=world.env,
        )  # fmt: skip
        try:
            r = world.sendmail("-i", "root", input=b"Subject: d\n\nhi\n")
            assert r.returncode == 0, r.stderr
            world.listener.wait(1)
            world.wait_queue_empty()
            deadline = time.monotonic() + 20
            while b"status=sent" not in err.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    text = err.read_text()
    assert "mailshim: daemon: watching" in text
    assert "to=<admin@example.org>" in text and "status=sent" in text, text


def test_check_backlog_whose_last_attempt_failed_is_a_warning_with_the_fix(tmp_path):
    world = Env(tmp_path, Listener(free_port()))  # nothing listens there
    world.reconfigure(mode="queue")
    r = world.sendmail("-i", "root", input=b"Subject: stuck\n\nhi\n")
    assert r.returncode == 0, r.stderr
    (qid,) = world.queued()
    r = mailshim(world, "check")
    assert lines_of(r.stdout, "warning", "queue") == []  # never tried: not a failure yet
    mailshim(world, "flush")
    r = mailshim(world, "check")
    out = r.stdout.splitlines()
    (line,) = lines_of(r.stdout, "warning", "queue")
    assert "1 message waiting" in line and "the last attempt (" in line
    assert "failed: connect to relay[127.0.0.1]" in line and "Connection refused" in line
    fix = out[out.index(line) + 1].strip()
    assert fix.startswith("fix: make the listener take mail again")
    assert "mailshim flush" in fix and f"mailshim queue show {qid}" in fix
