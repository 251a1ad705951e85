"""The queue views: `mailq`'s Postfix layout and `mailshim queue`'s table, ages and sizes,
colour only on a terminal and never with NO_COLOR; `mailq` itself run on a pseudo-terminal.
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
from hypothesis import given
from hypothesis import strategies as st

from conftest import Env, free_port
from conftest import Listener as SimpleListener
from mailshim import queueview, spool
from mailshim.reply import Reply
from mailshim.spoolfmt import Envelope, State

NOW = 1_800_000_000.0
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
QID = "18F2C0A1B3D4E5F6G7H8"


def item(
    qid: str = QID,
    size: int = 1234,
    age: float = 11520,
    sender: str = "alice@example.org",
    rcpts: tuple[str, ...] = ("admin@example.org",),
    state: State | None = None,
) -> queueview.Item:
    env = Envelope(qid, sender, list(rcpts), int(NOW - age), 0, size=size)
    return queueview.Item(spool.Spool("/nonexistent"), qid, env, state)


def deferred(error: str = "451 4.3.0 try later", attempts: int = 2, next_in: int = 1620) -> State:
    st_ = State()
    st_.attempts = attempts
    st_.last_error = error
    st_.next_attempt = int(NOW + next_in)
    st_.pending = {"admin@example.org": Reply.from_legacy(error)}
    return st_


# --- ages and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42, "42s"), (60, "1m"), (420, "7m"), (3600, "1h"), (11520, "3h12m"),
     (86400, "1d"), (187200, "2d4h"), (-5, "0s")],
)  # fmt: skip
def test_age(seconds, text):
    assert queueview.age(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_age_is_short_and_shaped(seconds):
    text = queueview.age(seconds)
    assert re.fullmatch(r"\d+s|\d+m|\d+h(\d\dm)?|\d+d(\d+h)?", text)
    assert len(text) <= 9


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**6))
def test_age_never_goes_backwards_in_units(a, b):
    order = "smhd"
    first, second = queueview.age(a), queueview.age(a + b)
    unit = lambda t: order.index(next(c for c in t if c.isalpha()))  # noqa: E731
    assert unit(first) <= unit(second)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (812, "812"), (999, "999"), (1234, "1.2K"), (34_000, "33K"), (5_900_000, "5.6M"),
     (1_200_000_000, "1.1G")],
)  # fmt: skip
def test_human_size(size, text):
    assert queueview.human_size(size) == text


# --- mailq's layout ---------------------------------------------------------------------


def test_empty_queue():
    assert queueview.format_listing([], NOW) == "Mail queue is empty\n"
    assert queueview.format_table([], NOW) == "Mail queue is empty\n"


def test_postfix_layout_one_message():
    text = queueview.format_listing([item()], NOW)
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-") and lines[0].endswith("-Sender/Recipient-------")
    assert lines[1].split() == [QID, "1234", "3h12m", "alice@example.org"]
    assert lines[2].strip() == "admin@example.org"
    # recipients start where the sender does
    assert lines[2].index("admin") == lines[1].index("alice")
    assert lines[-1] == "-- 2 Kbytes in 1 Request."
    assert lines[-2] == ""


def test_postfix_layout_held_deferred_and_partial():
    held = State()
    held.held = True
    partial = deferred()
    partial.done = {"bob@example.org": Reply(250, "ok")}
    partial.failed = {"carol@example.org": Reply(550, "5.1.1 no such user")}
    items = [
        item(qid="18F2C0A1B3D4E5F6G7H8", state=held),
        item(
            qid="18F2C0A1B3D4E5F6G7H9",
            state=partial,
            rcpts=("admin@example.org", "bob@example.org", "carol@example.org"),
            sender="",
        ),
    ]
    text = queueview.format_listing(items, NOW)
    assert "18F2C0A1B3D4E5F6G7H8!" in text  # Postfix marks held entries with "!"
    assert "(held: no delivery until released)" in text
    assert "(451 4.3.0 try later) [next try in 27m]" in text
    assert "bob@example.org (delivered)" in text
    assert "carol@example.org (failed: 550 5.1.1 no such user)" in text
    assert "MAILER-DAEMON" in text  # the null sender, as Postfix shows it
    assert text.splitlines()[-1] == "-- 3 Kbytes in 2 Requests."


def test_hostile_fields_stay_on_one_line():
    st_ = deferred(error="451 bad\r\nX-Injected: yes")
    text = queueview.format_listing([item(sender="a\nb@example.org", state=st_)], NOW)
    assert "\nX-Injected" not in text and "\nb@example.org" not in text


def test_unreadable_entry_is_listed():
    broken = queueview.Item(spool.Spool("/x"), QID, None, None, "bad magic")
    text = queueview.format_listing([broken], NOW)
    assert "(unreadable: bad magic)" in text
    assert "unreadable: bad magic" in queueview.format_table([broken], NOW)
    assert broken.as_dict()["status"] == "unreadable"


# --- mailshim queue's table ----------------------------------------------------------------


def test_table_columns_are_aligned():
    items = [
        item(qid="18F2C0A1B3D4E5F6G7H8", size=512, age=42),
        item(qid="18F2C0A1B3D4E5F6G7H9", size=5_900_000, age=187200, state=deferred(),
             rcpts=("a@example.org", "b@example.org", "c@example.org")),
    ]  # fmt: skip
    lines = queueview.format_table(items, NOW).splitlines()
    header, first, second, error = lines[0], lines[1], lines[2], lines[3]
    for column in ("AGE", "SIZE", "TRIES"):  # right-aligned: ends line up
        end = header.index(column) + len(column)
        assert first[end - 1] != " " and second[end - 1] != " ", column
    for column in ("STATUS", "SENDER", "RECIPIENTS"):  # left-aligned: starts line up
        start = header.index(column)
        assert first[start] != " " and second[start] != " " and first[start - 1] == " "
    assert "new" in first and "deferred, next in 27m" in second
    assert second.rstrip().endswith("a@example.org +2")
    assert error.strip() == "451 4.3.0 try later"
    assert error.index("451") == len(QID) + 2  # under the columns after the id
    assert lines[-1] == "2 messages, 5.6M: 1 deferred, 1 new"


def test_status_words():
    assert item().status == "new"
    assert item(state=deferred()).status == "deferred"
    held = deferred()
    held.held = True
    assert item(state=held).status == "held"
    part = deferred()
    part.done = {"x@example.org": Reply(250, "")}
    assert item(state=part).status == "partial"


# --- colour ------------------------------------------------------------------------------


class FakeTTY:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert queueview.use_color(FakeTTY(True))
    assert not queueview.use_color(FakeTTY(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not queueview.use_color(FakeTTY(True))
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    assert queueview.use_color(FakeTTY(True))
    monkeypatch.setenv("TERM", "dumb")
    assert not queueview.use_color(FakeTTY(True))


def test_colour_changes_nothing_but_escapes():
    items = [item(state=deferred()), item(qid="18F2C0A1B3D4E5F6G7H9")]
    for fmt in (queueview.format_listing, queueview.format_table):
        plain = fmt(items, NOW, False)
        coloured = fmt(items, NOW, True)
        assert "\x1b[" not in plain and "\x1b[" in coloured
        assert ANSI.sub("", coloured) == plain


def _on_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    return proc.wait(timeout=30), out.decode("utf-8", "replace")


@pytest.fixture
def queued_world(tmp_path):
    world = Env(tmp_path, SimpleListener(free_port()))  # nobody listens
    world.reconfigure(mode="queue")
    for n in range(2):
        r = world.sendmail("-i", "root", input=f"Subject: {n}\n\nbody\n".encode())
        assert r.returncode == 0, r.stderr
    return world


def test_mailq_on_a_terminal_is_coloured_unless_no_color(queued_world):
    mailq = str(Path(sys.executable).parent / "mailq")
    env = dict(queued_world.env, TERM="xterm")
    env.pop("NO_COLOR", None)
    code, out = _on_pty([mailq], env)
    assert code == 0
    assert "\x1b[1m" in out  # ids in bold
    assert out.replace("\r\n", "\n").rstrip().endswith("in 2 Requests.")
    code, out = _on_pty([mailq], dict(env, NO_COLOR="1"))
    assert code == 0 and "\x1b[" not in out and "in 2 Requests." in out


def test_mailq_through_a_pipe_is_plain(queued_world):
    r = queued_world.run("mailq", [])
    text = r.stdout.decode()
    assert r.returncode == 0 and "\x1b[" not in text
    for qid in queued_world.queued():
        assert qid in text
    assert text.splitlines()[-1] == "-- 1 Kbytes in 2 Requests."
    assert text.count("admin@example.org") == 2


def test_mail_that_waits_for_an_unreachable_listener_is_not_listed_as_new(tmp_path, listener):
    """Issue 23 item 6: entries that arrived while the listener was down were listed as
    "0 new" until a pass tried them. A pass that finds it unreachable marks the spool (the
    agent's mark, now also a run's and a flush's); what was never tried meanwhile is
    "waiting" for the listener, with its next try, and "new" again once it answers."""
    world = Env(tmp_path, listener)
    world.reconfigure(mode="queue", port=free_port())
    first = world.sendmail("-i", "a@example.org", input=b"Subject: 1\n\nbody\n")
    assert first.returncode == 0, first.stderr
    r = world.run("mailshim", ["run"])
    assert r.returncode == 0, r.stderr.decode()
    r = world.sendmail("-i", "b@example.org", input=b"Subject: 2\n\nbody\n")
    assert r.returncode == 0, r.stderr
    tried, fresh = world.queued()

    r = world.run("mailshim", ["queue", "--json"])
    rows = {row["id"]: row for row in json.loads(r.stdout)["entries"]}
    assert rows[tried]["status"] == "deferred"
    assert rows[fresh]["status"] == "waiting" and rows[fresh]["next_attempt"] > 0
    text = world.run("mailshim", ["queue"]).stdout.decode()
    assert "waiting, next" in text and "the listener was unreachable" in text
    assert "1 deferred, 1 waiting" in text
    mailq = world.run("mailq", []).stdout.decode()
    block = mailq[mailq.index(fresh) :]
    assert "(not tried yet: the listener was unreachable" in block.splitlines()[1]
    assert "[next try" in block.splitlines()[1]
    show = world.run("mailshim", ["queue", "show", fresh]).stdout.decode()
    assert "status:" in show and "waiting" in show and "next attempt:" in show

    # The listener answers: a delivery clears the mark, nothing is "waiting" any more.
    world.reconfigure(mode="queue")
    r = world.run("mailshim", ["flush"])
    assert r.returncode == 0, r.stderr.decode()
    assert world.queued() == [] and len(listener.messages) == 2
    r = world.sendmail("-i", "c@example.org", input=b"Subject: 3\n\nbody\n")
    rows = json.loads(world.run("mailshim", ["queue", "--json"]).stdout)["entries"]
    assert [row["status"] for row in rows] == ["new"]


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_json_values, st.sampled_from(["", "    "]))
def test_the_json_listing_writes_what_json_with_an_indent_writes(value, indent):
    """``queue --json`` writes each item with indented_json (json's C encoder for the text):
    the same text as ``json.dumps(value, indent=2)``, every line after the first indented."""
    assert queueview.indented_json(value, indent) == json.dumps(value, indent=2).replace(
        "\n", "\n" + indent
    )
