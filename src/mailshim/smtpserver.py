"""The `sendmail -bs` SMTP server as a pure state machine: command lines in, reply bytes out.

``ServerSession`` holds the state of one SMTP dialogue (RFC 5321, with PIPELINING, 8BITMIME,
SMTPUTF8, SIZE and ENHANCEDSTATUSCODES); ``DataDecoder`` turns the wire form of a DATA
section into the message bytes (dot-unstuffing exactly once, finding the terminating dot,
counting the size) for any split of the input into chunks. Reply helpers build well-formed
reply lines, including a listener's reply passed back after the final dot. Nothing here reads,
writes, sleeps or looks at the clock: ``mailshim.bs`` does the I/O and the submission.

Decisions, where RFC 5321 leaves room or real servers differ:

- ``MAIL`` without ``HELO``/``EHLO`` is accepted, like Postfix's smtpd with its default
  ``smtpd_helo_required = no``: the peer is a local program, and naming it proves nothing.
- ``MAIL`` parameters (``SIZE``, ``BODY``, ``SMTPUTF8``) are accepted after ``HELO`` too.
  Unknown parameters get ``555 5.5.4``; ``RCPT`` takes none (no DSN).
- A non-ASCII envelope address needs ``SMTPUTF8`` on ``MAIL`` (RFC 6531): ``553 5.6.7``.
- Command lines are limited to ``MAX_COMMAND_LINE`` octets, terminator included
  (``500 5.5.6``). Text lines in DATA have no limit: the decoder streams them, so memory
  stays flat whatever the line length, and the listener decides what it accepts.
- After ``hard_error_limit`` protocol errors (500, 501 syntax, 502, 503) the session ends with
  ``421 4.7.0``. A program that pipes a plain message into ``sendmail -bs`` by mistake and
  never reads the replies would otherwise fill both pipes and hang for ever.

Trust: runs inside ``sendmail -bs`` with the privilege of whoever started it (not set-id). Every
byte of input is hostile: arbitrary bytes, overlong lines, commands out of order, addresses
crafted to inject header or protocol lines. Replies never echo control characters. Every
problem with the input is a reply, never an exception; ``reply()`` raises ``SoftwareError``
(exit 70) only for a code outside 200-599, a programming error.

Raises: see the Trust paragraph; ``SoftwareError`` (exit 70) is the only exception, and input
problems are replies (500-555).
"""

from __future__ import annotations

from mailshim.address import check_envelope_address, is_8bit_address
from mailshim.errors import DataError, MailshimError, SoftwareError, TempFailError, printable

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

    from mailshim.reply import Reply

# RFC 5321 4.5.3.1.4 allows 512 octets; extensions make longer lines legitimate, and 1000 is
# the text-line limit everyone already copes with.
MAX_COMMAND_LINE = 1000
MAX_RECIPIENTS = 1000
HARD_ERROR_LIMIT = 20
# Longest reply text we emit per line; a listener's reply is cut there.
MAX_REPLY_TEXT = 500

_HELP_TEXT = "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
_NOT_IMPLEMENTED = frozenset(
    {"STARTTLS", "AUTH", "BDAT", "EXPN", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML"}
)


def _safe_text(text: str) -> str:
    """One reply line's text: printable ASCII only, bounded length."""
    # A line end inside one reply line is shown as "?", like any control, not as a space.
    return printable(text[:MAX_REPLY_TEXT].translate(_LINE_ENDS), ascii_only=True)


_LINE_ENDS = {10: "?", 13: "?"}


def reply(code: int, *lines: str) -> bytes:
    """Format an SMTP reply: ``code`` and one or more text lines, CRLF-terminated.

    >>> reply(250, "2.0.0 Ok")
    b'250 2.0.0 Ok\\r\\n'
    >>> reply(250, "host", "PIPELINING")
    b'250-host\\r\\n250 PIPELINING\\r\\n'
    """
    if not 200 <= code <= 599:
        raise SoftwareError(f"bad SMTP reply code {code}")
    texts = [_safe_text(line) for line in lines] or [""]
    out = []
    for i, text in enumerate(texts):
        sep = " " if i == len(texts) - 1 else "-"
        out.append(f"{code}{sep}{text}\r\n" if text else f"{code}{sep}\r\n")
    return "".join(out).encode("ascii")


def listener_reply(answer: Reply | None) -> bytes:
    """Pass back a listener's permanent reply (e.g. ``550 5.1.2 Relay not allowed``) to our
    client.

    Only 5xx replies pass: anything else becomes ``554 5.0.0``. The reply gets the enhanced
    status code ``5.0.0`` when the listener gave none, since we advertise ENHANCEDSTATUSCODES.

    >>> from mailshim.reply import Reply
    >>> listener_reply(Reply(550, "5.1.2 Relay not allowed"))
    b'550 5.1.2 Relay not allowed\\r\\n'
    >>> listener_reply(Reply(550, "no such user"))
    b'550 5.0.0 no such user\\r\\n'
    >>> listener_reply(Reply(250, "ok"))
    b'554 5.0.0 Rejected by the mail listener\\r\\n'
    """
    if answer is None or not answer.permanent:
        return reply(554, "5.0.0 Rejected by the mail listener")
    # str() keeps the stage note ("(in reply to MAIL FROM)"): the message was refused, not a
    # recipient, and the client should be able to tell.
    said = str(answer)[4:]
    return reply(answer.code, said if answer.enhanced else f"5.0.0 {said}".rstrip())


class Transaction:
    """The envelope of one message, complete once DATA has been accepted."""

    __slots__ = ("_seen", "body", "declared_size", "recipients", "sender", "smtputf8")

    def __init__(self, sender: str) -> None:
        self.sender = sender  # "" is the null sender <>
        self.recipients: list[str] = []
        self._seen: set[str] = set()
        self.body: str | None = None  # "7BIT" | "8BITMIME" | None (not given)
        self.smtputf8 = False
        self.declared_size: int | None = None

    def add_recipients(self, addrs: list[str]) -> None:
        for addr in addrs:
            if addr not in self._seen:
                self._seen.add(addr)
                self.recipients.append(addr)

    def __repr__(self) -> str:
        return f"Transaction({self.sender!r}, {self.recipients!r})"


class Response:
    """What a command produced: the reply bytes, and what the driver must do next."""

    __slots__ = ("close", "data", "transaction")

    def __init__(
        self, data: bytes, *, close: bool = False, transaction: Transaction | None = None
    ) -> None:
        self.data = data
        # close: the session is over (QUIT, too many errors); write data, then stop.
        self.close = close
        # transaction: DATA was accepted (354 sent); the driver must now read the message.
        self.transaction = transaction

    def __repr__(self) -> str:
        return f"Response({self.data!r}, close={self.close}, transaction={self.transaction!r})"


def _identity(addr: str) -> list[str]:
    return [addr]


def _split_path(arg: str) -> tuple[str, str] | None:
    """Split ``<path> params`` (or a bare ``path params``, as lenient servers allow) into the
    path in angle brackets and the parameter text. None when the brackets are unbalanced."""
    arg = arg.lstrip(" ")
    if arg.startswith("<"):
        quoted = False
        escaped = False
        for i, ch in enumerate(arg):
            if escaped:
                escaped = False
            elif ch == "\\" and quoted:
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == ">" and not quoted:
                return arg[: i + 1], arg[i + 1 :]
        return None
    token, _, rest = arg.partition(" ")
    if not token or "<" in token or ">" in token:
        return None
    return f"<{token}>", rest


def _strip_route(path: str) -> str:
    """Drop an RFC 5321 source route (``<@a,@b:user@c>`` → ``<user@c>``), which must be
    accepted and ignored."""
    inner = path[1:-1]
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon > 0:
            return f"<{inner[colon + 1 :]}>"
    return path


def _parse_params(text: str) -> list[tuple[str, str | None]] | None:
    """``SIZE=10 BODY=8BITMIME SMTPUTF8`` → ``[("SIZE", "10"), ...]``; None on bad syntax."""
    out: list[tuple[str, str | None]] = []
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not key or not all(ch.isalnum() or ch == "-" for ch in key) or not key.isascii():
            return None
        if eq and not value:
            return None
        out.append((key.upper(), value if eq else None))
    return out


class ServerSession:
    """One SMTP dialogue. Feed it command lines with ``command()``; after a ``Response`` that
    carries a ``transaction`` the driver reads the message (see ``DataDecoder``) and then calls
    ``data_finished()`` with the reply to the final dot."""

    def __init__(
        self,
        hostname: str,
        max_size: int,
        *,
        max_recipients: int = MAX_RECIPIENTS,
        hard_error_limit: int = HARD_ERROR_LIMIT,
        rewrite: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.hostname = _safe_text(hostname).replace(" ", "") or "localhost"
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.hard_error_limit = hard_error_limit
        # rewrite: RCPT address → final recipients (default domain, aliases). May raise
        # DataError (bad address) or another MailshimError (local trouble).
        self.rewrite = rewrite or _identity
        self.helo: str | None = None
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.rcpt_count = 0
        self.in_data = False
        self.errors = 0
        self.messages = 0

    # Replies that end or open the session -------------------------------------------------

    def greeting(self) -> bytes:
        return reply(220, f"{self.hostname} ESMTP mailshim")

    def timeout(self) -> bytes:
        return reply(421, f"4.4.2 {self.hostname} Error: timeout exceeded")

    def line_too_long(self) -> Response:
        """The reply for a command line longer than ``MAX_COMMAND_LINE`` (already discarded)."""
        return self._error(500, "5.5.6 Error: line too long")

    # The data phase ---------------------------------------------------------------------

    def data_finished(self, reply_bytes: bytes) -> bytes:
        """End the data phase: the transaction is over whatever the verdict; the session goes
        back to commands. Returns ``reply_bytes`` for convenience."""
        if not self.in_data:
            raise SoftwareError("data_finished() outside DATA")
        self.in_data = False
        self.transaction = None
        self.rcpt_count = 0
        self.messages += 1
        return reply_bytes

    # Commands ---------------------------------------------------------------------------

    def command(self, line: bytes) -> Response:
        """Handle one command line (with or without its CRLF/LF)."""
        if self.in_data:
            raise SoftwareError("command() called during DATA")
        if len(line) > MAX_COMMAND_LINE:
            return self.line_too_long()
        if line.endswith(b"\n"):
            line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(500, "5.5.2 Error: command not recognized")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if not verb.isascii() or not verb.isalpha():
            if not text.strip():
                return self._error(500, "5.5.2 Error: bad syntax")
            return self._error(500, "5.5.2 Error: command not recognized")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in arg):
            return self._error(501, "5.5.4 Error: control characters in the command")
        handler = _HANDLERS.get(verb)
        if handler is not None:
            return handler(self, arg.strip(" "))
        if verb in _NOT_IMPLEMENTED:
            return self._error(502, f"5.5.1 Error: {verb} not implemented")
        return self._error(500, "5.5.2 Error: command not recognized")

    def _reply(self, code: int, *lines: str) -> Response:
        return Response(reply(code, *lines))

    def _error(self, code: int, text: str) -> Response:
        """A reply that counts toward the hard error limit (a peer not speaking SMTP)."""
        self.errors += 1
        if self.errors >= self.hard_error_limit:
            return Response(
                reply(code, text) + reply(421, f"4.7.0 {self.hostname} Error: too many errors"),
                close=True,
            )
        return Response(reply(code, text))

    def _reset(self) -> None:
        self.transaction = None
        self.rcpt_count = 0

    def _helo(self, arg: str) -> Response:
        if not arg:
            return self._error(501, "5.5.4 Syntax: HELO hostname")
        self._reset()
        self.helo = arg
        self.esmtp = False
        return self._reply(250, self.hostname)

    def _ehlo(self, arg: str) -> Response:
        if not arg:
            return self._error(501, "5.5.4 Syntax: EHLO hostname")
        self._reset()
        self.helo = arg
        self.esmtp = True
        return self._reply(
            250,
            self.hostname,
            "PIPELINING",
            f"SIZE {self.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "HELP",
        )

    def _path_command(
        self, arg: str, keyword: str, syntax: str
    ) -> tuple[str, list[tuple[str, str | None]]] | Response:
        """``FROM:<path> params`` → the path (in angle brackets) and the parameters."""
        if arg[: len(keyword)].upper() != keyword:
            return self._error(501, f"5.5.4 Syntax: {syntax}")
        split = _split_path(arg[len(keyword) :])
        if split is None:
            return self._error(501, f"5.5.4 Syntax: {syntax}")
        params = _parse_params(split[1])
        if params is None:
            return self._error(501, "5.5.4 Syntax error in parameters")
        return split[0], params

    def _mail(self, arg: str) -> Response:
        if self.transaction is not None:
            return self._error(503, "5.5.1 Error: nested MAIL command")
        parsed = self._path_command(arg, "FROM:", "MAIL FROM:<address>")
        if isinstance(parsed, Response):
            return parsed
        path, params = parsed
        tx = Transaction("")
        seen: set[str] = set()
        for key, value in params:
            if key in seen:
                return self._error(501, f"5.5.4 Error: {key} given twice")
            seen.add(key)
            if key == "SIZE":
                if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                    return self._error(501, "5.5.4 Syntax: SIZE=number")
                tx.declared_size = int(value)
                if tx.declared_size > self.max_size:
                    return self._reply(552, "5.3.4 Message size exceeds fixed maximum message size")
            elif key == "BODY":
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    return self._error(501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
                tx.body = body
            elif key == "SMTPUTF8" and value is None:
                tx.smtputf8 = True
            else:
                return self._reply(555, f"5.5.4 Unsupported option: {key}")
        try:
            sender = check_envelope_address(_strip_route(path))
        except DataError:
            return self._reply(501, "5.1.7 Bad sender address syntax")
        if is_8bit_address(sender) and not tx.smtputf8:
            return self._reply(553, "5.6.7 Non-ASCII address without SMTPUTF8")
        tx.sender = sender
        self.transaction = tx
        return self._reply(250, "2.1.0 Ok")

    def _rcpt(self, arg: str) -> Response:
        tx = self.transaction
        if tx is None:
            return self._error(503, "5.5.1 Error: need MAIL command")
        parsed = self._path_command(arg, "TO:", "RCPT TO:<address>")
        if isinstance(parsed, Response):
            return parsed
        path, params = parsed
        if params:
            return self._reply(555, f"5.5.4 Unsupported option: {params[0][0]}")
        if self.rcpt_count >= self.max_recipients:
            return self._reply(452, "4.5.3 Error: too many recipients")
        try:
            addr = check_envelope_address(_strip_route(path))
        except DataError:
            return self._reply(501, "5.1.3 Bad recipient address syntax")
        if not addr:
            return self._reply(501, "5.1.3 Bad recipient address syntax")
        if is_8bit_address(addr) and not tx.smtputf8:
            return self._reply(553, "5.6.7 Non-ASCII address without SMTPUTF8")
        final = self._rewrite(addr)
        if isinstance(final, Response):
            return final
        tx.add_recipients(final)
        self.rcpt_count += 1
        return self._reply(250, "2.1.5 Ok")

    def _rewrite(self, addr: str) -> list[str] | Response:
        try:
            final = self.rewrite(addr)
        except DataError:
            return self._reply(501, "5.1.3 Bad recipient address syntax")
        except TempFailError:
            return self._reply(451, "4.3.0 Error: local error while rewriting the address")
        except MailshimError:
            return self._reply(451, "4.3.5 Error: local configuration problem")
        if not final:
            return self._reply(550, "5.1.1 Recipient address expands to nothing")
        return final

    def _data(self, arg: str) -> Response:
        if arg:
            return self._error(501, "5.5.4 Syntax: DATA")
        tx = self.transaction
        if tx is None:
            return self._error(503, "5.5.1 Error: need MAIL command")
        if not tx.recipients:
            return self._error(503, "5.5.1 Error: need RCPT command")
        self.in_data = True
        return Response(reply(354, "End data with <CR><LF>.<CR><LF>"), transaction=tx)

    def _rset(self, arg: str) -> Response:
        if arg:
            return self._error(501, "5.5.4 Syntax: RSET")
        self._reset()
        return self._reply(250, "2.0.0 Ok")

    def _noop(self, arg: str) -> Response:
        return self._reply(250, "2.0.0 Ok")

    def _quit(self, arg: str) -> Response:
        return Response(reply(221, f"2.0.0 {self.hostname} closing connection"), close=True)

    def _help(self, arg: str) -> Response:
        return self._reply(214, _HELP_TEXT)

    def _vrfy(self, arg: str) -> Response:
        if not arg:
            return self._error(501, "5.5.4 Syntax: VRFY address")
        return self._reply(
            252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery"
        )


_HANDLERS: dict[str, Callable[[ServerSession, str], Response]] = {
    "HELO": ServerSession._helo,
    "EHLO": ServerSession._ehlo,
    "MAIL": ServerSession._mail,
    "RCPT": ServerSession._rcpt,
    "DATA": ServerSession._data,
    "RSET": ServerSession._rset,
    "NOOP": ServerSession._noop,
    "QUIT": ServerSession._quit,
    "HELP": ServerSession._help,
    "VRFY": ServerSession._vrfy,
}


class DataDecoder:
    """The DATA section on the wire → the message bytes, fed in chunks of any size.

    A line holding a lone ``.`` (CRLF or bare LF terminated) ends the data; a leading dot on
    any other line is removed, once (RFC 5321 4.5.2). Every other byte passes unchanged,
    line endings included: normalisation is the message reader's job.

    >>> d = DataDecoder()
    >>> d.feed(b"a\\r\\n..b\\r\\n.\\r\\nQUIT\\r\\n")
    (b'a\\r\\n.b\\r\\n', 11)
    >>> d.done, d.size
    (True, 7)
    """

    __slots__ = ("_bol", "_pending", "done", "size")

    def __init__(self) -> None:
        self._bol = True  # at the start of a line
        self._pending = b""  # "." or ".\r" seen at a line start, waiting for the next byte
        self.done = False
        self.size = 0  # message bytes produced so far

    def feed(self, data: bytes) -> tuple[bytes, int | None]:
        """Decode ``data``. Returns the message bytes it holds and, when the terminating line
        is in it, the index in ``data`` just past that line (what follows is commands)."""
        if self.done:
            raise SoftwareError("DataDecoder.feed() after the end of the data")
        held = len(self._pending)
        buf = self._pending + data if held else data
        self._pending = b""
        out: list[bytes] = []
        i = 0
        n = len(buf)
        end: int | None = None
        while i < n:
            if self._bol:
                if buf[i] == 0x2E:  # "."
                    if i + 1 >= n:
                        self._pending = buf[i:]
                        break
                    nxt = buf[i + 1]
                    if nxt == 0x0A:
                        end = i + 2
                        break
                    if nxt == 0x0D:
                        if i + 2 >= n:
                            self._pending = buf[i:]
                            break
                        if buf[i + 2] == 0x0A:
                            end = i + 3
                            break
                    i += 1  # a stuffed dot: drop it
                self._bol = False
            # Only lines starting with "." need attention; copy everything up to the next one.
            j = buf.find(b"\n.", i)
            if j < 0:
                out.append(buf[i:])
                self._bol = buf[n - 1] == 0x0A
                i = n
            else:
                out.append(buf[i : j + 1])
                i = j + 1
                self._bol = True
        payload = b"".join(out)
        self.size += len(payload)
        if end is None:
            return payload, None
        self.done = True
        return payload, end - held
