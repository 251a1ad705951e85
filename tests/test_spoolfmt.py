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
VIEW = "0645F1A2B3C5AK3J9QXB"  # another valid id: a drop entry's status/ view


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
    with pytest.raises(DataError):  # the listings' decoder of a head read at once
        spoolfmt.decode_envelope_head(mutate(entry()))


def _decoded(decode, raw: bytes) -> object:
    try:
        env = decode(raw)
    except DataError as exc:
        return ("refused", exc.message)
    return (env.queue_id, env.sender, env.recipients, env.arrival, env.uid, env.eightbit,
            env.size, env.failed)  # fmt: skip


def _slow(raw: bytes) -> Envelope:
    return spoolfmt.decode_envelope(io.BytesIO(raw))[0]


# What an edit puts in: the bytes and words the record reader looks for.
_PIECES = [b"\r", b"\x00", b"\n", b"\n\n", b" ", b"x", b"\t", b"failed ", b"rcpt ", b"9", b"\xff"]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 400),
            st.integers(0, 3),
            st.lists(st.sampled_from(_PIECES), max_size=2).map(b"".join) | st.binary(max_size=2),
        ),
        max_size=4,
    ),
    st.sampled_from([1, 2]),
)
def test_the_head_decoder_takes_and_refuses_exactly_what_the_record_reader_does(edits, version):
    """decode_envelope_head (listings: one split) against decode_envelope (a readline per
    record): the same envelope or the same refusal, for entries damaged byte by byte."""
    raw = entry(recipients=["b@example.org", "c@example.org", "d@\xe9xample.org"])
    if version == 2:
        raw = raw.replace(b"ENTRY 1", b"ENTRY 2").replace(
            b"\n\n", b"\nfailed c@example.org\t550 no\n\n", 1
        )
    data = bytearray(raw)
    for at, cut, insert in edits:
        at = min(at, len(data))
        data[at : at + cut] = insert
    assert _decoded(spoolfmt.decode_envelope_head, bytes(data)) == _decoded(_slow, bytes(data))


@pytest.mark.parametrize(
    "raw",
    [
        # a record just under the limit of the record reader, at it, and over it
        entry().replace(b"rcpt c@example.org", b"rcpt " + b"x" * 4090),
        entry().replace(b"rcpt c@example.org", b"rcpt " + b"x" * 4091),
        entry().replace(b"rcpt c@example.org", b"rcpt " + b"x" * 5000),
        entry(sender=""),
        entry().replace(b"sender a", b"sender \ra"),
        entry().replace(b"rcpt c@", b"rcpt \x00c@"),
        entry().replace(b"rcpt c@example.org", b"rcpt "),
        entry(uid=0, arrival=0, size=0),
        entry()[: entry().index(b"\n\n") + 1],  # no blank line: truncated
    ],
)
def test_the_head_decoder_agrees_at_the_edges(raw):
    assert _decoded(spoolfmt.decode_envelope_head, raw) == _decoded(_slow, raw)


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
    state.bounce_id, state.relay_wait, state.view = QID, True, VIEW
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


# --- a hand-made entry: a CR or a NUL alone is enough to refuse it ------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.replace(b"sender a@example.org", b"sender a@exa\rmple.org"),
        lambda b: b.replace(b"sender a@example.org", b"sender a@exa\x00mple.org"),
        lambda b: b.replace(b"id " + QID.encode(), b"id " + QID.encode() + b"\r"),
        lambda b: b.replace(b"rcpt b@example.org", b"rcpt b@example.org\r"),
        lambda b: b.replace(b"rcpt b@example.org", b"rcpt b@exam\x00ple.org"),
        lambda b: b.replace(b"rcpt c@example.org", b"rcpt c@example.org\rDATA"),
    ],
)
def test_a_lone_cr_or_nul_in_any_record_is_refused(mutate):
    """Record values end up in SMTP commands: a CR alone (no LF) or a NUL alone is refused."""
    raw = mutate(entry())
    assert raw != entry()
    with pytest.raises(DataError):
        spoolfmt.decode_envelope(io.BytesIO(raw))


@pytest.mark.parametrize("bad", ["a\rb", "a\x00b", "a\nb"])
def test_a_recipient_with_a_cr_lf_or_nul_cannot_be_written(bad):
    with pytest.raises(DataError, match="recipient cannot be stored"):
        spoolfmt.encode_envelope(Envelope(QID, "a@x", [bad], 1, 0))


def test_record_length_limit_when_writing():
    fits = "x" * (spoolfmt.MAX_RECORD - 16)
    env = Envelope(QID, fits, [fits], 1, 0)
    back, _ = spoolfmt.decode_envelope(io.BytesIO(spoolfmt.encode_envelope(env).data))
    assert back.sender == fits and back.recipients == [fits]
    with pytest.raises(DataError, match="sender cannot be stored"):
        spoolfmt.encode_envelope(Envelope(QID, fits + "x", ["b@x"], 1, 0))


# --- sizes: up to 15 digits -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 149, 150, 151, 10**6, 10**9, 10**15 - 1])
def test_every_size_the_format_holds_is_accepted(size):
    digits, body = spoolfmt.patch_size_and_body(size, False)
    assert digits == b"%015d" % size and body == b"7bit"


@pytest.mark.parametrize("size", [-1, 10**15])
def test_sizes_beyond_the_format_are_refused(size):
    with pytest.raises(DataError, match="too large"):
        spoolfmt.patch_size_and_body(size, True)


def test_the_body_type_sits_after_the_size_digits():
    enc = spoolfmt.encode_envelope(Envelope(QID, "", ["x@x"], 1, 0))
    at = spoolfmt.body_type_offset(enc.size_offset)
    assert enc.data[enc.size_offset : enc.size_offset + 15] == b"0" * 15
    assert at == enc.size_offset + 21 and enc.data[at : at + 4] == b"7bit"


def test_an_eightbit_envelope_says_so():
    env = Envelope(QID, "a@x", ["b@x"], 1, 0, eightbit=True, size=7)
    data = spoolfmt.encode_envelope(env).data
    assert b"\nbody 8bit\n" in data and b"\nsize 000000000000007\n" in data
    back, _ = spoolfmt.decode_envelope(io.BytesIO(data + b"message"))
    assert back.eightbit and back.size == 7


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"size 000000000000005", b"size 00000000000005"),  # 14 digits
        (b"size 000000000000005", b"size 0000000000000005"),  # 16 digits
        (b"size 000000000000005", b"size 00000000000000x"),
        (b"arrival 1700000000", b"arrival +1700000000"),
        (b"arrival 1700000000", b"arrival 1" + b"0" * 20),  # 21 digits
        (b"uid 1000", b"uid \xd9\xa1"),  # an Arabic-Indic digit one
        (b"uid 1000", b"uid "),
        (b"rcpt b@example.org", b"rcpt "),
        (b"MAILSHIM-ENTRY 1\n", b"MAILSHIM-ENTRY 1 \n"),
    ],
)
def test_numbers_and_records_must_be_exact(old, new):
    raw = entry()
    assert old in raw
    with pytest.raises(DataError):
        spoolfmt.decode_envelope(io.BytesIO(raw.replace(old, new, 1)))


def test_twenty_digit_numbers_still_read():
    raw = entry().replace(b"arrival 1700000000", b"arrival " + b"1" * 20)
    env, _ = spoolfmt.decode_envelope(io.BytesIO(raw))
    assert env.arrival == int("1" * 20)


def test_envelope_size_limit(monkeypatch):
    data = spoolfmt.encode_envelope(Envelope(QID, "a@x", ["b@x", "c@x"], 1, 0)).data
    # the recipient records and the blank line: "rcpt b@x\n" "rcpt c@x\n" "\n" = 19 bytes
    monkeypatch.setattr(spoolfmt, "MAX_ENVELOPE", 19)
    assert spoolfmt.decode_envelope(io.BytesIO(data))[0].recipients == ["b@x", "c@x"]
    monkeypatch.setattr(spoolfmt, "MAX_ENVELOPE", 18)
    with pytest.raises(DataError) as info:
        spoolfmt.decode_envelope(io.BytesIO(data))
    assert info.value.message == "envelope larger than the spool format allows"


def test_the_message_offset_is_just_after_the_blank_line():
    raw = entry()
    env, offset = spoolfmt.decode_envelope(io.BytesIO(raw))
    assert raw[offset - 2 : offset] == b"\n\n" and raw[offset:] == b"hi\r\n\r"
    assert spoolfmt.encode_envelope(env).body_offset == offset


# --- failed records (version 2) -----------------------------------------------------------


def v2(extra: bytes) -> bytes:
    return (
        entry()
        .replace(b"MAILSHIM-ENTRY 1", b"MAILSHIM-ENTRY 2")
        .replace(b"\n\n", b"\n" + extra + b"\n\n", 1)
    )


@pytest.mark.parametrize(
    "extra",
    [
        b"failed b@example.org 550 no tab",
        b"failed b@example.org\t",
        b"failed b@example.org\t550 no\nfailed b@example.org\t550 again",
        b"failed b@example.org\t550 no\nrcpt d@example.org",
        b"failed b@example.org\t550 \x00",
    ],
)
def test_damaged_failed_records_are_refused(extra):
    with pytest.raises(DataError):
        spoolfmt.decode_envelope(io.BytesIO(v2(extra)))


def test_failed_records_read_back_with_tabs_in_the_reply_flattened():
    env = Envelope(QID, "a@x", ["b@x", "c@x"], 1, 0)
    env.failed = {"b@x": "550\tno\tsuch", "c@x": "554 go away"}
    back, _ = spoolfmt.decode_envelope(io.BytesIO(spoolfmt.encode_envelope(env).data))
    assert back.failed == {"b@x": "550 no such", "c@x": "554 go away"}


@pytest.mark.parametrize("rcpt", ["z@x", "b@x\t"])
def test_a_failed_recipient_must_be_a_recipient(rcpt):
    env = Envelope(QID, "a@x", ["b@x", "b@x\t"], 1, 0)
    env.failed = {rcpt: "550 no"}
    with pytest.raises(DataError, match="not among the recipients"):
        spoolfmt.encode_envelope(env)


def test_an_entry_needs_a_valid_id_and_a_recipient_to_be_written():
    with pytest.raises(DataError, match="bad queue id"):
        spoolfmt.encode_envelope(Envelope("x" * 20, "a@x", ["b@x"], 1, 0))
    with pytest.raises(DataError, match="at least one recipient"):
        spoolfmt.encode_envelope(Envelope(QID, "a@x", [], 1, 0))


# --- the uid, read alone ----------------------------------------------------------------------


def test_peek_uid_reads_the_uid_record():
    assert spoolfmt.peek_uid(io.BytesIO(entry(uid=4242))) == 4242
    v2entry = entry(uid=7).replace(b"MAILSHIM-ENTRY 1", b"MAILSHIM-ENTRY 2")
    assert spoolfmt.peek_uid(io.BytesIO(v2entry)) == 7
    for bad in (b"MAILSHIM-ENTRY 3\n", entry().replace(b"uid 1000", b"uid x"), b""):
        with pytest.raises(DataError):
            spoolfmt.peek_uid(io.BytesIO(bad))


# --- the state file -------------------------------------------------------------------------


def test_a_fresh_state_is_due_now_and_empty():
    st = State()
    assert (st.attempts, st.throttled, st.first_attempt, st.last_attempt, st.next_attempt) == (
        0, 0, 0, 0, 0,
    )  # fmt: skip
    assert (st.held, st.warned, st.reported, st.last_error, st.bounce_id) == (
        False, False, False, "", "",
    )  # fmt: skip
    assert (st.done, st.failed, st.pending, st.expired, st.requeued) == ({}, {}, {}, [], 0)


def test_the_state_file_is_one_line_of_sorted_ascii_json():
    st = State()
    st.last_error, st.expired, st.reported, st.requeued = "é", ["b@x", "a@x", "b@x"], True, 9
    raw = spoolfmt.encode_state(st)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and raw.isascii()
    data = json.loads(raw)
    assert list(data) == sorted(data) and data["format"] == "MAILSHIM-STATE 2"
    assert data["expired"] == ["a@x", "b@x"] and data["reported"] is True
    assert data["requeued"] == 9 and data["last_error"] == "é"
    assert set(data) == {
        "format", "attempts", "throttled", "first_attempt", "last_attempt", "next_attempt",
        "requeued", "held", "warned", "reported", "last_error", "bounce_id", "done", "failed",
        "pending", "expired", "relay_wait", "view",
    }  # fmt: skip
    assert data["relay_wait"] is False and data["view"] == ""
    back = spoolfmt.decode_state(raw)
    assert back.expired == ["a@x", "b@x"] and back.reported and back.requeued == 9


@pytest.mark.parametrize(
    "raw",
    [
        b'["MAILSHIM-STATE 2"]',
        b'{"format": "MAILSHIM-STATE 2", "attempts": true}',
        b'{"format": "MAILSHIM-STATE 2", "next_attempt": 1.5}',
        b'{"format": "MAILSHIM-STATE 2", "warned": "yes"}',
        b'{"format": "MAILSHIM-STATE 2", "last_error": 5}',
        b'{"format": "MAILSHIM-STATE 2", "bounce_id": 5}',
        b'{"format": "MAILSHIM-STATE 2", "expired": ["a@x", 5]}',
        b'{"format": "MAILSHIM-STATE 2", "done": []}',
        b'{"format": "MAILSHIM-STATE 2", "failed": {"a": {"code": "550", "text": ""}}}',
        b'\xff{"format": "MAILSHIM-STATE 2"}',
    ],
)
def test_more_damaged_states_are_data_errors(raw):
    with pytest.raises(DataError):
        spoolfmt.decode_state(raw)


def test_a_damaged_reply_names_its_field():
    raw = b'{"format": "MAILSHIM-STATE 2", "pending": {"a": {"code": 700, "text": ""}}}'
    with pytest.raises(DataError, match="state field pending: a reply's code is 0 or 200-599"):
        spoolfmt.decode_state(raw)


def test_a_state_without_a_view_has_none_and_a_valid_one_is_kept():
    assert spoolfmt.decode_state(b'{"format": "MAILSHIM-STATE 2"}').view == ""
    raw = b'{"format": "MAILSHIM-STATE 2", "view": "%s"}' % VIEW.encode()
    assert spoolfmt.decode_state(raw).view == VIEW


def test_zero_is_a_valid_counter_and_an_empty_bounce_id_means_none():
    st = spoolfmt.decode_state(b'{"format": "MAILSHIM-STATE 2", "attempts": 0, "bounce_id": ""}')
    assert st.attempts == 0 and st.bounce_id == ""


# --- drop-folder temp names ---------------------------------------------------------------


def test_temp_names_need_every_part():
    tag = "ABCDEFGHJK23"
    assert spoolfmt.temp_name(QID, tag) == f".{QID}.{tag}.tmp"
    assert spoolfmt.is_temp_name(f".{QID}.{tag}.tmp")
    for bad in (
        f"x{QID}.{tag}.tmp",  # not hidden
        f".{QID}.{tag[:-1]}.tmp",  # a short tag
        f".{QID}.{tag}4.tmp",  # a long tag
        f".{QID}.{tag.lower()}.tmp",  # outside the alphabet
        f".{QID}.{tag[:-1]}_.tmp",
        f".{QID[:-1]}.{tag}.tmp",  # not a queue id
        f".{QID}.{tag}.tmp.x",
    ):
        assert not spoolfmt.is_temp_name(bad), bad


# --- LineEnds: the defence against SMTP smuggling, by example -------------------------------


@pytest.mark.parametrize(
    ("data", "out"),
    [
        (b"a\rb", b"a\r\nb\r\n"),  # a bare CR becomes CRLF
        (b"a\nb", b"a\r\nb\r\n"),  # a bare LF becomes CRLF
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),  # CRLF stays
        (b"x\r\n.\r\ny", b"x\r\n.\r\ny\r\n"),
        (b"x\n.\ny", b"x\r\n.\r\ny\r\n"),  # "\n.\n" cannot end DATA on the listener
        (b"x\r.\ry", b"x\r\n.\r\ny\r\n"),
        (b"x\r\n.\ry", b"x\r\n.\r\ny\r\n"),
        (b"\r\r\n", b"\r\n\r\n"),
        (b"\n\r", b"\r\n\r\n"),
        (b"abc", b"abc\r\n"),  # the message ends with CRLF
        (b"", b""),
    ],
)
def test_bare_cr_and_lf_become_crlf(data, out):
    ends = LineEnds()
    assert ends.feed(data) + ends.end() == out


@pytest.mark.parametrize(
    ("chunks", "out"),
    [
        ([b"a\r", b"\nb"], b"a\r\nb\r\n"),  # a CRLF split between two reads stays one
        ([b"a\r", b"b"], b"a\r\nb\r\n"),
        ([b"a\r", b"\rb"], b"a\r\n\r\nb\r\n"),
        ([b"a\r", b""], b"a\r\n"),
        ([b"a\r"], b"a\r\n"),
        ([b"a\r\n", b""], b"a\r\n"),
        ([b"a", b"\n"], b"a\r\n"),
        ([b"", b""], b""),
    ],
)
def test_line_ends_across_chunks(chunks, out):
    ends = LineEnds()
    assert b"".join(ends.feed(c) for c in chunks) + ends.end() == out


def test_end_is_said_once():
    ends = LineEnds()
    assert ends.feed(b"a\r") == b"a"
    assert ends.end() == b"\r\n" and ends.end() == b""
    ends = LineEnds()
    assert ends.feed(b"a") == b"a" and ends.end() == b"\r\n" and ends.end() == b""


# --- bytes that are not UTF-8 are kept as they are, never a crash ---------------------------


def test_undecodable_bytes_in_a_hand_made_entry_are_kept_exactly():
    raw = (
        entry()
        .replace(b"sender a@example.org", b"sender a\xff@example.org")
        .replace(b"rcpt c@example.org", b"rcpt c\xfe@example.org")
        .replace(b"MAILSHIM-ENTRY 1", b"MAILSHIM-ENTRY 2")
        .replace(b"\n\n", b"\nfailed c\xfe@example.org\t550 \xfd\n\n", 1)
    )
    env, _ = spoolfmt.decode_envelope(io.BytesIO(raw))
    assert env.sender == "a\udcff@example.org"
    assert env.recipients == ["b@example.org", "c\udcfe@example.org"]
    assert env.failed == {"c\udcfe@example.org": "550 \udcfd"}
    # written again, the same bytes
    again = spoolfmt.encode_envelope(env).data
    assert b"sender a\xff@example.org\n" in again and b"rcpt c\xfe@example.org\n" in again
    assert b"failed c\xfe@example.org\t550 \xfd\n" in again


def test_a_failed_record_splits_at_the_first_tab():
    raw = v2(b"failed b@example.org\t550\tno such user")
    env, _ = spoolfmt.decode_envelope(io.BytesIO(raw))
    assert env.failed == {"b@example.org": "550\tno such user"}


def test_a_record_longer_than_the_limit_is_refused_even_when_it_ends():
    long = b"a" * (spoolfmt.MAX_RECORD + 10) + b"@example.org"
    raw = entry().replace(b"sender a@example.org", b"sender " + long)
    with pytest.raises(DataError) as info:
        spoolfmt.decode_envelope(io.BytesIO(raw))
    assert info.value.message == "entry truncated or record too long while reading sender"


def test_a_state_without_flags_or_error_reads_as_fresh():
    st = spoolfmt.decode_state(b'{"format": "MAILSHIM-STATE 1"}')
    assert (st.held, st.warned, st.reported, st.last_error) == (False, False, False, "")


def test_line_ends_over_three_chunks():
    ends = LineEnds()
    out = ends.feed(b"a\r") + ends.feed(b"\nb") + ends.feed(b"c") + ends.end()
    assert out == b"a\r\nbc\r\n"


LONG = "x" * 100


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"MAILSHIM-ENTRY 9\n", "not a mailshim spool entry (bad first line)"),
        (
            entry().replace(b"id " + QID.encode(), b"id " + LONG.encode()),
            f"bad queue id record {LONG[:40]!r}",
        ),
        (
            entry().replace(b"arrival ", b"arrivel " + LONG.encode()),
            f"expected record 'arrival', found {(b'arrivel ' + LONG.encode())[:40]!r}",
        ),
        (entry().replace(b"arrival 1", b"arrival x"), "record 'arrival' is not a number"),
        (entry().replace(b"uid 1000", b"uid x"), "record 'uid' is not a number"),
        (entry().replace(b"size 0", b"size 00"), "size record has the wrong width"),
        (
            entry().replace(b"size 000000000000005", b"size 00000000000000x"),
            "record 'size' is not a number",
        ),
        (
            entry().replace(b"body 7bit", b"body " + LONG.encode()),
            f"unknown body type {LONG[:20]!r}",
        ),
        (entry().replace(b"rcpt b@", b"rcpt b\x00@"), "malformed recipient record"),
        (entry().replace(b"rcpt b@example.org", b"rcpt "), "empty recipient record"),
        (
            entry().replace(b"rcpt b@example.org", b"xcpt " + LONG.encode()),
            f"unexpected record {(b'xcpt ' + LONG.encode())[:40]!r} among recipients",
        ),
        (
            entry().replace(b"rcpt b@example.org\nrcpt c@example.org\n", b""),
            "entry has no recipients",
        ),
        (
            v2(b"failed z@example.org\t550 no"),
            "a failed record that names no recipient of this entry",
        ),
        (entry()[:60], "entry truncated or record too long while reading uid"),
        (
            entry()[: entry().index(b"rcpt c@") + 6],
            "entry truncated or record too long while reading recipients",
        ),
    ],
)
def test_what_is_wrong_with_an_entry_is_said(raw, message):
    """The reason an entry went to corrupt/ (the runner logs it): exact words."""
    with pytest.raises(DataError) as info:
        spoolfmt.decode_envelope(io.BytesIO(raw))
    assert info.value.message == message


def test_what_is_wrong_with_an_envelope_to_write_is_said():
    with pytest.raises(DataError) as info:
        spoolfmt.encode_envelope(Envelope(QID, "a@x", [], 1, 0))
    assert info.value.message == "an entry needs at least one recipient"
    env = Envelope(QID, "a@x", ["b@x"], 1, 0)
    env.failed = {"b@x": "550 " + "\r" + LONG}
    with pytest.raises(DataError) as info:
        spoolfmt.encode_envelope(env)
    assert info.value.message == f"reply cannot be stored: {('550 ' + chr(13) + LONG)[:80]!r}"
    env.failed = {"z" * 100: "550 no"}
    with pytest.raises(DataError) as info:
        spoolfmt.encode_envelope(env)
    assert info.value.message == f"failed recipient {('z' * 80)!r} is not among the recipients"
    env = Envelope(QID, "a@x", ["b@x\n"], 1, 0)
    env.failed = {"b@x\n": "550 no"}
    with pytest.raises(DataError) as info:
        spoolfmt.encode_envelope(env)
    assert info.value.message == "recipient cannot be stored: 'b@x\\n'"
    with pytest.raises(DataError) as info:
        spoolfmt.patch_size_and_body(10**15, False)
    assert info.value.message == "message too large for the spool format"


def test_peek_uid_says_what_is_wrong():
    with pytest.raises(DataError) as info:
        spoolfmt.peek_uid(io.BytesIO(b"MAILSHIM-ENTRY 9\n"))
    assert info.value.message == "not a mailshim spool entry (bad first line)"
    with pytest.raises(DataError) as info:
        spoolfmt.peek_uid(io.BytesIO(entry().replace(b"uid 1000", b"uid x")))
    assert info.value.message == "record 'uid' is not a number"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "state file is not valid JSON"),
        (b'{"format": "X"}', "state file has an unknown format"),
        (b'{"format": "MAILSHIM-STATE 2", "last_error": 1}', "state field last_error is not text"),
        (
            b'{"format": "MAILSHIM-STATE 2", "bounce_id": "x"}',
            "state field bounce_id is not a queue id",
        ),
        (
            b'{"format": "MAILSHIM-STATE 2", "expired": [1]}',
            "state field expired is not a list of recipients",
        ),
        # the view names a file in status/: only a queue id, never a path
        (
            b'{"format": "MAILSHIM-STATE 2", "view": "../../etc/x"}',
            "state field view is not a queue id",
        ),
        (b'{"format": "MAILSHIM-STATE 2", "view": 5}', "state field view is not a queue id"),
    ],
)
def test_what_is_wrong_with_a_state_is_said(raw, message):
    with pytest.raises(DataError) as info:
        spoolfmt.decode_state(raw)
    assert info.value.message == message
