"""The spool entry and state formats, in one place (described in docs/spool-format.md).

An entry is one file: a short envelope of text records in a fixed order, a blank line, then the
message exactly as it goes on the wire (CRLF line ends, not dot-stuffed). It is written once
and never changed. What changes (attempts, next try, per-recipient results, hold) lives in a
separate small state file that is replaced atomically.

Trust: entries in the spool may come from other, hostile local users (issue 3's drop folder)
or be damaged. Readers accept only the records below, in this order, with bounded sizes; any
deviation is ``DataError`` and the caller moves the entry to ``corrupt/``.

Raises ``DataError`` (exit 65; the runner moves the entry to ``corrupt/``) for anything that is
not a well-formed entry or state, and when writing, for a value the format cannot hold.
"""

from __future__ import annotations

import io

from mailshim.constants import STATE_COUNTERS, STATE_FLAGS, STATE_REPLIES
from mailshim.errors import DataError
from mailshim.reply import Reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    import re
    from collections.abc import Callable
    from typing import BinaryIO

MAGIC = b"MAILSHIM-ENTRY 1\n"
# Version 2 adds ``failed`` records (recipients already refused); it is written only when an
# entry has them, so a runner of an older release still reads every other entry.
MAGIC_2 = b"MAILSHIM-ENTRY 2\n"
STATE_MAGIC = "MAILSHIM-STATE 2"
# Version 1 stored each reply as one line of text (``str(reply)``); it is still read.
OLD_STATE_MAGIC = "MAILSHIM-STATE 1"
SIZE_WIDTH = 15  # fixed width so the size can be patched in place once the body is written
MAX_ENVELOPE = 64 * 1024 * 1024
MAX_RECORD = 4096
ID_LENGTH = 20
ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def valid_id(name: str) -> bool:
    """Queue ids are 20 characters of [0-9A-Z]: safe as file names, nothing else is."""
    # [0-9A-Z] exactly: ASCII letters and digits, none lower-case (three C-speed scans).
    return len(name) == ID_LENGTH and name.isascii() and name.isalnum() and name.upper() == name


class Envelope:
    """Who the message is from and for, as stored in the entry."""

    __slots__ = (
        "arrival",
        "eightbit",
        "failed",
        "queue_id",
        "recipients",
        "sender",
        "size",
        "uid",
    )

    def __init__(
        self,
        queue_id: str,
        sender: str,
        recipients: list[str],
        arrival: int,
        uid: int,
        eightbit: bool = False,
        size: int = 0,
    ) -> None:
        self.queue_id = queue_id
        self.sender = sender  # "" is the null sender <>
        self.recipients = recipients
        self.arrival = arrival
        self.uid = uid
        self.eightbit = eightbit
        self.size = size
        # recipient -> the listener's permanent refusal, for recipients among ``recipients``
        # that were refused while nobody could tell the caller: the runner bounces them and
        # never sends them again.
        self.failed: dict[str, str] = {}


class EncodedEnvelope:
    """Envelope bytes plus where the patchable fields sit in them."""

    __slots__ = ("body_offset", "data", "size_offset")

    def __init__(self, data: bytes, size_offset: int, body_offset: int) -> None:
        self.data = data
        self.size_offset = size_offset
        self.body_offset = body_offset


def _field(value: str, what: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\n" in raw or b"\r" in raw or b"\x00" in raw or len(raw) > MAX_RECORD - 16:
        raise DataError(f"{what} cannot be stored: {value[:80]!r}")
    return raw


def encode_envelope(env: Envelope) -> EncodedEnvelope:
    """The envelope records, ending with the blank line; size and body type are patchable."""
    if not valid_id(env.queue_id):
        raise DataError(f"bad queue id {env.queue_id!r}")
    if not env.recipients:
        raise DataError("an entry needs at least one recipient")
    parts = [MAGIC_2 if env.failed else MAGIC, b"id " + env.queue_id.encode() + b"\n"]
    parts.append(b"arrival %d\n" % env.arrival)
    parts.append(b"uid %d\n" % env.uid)
    head = b"".join(parts)
    size_offset = len(head) + len(b"size ")
    parts.append(b"size " + b"%0*d" % (SIZE_WIDTH, env.size) + b"\n")
    parts.append(b"body " + (b"8bit" if env.eightbit else b"7bit") + b"\n")
    parts.append(b"sender " + _field(env.sender, "sender") + b"\n")
    for rcpt in env.recipients:
        parts.append(b"rcpt " + _field(rcpt, "recipient") + b"\n")
    for rcpt, reply in env.failed.items():
        if rcpt not in env.recipients or "\t" in rcpt:
            raise DataError(f"failed recipient {rcpt[:80]!r} is not among the recipients")
        text = _field(reply, "reply").replace(b"\t", b" ")
        parts.append(b"failed " + _field(rcpt, "recipient") + b"\t" + text + b"\n")
    parts.append(b"\n")
    data = b"".join(parts)
    return EncodedEnvelope(data, size_offset, len(data))


def patch_size_and_body(size: int, eightbit: bool) -> tuple[bytes, bytes]:
    """The bytes to write at ``size_offset``: the size digits, then "\\nbody 7bit|8bit"."""
    if not 0 <= size < 10**SIZE_WIDTH:
        raise DataError("message too large for the spool format")
    return b"%0*d" % (SIZE_WIDTH, size), b"8bit" if eightbit else b"7bit"


def body_type_offset(size_offset: int) -> int:
    return size_offset + SIZE_WIDTH + len(b"\nbody ")


def _line(f: BinaryIO, what: bytes) -> bytes:
    line = f.readline(MAX_RECORD)
    if not line.endswith(b"\n"):
        raise DataError(f"entry truncated or record too long while reading {what.decode()}")
    return line[:-1]


def _record(f: BinaryIO, name: bytes) -> str:
    line = _line(f, name)
    if not line.startswith(name + b" "):
        raise DataError(f"expected record {name.decode()!r}, found {line[:40]!r}")
    value = line[len(name) + 1 :]
    if b"\r" in value or b"\x00" in value:
        raise DataError(f"record {name.decode()!r} holds a control character")
    return value.decode("utf-8", "surrogateescape")


def _number(text: str, what: str) -> int:
    if not (text.isdigit() and text.isascii()) or len(text) > 20:
        raise DataError(f"record {what!r} is not a number")
    return int(text)


def decode_envelope(f: BinaryIO) -> tuple[Envelope, int]:
    """Read the envelope from ``f`` (at offset 0); returns it and the message offset.

    Raises ``DataError`` on anything but the exact record sequence.
    """
    first = f.readline(len(MAGIC) + 1)
    if first not in (MAGIC, MAGIC_2):
        raise DataError("not a mailshim spool entry (bad first line)")
    qid = _record(f, b"id")
    if not valid_id(qid):
        raise DataError(f"bad queue id record {qid[:40]!r}")
    arrival = _number(_record(f, b"arrival"), "arrival")
    uid = _number(_record(f, b"uid"), "uid")
    size_text = _record(f, b"size")
    if len(size_text) != SIZE_WIDTH:
        raise DataError("size record has the wrong width")
    size = _number(size_text, "size")
    body = _record(f, b"body")
    if body not in ("7bit", "8bit"):
        raise DataError(f"unknown body type {body[:20]!r}")
    sender = _record(f, b"sender")
    recipients: list[str] = []
    failed: dict[str, str] = {}
    consumed = 0
    while True:
        line = _line(f, b"recipients")
        consumed += len(line) + 1
        if consumed > MAX_ENVELOPE:
            raise DataError("envelope larger than the spool format allows")
        if line == b"":
            break
        if b"\r" in line or b"\x00" in line:
            raise DataError("malformed recipient record")
        if line.startswith(b"failed ") and first == MAGIC_2 and recipients:
            rcpt, tab, reply = line[7:].decode("utf-8", "surrogateescape").partition("\t")
            if not tab or rcpt not in recipients or rcpt in failed or not reply:
                raise DataError("a failed record that names no recipient of this entry")
            failed[rcpt] = reply
            continue
        if not line.startswith(b"rcpt ") or failed:
            raise DataError(f"unexpected record {line[:40]!r} among recipients")
        value = line[5:]
        if not value:
            raise DataError("empty recipient record")
        recipients.append(value.decode("utf-8", "surrogateescape"))
    if not recipients:
        raise DataError("entry has no recipients")
    env = Envelope(qid, sender, recipients, arrival, uid, body == "8bit", size)
    env.failed = failed
    return env, f.tell()


# The common shape of an envelope, up to its blank line: the records in order, numbers as
# ASCII digits, recipients after the sender, no ``failed`` record (those go the long way).
# Compiled at the first listing: ``re`` stays out of sendmail's start-up (test_imports).
_HEAD_SHAPE = (
    rb"MAILSHIM-ENTRY [12]\nid ([0-9A-Z]{20})\narrival ([0-9]{1,20})\nuid ([0-9]{1,20})\n"
    rb"size ([0-9]{%d})\nbody ([78]bit)\nsender ([^\n]*)\nrcpt ([^\n]+(?:\nrcpt [^\n]+)*)"
    % SIZE_WIDTH
)
_head_match: list[Callable[[bytes], re.Match[bytes] | None]] = []


def decode_envelope_head(head: bytes) -> Envelope:
    """``decode_envelope`` of an entry's first bytes, read at once (listings read 100,000):
    one match of the common shape instead of a file object and a readline per record.
    Anything else (the blank line not within ``head``, a control character, a ``failed``
    record, a record too long) goes to ``decode_envelope``, which takes or refuses it
    exactly as it always did and says what is wrong. Raises ``DataError``."""
    if not _head_match:
        import re

        _head_match.append(re.compile(_HEAD_SHAPE).fullmatch)
    end = head.find(b"\n\n")
    envelope = head[:end]
    m = _head_match[0](envelope) if end > 0 and head.startswith((MAGIC, MAGIC_2)) else None
    if (
        m is None
        or b"\r" in envelope
        or b"\x00" in envelope
        or (len(envelope) >= MAX_RECORD and max(map(len, envelope.split(b"\n"))) >= MAX_RECORD)
    ):
        return decode_envelope(io.BytesIO(head))[0]
    qid, arrival, uid, size, body, sender, rcpts = m.groups()
    return Envelope(
        qid.decode("ascii"),
        sender.decode("utf-8", "surrogateescape"),
        [r.decode("utf-8", "surrogateescape") for r in rcpts.split(b"\nrcpt ")],
        int(arrival),
        int(uid),
        body == b"8bit",
        int(size),
    )


def peek_uid(f: BinaryIO) -> int:
    """The ``uid`` record of an entry (at offset 0), reading only the first three records."""
    if f.readline(len(MAGIC) + 1) not in (MAGIC, MAGIC_2):
        raise DataError("not a mailshim spool entry (bad first line)")
    _record(f, b"id")
    _record(f, b"arrival")
    return _number(_record(f, b"uid"), "uid")


class State:
    """What the runner knows about an entry beyond its immutable envelope."""

    __slots__ = (
        "attempts",
        "bounce_id",
        "done",
        "expired",
        "failed",
        "first_attempt",
        "held",
        "last_attempt",
        "last_error",
        "next_attempt",
        "pending",
        "relay_wait",
        "reported",
        "requeued",
        "throttled",
        "view",
        "warned",
    )

    def __init__(self) -> None:
        self.attempts = 0  # failed attempts that count toward the retry schedule
        self.throttled = 0  # deferrals for back-pressure (rate limits, greylisting): not counted
        self.first_attempt = 0
        self.last_attempt = 0
        self.next_attempt = 0  # 0: due now
        self.held = False
        self.warned = False
        self.reported = False  # the failure report (bounce_id) is written: never again
        # Deferred only for the relay's sake (unreachable, 421, 4xx at MAIL/DATA/after the
        # dot), not a recipient's: due at once when a relay takes mail again (runner.py).
        self.relay_wait = False
        self.last_error = ""
        self.bounce_id = ""  # queue id chosen for this entry's failure report, once decided
        self.done: dict[str, Reply] = {}  # recipient -> the listener's reply (accepted)
        self.failed: dict[str, Reply] = {}  # recipient -> permanent failure reply
        self.pending: dict[str, Reply] = {}  # recipient -> last temporary failure reply
        self.expired: list[str] = []  # recipients in ``failed`` because the lifetime ran out
        self.requeued = 0  # when put back from dead/: the lifetime counts from then
        # A drop-folder entry's view for its submitter: the name of status/<drop id>
        # (ownview.py), "" when there is none.
        self.view = ""

    def open_recipients(self, env: Envelope) -> list[str]:
        return [r for r in env.recipients if r not in self.done and r not in self.failed]


def encode_state(state: State) -> bytes:
    import json

    data = {
        "format": STATE_MAGIC,
        "attempts": state.attempts,
        "throttled": state.throttled,
        "first_attempt": state.first_attempt,
        "last_attempt": state.last_attempt,
        "next_attempt": state.next_attempt,
        "requeued": state.requeued,
        "held": state.held,
        "warned": state.warned,
        "reported": state.reported,
        "relay_wait": state.relay_wait,
        "last_error": state.last_error,
        "bounce_id": state.bounce_id,
        "view": state.view,
        "done": {rcpt: reply.as_fields() for rcpt, reply in state.done.items()},
        "failed": {rcpt: reply.as_fields() for rcpt, reply in state.failed.items()},
        "pending": {rcpt: reply.as_fields() for rcpt, reply in state.pending.items()},
        "expired": sorted(set(state.expired)),
    }
    return json.dumps(data, ensure_ascii=True, sort_keys=True).encode() + b"\n"


def decode_state(raw: bytes) -> State:
    """A state file's fields, each checked (``DataError`` names the first that is wrong).

    Written for a listing's pace (100,000 of these): the JSON parser makes only ``dict``,
    ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None``, so an exact type test is the
    same test as ``isinstance`` without bool's subclassing of int; empty tables, the common
    case, skip their per-item checks."""
    import json  # not at import time: sendmail's start-up path does without it

    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: nesting deep enough to exhaust the parser (a planted state file).
        raise DataError("state file is not valid JSON") from None
    if type(data) is not dict or data.get("format") not in (STATE_MAGIC, OLD_STATE_MAGIC):
        raise DataError("state file has an unknown format")
    get = data.get
    state = State()
    for key in STATE_COUNTERS:
        value = get(key, 0)
        if type(value) is not int or value < 0:
            raise DataError(f"state field {key} is not a number")
        setattr(state, key, value)
    for key in STATE_FLAGS:
        value = get(key, False)
        if type(value) is not bool:
            raise DataError(f"state field {key} is not true/false")
        setattr(state, key, value)
    last = get("last_error", "")
    if type(last) is not str:
        raise DataError("state field last_error is not text")
    state.last_error = last
    bounce_id = get("bounce_id", "")
    if type(bounce_id) is not str or (bounce_id and not valid_id(bounce_id)):
        raise DataError("state field bounce_id is not a queue id")
    state.bounce_id = bounce_id
    view = get("view", "")
    if type(view) is not str or (view and not valid_id(view)):
        raise DataError("state field view is not a queue id")
    state.view = view
    expired = get("expired", [])
    if type(expired) is not list or (expired and not all(type(r) is str for r in expired)):
        raise DataError("state field expired is not a list of recipients")
    if expired:
        state.expired = sorted(set(expired))
    _decode_replies(state, data)
    return state


def _decode_replies(state: State, data: dict[str, object]) -> None:
    legacy = data["format"] == OLD_STATE_MAGIC
    for key in STATE_REPLIES:
        value = data.get(key, {})
        if type(value) is not dict:
            raise DataError(f"state field {key} is not a table of replies")
        if not value:
            continue  # State() starts with an empty table
        if not all(type(k) is str for k in value):
            raise DataError(f"state field {key} is not a table of replies")
        setattr(state, key, {rcpt: _stored_reply(key, v, legacy) for rcpt, v in value.items()})


def _stored_reply(key: str, value: object, legacy: bool) -> Reply:
    if legacy and isinstance(value, str):
        return Reply.from_legacy(value)
    try:
        return Reply.from_fields(value)
    except ValueError as exc:
        raise DataError(f"state field {key}: {exc}") from None


# --- the drop folder (incoming/) ----------------------------------------------------------


TAG_LENGTH = 12


def temp_name(qid: str, tag: str, kind: str = "tmp") -> str:
    """The name an entry has in ``incoming/`` while its writer fills it (``kind`` "tmp"), or
    a name created and removed to wake a runner ("poke"); never a queue id. ``tag`` is
    random (the caller's ``os.urandom``): a name another user can guess can be planted first.
    """
    return f".{qid}.{tag}.{kind}"


def is_temp_name(name: str) -> bool:
    parts = name.split(".")
    return (
        len(parts) == 4
        and parts[0] == ""
        and valid_id(parts[1])
        and len(parts[2]) == TAG_LENGTH
        and all(c in ID_ALPHABET for c in parts[2])
        and parts[3] in ("tmp", "poke")
    )


class LineEnds:
    """Streaming CRLF normaliser for message bytes copied out of the drop folder.

    ``sendmail`` spools CRLF-only messages; an entry a user crafted by hand may not be. A bare
    CR or LF reaching the listener could end the DATA phase early on some servers (SMTP
    smuggling), so every bare CR and LF becomes CRLF, and the message ends with CRLF.

    >>> n = LineEnds()
    >>> n.feed(b"a\\nb\\r") + n.feed(b"\\nc\\rd") + n.end()
    b'a\\r\\nb\\r\\nc\\r\\nd\\r\\n'
    """

    __slots__ = ("_cr", "_last", "_seen")

    def __init__(self) -> None:
        self._cr = False  # the previous chunk ended with CR: its LF may start this one
        self._last = b""
        self._seen = False

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        pairs = chunk.count(b"\r\n")
        if not (chunk.count(b"\n") == pairs and chunk.count(b"\r") == pairs):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if chunk:
            self._seen = True
            self._last = chunk[-1:]
        return chunk

    def end(self) -> bytes:
        if self._cr:
            self._cr = False
            self._last = b"\n"
            return b"\r\n"
        if self._seen and self._last != b"\n":
            self._last = b"\n"
            return b"\r\n"
        return b""
