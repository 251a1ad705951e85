"""journald's native protocol (journal.py, maillog.py): a real systemd-journald, started in a
private mount namespace whose /run/systemd/journal is a folder of this test, receives the
lines of a real submission and delivery; ``journalctl MAILSHIM_QUEUE_ID=...`` finds the
message's story and ``mailshim log`` reads it back from ``journalctl -o json``.

Where journald cannot be started (not root, no ``unshare``), the datagram test still runs:
a real unix datagram socket at a path ``MAILSHIM_JOURNAL_SOCKET`` names takes the entries and
the test parses the protocol itself. Without a socket, lines go to syslog as before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import Env, tool
from mailshim import journal

JOURNALD = "/lib/systemd/systemd-journald"
CRON = b"From: root\nTo: root\nSubject: cron output\n\nbackup done\n"


def parse_datagram(data: bytes) -> list[tuple[str, str]]:
    """journald's native format, read back independently of journal.encode."""
    fields = []
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = nl + 1
        else:
            name = line
            size = int.from_bytes(data[nl + 1 : nl + 9], "little")
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            pos = nl + 10 + size
        fields.append((name.decode(), value.decode()))
    return fields


def test_encode_keeps_a_newline_inside_one_field():
    raw = journal.encode([("MESSAGE", "a\nMAILSHIM_STATUS=sent"), ("PRIORITY", "6")])
    assert parse_datagram(raw) == [("MESSAGE", "a\nMAILSHIM_STATUS=sent"), ("PRIORITY", "6")]


def test_entries_reach_a_datagram_socket_with_their_fields(world: Env, tmp_path):
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    world.env["MAILSHIM_JOURNAL_SOCKET"] = path
    del world.env["MAILSHIM_NO_SYSLOG"]
    try:
        r = world.run("sendmail", ["-odi", "root"], input=CRON)
        assert r.returncode == 0, r.stderr
        entries = []
        while not any(("MAILSHIM_STATUS", "sent") in e for e in entries):
            entries.append(parse_datagram(sock.recv(65536)))
    finally:
        sock.close()
    (_msg,) = world.listener.wait(1)
    first, *_, last = entries
    qid = dict(first)["MAILSHIM_QUEUE_ID"]
    assert dict(first)["MESSAGE"].startswith(f"{qid}: uid={os.getuid()} from=<")
    assert ("SYSLOG_IDENTIFIER", "mailshim") in first
    assert ("SYSLOG_FACILITY", "2") in first
    # the delivery line: both identifiers, the Postfix line as MESSAGE, and its fields
    fields = dict(last)
    assert [v for k, v in last if k == "SYSLOG_IDENTIFIER"] == ["mailshim", "mailshim/smtp"]
    assert fields["MAILSHIM_QUEUE_ID"] == qid
    assert fields["MAILSHIM_RECIPIENT"] == "admin@example.org"
    assert fields["MAILSHIM_RELAY"].startswith("relay[127.0.0.1]:")
    assert fields["MESSAGE"].startswith(f"{qid}: to=<admin@example.org>, relay=relay[127.0.0.1]:")
    assert ", status=sent (250 " in fields["MESSAGE"]
    # notice: mailshim-flush.service keeps only notice and above (LogLevelMax=notice)
    assert fields["PRIORITY"] == "5"


def _can_start_journald() -> str:
    if os.geteuid() != 0:
        return "needs root to mount in a private namespace"
    if not os.path.exists(JOURNALD) or shutil.which("unshare") is None:
        return "systemd-journald or unshare is missing"
    return ""


@pytest.fixture
def journald(tmp_path):
    """A real systemd-journald in its own mount namespace; yields (socket path, pid)."""
    why = _can_start_journald()
    if why:
        if os.environ.get("MAILSHIM_REQUIRE_MONITORING_TOOLS"):
            pytest.fail(f"cannot start systemd-journald here: {why}")
        pytest.skip(why)
    sock_dir = tmp_path / "journal"
    sock_dir.mkdir()
    script = f"""
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log
mount --bind {sock_dir} /run/systemd/journal
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
exec {JOURNALD}
"""
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not (sock_dir / "socket").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"systemd-journald did not start: {err}")
        time.sleep(0.05)
    try:
        yield str(sock_dir / "socket"), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_real_journald_tells_the_story(world: Env, journald, tmp_path):
    path, pid = journald
    world.env["MAILSHIM_JOURNAL_SOCKET"] = path
    del world.env["MAILSHIM_NO_SYSLOG"]
    env = world.env
    r = world.run("sendmail", ["-odi", "root"], input=CRON)
    assert r.returncode == 0, r.stderr
    (_msg,) = world.listener.wait(1)

    def inside(*argv: str) -> subprocess.CompletedProcess[bytes]:
        # journalctl and `mailshim log` see the private journal from inside the namespace
        return subprocess.run(
            ["nsenter", "-t", str(pid), "-m", "--", *argv], capture_output=True, env=env,
            timeout=60,
        )  # fmt: skip

    deadline = time.monotonic() + 20
    while True:
        out = inside("journalctl", "-t", "mailshim", "-o", "json", "--no-pager")
        entries = [json.loads(line) for line in out.stdout.splitlines()]
        if any(e.get("MAILSHIM_STATUS") == "sent" for e in entries):
            break
        assert time.monotonic() < deadline, (out.stdout, out.stderr)
        time.sleep(0.1)
    qid = next(e["MAILSHIM_QUEUE_ID"] for e in entries if "MAILSHIM_QUEUE_ID" in e)
    # journalctl FIELD=value finds the message's whole story, and only it
    story = inside("journalctl", f"MAILSHIM_QUEUE_ID={qid}", "-o", "json", "--no-pager")
    found = [json.loads(line) for line in story.stdout.splitlines()]
    assert len(found) >= 2
    assert all(e["MAILSHIM_QUEUE_ID"] == qid for e in found)
    assert found[0]["MESSAGE"].startswith(f"{qid}: uid=")
    sent = [e for e in found if e.get("MAILSHIM_STATUS") == "sent"]
    assert sent and sent[0]["MAILSHIM_RECIPIENT"] == "admin@example.org"
    # journald shows (and forwards to syslog) the last identifier: pflogsumm's "mailshim/smtp"
    short = inside("journalctl", f"MAILSHIM_QUEUE_ID={qid}", "-o", "short", "--no-pager")
    assert " mailshim/smtp[" in short.stdout.decode()
    # pflogsumm reads journalctl's classic output: the delivery counts (tag mailshim/smtp)
    pflogsumm = shutil.which("pflogsumm")
    if pflogsumm is not None:
        short = inside("journalctl", "-t", "mailshim", "-o", "short", "--no-pager")
        report = subprocess.run(
            [pflogsumm, "--syslog-name=mailshim"], input=short.stdout, capture_output=True
        ).stdout.decode()
        assert re.search(r"^\s+1\s+delivered\s*$", report, re.M), report[:600]
    # mailshim log reads it back through journalctl -o json (no log file configured)
    log = inside(tool("mailshim"), "log", qid)
    assert log.returncode == 0, log.stderr
    lines = log.stdout.decode().splitlines()
    assert lines[0].split(" ", 2)[2].startswith("mailshim[") and f"{qid}: uid=" in lines[0]
    assert any(" mailshim/smtp[" in line and "status=sent" in line for line in lines)


def test_without_the_journal_the_log_file_has_the_tags(world: Env, tmp_path):
    """The journal turned off: the ``[log] file`` gets the same lines, delivery lines tagged
    mailshim/smtp, with an RFC 3339 time. (The syslog path itself, /dev/log, is not checked
    here: it is root's to replace.)"""
    log = tmp_path / "mail.log"
    world.reconfigure(extra=f'[log]\nfile = "{log}"\n')
    world.env["MAILSHIM_JOURNAL_SOCKET"] = ""
    r = world.run("sendmail", ["-odi", "root"], input=CRON)
    assert r.returncode == 0, r.stderr
    world.listener.wait(1)
    lines = log.read_text().splitlines()
    assert " mailshim[" in lines[0]
    sent = [line for line in lines if "status=sent" in line]
    assert len(sent) == 1 and " mailshim/smtp[" in sent[0]
    # RFC 3339 with a colon in the offset: pflogsumm reads nothing else of that form
    stamp = sent[0].split(" ", 1)[0]
    assert stamp[-6] in "+-" and stamp[-3] == ":", stamp


def test_a_long_line_is_cut_on_a_character_not_inside_one(world: Env, journald):
    """A line over MAX_VALUE is cut; cut inside a UTF-8 sequence it was no longer text, and
    journald keeps such a value as a blob ("[blob data]" in journalctl's output). And
    ``mailshim log`` shows it: journalctl -o json gives a field over 4096 bytes as null
    unless --all."""
    path, pid = journald
    qid = "0123456789ABCDEFGHJK"
    line = f"{qid}: x" + "\u20ac" * 20000  # 3 bytes each: MAX_VALUE falls inside one
    env = {**os.environ, "MAILSHIM_JOURNAL_SOCKET": path}
    boot = "import sys; from mailshim import maillog; maillog.log(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", boot, line], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while True:
        out = subprocess.run(
            ["nsenter", "-t", str(pid), "-m", "--", "journalctl", f"MAILSHIM_QUEUE_ID={qid}",
             "-o", "json", "--all", "--no-pager"], capture_output=True, timeout=60,
        )  # fmt: skip
        if out.stdout.strip():
            break
        assert time.monotonic() < deadline, out.stderr
        time.sleep(0.1)
    (entry,) = [json.loads(x) for x in out.stdout.splitlines()]
    message = entry["MESSAGE"]
    assert isinstance(message, str), "stored as a blob"
    assert message.startswith(f"{qid}: x\u20ac") and len(message.encode()) <= journal.MAX_VALUE
    log = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "--", tool("mailshim"), "log", qid],
        capture_output=True, env={**world.env, "MAILSHIM_JOURNAL_SOCKET": path}, timeout=60,
    )  # fmt: skip
    assert log.returncode == 0, log.stderr
    (shown,) = log.stdout.decode().splitlines()
    assert shown.endswith(message), shown[:200]
