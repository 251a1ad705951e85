"""The `mailshim` admin command as a subprocess: help with examples, one-line errors with
sysexits codes, send-test, flush (plain and with a progress bar on a terminal), queue, log.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Env, Listener, free_port

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAILSHIM = str(Path(sys.executable).parent / "mailshim")
QID = "18F2C0A1B3D4E5F6G7H8"
BOUNCE = "18F2C0A1B3D4E5F6ZZZZ"

COMMANDS = [
    ["config"],
    ["check"],
    ["send-test"],
    ["flush"],
    ["queue"],
    ["queue", "list"],
    ["queue", "show"],
    ["queue", "delete"],
    ["queue", "hold"],
    ["queue", "release"],
    ["queue", "retry"],
    ["log"],
    ["sink"],
]


def mailshim(
    world: Env, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MAILSHIM, *args],
        input=b"",
        capture_output=True,
        env=dict(world.env, **(env or {})),
        timeout=60,
    )


def queue_some(world: Env, count: int) -> list[str]:
    world.reconfigure(mode="queue")
    for n in range(count):
        r = world.sendmail("-i", "root", input=f"Subject: m{n}\n\nbody {n}\n".encode())
        assert r.returncode == 0, r.stderr
    return world.queued()


def on_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


# --- help and errors ----------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help_with_examples(world, command):
    r = mailshim(world, *command, "--help")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "Examples:" in text
    example = text.split("Examples:", 1)[1]
    assert f"mailshim {' '.join(command)}" in example or f"mailshim {command[0]}" in example


def test_top_level_help_and_no_arguments(world):
    r = mailshim(world)
    assert r.returncode == 0  # click 8.1 prints the help; 8.2+ would call it an error
    assert b"Commands:" in r.stdout and b"check" in r.stdout and r.stderr == b""
    assert mailshim(world, "--version").stdout.startswith(b"mailshim, version ")


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["check", "--bogus"], "mailshim check: No such option"),
        (["log"], "mailshim: name a queue id, or give --summary"),
        (["nosuch"], "mailshim: No such command"),
        (["queue", "show"], "mailshim: name one or more queue ids, or --all"),
        (["queue", "hold", "NOTANID0000000000000"], "mailshim: no such queue id: NOTANID"),
        (["log", "x y"], "mailshim: 'x y' is not a queue id"),
        (["send-test", "a\tb@example.org"], "mailshim: "),
    ],
)
def test_errors_are_one_line_with_a_sysexits_code(world, args, start):
    r = mailshim(world, *args)
    err = r.stderr.decode()
    assert r.returncode in (64, 65), (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith(start), err
    assert "Traceback" not in err


def test_broken_configuration_is_one_line_and_the_queue_still_lists(world):
    world.config.write_text(world.config.read_text() + "\n[limits]\nuser_window = 'x'\n")
    r = world.sendmail("root", input=b"x\n")
    assert r.returncode == 0, r.stderr
    [qid] = world.queued()
    r = mailshim(world, "queue")
    assert r.returncode == 0 and qid.encode() in r.stdout, r.stdout
    assert r.stderr.decode().count("\n") == 1 and b"user_window" in r.stderr


# --- send-test ------------------------------------------------------------------------


def test_send_test_to_root_shows_the_reply(world):
    r = mailshim(world, "send-test")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert re.search(r"queue id [0-9A-Z]{20}: sent", out)
    assert "<admin@example.org>: 250 2.0.0 Message queued for delivery." in out
    assert ">>> MAIL FROM:<" in err and "<<< 250 2.0.0 Message queued for delivery." in err
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["admin@example.org"]
    assert msg.header("Subject")[0].startswith("mailshim test message from ")
    assert msg.header("To") == ["admin@example.org"]
    assert len(msg.header("Date")) == 1 and len(msg.header("Message-ID")) == 1
    assert world.queued() == []


def test_send_test_refused(world):
    world.listener.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 No such user"
    r = mailshim(world, "send-test", "nobody@example.net")
    assert r.returncode == 67
    assert "<nobody@example.net>: 550 5.1.1 No such user" in r.stdout.decode()
    assert r.stderr.decode().splitlines()[-1] == (
        "mailshim: the listener refused <nobody@example.net>"
    )
    assert world.listener.messages == []


def test_send_test_deferred_stays_queued(tmp_path):
    world = Env(tmp_path, Listener(free_port()))  # nobody listens
    r = mailshim(world, "send-test")
    assert r.returncode == 75
    (qid,) = world.queued()
    last = r.stderr.decode().splitlines()[-1]
    assert last.startswith(f"mailshim: deferred: the message stays queued as {qid}")
    assert "Connection refused" in r.stdout.decode()


# --- flush ----------------------------------------------------------------------------


def test_flush_plain_lines_when_not_a_terminal(world):
    ids = queue_some(world, 3)
    r = mailshim(world, "flush")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[:-1] == [f"{qid}: delivered" for qid in ids]
    assert lines[-1] == "3 delivered."
    assert "\x1b" not in r.stdout.decode() and "\r" not in r.stdout.decode()
    assert len(world.listener.wait(3)) == 3


def test_flush_summary_names_only_what_happened(world):
    ids = queue_some(world, 2)
    r = mailshim(world, "queue", "hold", ids[0])
    assert r.returncode == 0, r.stderr
    r = mailshim(world, "flush")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [
        f"{ids[1]}: delivered",
        "1 delivered, 1 not due yet, held or busy.",
    ]
    mailshim(world, "queue", "delete", ids[0])
    r = mailshim(world, "flush")
    assert r.stdout.decode().splitlines() == ["Nothing to deliver."]


def test_flush_listener_down_says_what_was_not_tried(tmp_path):
    world = Env(tmp_path, Listener(free_port()))
    ids = queue_some(world, 3)
    r = mailshim(world, "flush")
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines == [
        f"{ids[0]}: deferred",
        "1 deferred, 2 not tried (the listener is unreachable).",
    ]
    assert world.queued() == ids


def test_flush_progress_bar_on_a_terminal(world):
    queue_some(world, 2)
    env = dict(world.env, TERM="xterm", COLUMNS="80")
    env.pop("NO_COLOR", None)
    code, out = on_pty([MAILSHIM, "flush"], env)
    assert code == 0, out
    plain = ANSI.sub("", out)
    assert "\r[--------------------] 0/2  0 delivered, 0 deferred, 0 bounced" in plain
    assert "\r[##########----------] 1/2  1 delivered, 0 deferred, 0 bounced" in plain
    assert "\r[####################] 2/2  2 delivered, 0 deferred, 0 bounced" in plain
    last_lines = plain.replace("\r\n", "\n").rstrip().splitlines()[-2:]
    assert last_lines[0].endswith("] 2/2  2 delivered, 0 deferred, 0 bounced")
    assert last_lines[1] == "2 delivered."
    assert "\x1b[32m" in out  # green on a terminal
    queue_some(world, 1)
    code, out = on_pty([MAILSHIM, "flush"], dict(env, NO_COLOR="1"))
    assert code == 0 and "\x1b[3" not in out and "1/1" in out


def test_flush_verbose_shows_the_dialogue_on_stderr(world):
    queue_some(world, 1)
    r = mailshim(world, "flush", "-v")
    assert r.returncode == 0
    assert b">>> DATA" in r.stderr and b"1 delivered" in r.stdout


# --- queue ------------------------------------------------------------------------------


def test_queue_table_json_hold_release_show(world):
    ids = queue_some(world, 2)
    r = mailshim(world, "queue")
    text = r.stdout.decode()
    assert r.returncode == 0
    header, *rows = text.splitlines()
    assert header.split() == ["ID", "AGE", "SIZE", "TRIES", "STATUS", "SENDER", "RECIPIENTS"]
    for qid, row in zip(ids, rows, strict=False):
        assert row.startswith(qid) and " new " in row and row.endswith("admin@example.org")
    assert text.splitlines()[-1] == "2 messages, " + text.splitlines()[-1].split(", ", 1)[1]
    assert text.splitlines()[-1].endswith(": 2 new")
    listed_again = mailshim(world, "queue", "list").stdout.decode().splitlines()
    assert [line.split()[:1] for line in listed_again] == [
        line.split()[:1] for line in text.splitlines()
    ]

    assert mailshim(world, "queue", "hold", ids[0]).stdout == b"hold: 1 entry\n"
    listed = json.loads(mailshim(world, "queue", "--json").stdout)["entries"]
    assert [(e["id"], e["status"], e["held"]) for e in listed] == [
        (ids[0], "held", True),
        (ids[1], "new", False),
    ]
    mailq = world.run("mailq", []).stdout.decode()
    assert f"{ids[0]}!" in mailq and f"{ids[1]}!" not in mailq
    # an id pasted from mailq, "!" and all, is accepted
    assert mailshim(world, "queue", "release", f"{ids[0]}!").returncode == 0
    shown = mailshim(world, "queue", "show", "--all").stdout.decode()
    assert len(re.findall(r"^status: +new$", shown, re.M)) == 2
    assert "Subject: m0" in shown and "Subject: m1" in shown
    assert mailshim(world, "queue", "delete", "--all").stdout == b"delete: 2 entries\n"
    assert mailshim(world, "queue").stdout == b"Mail queue is empty\n"


def test_queue_show_reads_like_a_person_wrote_it(tmp_path):
    world = Env(tmp_path, Listener(free_port()))  # nobody listens: the try fails
    (qid,) = queue_some(world, 1)
    assert mailshim(world, "flush").returncode == 0
    r = mailshim(world, "queue", "show", qid)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    fields = dict(
        (line.split(":", 1)[0], line.split(":", 1)[1].strip())
        for line in text.split("\n\n", 1)[0].splitlines()
        if not line.startswith(" ")
    )
    assert fields["id"] == qid and fields["status"] == "deferred"
    date = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}"
    assert re.fullmatch(date + r" \(\d+s ago\)", fields["arrived"]), fields
    assert re.fullmatch(date + r" \(in (\d+s|1m)\)", fields["next attempt"]), fields
    assert "Connection refused" in fields["last error"]
    assert fields["attempts"] == "1"
    assert re.fullmatch(r"\d+", fields["size"])  # under 1000 bytes: no unit to explain
    assert fields["recipients"] == "admin@example.org"
    # Nothing to say, nothing shown: not held, nothing delivered or failed yet.
    for absent in ("held", "delivered to", "failed", "arrival", "next_attempt"):
        assert absent not in fields, absent
    assert "Subject: m0" in text  # the headers follow
    # --json keeps the raw values.
    (raw,) = json.loads(mailshim(world, "queue", "show", "--json", qid).stdout)["entries"]
    assert raw["id"] == qid and isinstance(raw["arrival"], int) and raw["held"] is False
    assert raw["next_attempt"] > raw["arrival"] and raw["last_error"] == fields["last error"]


# --- log --------------------------------------------------------------------------------

LOG = f"""\
2026-11-23T10:00:00+0000 host mailshim[100]: {QID}: uid=0 from=<root@example.org> size=300 nrcpt=1 (queued in /var/spool/mailshim)
2026-11-23T10:00:01+0000 host mailshim[101]: 18F2C0A1B3D4E5F6AAAA: uid=0 from=<x@example.org> size=1 nrcpt=1 (queued in /var/spool/mailshim)
2026-11-23T10:00:02+0000 host mailshim[101]: {QID}: to=<admin@example.org>, relay=relay[127.0.0.1]:10025, delay=0.1, status=deferred (451 4.3.0 later)
2026-11-23T14:00:02+0000 host mailshim[102]: {QID}: to=<admin@example.org>, relay=relay[127.0.0.1]:10025, delay=4h, status=bounced (550 5.1.1 no such user)
2026-11-23T14:00:02+0000 host mailshim[102]: {QID}: sender non-delivery notification: {BOUNCE}
2026-11-23T14:00:03+0000 host mailshim[102]: {BOUNCE}: to=<root@example.org>, relay=relay[127.0.0.1]:10025, delay=1, status=sent (250 ok)
2026-11-23T14:00:04+0000 host postfix/smtpd[7]: unrelated line
"""  # noqa: E501


def test_log_from_a_file_follows_the_bounce(world, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text(LOG)
    r = mailshim(world, "log", QID, "--file", str(log))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 5
    assert "AAAA" not in r.stdout.decode() and "unrelated" not in r.stdout.decode()
    assert lines[-1].endswith(f"{BOUNCE}: to=<root@example.org>, relay=relay[127.0.0.1]:10025,"
                              " delay=1, status=sent (250 ok)")  # fmt: skip
    # a prefix works, and so does an id pasted from mailq with its "!"
    assert mailshim(world, "log", QID[:17], "--file", str(log)).stdout == r.stdout
    assert mailshim(world, "log", QID + "!", "--file", str(log)).stdout == r.stdout


def test_log_not_found_and_unreadable(world, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text(LOG)
    r = mailshim(world, "log", "0000000000000ABCDEFG", "--file", str(log))
    assert r.returncode == 66
    assert r.stderr.decode() == f"mailshim: no log line mentions 0000000000000ABCDEFG in {log}\n"
    r = mailshim(world, "log", QID, "--file", str(tmp_path / "missing.log"))
    assert r.returncode == 66 and b"No such file or directory" in r.stderr


def _fake_journalctl(tmp_path: Path, body: str) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "journalctl"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_log_from_the_journal(world, tmp_path):
    # journalctl -o json's shape: one object per line; a repeated field is a list, the last
    # value is the one shown (the real journald: tests/test_journal.py)
    entries = []
    for n, line in enumerate(LOG.splitlines()):
        _stamp, host, tag, message = line.split(" ", 3)
        ident, _, pid = tag.rstrip(":").rstrip("]").partition("[")
        idents = ["mailshim", ident] if ident.startswith("mailshim/") else ident
        entries.append(
            {
                "__REALTIME_TIMESTAMP": str(1796000000000000 + n),
                "_HOSTNAME": host,
                "SYSLOG_IDENTIFIER": idents,
                "SYSLOG_PID": pid,
                "MESSAGE": message,
            }
        )
    (tmp_path / "journal.txt").write_text("".join(json.dumps(e) + "\n" for e in entries))
    calls = tmp_path / "calls"
    env = _fake_journalctl(tmp_path, f'echo "$*" > {calls}\ncat {tmp_path / "journal.txt"}\n')
    r = mailshim(world, "log", QID, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 5
    assert lines[-1].endswith(f"{BOUNCE}: to=<root@example.org>, relay=relay[127.0.0.1]:10025,"
                              " delay=1, status=sent (250 ok)")  # fmt: skip
    assert calls.read_text().split() == [
        "-t", "mailshim", "-t", "mailshim/smtp", "--no-pager", "-o", "json", "--all"
    ]  # fmt: skip


def test_log_when_the_journal_fails(world, tmp_path):
    env = _fake_journalctl(tmp_path, "echo 'No journal files were found.' >&2\nexit 1\n")
    r = mailshim(world, "log", QID, env=env)
    # the journal is skipped; the mail log files (absent here, or without this id) are read
    assert r.returncode == 66
    assert "journal" not in r.stderr.decode()
    assert r.stderr.decode().startswith(f"mailshim: no log line mentions {QID} in ")


# --- config still works --------------------------------------------------------------------


def test_config_command(world):
    r = mailshim(world, "config")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert text.startswith(f"# configuration file: {world.config}")
    assert re.search(r"^aliases\.root\s+admin@example.org\s+# file ", text, re.M)
    doc = json.loads(mailshim(world, "config", "--json").stdout)
    assert doc["values"]["addresses.domain"] == {
        "value": "example.org",
        "source": f"file {world.config}",
    }


def test_flush_with_output_nowhere_to_go_is_an_error_in_one_line(world):
    """stdout on a full device: the messages still go, and the exit status says the report
    could not be written (the buffered progress lines included)."""
    ids = queue_some(world, 3)
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [MAILSHIM, "flush"], stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE,
            env=world.env, timeout=60,
        )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 74 and len(err.splitlines()) == 1, err
    assert err.startswith("mailshim: cannot write the output: No space left")
    assert len(world.listener.wait(len(ids))) == len(ids) and world.queued() == []


def test_flush_into_a_closed_pipe_still_delivers_everything(world):
    ids = queue_some(world, 3)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        r = subprocess.run(
            [MAILSHIM, "flush"], stdin=subprocess.DEVNULL, stdout=write, stderr=subprocess.PIPE,
            env=world.env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert r.returncode == 0 and r.stderr == b""
    assert len(world.listener.wait(len(ids))) == len(ids) and world.queued() == []
