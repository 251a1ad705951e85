"""The message: read stdin as a stream, normalise line ends, split the header, edit it.

``Reader`` pulls bytes through a ``read(n)`` callable, turns CRLF, bare LF and bare CR into
CRLF, keeps every other byte (8-bit included), and, when ``dot_ends`` is set (sendmail without
``-i``), stops at a line holding a lone ``.``. ``header_block`` returns the header fields
exactly as read; ``body`` streams the rest in chunks, so memory stays flat whatever the size.
``edit_headers`` builds the header section to spool.

The only changes mailshim makes to a message (the "documented edits"):

1. line ends become CRLF;
2. with ``dot_ends``, the lone ``.`` line and everything after it are dropped;
3. a message whose last line lacks a line end gets a final CRLF;
4. ``Bcc:`` and ``Resent-Bcc:`` fields are removed when ``strip_bcc`` is set;
5. ``From:``, ``Date:``, ``Message-ID:`` are appended after the existing fields when missing;
   in ``force`` mode the first ``From:`` is replaced in place (later ones dropped); in
   ``rewrite-local`` mode ``@domain`` is inserted after each address without a domain in
   ``From:``, ``Sender:`` and ``Reply-To:``, every other byte of those fields kept;
6. with ``qualify_domain`` (Postfix's ``append_at_myorigin``), ``@domain`` is inserted after
   each address without a domain in ``From:``, ``Sender:``, ``Reply-To:``, ``To:``, ``Cc:``
   and their ``Resent-`` forms, every other byte of those fields kept; a field that does not
   parse is left exactly as it was;
7. when a ``Resent-`` field is present, ``Resent-Date:`` and ``Resent-Message-ID:`` are added
   if missing, right after the first run of ``Resent-`` fields (the newest resent block);
8. a blank line always ends the header section, inserted when the input had none.

Header field values are decoded as UTF-8 with ``errors="surrogateescape"`` (``value_text``),
so undecodable bytes survive a round trip and never raise.

Trust: imported by ``sendmail`` (running as any local user, on the fast path: no ``re``,
``typing``, ``email`` or ``time`` at run time) and by the ``-bs`` server. The message bytes
are hostile: any length, any byte, no line ends at all. Memory is bounded by the header
``limit`` plus a chunk or two; a 100 MB line in the body is never held whole.

Raises ``DataError`` (exit 65) for a header block larger than its limit, a recipient field that
does not parse or an unusable ``From`` address; ``SoftwareError`` (exit 70) for a programming
error (an unknown ``from_mode``).
"""

from __future__ import annotations

import binascii

from mailshim.address import find_unqualified, parse_address_list
from mailshim.errors import DataError, SoftwareError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "QUALIFIED_FIELDS",
    "Field",
    "HeaderBlock",
    "HeaderEdits",
    "Reader",
    "edit_headers",
    "fold_field",
    "format_date",
    "format_display_name",
    "has_field",
    "header_recipients",
    "make_message_id",
]

CRLF = b"\r\n"
# A field name longer than a whole RFC 5322 line cannot be one: such a line is body. This
# also bounds what is buffered before deciding.
_MAX_NAME = 998
# Bytes allowed in a field name: printable ASCII except ":" (and SP, which may only trail).
_NAME_BYTES = bytes(b for b in range(33, 127) if b != ord(":"))

_FIELD = 1
_CONT = 2
_BODY = 3
_SEP = 4
_UNKNOWN = 5


def _normalize(data: bytes) -> bytes:
    """CRLF, bare LF and bare CR to CRLF; ``data`` must not end with a CR (held back)."""
    if b"\r" not in data:
        return data.replace(b"\n", CRLF)
    # Already CRLF throughout (the usual case once a CR is seen)? Two C-speed scans tell.
    rest = data.replace(CRLF, b"")
    if b"\r" not in rest and b"\n" not in rest:
        return data
    return data.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)


def _is_name(name: bytes) -> bool:
    """``name`` (possibly followed by blanks) is a field name."""
    name = name.rstrip(b" \t")
    return bool(name) and not name.translate(None, _NAME_BYTES)


def _line_kind(line: bytes, complete: bool, in_field: bool) -> int:
    """Classify a header-area line (``complete``: its CRLF has been seen)."""
    if not line:
        return _SEP if complete else _UNKNOWN
    if line[0] in (32, 9):
        return _CONT if in_field else _BODY
    colon = line.find(b":")
    if colon >= 0:
        return _FIELD if _is_name(line[:colon]) else _BODY
    if complete or len(line) > _MAX_NAME:
        return _BODY
    # No colon yet: it can still become "Name:" only if all so far is a name plus blanks.
    head = line.rstrip(b" \t")
    if not head or head.translate(None, _NAME_BYTES):
        return _BODY
    return _UNKNOWN


class Field:
    """One header field: ``raw`` is every byte of it, folded lines and final CRLF included."""

    __slots__ = ("lname", "name", "raw")

    def __init__(self, raw: bytes) -> None:
        colon = raw.find(b":")
        if colon < 0 or not _is_name(raw[:colon]):
            raise SoftwareError(f"not a header field: {raw[:80]!r}")
        self.raw = raw if raw.endswith(CRLF) else raw + CRLF
        self.name = raw[:colon].rstrip(b" \t").decode("ascii")
        self.lname = self.name.lower()

    def value_text(self) -> str:
        """The unfolded value (leading and trailing blanks stripped), UTF-8/surrogateescape."""
        value = self.raw[self.raw.index(b":") + 1 :]
        value = value.replace(CRLF, b"")
        return value.decode("utf-8", "surrogateescape").strip(" \t")

    def __repr__(self) -> str:
        return f"Field({self.raw!r})"


class HeaderBlock:
    """The header fields as read, whether a blank line ended them, and body bytes read ahead."""

    __slots__ = ("body_prefix", "fields", "had_separator")

    def __init__(self, fields: list[Field], had_separator: bool, body_prefix: bytes) -> None:
        self.fields = fields
        self.had_separator = had_separator
        self.body_prefix = body_prefix


class Reader:
    """Stream the input with normalised line ends; see the module docstring."""

    __slots__ = (
        "_at_line_start",
        "_chunk_size",
        "_cr",
        "_done",
        "_dot",
        "_held_dot",
        "_prefix",
        "_read",
        "eightbit",
        "ended_by_dot",
    )

    def __init__(
        self, read: Callable[[int], bytes], dot_ends: bool, chunk_size: int = 65536
    ) -> None:
        self._read = read
        self._dot = dot_ends
        self._chunk_size = max(1, chunk_size)
        self._cr = False  # a CR ended the last raw chunk: it may pair with an LF
        self._held_dot = False  # a "." at a line start ended the last chunk: maybe ".\r\n"
        self._at_line_start = True
        self._done = False
        self._prefix = b""
        self.eightbit = False
        self.ended_by_dot = False

    def _dot_filter(self, data: bytes, eof: bool) -> bytes:
        """Cut ``data`` at a lone-dot line; hold back a trailing "." that may start one."""
        if self._held_dot:
            data = b"." + data
            self._held_dot = False
        cut = -1
        if self._at_line_start and data.startswith(b".\r\n"):
            cut = 0
        else:
            found = data.find(b"\r\n.\r\n")
            if found >= 0:
                cut = found + 2
        if cut < 0 and (data.endswith(b"\r\n.") or (data == b"." and self._at_line_start)):
            data = data[:-1]
            if not eof:
                self._held_dot = True
            else:
                cut = len(data)  # a final "." with no line end after it
        if cut >= 0:
            self.ended_by_dot = True
            self._done = True
            data = data[:cut]
        if data:
            self._at_line_start = data.endswith(CRLF)
        return data

    def _pull(self) -> bytes | None:
        """The next non-empty normalised chunk, or None at the end of the input."""
        while not self._done:
            raw = self._read(self._chunk_size)
            if type(raw) is not bytes:
                raw = bytes(raw)  # a bytearray or memoryview from a custom reader
            if raw:
                if self._cr:
                    raw = b"\r" + raw
                self._cr = raw.endswith(b"\r")
                data = _normalize(raw[:-1] if self._cr else raw)
            else:
                data = CRLF if self._cr else b""
                self._cr = False
                self._done = True
            if self._dot:
                data = self._dot_filter(data, not raw)
            if data:
                if not self.eightbit and not data.isascii():
                    self.eightbit = True
                return data
        return None

    def header_block(self, limit: int) -> HeaderBlock:
        """Read the header fields; the bytes after them start ``body_prefix``.

        Raises ``DataError`` when the header block grows beyond ``limit`` bytes.
        """
        fields: list[Field] = []
        buf = bytearray()
        cur: bytearray | None = None  # the field being collected (it may be continued)
        used = 0  # header bytes so far
        pos = scan = 0  # start of the current line; where to look for its CRLF
        while True:
            eol = buf.find(CRLF, scan)
            end = eol + 2 if eol >= 0 else len(buf)
            # Only the start of a line decides what it is: classify a bounded slice.
            stop = min(eol if eol >= 0 else len(buf), pos + _MAX_NAME + 1)
            kind = _line_kind(bytes(buf[pos:stop]), eol >= 0, cur is not None)
            if kind in (_SEP, _BODY):
                break
            if used + end - pos > limit:
                raise DataError(f"message header block larger than {limit} bytes")
            if eol >= 0:
                used += end - pos
                if kind == _CONT and cur is not None:
                    cur += buf[pos:end]
                else:
                    if cur is not None:
                        fields.append(Field(bytes(cur)))
                    cur = bytearray(buf[pos:end])
                pos = scan = end
                continue
            chunk = self._pull()
            if chunk is None:
                if pos == len(buf):
                    break
                chunk = CRLF  # the last line lacks its line end: documented edit 3
            del buf[:pos]
            pos = 0
            scan = max(0, len(buf) - 1)
            buf += chunk
        if cur is not None:
            fields.append(Field(bytes(cur)))
        if kind == _SEP:
            pos += 2
        self._prefix = bytes(buf[pos:])
        return HeaderBlock(fields, kind == _SEP, self._prefix)

    def body(self) -> Iterator[bytes]:
        """The rest of the input as CRLF chunks (``body_prefix`` is not repeated).

        ``body_prefix`` followed by these chunks ends with CRLF when it is not empty.
        """
        ends_line = not self._prefix or self._prefix.endswith(b"\n")
        while True:
            chunk = self._pull()
            if chunk is None:
                break
            ends_line = chunk.endswith(b"\n")  # a normalised chunk never ends with a lone CR
            yield chunk
        if not ends_line:
            yield CRLF


def has_field(fields: list[Field], lname: str) -> bool:
    """Whether a field named ``lname`` (lowercase) exists."""
    return any(f.lname == lname for f in fields)


_RESENT_RCPT = ("resent-to", "resent-cc", "resent-bcc")
_RCPT = ("to", "cc", "bcc")


def header_recipients(fields: list[Field]) -> list[str]:
    """Recipients for ``-t``: Resent-To/Cc/Bcc if any exists, else To/Cc/Bcc; in order.

    Every such field is parsed (several ``To:`` lines included); duplicates are kept.
    Raises ``DataError`` naming the field when one cannot be parsed.
    """
    names = _RESENT_RCPT if any(f.lname in _RESENT_RCPT for f in fields) else _RCPT
    out: list[str] = []
    for f in fields:
        if f.lname in names:
            try:
                out.extend(parse_address_list(f.value_text()))
            except DataError as exc:
                raise DataError(f"{f.name} header: {exc.message}") from None
    return out


# ---------------------------------------------------------------------------------------------
# Header edits
# ---------------------------------------------------------------------------------------------

FROM_MODES = ("add", "rewrite-local", "force")
_REWRITE_FIELDS = ("from", "sender", "reply-to")
# The address fields a recipient reads (RFC 5322 3.6.2, 3.6.3, 3.6.6); Bcc is removed anyway.
QUALIFIED_FIELDS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
)
_ATEXT_PUNCT = "!#$%&'*+-/=?^_`{|}~"
_ENCODED_WORD_BYTES = 45  # 60 base64 characters: "=?UTF-8?B?" + 60 + "?=" is 72 <= 75
_FOLD_AT = 78
_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.!#$%&'*+-/=?^_`{|}~"
)


class HeaderEdits:
    """What ``edit_headers`` adds, replaces or removes (see the module docstring)."""

    __slots__ = (
        "date",
        "domain",
        "from_addr",
        "from_display",
        "from_mode",
        "message_id",
        "qualify_domain",
        "resent_message_id",
        "strip_bcc",
    )

    def __init__(
        self,
        *,
        date: str | None = None,
        message_id: str | None = None,
        from_addr: str = "",
        from_display: str | None = None,
        from_mode: str = "add",
        domain: str = "",
        strip_bcc: bool = False,
        qualify_domain: str = "",
        resent_message_id: str | None = None,
    ) -> None:
        if from_mode not in FROM_MODES:
            raise SoftwareError(f"unknown from_mode {from_mode!r}")
        self.date = date
        self.message_id = message_id
        self.from_addr = from_addr
        self.from_display = from_display
        self.from_mode = from_mode
        self.domain = domain
        self.strip_bcc = strip_bcc
        self.qualify_domain = qualify_domain
        self.resent_message_id = resent_message_id


def _clean(text: str) -> str:
    """Controls (CR and LF included: header injection) become spaces; ends stripped."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).strip()


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 B-encoded UTF-8 words of at most 75 characters, never splitting a character."""
    words = []
    piece = b""
    for ch in text:
        b = ch.encode("utf-8", "replace")
        if len(piece) + len(b) > _ENCODED_WORD_BYTES:
            words.append(piece)
            piece = b""
        piece += b
    if piece:
        words.append(piece)
    return [
        "=?UTF-8?B?" + binascii.b2a_base64(w, newline=False).decode("ascii") + "?=" for w in words
    ]


def format_display_name(name: str) -> str:
    """A display name as RFC 5322 phrase text: atoms, a quoted string, or encoded words.

    >>> format_display_name("Cron Daemon"), format_display_name("Doe, John")
    ('Cron Daemon', '"Doe, John"')
    >>> format_display_name("Zoë")
    '=?UTF-8?B?Wm/Dqw==?='
    """
    name = _clean(name)
    if not name:
        return ""
    words = name.split(" ")
    if not name.isascii() or max(len(w) for w in words) > _FOLD_AT - 8:
        return " ".join(_encoded_words(name))
    # "=?" could be taken for an encoded word: quoting keeps it literal (RFC 2047 5.).
    plain = all(c.isalnum() or c in _ATEXT_PUNCT for w in words for c in w)
    if plain and "=?" not in name and "" not in words:
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fold_field(name: str, value: str) -> str:
    """``Name: value`` folded before spaces into lines of at most 78 characters where a
    word allows it; no CRLF at the end.

    Folding only inserts CRLF before an existing space, so unfolding gives ``Name: value``
    back. A word too long for any line stays whole, never right after ``Name:`` alone.

    >>> fold_field("Subject", "a b")
    'Subject: a b'
    >>> [len(line) for line in fold_field("X", "word " * 30).splitlines()]
    [77, 76]
    """
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        if len(line) + 1 + len(word) > _FOLD_AT and line.strip() not in (f"{name}:", ""):
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


def _from_field(edits: HeaderEdits) -> bytes:
    addr = edits.from_addr
    if any(ord(c) < 32 or ord(c) == 127 for c in addr):
        raise DataError(f"invalid From address: {addr!r}")
    display = format_display_name(edits.from_display or "")
    value = f"{display} <{addr}>" if display else addr
    return fold_field("From", value).encode("utf-8", "surrogateescape") + CRLF


def _simple_field(name: str, value: str) -> bytes:
    return f"{name}: {_clean(value)}".encode("utf-8", "surrogateescape") + CRLF


def _rewrite_local(field: Field, domain: str) -> bytes:
    """Insert ``@domain`` after each address of ``field`` that has none; keep all else."""
    colon = field.raw.index(b":") + 1
    text = field.raw[colon:].decode("utf-8", "surrogateescape")
    try:
        where = find_unqualified(text)
    except DataError:
        return field.raw  # unparsable: leave it exactly as it was
    for at in reversed(where):
        text = text[:at] + "@" + domain + text[at:]
    return field.raw[:colon] + text.encode("utf-8", "surrogateescape")


def _resent_additions(fields: list[Field], edits: HeaderEdits) -> tuple[int, bytes]:
    """Where (index into ``fields``) and what to insert for an incomplete resent block.

    RFC 5322 3.6.6: each resent block needs Resent-Date, and Resent-Message-ID should be
    there. They go after the first run of ``Resent-`` fields, which a resender prepends.
    """
    first = next((i for i, f in enumerate(fields) if f.lname.startswith("resent-")), -1)
    if first < 0:
        return -1, b""
    end = first
    while end < len(fields) and fields[end].lname.startswith("resent-"):
        end += 1
    added = b""
    if edits.date and not has_field(fields, "resent-date"):
        added += _simple_field("Resent-Date", edits.date)
    if edits.resent_message_id and not has_field(fields, "resent-message-id"):
        added += _simple_field("Resent-Message-ID", edits.resent_message_id)
    return end, added


def edit_headers(fields: list[Field], edits: HeaderEdits) -> bytes:
    """The header section to spool, blank separator line included (always emitted).

    Fields are kept byte for byte and in order except for the edits in the module
    docstring. The blank line is written even when the input had none (or no body), so a
    body is never mistaken for header text.
    """
    out: list[bytes] = []
    want_from = bool(edits.from_addr)
    resent_at, resent_added = _resent_additions(fields, edits)
    for i, f in enumerate(fields):
        if i == resent_at and resent_added:
            out.append(resent_added)
        if edits.strip_bcc and f.lname in ("bcc", "resent-bcc"):
            continue
        if f.lname == "from" and edits.from_mode == "force" and edits.from_addr:
            if want_from:
                out.append(_from_field(edits))
                want_from = False
            continue
        if edits.qualify_domain and f.lname in QUALIFIED_FIELDS:
            out.append(_rewrite_local(f, edits.qualify_domain))
            continue
        if edits.from_mode == "rewrite-local" and f.lname in _REWRITE_FIELDS and edits.domain:
            out.append(_rewrite_local(f, edits.domain))
            continue
        out.append(f.raw)
    if resent_at == len(fields) and resent_added:
        out.append(resent_added)
    if want_from and not has_field(fields, "from"):
        out.append(_from_field(edits))
    if edits.date and not has_field(fields, "date"):
        out.append(_simple_field("Date", edits.date))
    if edits.message_id and not has_field(fields, "message-id"):
        out.append(_simple_field("Message-ID", edits.message_id))
    out.append(CRLF)
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Date and Message-ID
# ---------------------------------------------------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _civil(days: int) -> tuple[int, int, int]:
    """(year, month, day) of ``days`` since 1970-01-01, proleptic Gregorian calendar."""
    # Howard Hinnant's days-to-civil: eras of 400 years (146097 days) starting in March.
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def format_date(t: float, utc_offset_seconds: int) -> str:
    """RFC 5322 date of the epoch time ``t`` seen at ``utc_offset_seconds`` east of UTC.

    English names whatever the locale; computed here (no ``time``/``datetime`` import).
    An offset that is not whole minutes is shown truncated toward zero, as strftime's %z.

    >>> format_date(1795450027, 3600)
    'Mon, 23 Nov 2026 17:07:07 +0100'
    """
    local = int(t // 1) + utc_offset_seconds
    days, rem = divmod(local, 86400)
    year, month, day = _civil(days)
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    sign = "-" if utc_offset_seconds < 0 else "+"
    oh, om = divmod(abs(utc_offset_seconds) // 60, 60)
    return (
        f"{_DAYS[(days + 3) % 7]}, {day:02d} {_MONTHS[month - 1]} {year:04d} "
        f"{hour:02d}:{minute:02d}:{second:02d} {sign}{oh:02d}{om:02d}"
    )


def make_message_id(unique: str, domain: str) -> str:
    """``<unique@domain>``, keeping only characters a msg-id may hold (RFC 5322 3.6.4).

    >>> make_message_id("20261123170707.4242", "host.example.org")
    '<20261123170707.4242@host.example.org>'
    """

    def keep(s: str, extra: str) -> str:
        return "".join(c for c in s if c in _ID_CHARS or c in extra or ord(c) >= 0xA0)

    return f"<{keep(unique, '')}@{keep(domain, '[]:')}>"
