"""The `sendmail -bs` state machine: dialogues as lines in, replies out (no I/O)."""

from __future__ import annotations

import ast
import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailshim import smtpserver
from mailshim.errors import ConfigError, DataError, SoftwareError, TempFailError
from mailshim.reply import Reply
from mailshim.smtpserver import DataDecoder, ServerSession, listener_reply, reply

HOST = "mx.example.org"


def well_formed(data: bytes) -> list[int]:
    """Check that ``data`` is one or more complete SMTP replies; return their codes."""
    assert data.endswith(b"\r\n"), data
    codes = []
    current = None
    for line in data[:-2].split(b"\r\n"):
        assert len(line) >= 4, line
        code, sep, text = line[:3], line[3:4], line[4:]
        assert code.isdigit() and b"200" <= code <= b"599", line
        assert sep in (b" ", b"-"), line
        assert all(32 <= b < 127 for b in text), line
        if current is not None:
            assert code == current, data
        current = None if sep == b" " else code
        if sep == b" ":
            codes.append(int(code))
    assert current is None, data  # the last line ends the reply
    return codes


def code_of(data: bytes) -> tuple[int, str]:
    """The code and enhanced status code of a single reply line."""
    assert well_formed(data)
    last = data.rstrip(b"\r\n").split(b"\r\n")[-1].decode()
    return int(last[:3]), last[4:].split(" ", 1)[0]


class Dialogue:
    """Drive a ServerSession like the driver does: commands, then DATA lines through a decoder."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("max_size", 1000000)
        self.session = ServerSession(HOST, **kwargs)  # type: ignore[arg-type]
        self.decoder: DataDecoder | None = None
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.tx: smtpserver.Transaction | None = None
        self.body = b""
        self.closed = False

    def send(self, *lines: str | bytes) -> list[bytes]:
        out = []
        for line in lines:
            raw = line if isinstance(line, bytes) else line.encode() + b"\r\n"
            assert not self.closed, "line after the session ended"
            if self.decoder is not None:
                payload, end = self.decoder.feed(raw)
                self.body += payload
                if end is not None:
                    assert end == len(raw)
                    assert self.tx is not None
                    self.messages.append((self.tx.sender, list(self.tx.recipients), self.body))
                    out.append(self.session.data_finished(reply(250, "2.0.0 Ok: queued as Q1")))
                    self.decoder = None
                continue
            resp = self.session.command(raw)
            out.append(resp.data)
            self.closed = resp.close
            if resp.transaction is not None:
                self.tx = resp.transaction
                self.decoder = DataDecoder()
                self.body = b""
        for data in out:
            well_formed(data)
        return out

    def codes(self, *lines: str | bytes) -> list[tuple[int, str]]:
        return [code_of(r) for r in self.send(*lines)]


def test_greeting_names_the_host() -> None:
    assert ServerSession(HOST, 10).greeting() == b"220 mx.example.org ESMTP mailshim\r\n"


def test_hostile_hostname_is_sanitised() -> None:
    greeting = ServerSession("evil\r\n250 host", 10).greeting()
    assert greeting.count(b"\r\n") == 1
    well_formed(greeting)


def test_ehlo_advertises_extensions_and_nothing_unimplemented() -> None:
    d = Dialogue(max_size=52428800)
    (ehlo,) = d.send("EHLO client.example")
    lines = ehlo.decode().split("\r\n")[:-1]
    assert lines[0] == "250-mx.example.org"
    keywords = [line[4:] for line in lines[1:]]
    assert keywords == [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "HELP",
    ]
    assert lines[-1].startswith("250 ")
    for absent in ("STARTTLS", "AUTH", "CHUNKING", "DSN"):
        assert absent not in ehlo.decode()


def test_symfony_style_helo_dialogue() -> None:
    d = Dialogue()
    replies = d.send(
        "HELO [127.0.0.1]",
        "MAIL FROM:<app@example.org>",
        "RCPT TO:<user@example.net>",
        "DATA",
        "Subject: hi",
        "",
        "body",
        ".",
        "QUIT",
    )
    assert replies[0] == b"250 mx.example.org\r\n"
    assert [code_of(r)[0] for r in replies[1:]] == [250, 250, 354, 250, 221]
    assert d.closed
    assert d.messages == [("app@example.org", ["user@example.net"], b"Subject: hi\r\n\r\nbody\r\n")]


def test_mail_without_helo_is_accepted() -> None:
    d = Dialogue()
    assert d.codes("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>") == [
        (250, "2.1.0"),
        (250, "2.1.5"),
    ]


def test_helo_and_ehlo_need_an_argument() -> None:
    d = Dialogue()
    assert d.codes("HELO", "EHLO", "EHLO   ") == [(501, "5.5.4")] * 3


@pytest.mark.parametrize(
    "lines",
    [
        ["RCPT TO:<b@example.org>"],
        ["DATA"],
        ["MAIL FROM:<a@example.org>", "DATA"],
        ["MAIL FROM:<a@example.org>", "MAIL FROM:<a@example.org>"],
    ],
)
def test_wrong_order_is_503(lines: list[str]) -> None:
    d = Dialogue()
    d.send("EHLO c")
    assert d.codes(*lines)[-1] == (503, "5.5.1")


def test_data_with_only_refused_recipients_is_503() -> None:
    d = Dialogue()
    d.send("EHLO c", "MAIL FROM:<a@example.org>")
    assert d.codes("RCPT TO:<>", "DATA") == [(501, "5.1.3"), (503, "5.5.1")]


def test_pipelined_batch_gets_replies_in_order() -> None:
    d = Dialogue()
    replies = d.send(
        "EHLO c",
        "MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=100",
        "RCPT TO:<b@example.org>",
        "RCPT TO:<bad address@@>",
        "RCPT TO:<c@example.org>",
        "DATA",
    )
    assert [code_of(r)[0] for r in replies] == [250, 250, 250, 501, 250, 354]
    assert d.tx is not None
    assert d.tx.recipients == ["b@example.org", "c@example.org"]
    assert d.tx.body == "8BITMIME"
    assert d.tx.declared_size == 100


def test_rset_mid_transaction_forgets_the_envelope() -> None:
    d = Dialogue()
    d.send("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>")
    assert d.codes("RSET", "RCPT TO:<b@example.org>", "DATA") == [
        (250, "2.0.0"),
        (503, "5.5.1"),
        (503, "5.5.1"),
    ]
    d.send("MAIL FROM:<x@example.org>", "RCPT TO:<y@example.org>", "DATA", "hello", ".")
    assert d.messages == [("x@example.org", ["y@example.org"], b"hello\r\n")]


def test_rset_takes_no_argument_and_helo_resets() -> None:
    d = Dialogue()
    d.send("EHLO c", "MAIL FROM:<a@example.org>")
    assert d.codes("RSET now") == [(501, "5.5.4")]
    d.send("HELO again")
    assert d.codes("RCPT TO:<b@example.org>") == [(503, "5.5.1")]


def test_several_messages_per_session() -> None:
    d = Dialogue()
    d.send("EHLO c")
    for i in range(3):
        d.send(
            f"MAIL FROM:<s{i}@example.org>",
            f"RCPT TO:<r{i}@example.org>",
            "DATA",
            f"Subject: {i}",
            "",
            ".",
        )
    assert [m[0] for m in d.messages] == [f"s{i}@example.org" for i in range(3)]
    assert [m[1] for m in d.messages] == [[f"r{i}@example.org"] for i in range(3)]
    assert d.session.messages == 3
    assert d.session.transaction is None


def test_null_sender_and_source_route_and_lenient_forms() -> None:
    d = Dialogue()
    assert d.codes("MAIL FROM:<>") == [(250, "2.1.0")]
    assert d.session.transaction is not None
    assert d.session.transaction.sender == ""
    assert (
        d.codes(
            "RCPT TO:<@relay.example,@other.example:user@example.org>",
            "rcpt to: <second@example.org>",
            "RCPT TO:third@example.org",
        )
        == [(250, "2.1.5")] * 3
    )
    assert d.session.transaction.recipients == [
        "user@example.org",
        "second@example.org",
        "third@example.org",
    ]


def test_quoted_local_part_with_angle_bracket() -> None:
    d = Dialogue()
    d.send("MAIL FROM:<a@example.org>")
    assert d.codes('RCPT TO:<"odd>name"@example.org>') == [(250, "2.1.5")]


@pytest.mark.parametrize(
    "line",
    ["MAIL FROM:<a@example.org", "MAIL TO:<a@example.org>", "MAIL", "MAIL FROM:"],
)
def test_mail_syntax_errors(line: str) -> None:
    assert Dialogue().codes(line) == [(501, "5.5.4")]


def test_bad_sender_address() -> None:
    assert Dialogue().codes("MAIL FROM:<a b c>") == [(501, "5.1.7")]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("SIZE=2000", (552, "5.3.4")),
        ("SIZE=abc", (501, "5.5.4")),
        ("SIZE=", (501, "5.5.4")),
        ("SIZE", (501, "5.5.4")),
        ("BODY=BINARYMIME", (501, "5.5.4")),
        ("BODY=7bit", (250, "2.1.0")),
        ("SMTPUTF8", (250, "2.1.0")),
        ("SMTPUTF8=yes", (555, "5.5.4")),
        ("RET=FULL", (555, "5.5.4")),
        ("ENVID=x", (555, "5.5.4")),
        ("SIZE=1 SIZE=2", (501, "5.5.4")),
        ("=x", (501, "5.5.4")),
    ],
)
def test_mail_parameters(params: str, expected: tuple[int, str]) -> None:
    d = Dialogue(max_size=1000)
    assert d.codes(f"MAIL FROM:<a@example.org> {params}") == [expected]


def test_rcpt_parameters_are_refused() -> None:
    d = Dialogue()
    d.send("MAIL FROM:<a@example.org>")
    assert d.codes("RCPT TO:<b@example.org> NOTIFY=NEVER") == [(555, "5.5.4")]


def test_non_ascii_addresses_need_smtputf8() -> None:
    d = Dialogue()
    assert d.codes("MAIL FROM:<jörg@example.org>") == [(553, "5.6.7")]
    assert d.codes("MAIL FROM:<a@example.org>", "RCPT TO:<zoë@example.org>") == [
        (250, "2.1.0"),
        (553, "5.6.7"),
    ]
    d.send("RSET")
    assert d.codes("MAIL FROM:<jörg@example.org> SMTPUTF8", "RCPT TO:<zoë@example.org>") == [
        (250, "2.1.0"),
        (250, "2.1.5"),
    ]


def test_too_many_recipients() -> None:
    d = Dialogue(max_recipients=3)
    d.send("MAIL FROM:<a@example.org>")
    codes = d.codes(*[f"RCPT TO:<r{i}@example.org>" for i in range(5)])
    assert codes == [(250, "2.1.5")] * 3 + [(452, "4.5.3")] * 2
    assert d.codes("DATA") == [(354, "End")]


def test_rewrite_callback_applies_and_deduplicates() -> None:
    table = {"root": ["admin@example.org", "ops@example.org"], "ops": ["ops@example.org"]}

    def rewrite(addr: str) -> list[str]:
        return table.get(addr, [addr if "@" in addr else f"{addr}@example.org"])

    d = Dialogue(rewrite=rewrite)
    d.send("MAIL FROM:<a@example.org>")
    assert d.codes("RCPT TO:<root>", "RCPT TO:<ops>", "RCPT TO:<www-data>") == [(250, "2.1.5")] * 3
    assert d.session.transaction is not None
    assert d.session.transaction.recipients == [
        "admin@example.org",
        "ops@example.org",
        "www-data@example.org",
    ]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DataError("bad alias"), (501, "5.1.3")),
        (TempFailError("disk"), (451, "4.3.0")),
        (ConfigError("aliases file unreadable"), (451, "4.3.5")),
    ],
)
def test_rewrite_failures(exc: Exception, expected: tuple[int, str]) -> None:
    def rewrite(addr: str) -> list[str]:
        raise exc

    d = Dialogue(rewrite=rewrite)
    d.send("MAIL FROM:<a@example.org>")
    assert d.codes("RCPT TO:<b@example.org>") == [expected]


def test_rewrite_to_nothing_is_refused() -> None:
    d = Dialogue(rewrite=lambda addr: [])
    d.send("MAIL FROM:<a@example.org>")
    assert d.codes("RCPT TO:<b@example.org>") == [(550, "5.1.1")]


def test_misc_commands() -> None:
    d = Dialogue()
    assert d.codes(
        "NOOP",
        "NOOP anything",
        "HELP",
        "VRFY root",
        "VRFY",
        "EXPN staff",
        "STARTTLS",
        "AUTH PLAIN AGFiYwBk",
        "BDAT 100 LAST",
        "FROB",
        "",
        "DATA now",
    ) == [
        (250, "2.0.0"),
        (250, "2.0.0"),
        (214, "2.0.0"),
        (252, "2.5.2"),
        (501, "5.5.4"),
        (502, "5.5.1"),
        (502, "5.5.1"),
        (502, "5.5.1"),
        (502, "5.5.1"),
        (500, "5.5.2"),
        (500, "5.5.2"),
        (501, "5.5.4"),
    ]


def test_quit_closes() -> None:
    d = Dialogue()
    resp = d.session.command(b"quit\r\n")
    assert resp.close
    assert code_of(resp.data) == (221, "2.0.0")


def test_commands_are_case_insensitive_and_lf_is_enough() -> None:
    d = Dialogue()
    assert d.codes(b"ehlo c\n", b"mail from:<a@example.org>\n", b"Rcpt To:<b@example.org>\n") == [
        (250, "HELP"),
        (250, "2.1.0"),
        (250, "2.1.5"),
    ]


def test_control_characters_in_arguments() -> None:
    d = Dialogue()
    assert d.codes(b"MAIL FROM:<a@example.org>\rRCPT TO:<b@example.org>\r\n") == [(501, "5.5.4")]
    assert d.codes(b"HELO a\x00b\r\n") == [(501, "5.5.4")]
    assert d.codes(b"\xff\xfe\r\n") == [(500, "5.5.2")]


def test_line_too_long() -> None:
    d = Dialogue()
    long_line = b"NOOP " + b"x" * smtpserver.MAX_COMMAND_LINE + b"\r\n"
    assert d.codes(long_line) == [(500, "5.5.6")]
    ok_line = b"NOOP " + b"x" * (smtpserver.MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(ok_line) == smtpserver.MAX_COMMAND_LINE
    assert d.codes(ok_line) == [(250, "2.0.0")]
    assert code_of(d.session.line_too_long().data) == (500, "5.5.6")


def test_hard_error_limit_ends_the_session() -> None:
    d = Dialogue(hard_error_limit=5)
    replies = d.send(*["From: someone", "Subject: oops", "To: x", "", "body"])
    assert well_formed(replies[-1]) == [500, 421]
    assert d.closed
    assert b"4.7.0" in replies[-1]


def test_address_errors_do_not_count_toward_the_error_limit() -> None:
    d = Dialogue(hard_error_limit=3)
    d.send("MAIL FROM:<a@example.org>")
    d.send(*["RCPT TO:<>"] * 10)
    assert not d.closed


def test_timeout_reply() -> None:
    assert code_of(ServerSession(HOST, 10).timeout()) == (421, "4.4.2")


def test_misuse_of_the_data_phase_is_a_bug() -> None:
    s = ServerSession(HOST, 10)
    with pytest.raises(SoftwareError):
        s.data_finished(b"")
    s.command(b"MAIL FROM:<a@example.org>")
    s.command(b"RCPT TO:<b@example.org>")
    assert s.command(b"DATA").transaction is not None
    with pytest.raises(SoftwareError):
        s.command(b"NOOP")
    d = DataDecoder()
    d.feed(b".\r\n")
    with pytest.raises(SoftwareError):
        d.feed(b"x")


# --- replies ---------------------------------------------------------------------------


def test_reply_format() -> None:
    assert reply(250, "2.0.0 Ok") == b"250 2.0.0 Ok\r\n"
    assert reply(214, "a", "b", "c") == b"214-a\r\n214-b\r\n214 c\r\n"
    assert reply(250, "bad\r\ntext\x00") == b"250 bad??text?\r\n"
    with pytest.raises(SoftwareError):
        reply(99, "x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (Reply(550, "5.1.2 Relay not allowed."), b"550 5.1.2 Relay not allowed.\r\n"),
        (Reply(550, "no such user"), b"550 5.0.0 no such user\r\n"),
        (Reply(554, "5.7.1 one two"), b"554 5.7.1 one two\r\n"),
        (Reply(550, "4.1.1 wrong class"), b"550 5.0.0 4.1.1 wrong class\r\n"),
        (Reply(450, "4.2.2 try later"), b"554 5.0.0 Rejected by the mail listener\r\n"),
        (None, b"554 5.0.0 Rejected by the mail listener\r\n"),
        (Reply(0, "garbage", kind="protocol"), b"554 5.0.0 Rejected by the mail listener\r\n"),
        (Reply(550, ""), b"550 5.0.0\r\n"),
    ],
)
def test_listener_reply(text: Reply | None, expected: bytes) -> None:
    assert listener_reply(text) == expected


@given(st.integers(0, 599), st.text())
def test_listener_reply_is_always_a_5xx_reply(code: int, text: str) -> None:
    codes = well_formed(listener_reply(Reply(code, text)))
    assert len(codes) == 1
    assert 500 <= codes[0] <= 599


@given(st.integers(200, 599), st.lists(st.text(), max_size=5))
def test_reply_is_always_well_formed(code: int, lines: list[str]) -> None:
    assert well_formed(reply(code, *lines)) == [code]


# --- the data decoder -------------------------------------------------------------------


def decode_all(chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    """Feed chunks; return the message and what followed the terminator (None: no end)."""
    d = DataDecoder()
    out = b""
    for i, chunk in enumerate(chunks):
        payload, end = d.feed(chunk)
        out += payload
        if end is not None:
            assert d.done
            assert d.size == len(out)
            return out, chunk[end:] + b"".join(chunks[i + 1 :])
    assert d.size == len(out)
    return out, None


@pytest.mark.parametrize(
    ("wire", "message", "rest"),
    [
        (b".\r\n", b"", b""),
        (b".\n", b"", b""),
        (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
        (b"..\r\n.\r\n", b".\r\n", b""),
        (b"...\r\n.\r\n", b"..\r\n", b""),
        (b".x\r\n.\r\n", b"x\r\n", b""),  # a client that forgot to stuff: RFC 5321 4.5.2
        (b".\rx\r\n.\r\n", b"\rx\r\n", b""),
        (b"a\n..b\n.\nNOOP\n", b"a\n.b\n", b"NOOP\n"),
        (b"a.\r\n. \r\n.\r\n", b"a.\r\n \r\n", b""),
        (b"x\r.\r\n.\r\n", b"x\r.\r\n", b""),  # a bare CR does not end a line
        (b"no end", b"no end", None),
    ],
)
def test_decoder_cases(wire: bytes, message: bytes, rest: bytes | None) -> None:
    assert decode_all([wire]) == (message, rest)
    # Every split of the input into two chunks gives the same result.
    for cut in range(len(wire) + 1):
        assert decode_all([wire[:cut], wire[cut:]]) == (message, rest)
    # And one byte at a time.
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == (message, rest)


def stuff(lines: list[bytes], eol: bytes) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + eol for line in lines)


@given(
    st.lists(st.binary().map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.sampled_from([b"\r\n", b"\n"]),
    st.lists(st.integers(0, 400), max_size=8),
    st.binary(max_size=20),
)
def test_decoder_unstuffs_exactly_once_for_any_chunking(
    lines: list[bytes], eol: bytes, cuts: list[int], after: bytes
) -> None:
    # Lines are free of LF; a line ending in CR with an LF ending is fine for the decoder.
    message = b"".join(line + eol for line in lines)
    wire = stuff(lines, eol) + b"." + eol + after
    points = sorted({min(c, len(wire)) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    assert decode_all(chunks) == (message, after)


# --- properties of the whole machine ------------------------------------------------------

COMMANDS = [
    b"HELO x",
    b"EHLO x",
    b"MAIL FROM:<a@example.org>",
    b"MAIL FROM:<>",
    b"RCPT TO:<b@example.org>",
    b"RCPT TO:<root>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY x",
    b"HELP",
    b"QUIT",
    b".",
]
line_strategy = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=1100),
    st.builds(lambda c, tail: c + tail, st.sampled_from(COMMANDS), st.binary(max_size=40)),
).map(lambda b: b.replace(b"\n", b"") + b"\r\n")  # one line each: the driver splits at LF


@settings(max_examples=300)
@given(st.lists(line_strategy, max_size=40))
def test_arbitrary_lines_never_raise_and_replies_are_well_formed(lines: list[bytes]) -> None:
    d = Dialogue(max_size=5000, max_recipients=5, hard_error_limit=10)
    for line in lines:
        if d.closed:
            break
        d.send(line)  # checks every reply with well_formed()
    if d.decoder is None:
        assert not d.session.in_data


def test_module_is_pure() -> None:
    """smtpserver does no I/O: it imports only typing helpers and pure mailshim modules."""
    tree = ast.parse(inspect.getsource(smtpserver))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {
        "__future__",
        "typing",
        "collections.abc",
        "mailshim.address",
        "mailshim.errors",
        "mailshim.reply",
        "mailshim.constants",
    }


def test_docstring_examples() -> None:
    import doctest

    result = doctest.testmod(smtpserver)
    assert result.attempted > 0
    assert result.failed == 0
