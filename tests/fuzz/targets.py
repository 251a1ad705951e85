"""Fuzz targets: one function per parser, each taking raw bytes and checking the properties.

Shared by the atheris harness (``tests/fuzz/fuzz.py``, coverage-guided, run by
``tests/fuzz/run.sh``) and by the normal test suite (``tests/test_fuzz.py`` replays every file
of ``tests/fuzz/corpus/<target>/`` through these functions and drives them with hypothesis).
They need nothing but mailshim: no atheris, no hypothesis.

A target turns the bytes into that parser's input with a fixed, simple framing (so a corpus
file stays readable and hand-writable), calls the parser, and checks:

- nothing escapes but a ``MailshimError`` subclass, and that error carries a sysexits code
  and a one-line message (``check_error``);
- the parser's own properties (no byte changed outside the documented header edits, no control
  character in an address, replies that are well-formed SMTP, ...), by ``assert``.

Anything else raised (an ``AssertionError`` included) is a finding.
"""

from __future__ import annotations

import io
import re

from mailshim import address, aliases, argv, message, smtpserver, spoolfmt
from mailshim.errors import MailshimError, SoftwareError
from mailshim.reply import Reply

# sysexits(3) codes a rejection may carry (EX_USAGE .. EX_CONFIG).
SYSEXITS = frozenset(range(64, 79))
CRLF = b"\r\n"
DOMAIN = "example.org"
SEP = "\x1f"  # framing: the ASCII unit separator splits argv words and similar lists


def check_error(exc: MailshimError) -> None:
    """A rejection is a MailshimError with a sysexits code and a one-line message.

    ``SoftwareError`` (EX_SOFTWARE) means "a bug: something that should not happen did": on
    hostile input it is a finding, not a rejection.
    """
    if isinstance(exc, SoftwareError):
        raise exc
    assert exc.code in SYSEXITS, (type(exc).__name__, exc.code)
    text = exc.message
    assert "\n" not in text and "\r" not in text and "\x00" not in text, text
    assert text, type(exc).__name__


def _text(data: bytes) -> str:
    """Bytes as Python sees argv and header values: UTF-8 with surrogateescape."""
    return data.decode("utf-8", "surrogateescape")


def _no_controls(addr: str) -> None:
    assert not any(c in addr for c in "\r\n\x00"), addr


# ---------------------------------------------------------------------------------------------
# argv
# ---------------------------------------------------------------------------------------------


def target_argv(data: bytes) -> None:
    """``argv.parse`` on words split at 0x1F; the first word is the program name."""
    words = _text(data).split(SEP)
    prog, args = words[0] or "sendmail", words[1:]
    try:
        inv = argv.parse(args, prog)
    except MailshimError as exc:
        check_error(exc)
        return
    assert inv.action in ("submit", "list", "aliases", "verify", "smtp", "flush", "nothing")
    for value in [*inv.recipients, inv.sender or "", inv.full_name or ""]:
        _no_controls(value)
    # A recipient is a word of the command line, never a piece of one or an option's value.
    for rcpt in inv.recipients:
        assert rcpt in args, rcpt


# ---------------------------------------------------------------------------------------------
# addresses
# ---------------------------------------------------------------------------------------------


def _address_list(text: str) -> None:
    try:
        addrs = address.parse_address_list(text)
    except MailshimError as exc:
        check_error(exc)
        return
    for addr in addrs:
        _no_controls(addr)
        assert addr, text
        # The canonical form is accepted by the strict checker and does not move.
        try:
            canon = address.check_envelope_address(addr)
        except MailshimError as exc:
            check_error(exc)  # tolerant parser, strict checker: may refuse (a long domain)
            continue
        assert address.check_envelope_address(canon) == canon, (addr, canon)
    try:
        where = address.find_unqualified(text)
    except MailshimError as exc:  # pragma: no cover - _parse already succeeded above
        raise AssertionError(f"find_unqualified failed where parse succeeded: {exc}") from exc
    assert where == sorted(where) and all(0 < w <= len(text) for w in where), where
    assert len(where) == sum(1 for a in addrs if address.qualify(a, DOMAIN) != a), (where, addrs)


def _envelope(text: str) -> None:
    try:
        canon = address.check_envelope_address(text)
    except MailshimError as exc:
        check_error(exc)
        return
    _no_controls(canon)
    assert address.check_envelope_address(canon) == canon, (text, canon)
    assert address.check_envelope_address(f"<{canon}>") == canon, (text, canon)
    qualified = address.qualify(canon, DOMAIN)
    if canon:
        assert "@" in qualified
        assert address.check_envelope_address(qualified) == qualified or len(qualified) > 200


def _aliases(text: str) -> None:
    try:
        table, _skipped = aliases.parse_aliases_file(text)
    except MailshimError as exc:
        check_error(exc)
        return
    expander = aliases.Aliases(table)
    for name in [*list(table)[:8], "root", "nobody@" + DOMAIN]:
        try:
            # As submit.rewrite_recipient does: only a checked address is expanded.
            checked = address.check_envelope_address(name)
            if not checked:
                continue
            out = expander.expand(checked, DOMAIN)
        except MailshimError as exc:
            check_error(exc)
            continue
        assert out, name
        for addr in out:
            _no_controls(addr)
            assert "@" in addr, (name, addr)
        assert len(out) == len({(a.rpartition("@")[0], a.rpartition("@")[2].lower()) for a in out})


def target_address(data: bytes) -> None:
    """The first byte picks the function (list, envelope, aliases file); the rest is text."""
    if not data:
        return
    text = _text(data[1:])
    (_address_list, _envelope, _aliases)[data[0] % 3](text)


# ---------------------------------------------------------------------------------------------
# the message: line ends, the lone dot, the header block, the edits
# ---------------------------------------------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")


def expected_message(data: bytes, dot_ends: bool) -> bytes:
    """What the documented edits 1-3 make of ``data`` (line ends, lone dot, final CRLF)."""
    norm = _EOL.sub(CRLF, data)
    if dot_ends:
        lines = norm.split(CRLF)
        for i, line in enumerate(lines):
            if line == b".":
                norm = b"".join(part + CRLF for part in lines[:i])
                break
    if norm and not norm.endswith(CRLF):
        norm += CRLF
    return norm


class Chunked:
    """A ``read(n)`` that hands out ``data`` in pieces of the given sizes (then what is left)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.pos = 0
        self.sizes = [s for s in sizes if s > 0]
        self.calls_after_eof = 0

    def __call__(self, n: int) -> bytes:
        assert n > 0
        if self.pos >= len(self.data):
            self.calls_after_eof += 1
            assert self.calls_after_eof < 3, "read() called again and again after the end"
            return b""
        size = self.sizes.pop(0) if self.sizes else n
        piece = self.data[self.pos : self.pos + min(n, size)]
        self.pos += len(piece)
        return piece


def read_message(
    data: bytes, dot_ends: bool, sizes: list[int], chunk_size: int = 65536, limit: int = 1 << 20
) -> tuple[message.HeaderBlock, bytes, message.Reader] | None:
    """Run the Reader over ``data``; None when it refused the input (checked error)."""
    reader = message.Reader(Chunked(data, sizes), dot_ends, chunk_size=chunk_size)
    try:
        block = reader.header_block(limit)
    except MailshimError as exc:
        check_error(exc)
        return None
    body = b"".join(reader.body())
    return block, body, reader


def check_header_fields(fields: list[message.Field]) -> None:
    for f in fields:
        raw = f.raw
        assert raw.endswith(CRLF), raw
        lines = raw[:-2].split(CRLF)
        assert b":" in lines[0], raw
        for line in lines[1:]:
            assert line[:1] in (b" ", b"\t"), raw  # a continuation line
        assert b"\r" not in raw.replace(CRLF, b"") and b"\n" not in raw.replace(CRLF, b"")


def check_reader(data: bytes, dot_ends: bool, sizes: list[int], chunk_size: int) -> None:
    """Edits 1-3 only, whatever the split of the input into reads and chunks."""
    got = read_message(data, dot_ends, sizes, chunk_size)
    if got is None:
        return
    block, body, reader = got
    check_header_fields(block.fields)
    header = b"".join(f.raw for f in block.fields)
    sep = CRLF if block.had_separator else b""
    out = header + sep + block.body_prefix + body
    want = expected_message(data, dot_ends)
    assert out == want, (out[:200], want[:200])
    assert reader.eightbit == (not out.isascii()), reader.eightbit
    if not block.had_separator and (block.body_prefix + body):
        # The first body line could not have been taken for a header field.
        first = (block.body_prefix + body).split(CRLF, 1)[0]
        colon = first.find(b":")
        name = first[:colon].rstrip(b" \t") if colon > 0 else b""
        is_field = 0 < len(name) <= 998 and all(33 <= b < 127 and b != 58 for b in name)
        assert not is_field or first[:1] in (b" ", b"\t"), first[:100]


_FROM_MODES = ("add", "force", "rewrite-local")
_BCC = ("bcc", "resent-bcc")
_ADDED = ("from", "date", "message-id")


def _value(raw: bytes) -> str:
    return _text(raw[raw.index(b":") + 1 :].replace(CRLF, b"")).strip(" \t")


def resent_block_end(fields: list[message.Field]) -> int:
    """Index after the first run of Resent- fields (where edit 7 inserts); -1 without any."""
    names = [f.lname for f in fields]
    start = next((i for i, n in enumerate(names) if n.startswith("resent-")), -1)
    if start < 0:
        return -1
    while start < len(names) and names[start].startswith("resent-"):
        start += 1
    return start


def check_edits(
    fields: list[message.Field],
    mode: str,
    strip_bcc: bool,
    from_addr: str,
    from_display: str | None,
    qualify: bool = False,
) -> bytes:
    """``edit_headers`` changes only what the README lists; its output reads back the same."""
    edits = message.HeaderEdits(
        date="Mon, 23 Nov 2026 17:07:07 +0100",
        message_id=message.make_message_id("0123456789ABCDEFGHIJ", DOMAIN),
        from_addr=from_addr,
        from_display=from_display,
        from_mode=mode,
        domain=DOMAIN,
        strip_bcc=strip_bcc,
        qualify_domain=DOMAIN if qualify else "",
        resent_message_id=message.make_message_id("0123456789ABCDEFGHIJ.resent", DOMAIN),
    )
    try:
        out = message.edit_headers(fields, edits)
    except MailshimError as exc:
        check_error(exc)
        return b""
    assert out.endswith(CRLF)
    reread = message.Reader(Chunked(out + b"body\r\n", []), False).header_block(1 << 22)
    assert reread.had_separator and reread.body_prefix == b"body\r\n", out[-200:]
    assert b"".join(f.raw for f in reread.fields) + CRLF == out, "edited header reads back"
    new = list(reread.fields)
    # Edit 7: a resent block gets its missing Resent-Date / Resent-Message-ID after its
    # first run of Resent- fields; take them out, then the rest must match edits 4-6.
    end = resent_block_end(fields)
    if end >= 0:
        at = len([f for f in fields[:end] if not (strip_bcc and f.lname in _BCC)])
        want = [n for n in ("resent-date", "resent-message-id") if not message.has_field(fields, n)]
        assert [f.lname for f in new[at : at + len(want)]] == want, [f.raw for f in new]
        del new[at : at + len(want)]
    kept = [f for f in fields if not (strip_bcc and f.lname in _BCC)]
    want_added = [
        n for n in _ADDED if not message.has_field(fields, n) and (n != "from" or from_addr)
    ]
    made_from: list[message.Field] = []
    if mode == "force" and from_addr:
        froms = [f for f in new if f.lname == "from"]
        assert len(froms) == 1, [f.raw for f in froms]
        made_from = froms
        rest_new = [f for f in new if f.lname != "from"]
        rest_old = [f for f in kept if f.lname != "from"]
        for old, now in zip(rest_old, rest_new, strict=False):
            check_kept(old, now, mode, qualify)
        assert [f.lname for f in rest_new][len(rest_old) :] == [
            n for n in want_added if n != "from"
        ]
    else:
        assert len(new) == len(kept) + len(want_added), [f.raw for f in new]
        for old, now in zip(kept, new, strict=False):
            check_kept(old, now, mode, qualify)
        added = new[len(kept) :]
        assert [f.lname for f in added] == want_added, [f.raw for f in added]
        made_from = [f for f in added if f.lname == "from"]
    for f in made_from:
        assert address.parse_address_list(_value(f.raw)) == [from_addr], f.raw
    if strip_bcc:
        assert not any(f.lname in _BCC for f in new)
    return out


def check_kept(old: message.Field, now: message.Field, mode: str, qualify: bool) -> None:
    """A caller's field: the same bytes, or (edits 5 and 6) only ``@domain`` inserted."""
    if (qualify and old.lname in message.QUALIFIED_FIELDS) or (
        mode == "rewrite-local" and old.lname in ("from", "sender", "reply-to")
    ):
        _check_rewritten(old, now)
    else:
        assert now.raw == old.raw, (old.raw, now.raw)


def _check_rewritten(old: message.Field, now: message.Field) -> None:
    """rewrite-local only inserts ``@domain`` after unqualified addresses."""
    if now.raw == old.raw:
        return
    text = _text(now.raw[now.raw.index(b":") + 1 :])
    assert address.find_unqualified(text) == [], now.raw
    extra = len(now.raw) - len(old.raw)
    assert extra > 0 and extra % len("@" + DOMAIN) == 0, (old.raw, now.raw)
    # old is now with some "@example.org" removed: a subsequence check.
    it = iter(now.raw)
    assert all(b in it for b in old.raw), (old.raw, now.raw)


def target_message(data: bytes) -> None:
    """Byte 0: flags (dot_ends, strip_bcc, From mode); byte 1: read split; rest: the input.

    The whole preparation the way ``submit`` does it: Reader, header block, edits, body.
    """
    if len(data) < 2:
        return
    flags, split, raw = data[0], data[1], data[2:]
    dot_ends = bool(flags & 1)
    strip_bcc = bool(flags & 2)
    mode = _FROM_MODES[(flags >> 2) % 3]
    sizes = [1 + (split >> 4), 1 + (split & 15)] * 8
    chunk = (1, 2, 7, 64, 65536)[(flags >> 5) % 5]
    check_reader(raw, dot_ends, sizes, chunk)
    got = read_message(raw, dot_ends, sizes, chunk)
    if got is None:
        return
    block, body, _reader = got
    display = None if flags & 0x80 else "Fuzz " + _text(raw[:40])
    qualify = bool((flags ^ split) & 1)
    out = check_edits(block.fields, mode, strip_bcc, "user@" + DOMAIN, display, qualify)
    resent = resent_block_end(block.fields) >= 0
    if out and mode == "add" and not strip_bcc and not qualify and not resent:
        # With nothing to remove, the input (edits 1-3) is a prefix-and-suffix of the output.
        want = expected_message(raw, dot_ends)
        head = b"".join(f.raw for f in block.fields)
        rest = want[len(head) :]
        if block.had_separator:
            rest = rest[2:]
        assert want.startswith(head)
        assert out.startswith(head) and (out + block.body_prefix + body).endswith(rest)


def target_header_limit(data: bytes) -> None:
    """Header block of ``data[2:]`` with a tiny limit (byte 0) and read split (byte 1)."""
    if len(data) < 2:
        return
    limit = 1 + data[0] * 4
    sizes = [1 + data[1] % 17] * 64
    got = read_message(data[2:], bool(data[1] & 0x80), sizes, 65536, limit)
    if got is None:
        return
    block, _body, _reader = got
    assert sum(len(f.raw) for f in block.fields) <= limit + 2  # + a CRLF added at the end
    check_header_fields(block.fields)


# ---------------------------------------------------------------------------------------------
# dot-stuffing on the -bs side
# ---------------------------------------------------------------------------------------------


def decode_all(data: bytes, sizes: list[int]) -> tuple[bytes, int | None, int]:
    dec = smtpserver.DataDecoder()
    out = []
    pos = 0
    end = None
    i = 0
    while pos < len(data) and not dec.done:
        size = sizes[i % len(sizes)] if sizes else len(data)
        i += 1
        piece = data[pos : pos + max(1, size)]
        payload, stop = dec.feed(piece)
        out.append(payload)
        if stop is not None:
            assert 0 <= stop <= len(piece)
            end = pos + stop
        pos += len(piece)
    assert dec.size == sum(len(p) for p in out)
    return b"".join(out), end, dec.size


def target_dotdata(data: bytes) -> None:
    """Byte 0: split sizes; rest: a DATA section as the client sends it."""
    if not data:
        return
    sizes = [1 + (data[0] & 7), 1 + (data[0] >> 3)]
    wire = data[1:]
    whole, end_whole, _ = decode_all(wire, [])
    split, end_split, _ = decode_all(wire, sizes)
    assert (whole, end_whole) == (split, end_split), "the split of the input changes the result"
    # Reference, line by line (LF-terminated lines; a bare CR is just a byte).
    ref_out = []
    pos = 0
    ref_end = None
    for line in re.findall(rb"[^\n]*\n|[^\n]+$", wire):
        if line in (b".\n", b".\r\n"):
            ref_end = pos + len(line)
            break
        pos += len(line)
        ref_out.append(line[1:] if line.startswith(b".") else line)
    ref = b"".join(ref_out)
    if ref_end is not None:
        assert (whole, end_whole) == (ref, ref_end), (whole[:100], ref[:100], end_whole, ref_end)
    else:
        # Unfinished: a trailing "." or ".\r" at a line start may be held back.
        assert end_whole is None
        assert ref.startswith(whole) and len(ref) - len(whole) <= 2, (whole[-50:], ref[-50:])
    # Stuffing the decoded message and ending it gives the message back.
    if ref_end is not None:
        msg = whole  # it ends with LF or is empty: the end line starts a line
        stuffed = re.sub(rb"(^|\n)\.", rb"\1..", msg) + b".\r\n"
        again, end, size = decode_all(stuffed + b"QUIT\r\n", sizes)
        assert again == msg and end == len(stuffed) and size == len(msg)


# ---------------------------------------------------------------------------------------------
# the spool entry and state readers
# ---------------------------------------------------------------------------------------------


def valid_entry(recipients: int = 2) -> bytes:
    env = spoolfmt.Envelope(
        "0123456789ABCDEFGHIJ",
        "sender@example.org",
        [f"r{i}@example.org" for i in range(recipients)],
        1700000000,
        1000,
        True,
        42,
    )
    return spoolfmt.encode_envelope(env).data + b"Subject: x\r\n\r\nhello\r\n"


def _line_ends(split: int, raw: bytes) -> None:
    """``LineEnds`` (drop-folder copies): bare CR/LF to CRLF, whatever the chunking."""
    ends = spoolfmt.LineEnds()
    size = 1 + split % 7
    out = [ends.feed(raw[i : i + size]) for i in range(0, len(raw), size)]
    out.append(ends.end())
    got = b"".join(out)
    assert got == expected_message(raw, False), (got[:100], raw[:100])


def target_spoolfmt(data: bytes) -> None:
    """Byte 0 mod 3: 0 ``decode_envelope`` on the rest, 1 ``decode_state``, 2 ``LineEnds``."""
    if not data:
        return
    raw = data[1:]
    if data[0] % 3 == 2:
        _line_ends(data[0] // 3, raw)
        return
    if data[0] % 3 == 0:
        f = io.BytesIO(raw)
        try:
            env, offset = spoolfmt.decode_envelope(f)
        except MailshimError as exc:
            check_error(exc)
            return
        assert spoolfmt.valid_id(env.queue_id) and env.recipients
        assert 0 < offset <= len(raw) and raw[offset - 2 : offset] == b"\n\n"
        for value in [env.sender, *env.recipients]:
            assert "\n" not in value and "\r" not in value and "\x00" not in value
        # What was read encodes and reads back the same.
        again, _ = spoolfmt.decode_envelope(io.BytesIO(spoolfmt.encode_envelope(env).data))
        for name in spoolfmt.Envelope.__slots__:
            assert getattr(again, name) == getattr(env, name), name
        return
    try:
        state = spoolfmt.decode_state(raw)
    except MailshimError as exc:
        check_error(exc)
        return
    assert spoolfmt.decode_state(spoolfmt.encode_state(state)).__class__ is spoolfmt.State
    assert spoolfmt.encode_state(spoolfmt.decode_state(spoolfmt.encode_state(state))) == (
        spoolfmt.encode_state(state)
    )


# ---------------------------------------------------------------------------------------------
# the -bs server state machine
# ---------------------------------------------------------------------------------------------

_ALIASES = aliases.Aliases(
    {"root": ("admin@example.org",), "loop": ("loop2",), "loop2": ("loop",), "none": ()}
)


def _rewrite(addr: str) -> list[str]:
    return _ALIASES.expand(addr, DOMAIN)


def well_formed_reply(data: bytes) -> list[int]:
    """``data`` is one or more complete SMTP replies; returns their codes."""
    assert data.endswith(CRLF), data
    codes = []
    current = None
    for line in data[:-2].split(CRLF):
        assert len(line) >= 4, data
        code, sep, text = line[:3], line[3:4], line[4:]
        assert code.isdigit() and b"200" <= code <= b"599", data
        assert sep in (b" ", b"-"), data
        assert all(32 <= b < 127 for b in text), data
        if current is not None:
            assert code == current, data
        current = None if sep == b" " else code
        if sep == b" ":
            codes.append(int(code))
    assert current is None, data
    return codes


def run_session(wire: bytes, max_size: int = 4096, max_recipients: int = 5) -> list[bytes]:
    """Drive ``ServerSession`` the way ``bs.py`` does over the whole client input ``wire``."""
    session = smtpserver.ServerSession(
        "mx.example.org",
        max_size,
        max_recipients=max_recipients,
        hard_error_limit=8,
        rewrite=_rewrite,
    )
    replies = [session.greeting()]
    buf = wire
    while buf:
        nl = buf.find(b"\n")
        line, buf = (buf, b"") if nl < 0 else (buf[: nl + 1], buf[nl + 1 :])
        if len(line) > smtpserver.MAX_COMMAND_LINE:
            response = session.line_too_long()
        else:
            response = session.command(line)
        codes = well_formed_reply(response.data)
        replies.append(response.data)
        if response.close:
            assert codes[-1] in (221, 421), codes
            break
        tx = response.transaction
        if tx is None:
            continue
        assert codes == [354] and session.in_data
        assert tx.recipients and len(tx.recipients) <= max_recipients * 2
        for addr in [tx.sender, *tx.recipients]:
            _no_controls(addr)
            assert all(32 <= ord(c) != 127 for c in addr), addr
        for rcpt in tx.recipients:
            assert "@" in rcpt, rcpt
            assert rcpt.isascii() or tx.smtputf8, rcpt
        dec = smtpserver.DataDecoder()
        _payload, end = dec.feed(buf)
        if end is None:
            break  # end of input in DATA: the driver keeps nothing
        buf = buf[end:]
        verdict = smtpserver.reply(552, "5.3.4 too big") if dec.size > max_size else None
        done = session.data_finished(verdict or smtpserver.reply(250, "2.0.0 Ok: queued"))
        well_formed_reply(done)
        replies.append(done)
        assert not session.in_data and session.transaction is None
    return replies


def target_smtp(data: bytes) -> None:
    """A whole client side of a ``sendmail -bs`` session."""
    run_session(data)
    # listener_reply: any text the listener may send back turns into a clean 5xx reply.
    text = _text(data[:600])
    codes = well_formed_reply(smtpserver.listener_reply(Reply.from_legacy(text)))
    assert len(codes) == 1 and 500 <= codes[0] <= 599


# ---------------------------------------------------------------------------------------------
# the delivery status notification built for a failed entry
# ---------------------------------------------------------------------------------------------

_DSN_FIELDS = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "auto-submitted",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
]


def target_bounce(data: bytes) -> None:
    """Byte 0: kind and flags; the rest, split at 0x1F: sender, original header section, then
    pairs of (recipient, last reply). Every piece is what a crafted entry or a listener may
    hold. The report must be one well-formed message whatever they hold."""
    from mailshim import bounce

    if not data:
        return
    flags = data[0]
    parts = data[1:].split(b"\x1f")
    sender = _text(parts[0])
    # the original headers come from a spooled message: CRLF line ends only
    original = _EOL.sub(CRLF, parts[1]) if len(parts) > 1 else b""
    pairs = parts[2:] or [b"r@example.net", b"550 5.1.1 no"]
    recipients: dict[str, Reply] = {}
    for i in range(0, len(pairs), 2):
        reply = pairs[i + 1] if i + 1 < len(pairs) else b""
        recipients[_text(pairs[i])] = Reply.from_legacy(_text(reply))
    env = spoolfmt.Envelope("0123456789ABCDEFGHIJ", sender, list(recipients), 1700000000, 0)
    kind = bounce.FAILED if flags & 1 else bounce.DELAYED
    report = bounce.build_report(
        kind=kind,
        envelope=env,
        recipients=recipients,
        original_headers=original,
        reporting_mta="mx.example.org",
        domain=DOMAIN,
        now=1795450027,
        utc_offset=3600,
        message_id="0123456789ABCDEFGHIJ",
        expired=list(recipients)[:1] if flags & 2 else (),
        retry_until=1795450027 + 86400 if flags & 4 else None,
        last_attempt=1795450000 if flags & 8 else None,
    )
    # CRLF only, and the message reads back with exactly the fields the report writes.
    assert b"\r" not in report.replace(b"\r\n", b"") and b"\n" not in report.replace(b"\r\n", b"")
    block = message.Reader(Chunked(report, []), False).header_block(1 << 20)
    assert block.had_separator
    assert [f.lname for f in block.fields] == _DSN_FIELDS, [f.raw for f in block.fields]
    if sender and "@" in sender and _valid(sender):
        # To: names exactly one address: the sender (runs of blanks inside a quoted local
        # part are collapsed to one by the one-line cleaning; nothing else changes)
        to = next(f for f in block.fields if f.lname == "to")
        parsed = address.parse_address_list(_value(to.raw))
        assert len(parsed) == 1, to.raw
        if not any(c.isspace() for c in sender):
            assert parsed == [sender], to.raw
    # the MIME structure: three parts and the closing delimiter, each on a line of its own
    boundary = _value(next(f.raw for f in block.fields if f.lname == "content-type"))
    boundary = boundary.split('boundary="', 1)[1].rstrip('"')
    lines = report.split(b"\r\n")
    delimiter = b"--" + boundary.encode()
    assert lines.count(delimiter) == 3 and lines.count(delimiter + b"--") == 1, boundary
    assert sum(1 for line in lines if line.startswith(delimiter)) == 4, boundary


def _valid(addr: str) -> bool:
    try:
        return address.check_envelope_address(addr) == addr
    except MailshimError:
        return False


def target_bounce_lines(data: bytes) -> None:
    """The report's lines stay within RFC 5322's 998 octets (listeners may refuse longer)."""
    from mailshim import bounce

    if len(data) < 2:
        return
    rcpt = _text(data[1:]) * (1 + data[0])
    env = spoolfmt.Envelope("0123456789ABCDEFGHIJ", "s@example.org", [rcpt], 1700000000, 0)
    report = bounce.build_report(
        kind=bounce.FAILED,
        envelope=env,
        recipients={rcpt: Reply(550, "5.1.1 " + "why " * (data[0] * 2))},
        original_headers=b"Subject: x\r\n",
        reporting_mta="mx.example.org",
        domain=DOMAIN,
        now=1795450027,
        utc_offset=0,
        message_id="0123456789ABCDEFGHIJ",
    )
    longest = max(len(line) for line in report.split(b"\r\n"))
    assert longest <= 998, longest


# Reported bugs, each pinned by a strict xfail test in tests/test_fuzz.py: (target, exception
# class, text in its message). The atheris harness skips inputs hitting them (unless --strict)
# so that one known crash does not hide the next; the corpus replay tolerates them. Remove an
# entry once its bug is fixed.
OPEN_BUGS: dict[str, tuple[str, type[BaseException], str]] = {}


def open_bug(target: str, exc: BaseException) -> str | None:
    """The id of the reported, still open bug that ``exc`` (raised by ``target``) is, if any."""
    for bug_id, (name, kind, text) in OPEN_BUGS.items():
        if name == target and isinstance(exc, kind) and text in str(exc):
            return bug_id
    return None


TARGETS = {
    "argv": target_argv,
    "address": target_address,
    "message": target_message,
    "header_limit": target_header_limit,
    "dotdata": target_dotdata,
    "spoolfmt": target_spoolfmt,
    "smtp": target_smtp,
    "bounce": target_bounce,
}
