"""Tests for mailshim.message: stdin streaming, EOL and lone-dot rules, header split and edits."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailshim.address import find_unqualified
from mailshim.errors import EX_DATAERR, DataError
from mailshim.message import (
    QUALIFIED_FIELDS,
    Field,
    HeaderEdits,
    Reader,
    edit_headers,
    format_date,
    format_display_name,
    has_field,
    header_recipients,
    make_message_id,
)

LIMIT = 1 << 20


def pieces(data: bytes, sizes):
    """A read(n) that returns at most n bytes, cut at the given sizes (cycled)."""
    state = {"pos": 0, "i": 0}

    def read(n: int) -> bytes:
        size = min(n, sizes[state["i"] % len(sizes)])
        state["i"] += 1
        out = data[state["pos"] : state["pos"] + size]
        state["pos"] += len(out)
        return out

    return read


def random_pieces(data: bytes, seed: int, top: int = 7):
    rng = random.Random(seed)
    return pieces(data, [rng.randint(1, top) for _ in range(97)])


def split(data: bytes, dot_ends: bool = False, read=None, chunk_size: int = 65536, limit=LIMIT):
    """(reader, header block, the full body: prefix + body())."""
    reader = Reader(read or io.BytesIO(data).read, dot_ends, chunk_size)
    block = reader.header_block(limit)
    body = block.body_prefix + b"".join(reader.body())
    return reader, block, body


def whole(data: bytes, **kw) -> bytes:
    """Everything the reader gives back, header fields and separator included."""
    _reader, block, body = split(data, **kw)
    sep = b"\r\n" if block.had_separator else b""
    return b"".join(f.raw for f in block.fields) + sep + body


# --------------------------------------------------------------------------------------------
# Line ends
# --------------------------------------------------------------------------------------------

EOL_CASES = [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
    (b"a\n\rb", b"a\r\n\r\nb\r\n"),
    (b"a\r\n\n\r\r\n", b"a\r\n\r\n\r\n\r\n"),
    (b"x", b"x\r\n"),
    (b"", b""),
    (b"\r", b"\r\n"),
    (b"\n", b"\r\n"),
]


@pytest.mark.parametrize(("data", "expected"), EOL_CASES)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 65536])
def test_line_ends_become_crlf(data, expected, chunk_size):
    assert (
        whole(b"Subject: t\n\n" + data, chunk_size=chunk_size) == b"Subject: t\r\n\r\n" + expected
    )


@pytest.mark.parametrize("seed", range(40))
def test_cr_lf_split_across_reads_is_one_line_end(seed):
    data = b"Subject: t\r\n\r\n" + b"".join(
        random.Random(seed).choice([b"ab", b"\r\n", b"\r", b"\n", b"\r\r\n", b"."])
        for _ in range(300)
    )
    expected = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    for size in range(1, 8):
        assert whole(data, chunk_size=size, read=random_pieces(data, seed)) == expected


def test_php_crlf_headers_with_lf_body():
    data = b"To: a@example.org\r\nSubject: PHP\r\nMIME-Version: 1.0\r\n\r\nline one\nline two\n"
    _r, block, body = split(data)
    assert [f.name for f in block.fields] == ["To", "Subject", "MIME-Version"]
    assert block.had_separator
    assert body == b"line one\r\nline two\r\n"
    assert all(b"\r\r" not in f.raw for f in block.fields)


def test_stray_cr_inside_a_line_ends_it():
    _r, block, body = split(b"Subject: a\rb\n\nx\ry\n")
    assert [f.raw for f in block.fields] == [b"Subject: a\r\n"]
    # "b" is not a field: the header ends there and "b" starts the body
    assert not block.had_separator
    assert body == b"b\r\n\r\nx\r\ny\r\n"


# --------------------------------------------------------------------------------------------
# The lone dot
# --------------------------------------------------------------------------------------------

DOT_CASES = [
    # (input, body with dot_ends, ended_by_dot)
    (b"a\n.\nb\n", b"a\r\n", True),
    (b"a\r\n.\r\nb\r\n", b"a\r\n", True),
    (b"a\n.", b"a\r\n", True),
    (b"a\n.\r", b"a\r\n", True),
    (b"a\r.\rb", b"a\r\n", True),
    (b".\nrest", b"", True),
    (b".", b"", True),
    (b"a\n..\nb\n", b"a\r\n..\r\nb\r\n", False),
    (b"a\n. \nb\n", b"a\r\n. \r\nb\r\n", False),
    (b"a\n.x\n", b"a\r\n.x\r\n", False),
    (b"a.\nb", b"a.\r\nb\r\n", False),
    (b"a\n...\n", b"a\r\n...\r\n", False),
]


@pytest.mark.parametrize(("data", "expected", "ended"), DOT_CASES)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 65536])
def test_lone_dot_ends_input_only_with_dot_ends(data, expected, ended, chunk_size):
    head = b"Subject: t\n\n"
    reader, _block, body = split(head + data, dot_ends=True, chunk_size=chunk_size)
    assert body == expected
    assert reader.ended_by_dot is ended
    reader, _block, body = split(head + data, dot_ends=False, chunk_size=chunk_size)
    normal = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert body == (normal if normal.endswith(b"\r\n") else normal + b"\r\n")
    assert not reader.ended_by_dot


def test_lone_dot_in_the_header_ends_the_message():
    reader, block, body = split(b"Subject: x\n.\nTo: a@b\n\nbody\n", dot_ends=True)
    assert [f.raw for f in block.fields] == [b"Subject: x\r\n"]
    assert body == b""
    assert reader.ended_by_dot


def test_lone_dot_stops_reading():
    calls = []
    data = b"Subject: x\n\nbody\n.\n" + b"never read\n" * 10

    def read(n):
        calls.append(n)
        return data if len(calls) == 1 else pytest.fail("read after the lone dot")

    reader, _block, body = split(b"", dot_ends=True, read=read)
    assert body == b"body\r\n"
    assert reader.ended_by_dot and len(calls) == 1


def test_dot_dot_lines_are_not_unstuffed():
    assert whole(b"S: x\n\n..\n..x\n") == b"S: x\r\n\r\n..\r\n..x\r\n"


# --------------------------------------------------------------------------------------------
# Bytes kept, 8-bit
# --------------------------------------------------------------------------------------------


def test_eight_bit_and_nul_bytes_are_kept():
    body = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") + b"\n"
    reader, _block, out = split(b"Subject: caf\xc3\xa9\n\n" + body)
    assert out == body[:-1] + b"\r\n"
    assert reader.eightbit


def test_eightbit_flag():
    reader, _b, _body = split(b"Subject: plain\n\nascii only\n")
    assert not reader.eightbit
    reader, _b, _body = split(b"Subject: \xff\n\nascii\n")
    assert reader.eightbit
    # bytes after the lone dot are not part of the message
    reader, _b, _body = split(b"S: x\n\nok\n.\n\xff\xfe\n", dot_ends=True)
    assert not reader.eightbit


# --------------------------------------------------------------------------------------------
# Header block shapes
# --------------------------------------------------------------------------------------------


def test_folded_fields_and_value_text():
    data = b"Subject: a very\n long\n\tsubject\nTo: x@example.org,\n  y@example.org\n\nbody\n"
    _r, block, body = split(data)
    assert [f.raw for f in block.fields] == [
        b"Subject: a very\r\n long\r\n\tsubject\r\n",
        b"To: x@example.org,\r\n  y@example.org\r\n",
    ]
    assert block.fields[0].value_text() == "a very long\tsubject"
    assert block.fields[1].value_text() == "x@example.org,  y@example.org"
    assert block.fields[0].lname == "subject"
    assert body == b"body\r\n"


def test_value_text_is_utf8_with_surrogateescape():
    _r, block, _body = split(b"Subject: caf\xc3\xa9 \xff\n\n")
    text = block.fields[0].value_text()
    assert text == "café \udcff"
    assert text.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


def test_obsolete_blank_before_colon_is_a_field():
    _r, block, _body = split(b"Subject : old style\nTo:a@b\n\n")
    assert [(f.name, f.lname) for f in block.fields] == [("Subject", "subject"), ("To", "to")]


def test_no_body():
    _r, block, body = split(b"Subject: x\nTo: a@b\n")
    assert len(block.fields) == 2 and not block.had_separator and body == b""
    _r, block, body = split(b"Subject: x\n\n")
    assert block.had_separator and body == b""


def test_eof_inside_a_field_gets_a_line_end():
    _r, block, body = split(b"Subject: x\n continued")
    assert [f.raw for f in block.fields] == [b"Subject: x\r\n continued\r\n"]
    assert body == b""


@pytest.mark.parametrize(
    "data",
    [
        b"Hello world\nSubject: not a header\n\nx\n",
        b"From sender@example.org Mon Nov 23 17:07:07 2026\nSubject: x\n\nbody\n",
        b" indented first line\nSubject: x\n",
        b"\xc3\xa9t\xc3\xa9: x\n",
        b"no colon at all",
    ],
)
def test_body_without_headers(data):
    _r, block, body = split(data)
    assert block.fields == [] and not block.had_separator
    expected = data.replace(b"\n", b"\r\n")
    assert body == (expected if expected.endswith(b"\r\n") else expected + b"\r\n")


def test_message_starting_with_a_blank_line():
    _r, block, body = split(b"\nSubject: x\n")
    assert block.fields == [] and block.had_separator and body == b"Subject: x\r\n"


def test_no_blank_line_before_the_body():
    _r, block, body = split(b"Subject: x\nTo: a@b\nThis is the body.\nMore: text\n")
    assert [f.name for f in block.fields] == ["Subject", "To"]
    assert not block.had_separator
    assert body == b"This is the body.\r\nMore: text\r\n"


def test_whitespace_only_line_continues_a_field():
    _r, block, body = split(b"Subject: x\n \nTo: a@b\n\nb\n")
    assert [f.raw for f in block.fields] == [b"Subject: x\r\n \r\n", b"To: a@b\r\n"]
    assert body == b"b\r\n"


def test_header_limit():
    big = b"X-Big: " + b"a" * 5000 + b"\n"
    with pytest.raises(DataError) as info:
        split(b"Subject: x\n" + big * 3 + b"\nbody\n", limit=10_000)
    assert info.value.message == "message header block larger than 10000 bytes"
    assert info.value.code == EX_DATAERR
    # exactly at the limit is fine
    data = b"S: " + b"x" * 95 + b"\n"  # 100 bytes once normalised
    _r, block, _body = split(data + b"\nbody", limit=100)
    assert block.fields[0].raw == b"S: " + b"x" * 95 + b"\r\n"


def test_header_limit_on_a_line_without_end_reads_only_up_to_the_limit():
    produced = 0

    def read(n):
        nonlocal produced
        produced += n
        return b"X-Long: " if produced == n else b"y" * n

    with pytest.raises(DataError):
        Reader(read, False, 4096).header_block(100_000)
    assert produced < 100_000 + 2 * 4096


def test_long_lines_two_megabytes_without_newline():
    line = b"z" * (2 << 20)
    _r, block, body = split(b"Subject: long\n\n" + line)
    assert body == line + b"\r\n"
    # the same line with no header at all: decided as body without buffering it all
    _r, block, body = split(line, limit=4096)
    assert block.fields == [] and body == line + b"\r\n"
    # a 2 MB header field is accepted when the limit allows it
    _r, block, body = split(b"X-Long: " + line + b"\n\nb", limit=3 << 20)
    assert len(block.fields[0].raw) == len(line) + 10 and body == b"b\r\n"


def test_body_streams_a_huge_single_line_in_bounded_chunks():
    total = 30 << 20  # 30 MB, never held whole: the input is produced on demand
    sent = 0

    def read(n):
        nonlocal sent
        if sent == 0:
            sent = 1
            return b"Subject: s\n\n"
        size = min(n, total - sent)
        sent += size
        return b"q" * size

    reader = Reader(read, True, 65536)
    block = reader.header_block(LIMIT)
    seen = len(block.body_prefix)
    biggest = 0
    last = b""
    for chunk in reader.body():
        biggest = max(biggest, len(chunk))
        seen += len(chunk)
        last = chunk
    assert seen == total - 1 + 2 and last.endswith(b"\r\n")
    assert biggest <= 2 * 65536 + 2


def test_body_prefix_is_not_repeated_and_final_crlf_added_once():
    reader = Reader(io.BytesIO(b"S: x\n\nshort").read, False)
    block = reader.header_block(LIMIT)
    rest = list(reader.body())
    assert block.body_prefix + b"".join(rest) == b"short\r\n"


def test_body_without_header_block_call():
    reader = Reader(io.BytesIO(b"a\nb").read, False)
    assert b"".join(reader.body()) == b"a\r\nb\r\n"


def test_reader_accepts_bytearray_reads():
    src = io.BytesIO(b"S: x\n\nbody\n")
    reader = Reader(lambda n: bytearray(src.read(n)), False, 3)
    block = reader.header_block(LIMIT)
    assert block.body_prefix + b"".join(reader.body()) == b"body\r\n"


def test_field_constructor():
    f = Field(b"X-Test : v")
    assert (f.name, f.lname, f.raw) == ("X-Test", "x-test", b"X-Test : v\r\n")


# --------------------------------------------------------------------------------------------
# -t recipients
# --------------------------------------------------------------------------------------------


def fields_of(text: bytes):
    return split(text)[1].fields


def test_header_recipients_logwatch_and_friends():
    fields = fields_of(
        b"From: logwatch@host\nTo: root\nTo: admin@example.org\n"
        b'Cc: "Doe, J." <j@example.org>, team: a@x.example, b@x.example;\n'
        b"Bcc: hidden@example.org\nSubject: Logwatch\n\n"
    )
    assert header_recipients(fields) == [
        "root",
        "admin@example.org",
        "j@example.org",
        "a@x.example",
        "b@x.example",
        "hidden@example.org",
    ]


def test_header_recipients_resent_fields_win():
    fields = fields_of(b"To: a@x.example\nResent-Bcc: r@x.example\nCc: c@x.example\n\n")
    assert header_recipients(fields) == ["r@x.example"]


def test_header_recipients_duplicates_kept_and_folding():
    fields = fields_of(b"To: a@x.example,\n a@x.example\nCC: undisclosed-recipients:;\n\n")
    assert header_recipients(fields) == ["a@x.example", "a@x.example"]


def test_header_recipients_8bit_and_encoded_words():
    fields = fields_of("To: =?UTF-8?B?SsO2cmc=?= <jörg@bücher.example>\n\n".encode())
    assert header_recipients(fields) == ["jörg@bücher.example"]


def test_header_recipients_error_names_the_field():
    with pytest.raises(DataError, match=r"^To header: .*unterminated"):
        header_recipients(fields_of(b'To: "broken <a@b>\n\n'))


def test_has_field():
    fields = fields_of(b"DATE: x\nmessage-id: <a@b>\n\n")
    assert has_field(fields, "date") and has_field(fields, "message-id")
    assert not has_field(fields, "from")


# --------------------------------------------------------------------------------------------
# Header edits
# --------------------------------------------------------------------------------------------

DATE = "Mon, 23 Nov 2026 17:07:07 +0100"
MID = "<20261123170707.4242@host.example.org>"


def edits(**kw):
    base = {
        "date": DATE,
        "message_id": MID,
        "from_addr": "root@example.org",
        "domain": "example.org",
    }
    base.update(kw)
    return HeaderEdits(**base)


def test_missing_headers_appended_in_order():
    fields = fields_of(b"Subject: cron\nTo: root\n\n")
    out = edit_headers(fields, edits(from_display="Cron Daemon"))
    assert out == (
        b"Subject: cron\r\nTo: root\r\n"
        b"From: Cron Daemon <root@example.org>\r\n"
        b"Date: " + DATE.encode() + b"\r\n"
        b"Message-ID: " + MID.encode() + b"\r\n\r\n"
    )


def test_present_headers_not_added_again_any_case():
    raw = b"FROM: me@x.example\r\ndate: Tue, 1 Jan 2030 00:00:00 +0000\r\nMESSAGE-ID: <x@y>\r\n"
    out = edit_headers(fields_of(raw + b"\r\n"), edits())
    assert out == raw + b"\r\n"


def test_each_addition_alone():
    fields = fields_of(b"From: a@b.example\nDate: x\n\n")
    assert edit_headers(fields, edits()).endswith(b"Message-ID: " + MID.encode() + b"\r\n\r\n")
    fields = fields_of(b"From: a@b.example\nMessage-ID: <m@x>\n\n")
    assert edit_headers(fields, edits()).endswith(b"Date: " + DATE.encode() + b"\r\n\r\n")
    fields = fields_of(b"Date: x\nMessage-ID: <m@x>\n\n")
    assert edit_headers(fields, edits()).endswith(b"From: root@example.org\r\n\r\n")


def test_nothing_added_when_edits_are_empty():
    fields = fields_of(b"Subject: s\n\n")
    out = edit_headers(fields, HeaderEdits())
    assert out == b"Subject: s\r\n\r\n"


def test_separator_always_emitted():
    fields = fields_of(b"From: a@b\nDate: d\nMessage-ID: <m@x>\nbody starts here\n")
    assert edit_headers(fields, edits()) == b"From: a@b\r\nDate: d\r\nMessage-ID: <m@x>\r\n\r\n"
    assert edit_headers([], HeaderEdits()) == b"\r\n"


def test_bcc_removed_only_when_asked():
    raw = b"To: a@x\nBcc: secret@x,\n more@x\nResent-Bcc: r@x\nbcc: lower@x\nSubject: s\n\n"
    fields = fields_of(raw)
    out = edit_headers(fields, HeaderEdits(strip_bcc=True))
    assert out == b"To: a@x\r\nSubject: s\r\n\r\n"
    out = edit_headers(fields, HeaderEdits(strip_bcc=False))
    assert out == raw.replace(b"\n", b"\r\n")


def test_from_mode_force_replaces_in_place():
    fields = fields_of(b"To: a@x\nFrom: Someone <forged@x>\nSubject: s\nFrom: second@x\n\n")
    out = edit_headers(fields, edits(from_mode="force", from_display="Real"))
    assert out.startswith(b"To: a@x\r\nFrom: Real <root@example.org>\r\nSubject: s\r\nDate: ")
    assert out.count(b"From:") == 1


def test_from_mode_force_without_an_address_keeps_from():
    fields = fields_of(b"From: a@x\n\n")
    out = edit_headers(fields, HeaderEdits(from_mode="force"))
    assert out == b"From: a@x\r\n\r\n"


def test_from_mode_rewrite_local_keeps_every_other_byte():
    raw = (
        b"From: Cron Daemon <root> (the \xff daemon),\r\n\tbin, other@x.example\r\n"
        b'Sender: daemon\r\nReply-To: "a b"\r\nTo: root\r\nSubject: root\r\n\r\n'
    )
    fields = fields_of(raw)
    out = edit_headers(fields, edits(from_mode="rewrite-local", date=None, message_id=None))
    assert out == (
        b"From: Cron Daemon <root@example.org> (the \xff daemon),\r\n"
        b"\tbin@example.org, other@x.example\r\n"
        b"Sender: daemon@example.org\r\n"
        b'Reply-To: "a b"@example.org\r\n'
        b"To: root\r\nSubject: root\r\n\r\n"
    )


def test_from_mode_rewrite_local_leaves_unparsable_fields_alone():
    raw = b'From: "broken <root>\r\nDate: d\r\nMessage-ID: <m@x>\r\n\r\n'
    assert edit_headers(fields_of(raw), edits(from_mode="rewrite-local")) == raw


def test_from_mode_rewrite_local_adds_a_missing_from():
    out = edit_headers(
        fields_of(b"Date: d\nMessage-ID: <m@x>\n\n"), edits(from_mode="rewrite-local")
    )
    assert out.endswith(b"From: root@example.org\r\n\r\n")


def test_unknown_from_mode_is_a_bug():
    with pytest.raises(Exception, match="unknown from_mode"):
        HeaderEdits(from_mode="sometimes")


@pytest.mark.parametrize(
    ("display", "expected"),
    [
        ("Cron Daemon", "Cron Daemon"),
        ("CronDaemon", "CronDaemon"),
        ("Doe, John", '"Doe, John"'),
        ('Say "hi"', '"Say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("J. Random", '"J. Random"'),
        ("a  b", '"a  b"'),
        ("=?UTF-8?B?eA==?=", '"=?UTF-8?B?eA==?="'),
        ("Zoë", "=?UTF-8?B?Wm/Dqw==?="),
        ("Root\r\nBcc: victim@example.org", '"Root  Bcc: victim@example.org"'),
        ("\r\n", ""),
        ("", ""),
    ],
)
def test_display_name_formatting(display, expected):
    assert format_display_name(display) == expected


def test_from_display_injection_is_neutralised():
    out = edit_headers(
        fields_of(b"Date: d\nMessage-ID: <m@x>\n\n"), edits(from_display="x\nBcc: v@x")
    )
    assert out.count(b"\r\n") == 4 and b"\nBcc" not in out


def _unfold_and_decode(value: str) -> str:
    """Decode a sequence of B encoded words (what a mail reader shows)."""
    import base64

    words = value.replace("\r\n", "").split()
    return b"".join(base64.b64decode(w[10:-2]) for w in words).decode()


@pytest.mark.parametrize("name", ["Jörg Müller", "日本語の名前" * 10, "ë" * 200, "x" * 300])
def test_long_and_non_ascii_display_names_fold_and_round_trip(name):
    out = edit_headers(fields_of(b"Date: d\nMessage-ID: <m@x>\n\n"), edits(from_display=name))
    text = out.decode("ascii")
    assert all(len(line) <= 78 for line in text.split("\r\n"))
    value = text[len("Date: d\r\nMessage-ID: <m@x>\r\nFrom: ") :].split(" <root@example.org>")[0]
    for word in value.replace("\r\n", " ").split():
        assert word.startswith("=?UTF-8?B?") and word.endswith("?=") and len(word) <= 75
    assert _unfold_and_decode(value) == name


def test_ascii_display_with_many_words_folds_without_changing_meaning():
    name = " ".join(["word"] * 40)
    out = edit_headers([], edits(from_display=name, date=None, message_id=None))
    lines = out.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert out.replace(b"\r\n ", b" ") == f"From: {name} <root@example.org>\r\n\r\n".encode()


def test_from_addr_with_control_characters_is_refused():
    with pytest.raises(DataError):
        edit_headers([], edits(from_addr="a@b\r\nBcc: x@y"))


# --------------------------------------------------------------------------------------------
# Date and Message-ID
# --------------------------------------------------------------------------------------------


def _strftime_date(t: int, offset: int) -> str:
    base = time.strftime("%a, %d %b %Y %H:%M:%S", time.gmtime(t + offset))
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return f"{base} {sign}{hours:02d}{minutes:02d}"


def test_format_date_example():
    assert format_date(1795450027.9, 3600) == "Mon, 23 Nov 2026 17:07:07 +0100"
    assert format_date(0, 0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert format_date(951782400, -9000) == "Mon, 28 Feb 2000 21:30:00 -0230"


@settings(max_examples=2000)
@given(
    # years 1425 to 6325: glibc does not pad years below 1000, RFC 5322 wants 4 digits
    st.integers(min_value=-(2**34), max_value=2**37),
    st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: m * 60),
)
def test_format_date_matches_strftime_in_c_locale(t, offset):
    assert format_date(t, offset) == _strftime_date(t, offset)


@pytest.mark.parametrize(
    "t",
    [
        951782400,  # 2000-02-29 leap day of a century leap year
        4107542400,  # 2100-03-01 after a century non-leap year
        -2208988800,  # 1900-01-01
        253402300799,  # 9999-12-31 23:59:59
        1709164800,  # 2024-02-29
    ],
)
def test_format_date_calendar_edges(t):
    for offset in (-43200, -1, 0, 1, 50400):
        assert format_date(t, offset - offset % 60) == _strftime_date(t, offset - offset % 60)


def test_format_date_negative_fractional_time_floors():
    assert format_date(-0.5, 0) == "Wed, 31 Dec 1969 23:59:59 +0000"


def test_make_message_id():
    assert (
        make_message_id("20261123.4242.abc", "host.example.org")
        == "<20261123.4242.abc@host.example.org>"
    )
    assert make_message_id("a b<c>\r\n", "[127.0.0.1]") == "<abc@[127.0.0.1]>"


# --------------------------------------------------------------------------------------------
# Imports on the fast path
# --------------------------------------------------------------------------------------------


def test_pure_modules_import_nothing_heavy():
    code = "import mailshim.address, mailshim.aliases, mailshim.message"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    baseline = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        check=True,
    )

    def modules(stderr):
        return {line.split("|")[-1].strip() for line in stderr.splitlines() if "|" in line}

    new = modules(result.stderr) - modules(baseline.stderr)
    forbidden = {"re", "typing", "dataclasses", "enum", "email", "datetime", "time", "socket"}
    assert not (new & forbidden), new
    assert {"mailshim.address", "mailshim.aliases", "mailshim.message"} <= new


# --------------------------------------------------------------------------------------------
# The central property: nothing changes but the documented edits
# --------------------------------------------------------------------------------------------

PARTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b".",
    b"..",
    b":",
    b" ",
    b"\t",
    b"a",
    b"xyz",
    b"\xc3\xa9",
    b"\xff",
    b"\x00",
    b"From",
    b"To",
    b"Bcc",
    b"Resent-Bcc",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"From ",
    b": ",
    b"\nTo: a@b\n",
    b"\nBcc: s@x\n",
    b"\n\n",
    b"\n.\n",
    b"\n \n",
]
INLINE = [p for p in PARTS if b"\r" not in p and b"\n" not in p]
NAMES = [b"From", b"To", b"Bcc", b"Resent-Bcc", b"Subject", b"Date", b"Message-ID", b"X-A", b"Cc "]
eol = st.sampled_from([b"\n", b"\r\n", b"\r"])
text = st.lists(st.sampled_from(INLINE), max_size=6).map(b"".join)
header_line = st.one_of(
    st.builds(lambda n, v: n + b":" + v, st.sampled_from(NAMES), text),
    st.builds(lambda w, v: w + v, st.sampled_from([b" ", b"\t"]), text),
)


@st.composite
def messages(draw):
    """Shaped like mail: header lines, maybe a blank line, body lines, mixed line ends."""
    out = [line + draw(eol) for line in draw(st.lists(header_line, max_size=6))]
    if draw(st.booleans()):
        out.append(draw(eol))
    out += [line + draw(eol) for line in draw(st.lists(st.one_of(text, st.just(b".")), max_size=5))]
    if out and draw(st.booleans()):
        out[-1] = out[-1].rstrip(b"\r\n")
    return b"".join(out)


inputs = st.one_of(
    messages(),
    st.lists(st.sampled_from(PARTS), max_size=60).map(b"".join),
    st.binary(max_size=200),
)


def normalise(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def dot_cut(msg: bytes) -> tuple[bytes, bool]:
    """The message up to a lone-dot line (reference model, line by line)."""
    out = []
    for line in msg.split(b"\r\n"):
        if line == b".":
            return b"".join(x + b"\r\n" for x in out), True
        out.append(line)
    return msg, False


def reference_header(msg: bytes):
    """(field raws, had separator, body) by a line-by-line reading of the rules."""
    lines = msg.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    fields: list[bytes] = []
    for i, line in enumerate(lines):
        if line == b"":
            return fields, True, b"".join(x + b"\r\n" for x in lines[i + 1 :])
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
            continue
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")
        if colon and name and len(name) <= 998 and all(33 <= c <= 126 for c in name):
            fields.append(line + b"\r\n")
            continue
        return fields, False, b"".join(x + b"\r\n" for x in lines[i:])
    return fields, False, b""


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=inputs,
    dot_ends=st.booleans(),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    chunk_size=st.integers(1, 12),
    strip_bcc=st.booleans(),
)
def test_property_only_documented_edits(data, dot_ends, sizes, chunk_size, strip_bcc):
    reader = Reader(pieces(data, sizes), dot_ends, chunk_size)
    block = reader.header_block(LIMIT)
    body = block.body_prefix + b"".join(reader.body())

    expected = normalise(data)
    ended = False
    if dot_ends:
        expected, ended = dot_cut(expected)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"  # documented edit: final line end
    assert reader.ended_by_dot is ended
    assert reader.eightbit is (not expected.isascii())

    # The reader loses and changes no byte, and splits where the rules say.
    ref_fields, ref_sep, ref_body = reference_header(expected)
    assert [f.raw for f in block.fields] == ref_fields
    assert block.had_separator is ref_sep
    assert body == ref_body

    # The edits: Bcc removal, appended From/Date/Message-ID when missing, the separator.
    ed = HeaderEdits(date=DATE, message_id=MID, from_addr="root@example.org", strip_bcc=strip_bcc)
    head = edit_headers(block.fields, ed)
    removed = ("bcc", "resent-bcc") if strip_bcc else ()
    kept = b"".join(f.raw for f in block.fields if f.lname not in removed)
    added = b""
    names = {f.lname for f in block.fields}
    if "from" not in names:
        added += b"From: root@example.org\r\n"
    if "date" not in names:
        added += b"Date: " + DATE.encode() + b"\r\n"
    if "message-id" not in names:
        added += b"Message-ID: " + MID.encode() + b"\r\n"
    # A resent block gets its Resent-Date after its first run of Resent- fields.
    end = resent_block_end(block.fields)
    at = len(b"".join(f.raw for f in block.fields[:end] if f.lname not in removed))
    resent = b""
    if end >= 0 and "resent-date" not in names:
        resent = b"Resent-Date: " + DATE.encode() + b"\r\n"
    assert head == kept[:at] + resent + kept[at:] + added + b"\r\n"

    # Put back what the edits took out: the input (normalised) again.
    if not strip_bcc:
        head = head[:at] + head[at + len(resent) :]
        restored = head[: len(kept)] + (b"\r\n" if block.had_separator else b"") + body
        assert restored == expected


def resent_block_end(fields) -> int:
    """Index after the first run of Resent- fields; -1 without any."""
    lnames = [f.lname for f in fields]
    starts = [i for i, name in enumerate(lnames) if name.startswith("resent-")]
    if not starts:
        return -1
    end = starts[0]
    while end < len(lnames) and lnames[end].startswith("resent-"):
        end += 1
    return end


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=inputs, mode=st.sampled_from(["add", "force", "rewrite-local"]))
def test_property_from_modes_touch_only_originator_fields(data, mode):
    _r, block, _body = split(data)
    ed = HeaderEdits(from_addr="root@example.org", from_mode=mode, domain="example.org")
    head = edit_headers(block.fields, ed)
    others = b"".join(f.raw for f in block.fields if f.lname not in ("from", "sender", "reply-to"))
    stripped = b"".join(
        line + b"\r\n"
        for line in _field_raws(head)
        if line.partition(b":")[0].rstrip(b" \t").lower() not in (b"from", b"sender", b"reply-to")
    )
    assert stripped.replace(b"\r\n", b"") == others.replace(b"\r\n", b"")


def _field_raws(head: bytes):
    """Split an edited header section back into whole fields (continuations joined)."""
    raws: list[bytes] = []
    for line in head[:-2].split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and raws:
            raws[-1] += b"\r\n" + line
        else:
            raws.append(line)
    return raws


@settings(max_examples=800)
@given(inputs)
def test_property_recipients_never_crash(data):
    _r, block, _body = split(data)
    try:
        header_recipients(block.fields)
    except DataError as exc:
        assert exc.code == EX_DATAERR


# --- qualifying address fields (append_at_myorigin) and completing resent blocks -----------

MARK = b"@q.invalid"  # a domain the generated inputs never contain
ADDRESS_PARTS = [
    b"root", b"a@b.example", b" ", b",", b"(Cron Daemon)", b"<", b">", b'"', b"x y", b":",
    b";", b"\xc3\xa9", b"\r\n ", b"\r\n\t", b"@", b"[1.2.3.4]", b"\\", b"()", b".",
]  # fmt: skip
FIELD_NAMES = [
    b"From", b"Sender", b"Reply-To", b"To", b"Cc", b"Bcc", b"Resent-From", b"Resent-Sender",
    b"Resent-To", b"Resent-Cc", b"Resent-Date", b"Resent-Message-ID", b"Subject", b"X-To",
    b"Comments", b"TO", b"resent-cc",
]  # fmt: skip
address_field = st.builds(
    lambda n, v: n + b":" + v + b"\r\n",
    st.sampled_from(FIELD_NAMES),
    st.lists(st.sampled_from(ADDRESS_PARTS), max_size=8).map(b"".join),
)


def _unqualified_count(field) -> int:
    try:
        return len(find_unqualified(field.raw.split(b":", 1)[1].decode("utf-8", "surrogateescape")))
    except DataError:
        return 0


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(raws=st.lists(address_field, max_size=8), strip_bcc=st.booleans())
def test_property_qualify_changes_only_address_fields(raws, strip_bcc):
    fields = fields_of(b"".join(raws) + b"\r\n")
    ed = HeaderEdits(
        date=DATE, resent_message_id=MID, qualify_domain="q.invalid", strip_bcc=strip_bcc
    )
    out = _field_raws(edit_headers(fields, ed))
    removed = ("bcc", "resent-bcc") if strip_bcc else ()
    kept = [f for f in fields if f.lname not in removed]
    end = resent_block_end(fields)
    names = {f.lname for f in fields}
    extra = []
    if end >= 0 and "resent-date" not in names:
        extra.append(b"Resent-Date: " + DATE.encode())
    if end >= 0 and "resent-message-id" not in names:
        extra.append(b"Resent-Message-ID: " + MID.encode())
    # The resent additions sit right after the first run of Resent- fields, and nowhere else.
    at = len([f for f in fields[: max(end, 0)] if f.lname not in removed])
    assert out[at : at + len(extra)] == extra
    del out[at : at + len(extra)]
    if "date" not in names:  # the ordinary Date, appended at the end
        assert out.pop() == b"Date: " + DATE.encode()
    assert len(out) == len(kept)
    for f, got in zip(kept, out, strict=True):
        got += b"\r\n"
        if f.lname in QUALIFIED_FIELDS:
            # Output = input with "@domain" inserted once per bare address, nothing else.
            assert got.replace(MARK, b"") == f.raw
            assert got.count(MARK) == _unqualified_count(f)
            assert _unqualified_count(Field(got)) == 0
        else:
            assert got == f.raw


def test_resent_additions_at_the_end_when_the_block_ends_the_header():
    fields = fields_of(b"Subject: s\nResent-To: a@x.example\n\n")
    out = edit_headers(fields, HeaderEdits(date=DATE, resent_message_id="<r@x>"))
    assert out == (
        b"Subject: s\r\nResent-To: a@x.example\r\nResent-Date: " + DATE.encode() + b"\r\n"
        b"Resent-Message-ID: <r@x>\r\nDate: " + DATE.encode() + b"\r\n\r\n"
    )


def test_resent_additions_after_the_first_block_only():
    fields = fields_of(
        b"Resent-To: new@x.example\nResent-From: me@x.example\nReceived: x\n"
        b"Resent-To: old@x.example\nFrom: a@x.example\n\n"
    )
    out = edit_headers(fields, HeaderEdits(date=DATE, resent_message_id="<r@x>"))
    lines = out.split(b"\r\n")
    assert lines[2] == b"Resent-Date: " + DATE.encode()
    assert lines[3] == b"Resent-Message-ID: <r@x>" and lines[4] == b"Received: x"
    assert out.count(b"Resent-Date") == 1


def test_qualify_cron_and_sudo_fields():
    fields = fields_of(b"From: root (Cron Daemon)\nTo: root\nSubject: root\nX-Cron-Env: <root>\n\n")
    out = edit_headers(fields, HeaderEdits(qualify_domain="example.org"))
    assert out == (
        b"From: root@example.org (Cron Daemon)\r\nTo: root@example.org\r\n"
        b"Subject: root\r\nX-Cron-Env: <root>\r\n\r\n"
    )
