"""spoolfmt: the entry and state formats, strict decoding, the drop-folder line-end normaliser."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailshim import spoolfmt
from mailshim.errors import DataError
from mailshim.reply import Reply
from mailshim.spoolfmt import Envelope, LineEnds, State

QID = "0645F1A2B3C4DK3J9QXA"


def entry(**kw) -> bytes:
    env = Envelope(
        kw.get("qid", QID),
        kw.get("sender", "a@example.org"),
        kw.get("recipients", ["b@example.org", "c@example.org"]),
        kw.get("arrival", 1_700_000_000),
        kw.get("uid", 1000),
        kw.get("eightbit", False),
        kw.get("size", 5),
    )
    return spoolfmt.encode_envelope(env).data + b"hi\r\n\r\n"[: kw.get("size", 5)]


def test_round_trip_and_offset():
    raw = entry()
    env, offset = spoolfmt.decode_envelope(io.BytesIO(raw))
    assert (env.queue_id, env.sender, env.recipients, env.uid, env.size) == (
        QID, "a@example.org", ["b@example.org", "c@example.org"], 1000, 5,
    )  # fmt: skip
    assert raw[offset:] == b"hi\r\n\r"


def test_patched_size_and_body_type_read_back():
    env = Envelope(QID, "", ["x@example.org"], 1, 0)
    enc = spoolfmt.encode_envelope(env)
    data = bytearray(enc.data)
    digits, body = spoolfmt.patch_size_and_body(123, True)
    data[enc.size_offset : enc.size_offset + len(digits)] = digits
    at = spoolfmt.body_type_offset(enc.size_offset)
    data[at : at + 4] = body
    got, _ = spoolfmt.decode_envelope(io.BytesIO(bytes(data)))
    assert got.size == 123 and got.eightbit and got.sender == ""


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.replace(b"MAILSHIM-ENTRY 1", b"MAILSHIM-ENTRY 3"),
        # version 1 has no failed records; version 2's must name a recipient, after them
        lambda b: b.replace(b"\n\n", b"\nfailed b@example.org\t550 no\n\n", 1),
        lambda b: b.replace(b"MAILSHIM-ENTRY 1", b"MAILSHIM-ENTRY 2").replace(
            b"\n\n", b"\nfailed z@example.org\t550 no\n\n", 1
        ),
        lambda b: b.replace(b"MAILSHIM-ENTRY 1", b"MAILSHIM-ENTRY 2").replace(
            b"rcpt c@", b"failed b@example.org\t550 no\nrcpt c@"
        ),
        lambda b: b.replace(b"arrival ", b"arrivel "),
        lambda b: b.replace(b"uid 1000", b"uid -1"),
        lambda b: b.replace(b"body 7bit", b"body 9bit"),
        lambda b: b.replace(b"rcpt b@", b"rcpx b@"),
        lambda b: b.replace(b"id " + QID.encode(), b"id ../../etc/passwd"),
        lambda b: b.replace(b"sender a@example.org\n", b""),  # records out of order
        lambda b: b.replace(b"rcpt b@example.org\nrcpt c@example.org\n", b""),  # no recipients
        lambda b: b[:40],  # truncated
    ],
)
def test_anything_but_the_exact_records_is_refused(mutate):
    with pytest.raises(DataError):
        spoolfmt.decode_envelope(io.BytesIO(mutate(entry())))


def test_fields_that_would_break_the_format_are_refused():
    for bad in ("a\nrcpt evil@example.org", "a\rb", "a\x00b", "x" * 5000):
        with pytest.raises(DataError):
            spoolfmt.encode_envelope(Envelope(QID, bad, ["b@example.org"], 1, 0))


def test_queue_ids_are_safe_file_names():
    assert spoolfmt.valid_id(QID)
    for bad in ("", "short", QID.lower(), QID[:-1] + "/", QID[:-1] + ".", "." * 20, QID + "A"):
        assert not spoolfmt.valid_id(bad)
    # letters and digits beyond ASCII (str.isalnum() takes them), one lower-case letter
    for bad in (QID[:-1] + "\u0663", QID[:-1] + "\uff21", QID[:-1] + "\u00c9", QID[:-1] + "z"):
        assert not spoolfmt.valid_id(bad)


def test_temp_names_are_never_queue_ids():
    for kind in ("tmp", "poke"):
        name = spoolfmt.temp_name(QID, "ABCDEFGHJK23", kind)
        assert spoolfmt.is_temp_name(name) and not spoolfmt.valid_id(name)
    assert not spoolfmt.is_temp_name(QID) and not spoolfmt.is_temp_name(".x.tmp")
    assert not spoolfmt.is_temp_name(f".{QID}.tmp")  # the old, guessable name
    assert not spoolfmt.is_temp_name(f".{QID}.ABCDEFGHJK23.exe")


def test_failed_records_round_trip_as_version_2():
    env = Envelope(QID, "a@example.org", ["b@example.org", "c@example.org"], 1, 1000)
    plain = spoolfmt.encode_envelope(env).data
    env.failed = {"c@example.org": "550 5.1.1 no such user"}
    data = spoolfmt.encode_envelope(env).data
    assert plain.startswith(b"MAILSHIM-ENTRY 1\n") and data.startswith(b"MAILSHIM-ENTRY 2\n")
    back, _ = spoolfmt.decode_envelope(io.BytesIO(data))
    assert back.failed == env.failed and back.recipients == env.recipients


def test_state_round_trip_with_every_field():
    state = State()
    state.attempts, state.throttled, state.first_attempt = 3, 2, 10
    state.last_attempt, state.next_attempt = 20, 30
    state.held, state.warned, state.last_error = True, True, "451 4.3.0 later"
    state.bounce_id = QID
    state.done = {"a@x": Reply(250, "2.0.0 ok")}
    state.failed = {"b@x": Reply(550, "no")}
    state.pending = {"c@x": Reply(0, "timed out", kind="timeout")}
    state.expired = ["b@x"]
    again = spoolfmt.decode_state(spoolfmt.encode_state(state))
    for name in State.__slots__:
        assert getattr(again, name) == getattr(state, name), name


def test_version_1_state_files_read_their_replies_from_text():
    # Before replies were stored as fields, a state file held str(reply): an upgrade keeps
    # every recipient's result, split into the same fields a fresh reply has.
    raw = (
        b'{"format": "MAILSHIM-STATE 1", "done": {"a@x": "250 2.0.0 Ok: queued"},'
        b' "failed": {"b@x": "550 5.1.1 No such user", "c@x": "554 rejected"},'
        b' "pending": {"d@x": "connect to relay[127.0.0.1]:25: Connection refused"}}'
    )
    state = spoolfmt.decode_state(raw)
    assert state.done == {"a@x": Reply(250, "2.0.0 Ok: queued")}
    assert state.failed["b@x"].enhanced == "5.1.1" and state.failed["b@x"].text == "No such user"
    assert state.failed["c@x"] == Reply(554, "rejected") and state.failed["c@x"].enhanced == ""
    pending = state.pending["d@x"]
    assert pending.code == 0 and pending.kind == "" and "Connection refused" in pending.text
    # Written again, it is in the new form and reads back the same.
    again = spoolfmt.decode_state(spoolfmt.encode_state(state))
    assert b'"MAILSHIM-STATE 2"' in spoolfmt.encode_state(state)
    assert (again.done, again.failed, again.pending) == (state.done, state.failed, state.pending)


def test_replies_are_stored_as_fields():
    state = State()
    state.failed = {"b@x": Reply(550, "5.1.1 No such user")}
    state.pending = {"c@x": Reply(0, "no reply after the final dot", kind="unanswered")}
    raw = json.loads(spoolfmt.encode_state(state))
    assert raw["failed"] == {"b@x": {"code": 550, "enhanced": "5.1.1", "text": "No such user"}}
    assert raw["pending"]["c@x"] == {
        "code": 0,
        "kind": "unanswered",
        "text": "no reply after the final dot",
    }


def test_old_state_files_without_the_new_fields_still_read():
    state = spoolfmt.decode_state(b'{"format": "MAILSHIM-STATE 1", "attempts": 2}')
    assert state.attempts == 2 and state.throttled == 0 and state.bounce_id == ""
    assert state.expired == []


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"format": "OTHER"}',
        b'{"format": "MAILSHIM-STATE 1", "attempts": -1}',
        b'{"format": "MAILSHIM-STATE 1", "held": 1}',
        b'{"format": "MAILSHIM-STATE 1", "bounce_id": "../x"}',
        b'{"format": "MAILSHIM-STATE 1", "expired": "a@x"}',
        b'{"format": "MAILSHIM-STATE 1", "done": {"a": 1}}',
        b'{"format": "MAILSHIM-STATE 2", "done": {"a": "250 ok"}}',
        b'{"format": "MAILSHIM-STATE 2", "done": {"a": {"code": 250}}}',
        b'{"format": "MAILSHIM-STATE 2", "done": {"a": {"code": 99, "text": ""}}}',
        b'{"format": "MAILSHIM-STATE 2", "done": {"a": {"code": 250, "text": "", "x": 1}}}',
        b'{"format": "MAILSHIM-STATE 2", "failed": {"a": {"code": 550, "text": "",'
        b' "enhanced": "4.1.1"}}}',
        b'{"format": "MAILSHIM-STATE 2", "pending": {"a": {"code": 0, "text": "",'
        b' "kind": "made-up"}}}',
        b'{"format": "MAILSHIM-STATE 2", "pending": {"a": {"code": 451, "text": "",'
        b' "kind": "timeout"}}}',
        b'{"format": "MAILSHIM-STATE 1", "done": ' + b"[" * 100000,
    ],
)
def test_damaged_state_is_a_data_error(raw):
    with pytest.raises(DataError):
        spoolfmt.decode_state(raw)


def test_open_recipients_leave_out_done_and_failed():
    env = Envelope(QID, "a@x", ["1@x", "2@x", "3@x"], 1, 0)
    state = State()
    state.done["1@x"] = Reply(250, "")
    state.failed["3@x"] = Reply(550, "")
    assert state.open_recipients(env) == ["2@x"]


# --- LineEnds: drop-folder entries are normalised to CRLF ---------------------------------


def _normalise(data: bytes) -> bytes:
    out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_line_ends_in_any_chunking_equal_normalising_the_whole(data, cuts):
    ends = LineEnds()
    out = b""
    pos = 0
    for cut in cuts:
        out += ends.feed(data[pos : pos + cut])
        pos += cut
    out += ends.feed(data[pos:]) + ends.end()
    assert out == _normalise(data)
    # no bare CR or LF is left
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r")


@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_crlf_messages_pass_unchanged(lines):
    data = b"".join(line + b"\r\n" for line in lines)
    ends = LineEnds()
    assert ends.feed(data) + ends.end() == data
