"""Hand a spooled message to the listener(s) over SMTP or LMTP: streamed DATA, failover.

One ``RelayClient`` holds one connection for many messages (RSET between them) and tries the
configured relays in order. For each message it returns one ``Reply`` per recipient: 2xx sent,
4xx (or code 0: no reply at all) deferred, 5xx bounced. Wire and server problems never raise.

aiosmtplib does the connection, EHLO, STARTTLS/implicit TLS, AUTH, MAIL and RCPT. DATA is ours:
aiosmtplib's ``data()`` holds the whole message in memory several times over and writes it
without back-pressure, and its reader pairs one reply with one command, dropping LMTP's extra
replies when they arrive together. So after the 354 the transport is lent to ``_DataChannel``,
which streams the file in chunks with dot-stuffing, waits on the transport's flow control, and
reads as many replies as the protocol owes; then the transport goes back to aiosmtplib.
The only aiosmtplib surface used is what 2.0 (Debian bookworm) and the newest release share:
``SMTP(...)`` keywords, ``connect``, ``execute_command``, ``starttls``, ``auth_plain``,
``auth_login``, ``close``, ``transport``/``protocol``, ``last_ehlo_response``,
``esmtp_extensions``, ``server_auth_methods`` and the exception classes both define.

Trust: called by the delivery agent and the runner (as the submitting user or the ``mailshim``
user) and by ``sendmail -odi``/``-v``. The listener is hostile-or-broken by assumption: replies
may be garbage, split, endless, late or missing, TLS may fail half-way and the connection may
drop anywhere; each ends as a temporary reply within ``timeout``, never a hang or a traceback.
Reply text is cleaned to one printable line before anyone sees it. The message file comes from
the spool and is sent byte for byte; the AUTH secret is read only when a connection needs it,
never written to the transcript, and never sent in clear text except to a loopback address or
a unix socket.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING, BinaryIO, ClassVar, Protocol, cast

import aiosmtplib

from mailshim.errors import ConfigError, MailshimError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["RelayClient", "RelayDown", "RelaySettings", "Reply", "SendResult", "Session"]

CHUNK = 64 * 1024
# A reply longer than this is garbage from a broken or hostile listener.
MAX_REPLY_BYTES = 64 * 1024
MAX_TEXT = 1000
QUIT_TIMEOUT = 5.0
AUTH_MECHANISMS = ("plain", "login")
LOCALHOST_NAMES = ("localhost", "localhost.")
LOOPBACK_ADDRESSES = ("::1", "127.0.0.1")


class RelaySettings(Protocol):
    """What this module reads from a ``config.RelayConfig`` (duck-typed)."""

    name: str
    host: str | None
    port: int
    socket: str | None
    tls: str
    verify: bool
    ca_file: str | None
    username: str | None
    timeout: float
    helo: str | None
    protocol: str
    retry_after_failure: float

    def password(self) -> str | None: ...


# A refusal (5xx) at MAIL FROM concerns the message, not a recipient: sendmail exits 69, not
# 67, and the DSN status is derived from the stage (bounce.status_of reads the marker in str()).
# Temporary replies at MAIL FROM are not marked: they are retried like any other.
MAIL_STAGE = "in reply to MAIL FROM"


class Reply:
    """One reply for one recipient: the listener's, or code 0 when none came (temporary).

    ``stage`` is empty, or says the message was refused at MAIL FROM (the same reply for every
    recipient), with the declared size over the listener's SIZE limit when that was so.
    """

    __slots__ = ("code", "stage", "text")

    def __init__(self, code: int, text: str, stage: str = "") -> None:
        self.code = code
        self.text = text
        self.stage = stage

    @property
    def at_mail(self) -> bool:
        """The listener refused the message at MAIL FROM (not tied to a recipient)."""
        return self.stage.startswith(MAIL_STAGE)

    @property
    def temporary(self) -> bool:
        return self.code == 0 or 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        if self.code == 0:
            return self.text
        said = f"{self.code} {self.text}".rstrip()
        return f"{said} ({self.stage})" if self.stage else said

    def __repr__(self) -> str:
        if self.stage:
            return f"Reply({self.code!r}, {self.text!r}, {self.stage!r})"
        return f"Reply({self.code!r}, {self.text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.text, self.stage) == (other.code, other.text, other.stage)

    def __hash__(self) -> int:
        return hash((self.code, self.text, self.stage))


class SendResult:
    """The outcome of one message: a reply per envelope recipient, and the relay that decided."""

    __slots__ = ("relay", "replies")

    def __init__(self, replies: dict[str, Reply], relay: str) -> None:
        self.replies = replies
        self.relay = relay

    def sent(self) -> list[str]:
        return [rcpt for rcpt, reply in self.replies.items() if 200 <= reply.code < 300]

    def deferred(self) -> list[str]:
        return [rcpt for rcpt, reply in self.replies.items() if reply.temporary]

    def bounced(self) -> list[str]:
        return [rcpt for rcpt, reply in self.replies.items() if reply.permanent]

    def __repr__(self) -> str:
        return f"SendResult({self.replies!r}, {self.relay!r})"


def clean_text(text: str) -> str:
    """One printable line from a listener's text: no controls, no surrogates, bounded.

    >>> clean_text("5.1.1 no\\nsuch\\x1b[31m user")
    '5.1.1 no such?[31m user'
    """
    out = []
    for ch in " ".join(text.splitlines()):
        num = ord(ch)
        if ch == "\t":
            out.append(" ")
        elif num < 32 or 127 <= num < 160 or 0xD800 <= num <= 0xDFFF:
            out.append("?")
        else:
            out.append(ch)
    line = "".join(out).strip()
    return line if len(line) <= MAX_TEXT else line[:MAX_TEXT] + "..."


def _describe(exc: BaseException) -> str:
    """A short reason for a connection-level failure, from the most specific cause."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        if (
            isinstance(seen, OSError)
            and not isinstance(seen, aiosmtplib.SMTPException)
            and seen.errno
        ):
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return clean_text(f"{exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPException):
        return clean_text(exc.message)
    return clean_text(str(exc)) or type(exc).__name__


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError))


# Everything aiosmtplib or the socket layer raises for a wire problem.
_WIRE_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError)


class RelayDown(Exception):
    """The relay (or one of its addresses) cannot take mail now; ``reply`` says why.

    Raised only by ``Session.open`` (for ``mailshim check``); ``RelayClient`` turns it into
    temporary replies.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class _LocalFailure(Exception):
    """Something on our side (reading the spooled message) failed; no relay can help."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class _PinnedNameContext(ssl.SSLContext):
    """Checks the certificate against the configured host name, whatever address we dialled.

    We connect to each resolved address as an IP literal (so that each is tried in turn with
    its own timeout), which would otherwise make the TLS layer check the certificate against
    the address. asyncio calls ``wrap_bio`` for both implicit TLS and STARTTLS, on every
    supported Python, so this one override serves both aiosmtplib versions.
    """

    expected_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        name = server_hostname if server_side else (self.expected_name or server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, name, session)


def _tls_context(relay: RelaySettings, name: str) -> ssl.SSLContext:
    context = _PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.expected_name = name
    if relay.verify:
        if relay.ca_file:
            context.load_verify_locations(cafile=relay.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _bare_host(host: str) -> str:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def _is_loopback(address: str | None) -> bool:
    if address is None:  # a unix socket never leaves the machine
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _valid_helo(name: str) -> bool:
    return bool(name) and name.isascii() and all(33 <= ord(ch) < 127 for ch in name)


def _bad_address(addr: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in addr)


def _wire_address(addr: str) -> str:
    """The address between the angle brackets; ``""`` and ``"<>"`` are the null sender."""
    if len(addr) >= 2 and addr.startswith("<") and addr.endswith(">"):
        return addr[1:-1]
    return addr


class _DataChannel(asyncio.Protocol):
    """Owns the transport from the 354 until the replies owed for the final dot are read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, previous: asyncio.BaseProtocol) -> None:
        self._loop = loop
        self._previous = previous
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._reply_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.replies: collections.deque[tuple[int, str]] = collections.deque()
        self.error: str | None = None
        self.lost = False

    @property
    def clean(self) -> bool:
        """Nothing unread and nothing wrong: the connection can go back to aiosmtplib."""
        return not (self.lost or self.error or self.replies or self._buffer or self._lines)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
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
            self._fail("reply too long")
        self._wake()

    def _line(self, line: bytes) -> None:
        code, sep = line[:3], line[3:4]
        if len(code) != 3 or not code.isdigit() or sep not in (b"", b" ", b"-"):
            shown = clean_text(line[:80].decode("utf-8", "replace"))
            self._fail(f"garbage instead of a reply: {shown!r}")
            return
        self._reply_bytes += len(line)
        if self._reply_bytes > MAX_REPLY_BYTES:
            self._fail("reply too long")
            return
        self._lines.append(line[4:].strip().decode("utf-8", "replace"))
        if sep != b"-":
            self.replies.append((int(code), "\n".join(self._lines)))
            self._lines = []
            self._reply_bytes = 0

    def eof_received(self) -> bool:
        self._fail("connection closed by the server")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail("connection lost" if exc is None else f"connection lost: {_describe(exc)}")
        # aiosmtplib's protocol must learn of it too, or its state would claim a live link.
        self._previous.connection_lost(exc)

    async def _event(self, timeout: float) -> None:
        self._waiter = self._loop.create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None

    async def drain(self, timeout: float) -> None:
        """Wait while the transport's buffer is above its high-water mark (back-pressure)."""
        # Yield at least once: a reset is noticed (and an early reply read) only when the
        # loop runs its callbacks, and an unpaused transport would otherwise never let it.
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


class _Outcome:
    """What one transaction on one relay decided."""

    __slots__ = ("relay_failed", "replies", "retry_fresh")

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        # The relay as a whole failed (421, no reply, 4xx at RSET/MAIL/DATA): skip it a while.
        self.relay_failed = False
        # Nothing was accepted and nothing refused for good, on a connection that already
        # carried mail: a fresh one may well succeed (idle timeout, Stalwart's limit of
        # 10 messages per session).
        self.retry_fresh = False

    def all(self, recipients: Sequence[str], reply: Reply) -> None:
        for rcpt in recipients:
            self.replies[rcpt] = reply


class Session:
    """One live SMTP or LMTP connection to one relay at one address."""

    def __init__(
        self,
        relay: RelaySettings,
        label: str,
        smtp: aiosmtplib.SMTP,
        helo: str,
        server_name: str,
        context: ssl.SSLContext | None,
        say: Callable[[str], None],
    ) -> None:
        self.relay = relay
        self.label = label
        self.helo = helo
        self.lmtp = relay.protocol == "lmtp"
        self.messages = 0
        self.alive = True
        self.extensions: dict[str, str] = {}
        self.encrypted = relay.tls == "tls"
        self.greeting = ""
        self._smtp = smtp
        self._server_name = server_name
        self._context = context
        self._say = say

    def size_limit(self) -> int | None:
        """The largest message the listener announced (EHLO ``SIZE n``); None when it gave
        no figure or 0 (RFC 1870: no fixed limit)."""
        value = self.extensions.get("size", "").strip()
        if value.isdigit() and value.isascii() and 0 < int(value) < 1 << 62:
            return int(value)
        return None

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        relay: RelaySettings,
        *,
        helo: str,
        say: Callable[[str], None] = lambda line: None,
        context: Callable[[RelaySettings, str], ssl.SSLContext] | None = None,
    ) -> Session:
        """Connect to the first address of ``relay`` that greets, says EHLO/LHLO, TLS, AUTH.

        Raises ``RelayDown`` with the last address's failure when none works.
        """
        name = relay.helo or helo
        if relay.socket:
            if relay.tls == "tls":
                # aiosmtplib 2.0 cannot do implicit TLS on a unix socket at all.
                raise RelayDown(
                    Reply(0, f'{relay.name}: tls = "tls" is not supported on a unix socket')
                )
            server_name = _bare_host(relay.host) if relay.host else "localhost"
            targets: list[tuple[str | None, str]] = [(None, f"{relay.name}[{relay.socket}]")]
        else:
            server_name = _bare_host(relay.host or "localhost")
            addresses = await _resolve(relay, server_name)
            targets = [(addr, f"{relay.name}[{addr}]:{relay.port}") for addr in addresses]
        tls_context: ssl.SSLContext | None = None
        if relay.tls in ("tls", "starttls"):
            try:
                tls_context = (context or _tls_context)(relay, server_name)
            except (OSError, ValueError) as exc:
                raise RelayDown(
                    Reply(0, f"{relay.name}: cannot load TLS settings: {_describe(exc)}")
                ) from None
        failure = Reply(0, f"{relay.name}: no address to connect to")
        for address, label in targets:
            try:
                session = await cls._connect(
                    relay, address, label, name, server_name, tls_context, say
                )
                await session.hello()
            except RelayDown as down:
                failure = down.reply
                continue
            return session
        raise RelayDown(failure)

    @classmethod
    async def _connect(
        cls,
        relay: RelaySettings,
        address: str | None,
        label: str,
        helo: str,
        server_name: str,
        context: ssl.SSLContext | None,
        say: Callable[[str], None],
    ) -> Session:
        say(f"*** connecting to {label}")
        try:
            # hostname=None with socket_path: aiosmtplib 2.0 defaults it to "localhost"
            # and then refuses the combination.
            smtp = aiosmtplib.SMTP(
                hostname=address,
                port=relay.port if address is not None else None,
                socket_path=relay.socket if address is None else None,
                local_hostname=helo,
                timeout=relay.timeout,
                use_tls=relay.tls == "tls",
                # False, never None: None upgrades whenever STARTTLS is offered.
                start_tls=False,
                tls_context=context,
            )
            greeting = await smtp.connect()
        except ValueError as exc:  # a combination asyncio or aiosmtplib refuses
            raise RelayDown(Reply(0, f"connect to {label}: {exc}")) from None
        except _WIRE_ERRORS as exc:
            say(f"*** {label}: {_describe(exc)}")
            raise RelayDown(Reply(0, f"connect to {label}: {_describe(exc)}")) from None
        session = cls(relay, label, smtp, helo, server_name, context, say)
        session.greeting = clean_text(greeting.message)
        session._show(greeting.code, greeting.message)
        return session

    async def hello(self) -> None:
        """EHLO (or LHLO), then STARTTLS and AUTH as configured. Raises ``RelayDown``."""
        await self._greet(allow_helo=True)
        if self.relay.tls == "starttls":
            await self._starttls()
            await self._greet(allow_helo=False)
        if self.relay.username:
            await self._auth(self.relay.username)

    async def _greet(self, *, allow_helo: bool) -> None:
        verb = b"LHLO" if self.lmtp else b"EHLO"
        reply, response = await self._exchange(verb, self.helo.encode("ascii"))
        if reply.code == 250 and response is not None:
            self._smtp.last_ehlo_response = response
            self.extensions = dict(self._smtp.esmtp_extensions)
            return
        if allow_helo and not self.lmtp and reply.permanent:
            reply, response = await self._exchange(b"HELO", self.helo.encode("ascii"))
            if reply.code == 250 and response is not None:
                self._smtp.last_helo_response = response
                self.extensions = {}
                return
        raise self._down(f"{self.label} refused {verb.decode()}", reply) from None

    async def _starttls(self) -> None:
        if "starttls" not in self.extensions:
            raise self._down(
                f'{self.label} does not offer STARTTLS, and tls = "starttls" requires it', None
            ) from None
        self._say(">>> STARTTLS")
        try:
            response = await self._smtp.starttls(
                server_hostname=self._server_name, tls_context=self._context
            )
        except aiosmtplib.SMTPResponseException as exc:
            self._show(exc.code, exc.message)
            raise self._down(
                f"{self.label} refused STARTTLS", Reply(exc.code, exc.message)
            ) from None
        except _WIRE_ERRORS as exc:
            raise self._down(f"STARTTLS with {self.label} failed: {_describe(exc)}", None) from None
        self._show(response.code, response.message)
        self.encrypted = True
        self.extensions = {}

    async def _auth(self, username: str) -> None:
        if not self.encrypted and not _is_loopback(self._peer_address()):
            raise self._down(
                f"refusing to send the password for {username} unencrypted to {self.label}"
                ' (set tls = "starttls" or "tls")',
                None,
            ) from None
        try:
            password = self.relay.password() or ""
        except MailshimError as exc:
            raise self._down(f"{self.relay.name}: {exc.message}", None) from None
        except OSError as exc:
            raise self._down(
                f"{self.relay.name}: cannot read the password: {_describe(exc)}", None
            ) from None
        offered = [m for m in AUTH_MECHANISMS if m in self._smtp.server_auth_methods]
        if not offered:
            raise self._down(
                f"{self.label} offers no AUTH mechanism we speak (PLAIN, LOGIN),"
                " but a username is configured",
                None,
            ) from None
        mechanism = offered[0]
        self._say(f">>> AUTH {mechanism.upper()} <credentials hidden>")
        try:
            if mechanism == "plain":
                response = await self._smtp.auth_plain(username, password)
            else:
                response = await self._smtp.auth_login(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            self._show(exc.code, exc.message)
            raise self._down(
                f"authentication as {username} at {self.label} failed",
                Reply(exc.code, exc.message),
            ) from None
        except _WIRE_ERRORS as exc:
            raise self._down(f"AUTH with {self.label} failed: {_describe(exc)}", None) from None
        self._show(response.code, response.message)

    def _peer_address(self) -> str | None:
        if self.relay.socket:
            return None
        peer = self._smtp.transport.get_extra_info("peername") if self._smtp.transport else None
        return str(peer[0]) if peer else ""

    def _down(self, why: str, reply: Reply | None) -> RelayDown:
        """Close this connection; the failure it returns names the server's reply if any."""
        self.kill()
        text = why if reply is None else f"{why}: {reply}"
        return RelayDown(Reply(0, clean_text(text)))

    # -- commands ---------------------------------------------------------------------------

    async def _exchange(self, *args: bytes) -> tuple[Reply, aiosmtplib.SMTPResponse | None]:
        verb = args[0].decode("ascii")
        if not self.alive:
            return Reply(0, f"lost connection with {self.label} before {verb}"), None
        self._say(">>> " + clean_text(b" ".join(args).decode("utf-8", "replace")))
        try:
            response = await self._smtp.execute_command(*args)
        except _WIRE_ERRORS as exc:
            self.kill()
            if _is_timeout(exc):
                text = f"conversation with {self.label} timed out after {verb}"
            else:
                text = f"lost connection with {self.label} after {verb}: {_describe(exc)}"
            self._say("*** " + text)
            return Reply(0, text), None
        self._show(response.code, response.message)
        if not 200 <= response.code <= 599:
            self.kill()
            text = f"{self.label} sent an invalid reply to {verb}: {response.code}"
            return Reply(0, clean_text(text)), None
        if response.code == 421:
            self.kill()  # the server is closing this connection
        return Reply(response.code, clean_text(response.message)), response

    async def _command(self, *args: bytes, ok: tuple[int, ...] = (250,)) -> Reply:
        """Send one command; replies other than ``ok``, 4xx or 5xx end the connection."""
        reply, _ = await self._exchange(*args)
        if reply.code == 0 or reply.code in ok or 400 <= reply.code <= 599:
            return reply
        self.kill()
        verb = args[0].decode("ascii")
        return Reply(0, clean_text(f"{self.label} sent an unexpected reply to {verb}: {reply}"))

    async def command(self, *args: bytes, ok: tuple[int, ...] = (250,)) -> Reply:
        """One command outside a transaction (``mailshim check``); see ``_command``."""
        return await self._command(*args, ok=ok)

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS layer of the connection, when encrypted (certificate, version, cipher)."""
        transport = self._smtp.transport
        found = transport.get_extra_info("ssl_object") if transport is not None else None
        return found if isinstance(found, ssl.SSLObject) else None

    def _show(self, code: int, message: str) -> None:
        lines = message.split("\n")
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            self._say(clean_text(f"<<< {code}{sep}{line}"))

    def kill(self) -> None:
        """Drop the connection now, without QUIT (after a failure, the link is not trusted)."""
        self.alive = False
        transport = cast("asyncio.Transport | None", self._smtp.transport)
        if transport is not None:
            transport.abort()
        self._smtp.close()

    async def quit(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._say(">>> QUIT")
        try:
            response = await self._smtp.execute_command(
                b"QUIT", timeout=min(QUIT_TIMEOUT, self.relay.timeout)
            )
            self._show(response.code, response.message)
        except _WIRE_ERRORS:
            pass
        self.kill()

    # -- one message ------------------------------------------------------------------------

    async def transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        message: BinaryIO,
        start: int,
        size: int,
        eightbit: bool,
    ) -> _Outcome:
        out = _Outcome()
        if self.messages:
            reply = await self._command(b"RSET")
            if reply.code != 250:
                out.all(recipients, reply if reply.temporary else Reply(0, str(reply)))
                out.relay_failed = out.retry_fresh = True
                return out
        self.messages += 1

        sender = _wire_address(sender)
        utf8 = not sender.isascii() or not all(r.isascii() for r in recipients)
        if utf8 and "smtputf8" not in self.extensions:
            recipients = self._refuse_utf8(out, sender, recipients)
            if not recipients:
                return out
            utf8 = False
        encoding = "utf-8" if utf8 else "ascii"

        reply = await self._command(
            b"MAIL",
            b"FROM:<" + sender.encode(encoding) + b">",
            *self._mail_params(size, eightbit, utf8),
        )
        if reply.code != 250:
            if reply.permanent:
                reply = Reply(reply.code, reply.text, self._mail_stage(size))
            out.all(recipients, reply)
            out.relay_failed = out.retry_fresh = reply.temporary
            return out
        accepted = await self._recipients(out, recipients, encoding)
        if not accepted:
            # Every RCPT deferred (Stalwart's 452 4.4.5 may come here instead of at MAIL):
            # on a connection that already carried mail, a fresh one is worth one try.
            out.retry_fresh = all(reply.temporary for reply in out.replies.values())
            return out

        reply = await self._command(b"DATA", ok=(354,))
        if reply.code != 354:
            out.all(accepted, reply)
            out.relay_failed = reply.temporary
            return out
        replies = await self._data(message, start, len(accepted) if self.lmtp else 1)
        if self.lmtp:
            for rcpt, final in zip(accepted, replies, strict=True):
                out.replies[rcpt] = final
            out.relay_failed = any(r.code in (0, 421) for r in replies)
        else:
            out.all(accepted, replies[0])
            out.relay_failed = replies[0].temporary
        return out

    def _mail_stage(self, size: int) -> str:
        """The stage of a MAIL FROM refusal; names a size over the advertised SIZE limit."""
        limit = self.extensions.get("size", "").strip()
        if limit.isascii() and limit.isdigit() and 0 < int(limit) < size:
            return f"{MAIL_STAGE}; SIZE={size} over the listener's limit of {int(limit)}"
        return MAIL_STAGE

    def _mail_params(self, size: int, eightbit: bool, utf8: bool) -> list[bytes]:
        params = []
        if "size" in self.extensions:
            params.append(f"SIZE={size}".encode("ascii"))
        # 8-bit data to a server that does not offer 8BITMIME still goes out: RFC 6152 says
        # not to, but every listener in use takes it, and bouncing cron mail is worse.
        if eightbit and "8bitmime" in self.extensions:
            params.append(b"BODY=8BITMIME")
        if utf8:
            params.append(b"SMTPUTF8")
        return params

    async def _recipients(
        self, out: _Outcome, recipients: Sequence[str], encoding: str
    ) -> list[str]:
        """RCPT for each; refusals go into ``out``; returns the accepted ones."""
        accepted: list[str] = []
        for rcpt in recipients:
            wire = _wire_address(rcpt).encode(encoding)
            reply = await self._command(b"RCPT", b"TO:<" + wire + b">", ok=(250, 251))
            if reply.code in (250, 251):
                accepted.append(rcpt)
            elif reply.code in (0, 421):
                # The connection is gone: nobody got this message from this relay.
                out.all([r for r in recipients if r not in out.replies], reply)
                out.relay_failed = True
                return []
            else:
                out.replies[rcpt] = reply
        return accepted

    def _refuse_utf8(self, out: _Outcome, sender: str, recipients: Sequence[str]) -> list[str]:
        """Without SMTPUTF8, non-ASCII addresses cannot be sent: refuse those, keep the rest."""
        why = f"5.6.7 SMTPUTF8 is required, but {self.label} does not offer it"
        if not sender.isascii():
            out.all(recipients, Reply(553, clean_text(f"{why} (sender <{sender}>)")))
            return []
        for rcpt in recipients:
            if not rcpt.isascii():
                out.replies[rcpt] = Reply(553, clean_text(f"{why} (recipient <{rcpt}>)"))
        return [r for r in recipients if r.isascii()]

    async def _data(self, message: BinaryIO, start: int, owed: int) -> list[Reply]:
        """Stream the message after a 354; return the ``owed`` replies to the final dot."""
        smtp = self._smtp
        transport, previous = smtp.transport, smtp.protocol
        if transport is None or previous is None or transport.is_closing():
            self.kill()
            return [Reply(0, f"lost connection with {self.label} before the message")] * owed
        channel = _DataChannel(asyncio.get_running_loop(), previous)
        transport.set_protocol(channel)
        done = False
        try:
            replies, done = await self._stream(channel, transport, message, start, owed)
        finally:
            if done and channel.clean:
                transport.set_protocol(previous)
            else:
                self.kill()
        return replies

    async def _stream(
        self,
        channel: _DataChannel,
        transport: asyncio.BaseTransport,
        message: BinaryIO,
        start: int,
        owed: int,
    ) -> tuple[list[Reply], bool]:
        writer = cast("asyncio.WriteTransport", transport)
        timeout = self.relay.timeout
        self._say("*** (message body not shown)")
        try:
            message.seek(start)
        except OSError as exc:
            raise _LocalFailure(Reply(0, f"cannot read the message: {_describe(exc)}")) from None
        # The two bytes before each chunk: a "." after CRLF is at a line start even when the
        # CRLF ended the previous chunk. Starting with CRLF stuffs a dot on the first line.
        tail = b"\r\n"
        while True:
            try:
                chunk = message.read(CHUNK)
            except OSError as exc:
                # No final dot goes out: the server must not take a truncated message.
                raise _LocalFailure(
                    Reply(0, f"cannot read the message: {_describe(exc)}")
                ) from None
            if not chunk:
                break
            joined = tail + chunk
            writer.write(joined.replace(b"\r\n.", b"\r\n..")[2:])
            tail = joined[-2:]
            try:
                await channel.drain(timeout)
            except asyncio.TimeoutError:
                text = f"conversation with {self.label} timed out while sending the message"
                return [Reply(0, text)] * owed, False
            if channel.error is not None or channel.replies or writer.is_closing():
                return [self._early(channel)] * owed, False
        writer.write(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
        self._say(">>> .")
        replies: list[Reply] = []
        while len(replies) < owed:
            try:
                got = await channel.reply(timeout)
            except asyncio.TimeoutError:
                got = "timed out"
            if isinstance(got, str):
                # At-least-once window: the listener may have stored the message and then
                # failed to tell us. Deferring means it may arrive twice; dropping it could
                # lose it, which is worse.
                text = (
                    f"no reply from {self.label} after the end of the message ({got});"
                    " it may have been delivered"
                )
                self._say("*** " + text)
                return replies + [Reply(0, clean_text(text))] * (owed - len(replies)), False
            code, text = got
            self._show(code, text)
            if not 200 <= code <= 599:
                bad = Reply(0, clean_text(f"{self.label} sent an invalid reply: {code} {text}"))
                return replies + [bad] * (owed - len(replies)), False
            replies.append(Reply(code, clean_text(text)))
        return replies, True

    def _early(self, channel: _DataChannel) -> Reply:
        """A reply or a failure before the final dot: the message was not taken."""
        if channel.replies:
            code, text = channel.replies.popleft()
            self._show(code, text)
            if 400 <= code <= 599:
                return Reply(code, clean_text(text))
            return Reply(0, clean_text(f"{self.label} replied before the end of the message"))
        why = channel.error or "connection lost"
        return Reply(0, clean_text(f"{self.label}: {why} while sending the message"))


async def _resolve(relay: RelaySettings, host: str) -> list[str]:
    """Every address of ``host``, IPv6 and IPv4, in the resolver's order; raises RelayDown."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, relay.port, type=socket.SOCK_STREAM), relay.timeout
        )
        addresses = [str(info[4][0]) for info in infos]
    except (OSError, asyncio.TimeoutError) as exc:
        if host.lower() not in LOCALHOST_NAMES:
            why = "timed out" if _is_timeout(exc) else _describe(exc)
            raise RelayDown(Reply(0, f"{relay.name}: cannot resolve {host}: {why}")) from None
        addresses = []
    if host.lower() in LOCALHOST_NAMES:
        # "localhost" means the loopback, both families, whatever /etc/hosts lists.
        addresses.extend(LOOPBACK_ADDRESSES)
    return list(dict.fromkeys(addresses))


class RelayClient:
    """Deliver messages through the configured relays, one reused connection at a time."""

    # Relays that failed recently, shared by every client in this process:
    # key -> time.monotonic() before which the relay is skipped.
    _down_until: ClassVar[dict[tuple[str, str | None, int, str | None], float]] = {}

    def __init__(
        self,
        relays: Sequence[RelaySettings],
        *,
        helo: str,
        transcript: Callable[[str], None] | None = None,
        max_messages_per_connection: int = 0,
    ) -> None:
        if not relays:
            raise ConfigError("no relay configured")
        for name in [helo, *(r.helo for r in relays if r.helo)]:
            if not _valid_helo(name):
                raise ConfigError(f"invalid HELO name {name!r}: one word of printable ASCII")
        self._relays = tuple(relays)
        self._helo = helo
        self._transcript = transcript
        self._max = max(0, max_messages_per_connection)
        self._session: Session | None = None
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self._lock: asyncio.Lock | None = None
        # The SIZE the last listener greeted with announced (see Session.size_limit).
        self.listener_size: int | None = None

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """QUIT the open connection, if any."""
        session, self._session = self._session, None
        if session is not None:
            await session.quit()

    @classmethod
    def forget_failures(cls) -> None:
        """Try every relay again at once (``mailshim flush``; tests)."""
        cls._down_until.clear()

    def _say(self, line: str) -> None:
        if self._transcript is not None:
            self._transcript(line)

    def _context(self, relay: RelaySettings, name: str) -> ssl.SSLContext:
        key = (relay.name, name)
        if key not in self._contexts:
            self._contexts[key] = _tls_context(relay, name)
        return self._contexts[key]

    @staticmethod
    def _key(relay: RelaySettings) -> tuple[str, str | None, int, str | None]:
        return (relay.name, relay.host, relay.port, relay.socket)

    def _candidates(self) -> list[RelaySettings]:
        now = time.monotonic()
        usable = [r for r in self._relays if self._down_until.get(self._key(r), 0.0) <= now]
        # When every relay failed recently, trying them beats giving up.
        return usable or list(self._relays)

    def _mark(self, relay: RelaySettings, failed: bool) -> None:
        if failed:
            until = time.monotonic() + max(0.0, relay.retry_after_failure)
            self._down_until[self._key(relay)] = until
        else:
            self._down_until.pop(self._key(relay), None)

    async def _session_for(self, relay: RelaySettings) -> Session:
        """The open connection when it goes to ``relay`` and may carry more; else a new one."""
        current = self._session
        if current is not None and (
            not current.alive or (self._max and current.messages >= self._max)
        ):
            await current.quit()
            self._session = current = None
        if current is not None and current.relay is relay:
            return current
        fresh = await Session.open(relay, helo=self._helo, say=self._say, context=self._context)
        self.listener_size = fresh.size_limit()
        # The old connection (to a relay further down the list) goes only once this one works.
        if current is not None:
            await current.quit()
        self._session = fresh
        return fresh

    async def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.quit()

    async def _attempt(
        self,
        relay: RelaySettings,
        sender: str,
        recipients: list[str],
        message: BinaryIO,
        start: int,
        size: int,
        eightbit: bool,
    ) -> tuple[Session, _Outcome]:
        session = await self._session_for(relay)
        reused = session.messages > 0
        outcome = await session.transaction(sender, recipients, message, start, size, eightbit)
        if reused and outcome.retry_fresh:
            first = next(iter(outcome.replies.values()))
            self._say(f"*** {first}; reconnecting to {relay.name}")
            await self._drop()
            session = await self._session_for(relay)
            outcome = await session.transaction(sender, recipients, message, start, size, eightbit)
        if outcome.relay_failed or not session.alive:
            await self._drop()
        return session, outcome

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: BinaryIO,
        size: int,
        eightbit: bool,
    ) -> SendResult:
        """Deliver one message; one reply per recipient, in envelope order.

        ``message`` is positioned at the start of CRLF-normalised, unstuffed bytes ending
        with CRLF. Recipients with a temporary reply move on to the next relay; a relay that
        failed as a whole is skipped for ``retry_after_failure`` seconds.
        """
        wanted = list(dict.fromkeys(recipients))
        replies: dict[str, Reply] = {}
        for rcpt in wanted:
            if _bad_address(sender) or _bad_address(rcpt):
                replies[rcpt] = Reply(501, "5.1.3 control character in address")
        pending = [r for r in wanted if r not in replies]
        used = "none"
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            start = message.tell()
            for relay in self._candidates():
                if not pending:
                    break
                try:
                    session, outcome = await self._attempt(
                        relay, sender, pending, message, start, size, eightbit
                    )
                except RelayDown as down:
                    self._mark(relay, True)
                    for rcpt in pending:
                        replies[rcpt] = down.reply
                    continue
                except _LocalFailure as local:
                    await self._drop()
                    for rcpt in pending:
                        replies[rcpt] = local.reply
                    break
                used = session.label
                self._mark(relay, outcome.relay_failed)
                replies.update(outcome.replies)
                pending = [r for r in pending if replies[r].temporary]
        return SendResult({rcpt: replies[rcpt] for rcpt in wanted}, used)
