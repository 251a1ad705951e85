"""The bytes on one connection to a listener: the only module that touches aiosmtplib.

``Connection`` wraps one ``aiosmtplib.SMTP`` object: connect (TCP, unix socket, implicit TLS),
one command and its reply, STARTTLS, AUTH, QUIT, the TLS layer and the peer's address. DATA is
ours: aiosmtplib's ``data()`` holds the whole message in memory several times over and writes it
without back-pressure, and its reader pairs one reply with one command, dropping LMTP's extra
replies when they arrive together. So after the 354 ``Connection.send_body`` lends the
transport to ``_DataChannel``, which streams the file in chunks with dot-stuffing, waits on the
transport's flow control, and reads as many replies as the protocol owes; then the transport
goes back to aiosmtplib. PIPELINING (RFC 2920) uses the same reader: ``Connection.pipeline``
writes MAIL, every RCPT and DATA in one go and reads their replies in order, one per command,
because aiosmtplib's reader would take only the first of replies that arrive together.

The only aiosmtplib surface used is what 2.0 (Debian bookworm) and the newest release share:
``SMTP(...)`` keywords, ``connect``, ``execute_command``, ``starttls``, ``auth_plain``,
``auth_login``, ``close``, ``transport``/``protocol``, ``last_ehlo_response``,
``esmtp_extensions``, ``server_auth_methods`` and the exception classes both define. A library
upgrade touches this file only.

Trust: called by ``relay`` in the delivery agent, the runner, ``sendmail -odi``/``-v`` and
``mailshim check``. The listener is hostile-or-broken by assumption: replies may be garbage,
split, endless, late or missing, TLS may fail half-way and the connection may drop anywhere.
Every library or socket exception becomes a ``WireError`` with a failure kind (``reply``'s
constants) and one printable line; a refused STARTTLS or AUTH is a ``WireReply``; a failure to
read the spooled message is ``LocalFailure``. Nothing else escapes, and no wait is unbounded.

Raises ``WireError`` (a failure kind and a line), ``WireReply`` (a refused STARTTLS or AUTH) and
``LocalFailure`` (the spooled file cannot be read), as said above; ``relay`` turns them into
results, never exit codes of its own.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import ssl
from typing import TYPE_CHECKING, BinaryIO, cast

import aiosmtplib

from mailshim import reply as kinds
from mailshim.reply import Reply, clean_text

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Connection", "LocalFailure", "WireError", "WireReply", "failure"]

CHUNK = 64 * 1024
# A reply longer than this is garbage from a broken or hostile listener.
MAX_REPLY_BYTES = 64 * 1024
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH = (62, 64)
ERRNO_KINDS = {
    errno.ECONNREFUSED: kinds.REFUSED,
    errno.ENOENT: kinds.NO_SOCKET,
    errno.EACCES: kinds.DENIED,
    errno.EPERM: kinds.DENIED,
    errno.ETIMEDOUT: kinds.TIMEOUT,
    errno.ECONNRESET: kinds.CLOSED,
    errno.ECONNABORTED: kinds.CLOSED,
    errno.EPIPE: kinds.CLOSED,
    errno.EHOSTUNREACH: kinds.UNREACHABLE,
    errno.ENETUNREACH: kinds.UNREACHABLE,
}

# Everything aiosmtplib or the socket layer raises for a wire problem.
WIRE_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError))


def failure(exc: BaseException) -> tuple[str, str]:
    """(kind, short reason) for a connection-level failure, from the most specific cause."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            kind = kinds.TLS_NAME if seen.verify_code in NAME_MISMATCH else kinds.TLS_VERIFY
            return kind, f"TLS certificate verification failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return kinds.TLS_FAILED, f"TLS failed: {seen.reason or seen}"
        if (
            isinstance(seen, OSError)
            and not isinstance(seen, aiosmtplib.SMTPException)
            and seen.errno
        ):
            return ERRNO_KINDS.get(seen.errno, kinds.NETWORK), os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    if is_timeout(exc):
        return kinds.TIMEOUT, "timed out"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return kinds.CLOSED, clean_text(exc.message)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return kinds.PROTOCOL, clean_text(f"{exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPException):
        return kinds.PROTOCOL, clean_text(exc.message)
    return kinds.NETWORK, clean_text(str(exc)) or type(exc).__name__


class WireError(Exception):
    """The connection failed: ``kind`` (a ``reply`` constant) and one line saying why."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        return cls(*failure(exc))


class WireReply(Exception):
    """The listener refused STARTTLS or AUTH with this reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class LocalFailure(Exception):
    """Something on our side (reading the spooled message) failed; no relay can help."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class _DataChannel(asyncio.Protocol):
    """Owns the transport while a pipelined batch's replies are read, or from the 354 until
    the replies owed for the final dot are read."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, previous: asyncio.BaseProtocol, room: int
    ) -> None:
        self._loop = loop
        self._previous = previous
        # Replies held unread at most: more than the commands owe is a flood, not an answer.
        self._room = room
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._reply_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.replies: collections.deque[tuple[int, str]] = collections.deque()
        self.error: str | None = None
        self.error_kind = kinds.CLOSED
        self.lost = False

    @property
    def clean(self) -> bool:
        """Nothing unread and nothing wrong: the connection can go back to aiosmtplib."""
        return not (self.lost or self.error or self.replies or self._buffer or self._lines)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, kind: str, why: str) -> None:
        if self.error is None:
            self.error, self.error_kind = why, kind
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._buffer += data
        while self.error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(kinds.PROTOCOL, "reply too long")
        self._wake()

    def _line(self, line: bytes) -> None:
        code, sep = line[:3], line[3:4]
        if len(code) != 3 or not code.isdigit() or sep not in (b"", b" ", b"-"):
            shown = clean_text(line[:80].decode("utf-8", "replace"))
            self._fail(kinds.PROTOCOL, f"garbage instead of a reply: {shown!r}")
            return
        self._reply_bytes += len(line)
        if self._reply_bytes > MAX_REPLY_BYTES:
            self._fail(kinds.PROTOCOL, "reply too long")
            return
        self._lines.append(line[4:].strip().decode("utf-8", "replace"))
        if sep != b"-":
            if len(self.replies) >= self._room:
                self._fail(kinds.PROTOCOL, "more replies than commands")
                return
            self.replies.append((int(code), "\n".join(self._lines)))
            self._lines = []
            self._reply_bytes = 0

    def eof_received(self) -> bool:
        self._fail(kinds.CLOSED, "connection closed by the server")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is None:
            self._fail(kinds.CLOSED, "connection lost")
        else:
            kind, why = failure(exc)
            self._fail(kind, f"connection lost: {why}")
        # aiosmtplib's protocol must learn of it too, or its state would claim a live link.
        self._previous.connection_lost(exc)

    async def _event(self, timeout: float) -> None:
        # A timer on a bare future: asyncio.wait_for costs a task's worth more per reply.
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def drain(self, timeout: float, *, look: bool = True) -> None:
        """Wait while the transport's buffer is above its high-water mark (back-pressure).

        ``look``: yield to the loop at least once, so that a reset is noticed (and an early
        reply read) even when the transport is not paused; not needed when a reply is read
        right after."""
        if look:
            await asyncio.sleep(0)
        deadline = self._loop.time() + timeout
        while self._paused and self.error is None and not self.replies:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await self._event(remaining)

    async def reply(self, timeout: float) -> tuple[int, str] | str:
        """The next reply, or a string saying why there is none (timeouts raise)."""
        deadline = self._loop.time() + timeout
        while not self.replies:
            if self.error is not None:
                return self.error
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await self._event(remaining)
        return self.replies.popleft()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class Connection:
    """One aiosmtplib connection: commands in, ``(code, text)`` out, failures as ``WireError``.

    ``label`` names the relay and address in texts; ``say`` takes transcript lines.
    """

    def __init__(
        self, smtp: aiosmtplib.SMTP, label: str, timeout: float, say: Callable[[str], None]
    ) -> None:
        self._smtp = smtp
        self._last: aiosmtplib.SMTPResponse | None = None
        self.label = label
        self.timeout = timeout
        self.say = say

    @classmethod
    async def open(
        cls,
        *,
        address: str | None,
        port: int,
        socket_path: str | None,
        helo: str,
        timeout: float,
        implicit_tls: bool,
        context: ssl.SSLContext | None,
        label: str,
        say: Callable[[str], None],
    ) -> tuple[Connection, int, str]:
        """Connect to ``address`` (or the unix socket) and read the greeting."""
        try:
            # hostname=None with socket_path: aiosmtplib 2.0 defaults it to "localhost"
            # and then refuses the combination.
            smtp = aiosmtplib.SMTP(
                hostname=address,
                port=port if address is not None else None,
                socket_path=socket_path if address is None else None,
                local_hostname=helo,
                timeout=timeout,
                use_tls=implicit_tls,
                # False, never None: None upgrades whenever STARTTLS is offered.
                start_tls=False,
                tls_context=context,
            )
            greeting = await smtp.connect()
        except ValueError as exc:  # a combination asyncio or aiosmtplib refuses
            raise WireError(kinds.CONFIG, str(exc)) from None
        except WIRE_ERRORS as exc:
            raise WireError.of(exc) from None
        return cls(smtp, label, timeout, say), greeting.code, greeting.message

    # -- commands -------------------------------------------------------------------------

    async def execute(self, *args: bytes, timeout: float | None = None) -> tuple[int, str]:
        """Send one command line, return its reply; ``WireError`` when none came."""
        try:
            if timeout is None:
                response = await self._smtp.execute_command(*args)
            else:
                response = await self._smtp.execute_command(*args, timeout=timeout)
        except WIRE_ERRORS as exc:
            raise WireError.of(exc) from None
        self._last = response
        return response.code, response.message

    def greeted(self, esmtp: bool) -> dict[str, str]:
        """Record the last reply as the EHLO (or HELO) answer; the extensions it offers."""
        if self._last is None:
            return {}
        if esmtp:
            self._smtp.last_ehlo_response = self._last
            return dict(self._smtp.esmtp_extensions)
        self._smtp.last_helo_response = self._last
        return {}

    async def starttls(self, server_name: str, context: ssl.SSLContext | None) -> tuple[int, str]:
        try:
            response = await self._smtp.starttls(server_hostname=server_name, tls_context=context)
        except aiosmtplib.SMTPResponseException as exc:
            raise WireReply(exc.code, exc.message) from None
        except WIRE_ERRORS as exc:
            raise WireError.of(exc) from None
        return response.code, response.message

    @property
    def auth_mechanisms(self) -> list[str]:
        """The AUTH mechanisms the EHLO reply offered, lower case."""
        return [m.lower() for m in self._smtp.server_auth_methods]

    async def auth(self, mechanism: str, username: str, password: str) -> tuple[int, str]:
        try:
            if mechanism == "plain":
                response = await self._smtp.auth_plain(username, password)
            else:
                response = await self._smtp.auth_login(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            raise WireReply(exc.code, exc.message) from None
        except WIRE_ERRORS as exc:
            raise WireError.of(exc) from None
        return response.code, response.message

    async def pipeline(
        self, commands: Sequence[bytes], show: Callable[[int, str], None]
    ) -> tuple[list[tuple[int, str]], WireError | None]:
        """Write every command line (CRLF-terminated) in one go; read their replies in order.

        Returns the replies read, one per command from the first, and why reading stopped
        when fewer came (the connection has then been aborted). A 421 ends the reading: the
        listener is closing and owes nothing more. Codes are not judged here.
        """
        smtp = self._smtp
        transport, previous = smtp.transport, smtp.protocol
        if transport is None or previous is None or transport.is_closing():
            self.abort()
            return [], WireError(kinds.CLOSED, "connection lost")
        channel = _DataChannel(asyncio.get_running_loop(), previous, len(commands))
        transport.set_protocol(channel)
        writer = cast("asyncio.WriteTransport", transport)
        replies: list[tuple[int, str]] = []
        stopped: WireError | None = None
        try:
            writer.write(b"".join(commands))
            await channel.drain(self.timeout, look=False)
            while len(replies) < len(commands):
                got = await channel.reply(self.timeout)
                if isinstance(got, str):
                    stopped = WireError(channel.error_kind, got)
                    break
                show(*got)
                replies.append(got)
                if got[0] == 421:
                    stopped = WireError(kinds.CLOSED, "the server is closing the connection")
                    break
        except asyncio.TimeoutError:
            stopped = WireError(kinds.TIMEOUT, "timed out")
        finally:
            if stopped is None and channel.clean:
                transport.set_protocol(previous)
            else:
                if stopped is None:
                    # every reply came, then the link broke or sent more than was asked
                    why = channel.error or "more replies than commands"
                    stopped = WireError(
                        channel.error_kind if channel.error else kinds.PROTOCOL, why
                    )
                self.abort()
        return replies, stopped

    # -- the link -------------------------------------------------------------------------

    def peer_address(self) -> str:
        transport = self._smtp.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if peer else ""

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        transport = self._smtp.transport
        found = transport.get_extra_info("ssl_object") if transport is not None else None
        return found if isinstance(found, ssl.SSLObject) else None

    def abort(self) -> None:
        """Drop the connection now, without QUIT."""
        transport = cast("asyncio.Transport | None", self._smtp.transport)
        if transport is not None:
            transport.abort()
        self._smtp.close()

    # -- the message ----------------------------------------------------------------------

    async def send_body(
        self,
        message: BinaryIO,
        start: int,
        owed: int,
        show: Callable[[int, str], None],
    ) -> tuple[list[Reply], bool]:
        """Stream the message after a 354; return the ``owed`` replies to the final dot.

        The flag says whether the connection can carry another message; when it cannot, it
        has been aborted. A reply that could not be read is a code-0 ``Reply`` with its kind;
        ``LocalFailure`` when the spooled message cannot be read (no final dot was sent).
        """
        smtp = self._smtp
        transport, previous = smtp.transport, smtp.protocol
        if transport is None or previous is None or transport.is_closing():
            self.abort()
            text = f"lost connection with {self.label} before the message"
            return [Reply(0, text, kind=kinds.CLOSED)] * owed, False
        # One reply more than owed is room enough to see that the listener sent too many.
        channel = _DataChannel(asyncio.get_running_loop(), previous, owed + 1)
        transport.set_protocol(channel)
        done = False
        try:
            replies, done = await self._stream(channel, transport, message, start, owed, show)
        finally:
            if done and channel.clean:
                transport.set_protocol(previous)
            else:
                done = False
                self.abort()
        return replies, done

    async def _stream(
        self,
        channel: _DataChannel,
        transport: asyncio.BaseTransport,
        message: BinaryIO,
        start: int,
        owed: int,
        show: Callable[[int, str], None],
    ) -> tuple[list[Reply], bool]:
        writer = cast("asyncio.WriteTransport", transport)
        timeout = self.timeout
        self.say("*** (message body not shown)")
        try:
            message.seek(start)
        except OSError as exc:
            raise LocalFailure(_unreadable(exc)) from None
        # The two bytes before each chunk: a "." after CRLF is at a line start even when the
        # CRLF ended the previous chunk. Starting with CRLF stuffs a dot on the first line.
        tail = b"\r\n"
        # Each chunk goes out once the next one is read, so that the last one and the final
        # dot leave in one write (a small message: one write in all).
        ready = b""
        while True:
            try:
                chunk = message.read(CHUNK)
            except OSError as exc:
                # No final dot goes out: the server must not take a truncated message.
                raise LocalFailure(_unreadable(exc)) from None
            if not chunk:
                break
            joined = tail + chunk
            tail = joined[-2:]
            if ready:
                writer.write(ready)
                try:
                    await channel.drain(timeout)
                except asyncio.TimeoutError:
                    text = f"conversation with {self.label} timed out while sending the message"
                    return [Reply(0, text, kind=kinds.TIMEOUT)] * owed, False
                if channel.error is not None or channel.replies or writer.is_closing():
                    return [self._early(channel, show)] * owed, False
            ready = joined.replace(b"\r\n.", b"\r\n..")[2:]
        if channel.error is not None or channel.replies or writer.is_closing():
            return [self._early(channel, show)] * owed, False
        writer.write(ready + (b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n"))
        self.say(">>> .")
        replies: list[Reply] = []
        while len(replies) < owed:
            try:
                got = await channel.reply(timeout)
            except asyncio.TimeoutError:
                got = "timed out"
            if isinstance(got, str):
                # At-least-once window: the listener may have stored the message and then
                # failed to tell us. Deferring means it may arrive twice; dropping it could
                # lose it, which is worse. The kind tells the relay not to fail over.
                text = (
                    f"no reply from {self.label} after the end of the message ({got});"
                    " it may have been delivered"
                )
                self.say("*** " + text)
                lost = Reply(0, clean_text(text), kind=kinds.UNANSWERED)
                return replies + [lost] * (owed - len(replies)), False
            code, text = got
            show(code, text)
            if not 200 <= code <= 599:
                bad = Reply(
                    0,
                    clean_text(f"{self.label} sent an invalid reply: {code} {text}"),
                    kind=kinds.PROTOCOL,
                )
                return replies + [bad] * (owed - len(replies)), False
            replies.append(Reply(code, clean_text(text)))
        return replies, True

    def _early(self, channel: _DataChannel, show: Callable[[int, str], None]) -> Reply:
        """A reply or a failure before the final dot: the message was not taken."""
        if channel.replies:
            code, text = channel.replies.popleft()
            show(code, text)
            if 400 <= code <= 599:
                return Reply(code, clean_text(text))
            why = f"{self.label} replied before the end of the message"
            return Reply(0, clean_text(why), kind=kinds.PROTOCOL)
        why = channel.error or "connection lost"
        text = clean_text(f"{self.label}: {why} while sending the message")
        return Reply(0, text, kind=channel.error_kind)


def _unreadable(exc: OSError) -> Reply:
    return Reply(0, f"cannot read the message: {failure(exc)[1]}", kind=kinds.LOCAL)
