"""Real listeners for tests: aiosmtpd SMTP/LMTP with a recording, scriptable handler, and more.

- ``Listener``: an aiosmtpd SMTP or LMTP server in a thread, on TCP (IPv4 or IPv6) or a unix
  socket, optionally with STARTTLS or implicit TLS (``Certs``, via trustme) and AUTH. Its
  ``RecordingHandler`` keeps every raw command line, every message and the number of
  connections, and can be told what to answer: ``handler.script("MAIL", "451 4.3.0 later")``
  answers the next MAIL that way; ``rcpt_replies`` / ``data_replies`` answer per address;
  ``DROP`` closes the connection instead of answering, ``HANG`` never answers. It offers
  PIPELINING (aiosmtpd itself does not, but reads pipelined commands correctly; real
  listeners offer it) unless ``hidden_extensions`` holds it, and ``pipelined`` lists the
  command lines that arrived while more input was already waiting.
- ``SilentListener``: accepts connections and never says a word.
- ``RawListener``: runs a coroutine of your own as the whole server side of each connection.
- ``StreamingSink``: a tiny SMTP server that hashes what it receives instead of keeping it
  (for messages of hundreds of megabytes).
- ``free_port()``, ``has_ipv6_loopback()``.

Only loopback addresses are used. Nothing here is mocked: the client under test talks to a
real server over a real socket.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import socket
import ssl
import threading
from typing import Any

import trustme
from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult

DROP = "<drop the connection>"
HANG = "<never answer>"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (aiosmtpd's Controller cannot take port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class Certs:
    """A throwaway CA and a server certificate for ``names`` (trustme)."""

    def __init__(self, *names: str) -> None:
        self.ca = trustme.CA()
        self.names = names or ("localhost", "127.0.0.1", "::1")
        self.cert = self.ca.issue_cert(*self.names)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context

    def ca_file(self, folder: str | os.PathLike[str]) -> str:
        path = os.path.join(os.fspath(folder), "ca.pem")
        self.ca.cert_pem.write_to_path(path)
        return path


class Received:
    """One message as the listener saw it."""

    def __init__(self, session: Any, envelope: Any, tls: bool) -> None:
        self.mail_from: str = envelope.mail_from
        self.mail_options: list[str] = list(envelope.mail_options)
        self.rcpt_tos: list[str] = list(envelope.rcpt_tos)
        self.data: bytes = envelope.original_content
        self.tls = tls
        login = getattr(getattr(session, "auth_data", None), "login", None)
        self.login: bytes | None = login if isinstance(login, bytes) else None

    def __repr__(self) -> str:
        return f"<Received from={self.mail_from!r} to={self.rcpt_tos!r} {len(self.data)} bytes>"


class RecordingHandler:
    """aiosmtpd handler that records everything and answers as scripted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: list[bytes] = []
        self.messages: list[Received] = []
        self.connections = 0
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: dict[str, str] = {}
        self.hidden_extensions: set[str] = set()
        # Command lines read while the next bytes were already there: the client sent on
        # without waiting for this line's reply.
        self.pipelined: list[bytes] = []
        self._script: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)

    def script(self, command: str, *replies: str) -> None:
        """Answer the next uses of ``command`` (MAIL, RCPT, DATA, RSET) with ``replies``.

        For DATA the reply is the one after the final dot (LMTP: one line per recipient,
        joined with CRLF). A scripted 2xx also does what the default would do.
        """
        with self.lock:
            self._script[command.upper()].extend(replies)

    def commands(self, verb: str) -> list[bytes]:
        with self.lock:
            return [line for line in self.lines if line.upper().startswith(verb.encode())]

    def _next(self, command: str) -> str | None:
        with self.lock:
            queue = self._script.get(command)
            return queue.popleft() if queue else None

    @staticmethod
    async def _act(server: SMTP, reply: str) -> str:
        if reply == DROP:
            assert server.transport is not None
            server.transport.close()
        if reply in (DROP, HANG):
            # aiosmtpd cancels this coroutine when the connection goes away.
            await asyncio.get_running_loop().create_future()
        return reply

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        hidden = {h.upper() for h in self.hidden_extensions}
        responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return [r for r in responses if r[4:].split(" ")[0].upper() not in hidden]

    async def handle_MAIL(self, server, session, envelope, address, options):
        reply = self._next("MAIL")
        if reply is not None and not reply.startswith("2"):
            return await self._act(server, reply)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        reply = self._next("RCPT") or self.rcpt_replies.get(address)
        if reply is not None and not reply.startswith("2"):
            return await self._act(server, reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return reply or "250 2.1.5 OK"

    async def handle_RSET(self, server, session, envelope):
        reply = self._next("RSET")
        return await self._act(server, reply) if reply is not None else "250 2.0.0 OK"

    async def handle_DATA(self, server, session, envelope):
        tls = server.transport is not None and (
            server.transport.get_extra_info("sslcontext") is not None
        )
        received = Received(session, envelope, tls)
        scripted = self._next("DATA")
        lmtp = isinstance(server, LMTP)
        if scripted is None and lmtp:
            scripted = "\r\n".join(
                self.data_replies.get(rcpt, f"250 2.0.0 <{rcpt}> delivered")
                for rcpt in envelope.rcpt_tos
            )
        delivered = scripted is None or scripted.startswith("2")
        if delivered or lmtp:
            with self.lock:
                self.messages.append(received)
        if scripted is None:
            return "250 2.0.0 Message queued"
        return await self._act(server, scripted)


class _Recording:
    """Mixin for aiosmtpd's SMTP/LMTP: counts connections and records raw command lines.

    A connection counts once it sends a command: aiosmtpd's own start-up probe sends none.
    """

    event_handler: RecordingHandler

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: Any) -> None:
        super()._cb_client_connected(reader, writer)  # type: ignore[misc]
        handler = self.event_handler
        original = reader.readuntil
        seen = False

        async def readuntil(separator: bytes = b"\n") -> bytes:
            nonlocal seen
            line = await original(separator)
            if separator == b"\n":  # command lines; DATA reads with b"\r\n"
                with handler.lock:
                    handler.connections += 0 if seen else 1
                    handler.lines.append(line.rstrip(b"\r\n"))
                    if reader._buffer:  # what the client sent after this line
                        handler.pipelined.append(line.rstrip(b"\r\n"))
                seen = True
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign]


class _SMTPServer(_Recording, SMTP):
    line_length_limit = 1 << 20  # the client must be able to send long lines


class _LMTPServer(_Recording, LMTP):
    line_length_limit = 1 << 20


def _factory(controller: Any) -> SMTP:
    cls = _LMTPServer if controller.lmtp else _SMTPServer
    return cls(controller.handler, **controller.SMTP_kwargs)


class _TCPController(Controller):
    lmtp = False
    factory = _factory


class _UnixController(UnixSocketController):
    lmtp = False
    factory = _factory


class Listener:
    """An aiosmtpd listener in a thread; a context manager.

    ``tls``: None, "starttls" (offered, not required) or "tls" (implicit). ``auth``: a dict
    of user -> password enabling AUTH (allowed without TLS, as on loopback), and required
    before MAIL when ``auth_required``. ``unix``: a socket path instead of host/port.
    """

    def __init__(
        self,
        handler: RecordingHandler | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        unix: str | None = None,
        lmtp: bool = False,
        tls: str | None = None,
        certs: Certs | None = None,
        auth: dict[str, str] | None = None,
        auth_required: bool = False,
        smtputf8: bool = True,
        size_limit: int | None = 2**25,
    ) -> None:
        self.handler = handler or RecordingHandler()
        self.host = host
        self.port = port or (0 if unix else free_port(host))
        self.socket = unix
        kwargs: dict[str, Any] = {
            "server_hostname": "listener.test",
            "enable_SMTPUTF8": smtputf8,
            "data_size_limit": size_limit,
        }
        if tls is not None:
            if certs is None:
                raise ValueError("tls needs certs")
            if tls == "starttls":
                kwargs["tls_context"] = certs.server_context()
            else:
                kwargs["ssl_context"] = certs.server_context()
        if auth is not None:
            users = {u.encode(): p.encode() for u, p in auth.items()}

            def authenticator(server, session, envelope, mechanism, data):
                ok = getattr(data, "login", None) in users and users[data.login] == data.password
                # handled=False: aiosmtpd itself answers 535 on failure
                return AuthResult(success=ok, handled=False, auth_data=data)

            kwargs.update(
                authenticator=authenticator, auth_require_tls=False, auth_required=auth_required
            )
        controller: Controller | UnixSocketController
        if unix is not None:
            controller = _UnixController(self.handler, unix_socket=unix, **kwargs)
        else:
            controller = _TCPController(self.handler, hostname=host, port=self.port, **kwargs)
        controller.lmtp = lmtp
        self.controller = controller

    def start(self) -> Listener:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SilentListener:
    """Accepts TCP connections and never sends a byte (a hung listener)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def __enter__(self) -> SilentListener:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.accepted:
            conn.close()
        self._sock.close()


class _LoopThread:
    """An asyncio loop in a daemon thread serving ``asyncio.start_server`` on loopback."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # subclasses script the dialogue; by itself, a listener that hangs up at once
        writer.close()

    def __enter__(self) -> Any:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, 0), self._loop
        )
        self._server = started.result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class RawListener(_LoopThread):
    """A listener whose whole dialogue is ``dialogue(reader, writer)``, for broken servers.

    The coroutine writes the greeting itself; the connection is closed when it returns.
    """

    def __init__(self, dialogue: Any, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._dialogue = dialogue

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._dialogue(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class StreamingSink(_LoopThread):
    """A minimal SMTP listener that hashes each message instead of storing it.

    ``results``: one ``(sha256 hex, byte count)`` per message, of the un-stuffed content.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.results: list[tuple[str, int]] = []
        self.lines: list[bytes] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 sink ESMTP\r\n")
            while True:
                line = (await reader.readuntil(b"\n")).rstrip(b"\r\n")
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250-8BITMIME\r\n250-SIZE\r\n250 SMTPUTF8\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    self.results.append(await self._data(reader))
                    writer.write(b"250 2.0.0 hashed\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _data(reader: asyncio.StreamReader) -> tuple[str, int]:
        digest = hashlib.sha256()
        count = 0
        rest = b""
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("EOF in DATA")
            rest += chunk
            cut = rest.rfind(b"\r\n")
            if cut < 0:
                continue
            # Whole lines only, behind a virtual CRLF so a line start is always "\r\n".
            region = b"\r\n" + rest[: cut + 2]
            rest = rest[cut + 2 :]
            end = region.find(b"\r\n.\r\n")
            body = region if end < 0 else region[: end + 2]
            out = body.replace(b"\r\n..", b"\r\n.")[2:]
            digest.update(out)
            count += len(out)
            if end >= 0:
                return digest.hexdigest(), count
