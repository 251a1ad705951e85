"""Opening one SMTP or LMTP connection to one relay, and the commands on it: resolve, connect,
EHLO/LHLO, STARTTLS, AUTH; one command or a PIPELINING batch at a time; QUIT.

``Link.open`` resolves the relay's host (IPv6 and IPv4, in the resolver's order; no resolver
for an address) and keeps the first address that greets and gets through EHLO/LHLO, STARTTLS
and AUTH as configured. Every reply is judged here (a reply code outside the expected ones, a
lost connection, a timeout become a ``Reply`` with its kind), so that what runs on the link
(a mail transaction: ``smtpsession``; the check's MAIL/RCPT probe: ``probe``) sees replies,
never exceptions from the wire. The bytes themselves (aiosmtplib) are ``wire``'s; TLS contexts
are ``tlsctx``'s.

Trust: called through ``smtpsession.RelaySession`` by ``relay.RelayClient`` (as the submitting
user or the ``mailshim`` user) and by ``mailshim check`` (``probe``). The listener is
hostile-or-broken by assumption; every failure ends as a temporary reply within ``timeout``,
never a hang or a traceback. Reply text is cleaned to one printable line before anyone sees it.
The AUTH secret is read only when a connection needs it, never written to the transcript, and
never sent in clear text except to a loopback address or a unix socket.

Raises ``RelayDown`` from ``Link.open`` when no address of the relay can take mail (its
``reply`` has the failure's kind). Failures on the listener's side are replies, not exceptions.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Protocol, TypeVar

from mailshim import reply as kinds
from mailshim.errors import MailshimError
from mailshim.hostnames import (
    LOCALHOST_NAMES,
    LOOPBACK_ADDRESSES,
    bare_host,
    is_loopback,
)
from mailshim.reply import Reply, clean_text
from mailshim.tlsctx import ContextCache, tls_context
from mailshim.wire import Connection, WireError, WireReply, failure, is_timeout

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Sequence


__all__ = ["AUTH_MECHANISMS", "Link", "RelayDown", "RelaySettings", "silent"]


QUIT_TIMEOUT = 5.0
AUTH_MECHANISMS = ("plain", "login")


class RelaySettings(Protocol):
    """What this module and ``relay`` read from a ``config.RelayConfig`` (duck-typed)."""

    name: str
    host: str | None
    port: int
    socket: str | None
    tls: str
    verify: bool
    ca_file: str | None
    client_cert: str | None
    client_key: str | None
    username: str | None
    timeout: float
    helo: str | None
    protocol: str
    retry_after_failure: float

    def password(self) -> str | None: ...


class RelayDown(Exception):
    """The relay (or one of its addresses) cannot take mail now; ``reply`` says why.

    Its ``reply`` has code 0 and the failure's kind; ``server`` is the listener's own reply
    when one caused it (a refused EHLO, STARTTLS or AUTH). Raised only by
    ``Link.open`` (for ``mailshim check``); ``RelayClient`` turns it into temporary
    replies.
    """

    def __init__(self, reply: Reply, server: Reply | None = None) -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.server = server


def _down(kind: str, text: str, server: Reply | None = None) -> RelayDown:
    return RelayDown(Reply(0, clean_text(text), kind=kind), server)


def silent(line: str) -> None:
    """The transcript when nobody reads one (``-v`` not given): lines are not even built."""


_L = TypeVar("_L", bound="Link")


class Link:
    """One live SMTP or LMTP connection to one relay at one address, before and between messages."""

    def __init__(
        self,
        relay: RelaySettings,
        wire: Connection,
        helo: str,
        server_name: str,
        context: ssl.SSLContext | None,
    ) -> None:
        self.relay = relay
        self.label = wire.label
        self.helo = helo
        self.lmtp = relay.protocol == "lmtp"
        self.messages = 0
        self.alive = True
        self.extensions: dict[str, str] = {}
        self.encrypted = relay.tls == "tls"
        self.greeting = ""
        # A MAIL FROM went out and its transaction has not ended with the final dot's replies.
        self._open = False
        self._wire = wire
        self._server_name = server_name
        self._context = context
        self._say = wire.say
        self._verbose = wire.say is not silent

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls: type[_L],
        relay: RelaySettings,
        *,
        helo: str,
        say: Callable[[str], None] = silent,
        contexts: ContextCache | None = None,
    ) -> _L:
        """Connect to the first address of ``relay`` that greets, says EHLO/LHLO, TLS, AUTH.

        Raises ``RelayDown`` with the last address's failure when none works.
        """
        name = relay.helo or helo
        if relay.socket:
            if relay.tls == "tls":
                # aiosmtplib 2.0 cannot do implicit TLS on a unix socket at all.
                raise _down(
                    kinds.CONFIG, f'{relay.name}: tls = "tls" is not supported on a unix socket'
                )
            server_name = bare_host(relay.host) if relay.host else "localhost"
            targets: list[tuple[str | None, str]] = [(None, f"{relay.name}[{relay.socket}]")]
        else:
            server_name = bare_host(relay.host or "localhost")
            addresses = await _resolve(relay, server_name)
            targets = [(addr, f"{relay.name}[{addr}]:{relay.port}") for addr in addresses]
        tls: ssl.SSLContext | None = None
        if relay.tls in ("tls", "starttls"):
            try:
                settings = (
                    server_name, relay.verify, relay.ca_file, relay.client_cert, relay.client_key,
                )  # fmt: skip
                tls = tls_context(*settings) if contexts is None else contexts.get(*settings)
            except (OSError, ValueError) as exc:
                why = failure(exc)[1]
                raise _down(
                    kinds.TLS_SETTINGS, f"{relay.name}: cannot load TLS settings: {why}"
                ) from None
        down = _down(kinds.DNS, f"{relay.name}: no address to connect to")
        for address, label in targets:
            try:
                session = await cls._connect(relay, address, label, name, server_name, tls, say)
                await session.hello()
            except RelayDown as failed:
                down = failed
                continue
            return session
        raise down

    @classmethod
    async def _connect(
        cls: type[_L],
        relay: RelaySettings,
        address: str | None,
        label: str,
        helo: str,
        server_name: str,
        context: ssl.SSLContext | None,
        say: Callable[[str], None],
    ) -> _L:
        say(f"*** connecting to {label}")
        try:
            wire, code, text = await Connection.open(
                address=address,
                port=relay.port,
                socket_path=relay.socket,
                helo=helo,
                timeout=relay.timeout,
                implicit_tls=relay.tls == "tls",
                context=context,
                label=label,
                say=say,
            )
        except WireError as exc:
            if exc.kind != kinds.CONFIG:
                say(f"*** {label}: {exc.text}")
            raise _down(exc.kind, f"connect to {label}: {exc.text}") from None
        session = cls(relay, wire, helo, server_name, context)
        session.greeting = clean_text(text)
        session._show(code, text)
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
        reply = await self._exchange(verb, self.helo.encode("ascii"))
        if reply.code == 250:
            self.extensions = self._wire.greeted(esmtp=True)
            return
        if allow_helo and not self.lmtp and reply.permanent:
            reply = await self._exchange(b"HELO", self.helo.encode("ascii"))
            if reply.code == 250:
                self.extensions = self._wire.greeted(esmtp=False)
                return
        kind = reply.kind if reply.code == 0 else kinds.HELO_REFUSED
        raise self._fail(kind, f"{self.label} refused {verb.decode()}", reply) from None

    async def _starttls(self) -> None:
        if "starttls" not in self.extensions:
            raise self._fail(
                kinds.TLS_REQUIRED,
                f'{self.label} does not offer STARTTLS, and tls = "starttls" requires it',
            ) from None
        self._say(">>> STARTTLS")
        try:
            code, text = await self._wire.starttls(self._server_name, self._context)
        except WireReply as refused:
            raise self._refused(
                kinds.TLS_REFUSED, f"{self.label} refused STARTTLS", refused
            ) from None
        except WireError as exc:
            kind = exc.kind if exc.kind in (kinds.TLS_VERIFY, kinds.TLS_NAME) else kinds.TLS_FAILED
            raise self._fail(kind, f"STARTTLS with {self.label} failed: {exc.text}") from None
        self._show(code, text)
        self.encrypted = True
        self.extensions = {}

    async def _auth(self, username: str) -> None:
        if not self.encrypted and not is_loopback(self._peer_address()):
            raise self._fail(
                kinds.AUTH_CLEARTEXT,
                f"refusing to send the password for {username} unencrypted to {self.label}"
                ' (set tls = "starttls" or "tls")',
            ) from None
        try:
            password = self.relay.password() or ""
        except MailshimError as exc:
            raise self._fail(kinds.AUTH_SECRET, f"{self.relay.name}: {exc.message}") from None
        except OSError as exc:
            raise self._fail(
                kinds.AUTH_SECRET,
                f"{self.relay.name}: cannot read the password: {failure(exc)[1]}",
            ) from None
        offered = [m for m in AUTH_MECHANISMS if m in self._wire.auth_mechanisms]
        if not offered:
            raise self._fail(
                kinds.AUTH_UNSUPPORTED,
                f"{self.label} offers no AUTH mechanism we speak (PLAIN, LOGIN),"
                " but a username is configured",
            ) from None
        mechanism = offered[0]
        self._say(f">>> AUTH {mechanism.upper()} <credentials hidden>")
        try:
            code, text = await self._wire.auth(mechanism, username, password)
        except WireReply as refused:
            why = f"authentication as {username} at {self.label} failed"
            raise self._refused(kinds.AUTH_FAILED, why, refused) from None
        except WireError as exc:
            raise self._fail(exc.kind, f"AUTH with {self.label} failed: {exc.text}") from None
        self._show(code, text)

    def _peer_address(self) -> str | None:
        if self.relay.socket:
            return None
        return self._wire.peer_address()

    def _refused(self, kind: str, why: str, refused: WireReply) -> RelayDown:
        """The listener refused STARTTLS or AUTH: show its reply and close."""
        self._show(refused.code, refused.message)
        return self._fail(kind, why, Reply(refused.code, clean_text(refused.message)))

    def _fail(self, kind: str, why: str, reply: Reply | None = None) -> RelayDown:
        """Close this connection; the failure it returns names the server's reply if any."""
        self.kill()
        return _down(kind, why if reply is None else f"{why}: {reply}", reply)

    # -- commands ---------------------------------------------------------------------------

    async def _exchange(self, *args: bytes) -> Reply:
        verb = args[0].decode("ascii")
        if not self.alive:
            return Reply(0, f"lost connection with {self.label} before {verb}", kind=kinds.CLOSED)
        if self._verbose:
            self._say(">>> " + clean_text(b" ".join(args).decode("utf-8", "replace")))
        try:
            code, text = await self._wire.execute(*args)
        except WireError as exc:
            return self._lost(verb, exc)
        self._show(code, text)
        return self._judge(verb, code, text)

    def _lost(self, verb: str, exc: WireError) -> Reply:
        """No reply to ``verb``: the connection is gone (or no longer trusted)."""
        self.kill()
        if exc.kind == kinds.TIMEOUT:
            text = f"conversation with {self.label} timed out after {verb}"
        else:
            text = f"lost connection with {self.label} after {verb}: {exc.text}"
        self._say("*** " + text)
        return Reply(0, text, kind=exc.kind)

    def _judge(self, verb: str, code: int, text: str) -> Reply:
        if not 200 <= code <= 599:
            self.kill()
            why = f"{self.label} sent an invalid reply to {verb}: {code}"
            return Reply(0, clean_text(why), kind=kinds.PROTOCOL)
        if code == 421:
            self.kill()  # the server is closing this connection
        return Reply(code, clean_text(text))

    def _expected(self, verb: str, reply: Reply, ok: tuple[int, ...]) -> Reply:
        """Replies other than ``ok``, 4xx or 5xx end the connection."""
        if reply.code == 0 or reply.code in ok or 400 <= reply.code <= 599:
            return reply
        self.kill()
        why = f"{self.label} sent an unexpected reply to {verb}: {reply}"
        return Reply(0, clean_text(why), kind=kinds.PROTOCOL)

    async def command(self, *args: bytes, ok: tuple[int, ...] = (250,)) -> Reply:
        """Send one command; replies other than ``ok``, 4xx or 5xx end the connection."""
        reply = await self._exchange(*args)
        return self._expected(args[0].decode("ascii"), reply, ok)

    async def pipelined(
        self, commands: Sequence[tuple[tuple[bytes, ...], tuple[int, ...]]]
    ) -> list[Reply]:
        """Send every command in one write (RFC 2920); one judged reply per command, in order.

        Commands left without a reply (a 421, the connection lost, a timeout) get the
        failure as a code-0 reply; the connection has then been dropped.
        """
        verbs = [args[0].decode("ascii") for args, _ in commands]
        if not self.alive:
            return [
                Reply(0, f"lost connection with {self.label} before {verbs[0]}", kind=kinds.CLOSED)
            ] * len(commands)
        for args, _ in commands if self._verbose else ():
            self._say(">>> " + clean_text(b" ".join(args).decode("utf-8", "replace")))
        lines = [b" ".join(args) + b"\r\n" for args, _ in commands]
        got, stopped = await self._wire.pipeline(lines, self._show)
        # ``got`` falls short of the commands when reading stopped: those are filled below.
        replies = [
            self._expected(verb, self._judge(verb, code, text), ok)
            for verb, (code, text), (_, ok) in zip(verbs, got, commands, strict=False)
        ]
        if stopped is not None:
            self.kill()
            if len(replies) < len(commands):
                lost = self._lost(verbs[len(replies)], stopped)
                replies += [lost] * (len(commands) - len(replies))
        return replies

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS layer of the connection, when encrypted (certificate, version, cipher)."""
        return self._wire.ssl_object

    def _show(self, code: int, message: str) -> None:
        if not self._verbose:
            return
        lines = message.split("\n")
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            self._say(clean_text(f"<<< {code}{sep}{line}"))

    def kill(self) -> None:
        """Drop the connection now, without QUIT (after a failure, the link is not trusted)."""
        self.alive = False
        self._wire.abort()

    async def quit(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._say(">>> QUIT")
        try:
            code, text = await self._wire.execute(
                b"QUIT", timeout=min(QUIT_TIMEOUT, self.relay.timeout)
            )
            self._show(code, text)
        except WireError:
            pass
        self.kill()


def _literal_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return True
    return False


async def _resolve(relay: RelaySettings, host: str) -> list[str]:
    """Every address of ``host``, IPv6 and IPv4, in the resolver's order; raises RelayDown."""
    if _literal_ip(host):
        return [host]  # no resolver (and no executor thread) for an address
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, relay.port, type=socket.SOCK_STREAM), relay.timeout
        )
        addresses = [str(info[4][0]) for info in infos]
    except (OSError, asyncio.TimeoutError) as exc:
        if host.lower() not in LOCALHOST_NAMES:
            kind, why = (kinds.TIMEOUT, "timed out") if is_timeout(exc) else failure(exc)
            raise _down(
                kind if kind == kinds.TIMEOUT else kinds.DNS,
                f"{relay.name}: cannot resolve {host}: {why}",
            ) from None
        addresses = []
    if host.lower() in LOCALHOST_NAMES:
        # "localhost" means the loopback, both families, whatever /etc/hosts lists.
        addresses.extend(LOOPBACK_ADDRESSES)
    return list(dict.fromkeys(addresses))
