"""A scripted SMTP/LMTP listener for the model test: one asyncio server per port, whose
behaviour a rule switches at any time, recording every message it stores by its token.

Raw asyncio rather than aiosmtpd so that every misbehaviour is one line: a greeting that never
comes (mute), a 421 instead of the greeting, a 4xx at MAIL, RCPT or after the final dot, a
421 in the middle of a session, slow replies, a rate limit that refuses MAIL on all but one
open session (Stalwart's ``452 4.4.5``), a 5xx at RCPT (dead letters to requeue), a 421
after storing the message (Dovecot's LMTP stopped mid-message: docs/spool.md window 7), and,
to show that the model sees a duplicate outside the windows, a listener that stores every
message twice.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

TOKEN = re.compile(rb"MODELTOK-[0-9a-z]+-[0-9]+")

BEHAVIOURS = (
    "up",
    "down",
    "connect4xx",
    "mail4xx",
    "rate",
    "rcpt4xx",
    "dot4xx",
    "mid421",
    "mute",
    "slow",
    "rcpt5xx",
    "stored4xx",
    "twice",
)
# behaviours under which a client cannot even get a session going: the only ones after
# which a failover client may go to the next relay (issue 22 item 9)
UNREACHABLE = ("down", "connect4xx", "mute")
# behaviours whose replies fail the relay as a whole (a 4xx at MAIL or after the dot that is
# not back-pressure, a 421 mid-session): the client skips it for its relay-down mark
# (relay.py), so other mail, and a deferred message's next attempt, may go to the next relay
# meanwhile; only the same attempt must not (issue 22 item 9: test_model.py checks that)
RELAY_FAILED = (*UNREACHABLE, "mail4xx", "dot4xx", "stored4xx", "mid421")
# and those after which a recipient moves on to the next relay in the same attempt: its own
# temporary reply at RCPT (relay.py: "recipients with a temporary reply move on")
FAILS_OVER = (*RELAY_FAILED, "rcpt4xx")
SLOW_REPLY = 0.15  # seconds before each reply in "slow"


class Arrival:
    __slots__ = ("conn", "null_sender", "port", "rcpts", "token", "when")

    def __init__(self, token: str, port: int, conn: int, null_sender: bool, rcpts: list[str]):
        self.token = token
        self.port = port
        self.conn = conn
        self.null_sender = null_sender
        self.rcpts = rcpts
        self.when = time.monotonic()

    def __repr__(self) -> str:
        kind = "bounce" if self.null_sender else "mail"
        return f"<{kind} {self.token} port {self.port} conn {self.conn}>"


class Conn:
    """One connection: its number, the last token stored on it, whether the client quit."""

    __slots__ = ("last", "number", "quit")

    def __init__(self, number: int) -> None:
        self.number = number
        self.last: str | None = None
        self.quit = False


class Port:
    """One listening port: its behaviour, its server, its open connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.behaviour = "up"
        self.server: asyncio.AbstractServer | None = None
        self.conns: dict[int, asyncio.StreamWriter] = {}
        # (monotonic time, behaviour) for every switch: the failover invariant reads it
        self.history: list[tuple[float, str]] = [(time.monotonic(), "up")]


class ScriptedListener:
    def __init__(self, ports: list[int], lmtp: bool = False) -> None:
        self.lmtp = lmtp
        self.ports = [Port(p) for p in ports]
        self.arrivals: list[Arrival] = []
        # the last message stored on each connection that then ended without QUIT: its
        # client may not have learnt that it was taken (docs/spool.md section 5, windows 1, 2)
        self.cut_short: set[str] = set()
        # messages stored and then answered 421 (window 7)
        self.stored_refused: set[str] = set()
        self.lock = threading.Lock()
        self.slow_reply = SLOW_REPLY
        self._next_conn = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        for p in self.ports:
            self._call(self._listen(p))

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        for p in self.ports:
            self.set(p.port, "down")
        self._call(self._cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the switch -------------------------------------------------------------------------

    def set(self, port: int, behaviour: str) -> None:
        assert behaviour in BEHAVIOURS, behaviour
        p = self._port(port)
        self._call(self._switch(p, behaviour))

    def behaviour(self, port: int) -> str:
        return self._port(port).behaviour

    def history(self, port: int) -> list[tuple[float, str]]:
        return list(self._port(port).history)

    def _port(self, port: int) -> Port:
        return next(p for p in self.ports if p.port == port)

    async def _switch(self, p: Port, behaviour: str) -> None:
        p.behaviour = behaviour
        p.history.append((time.monotonic(), behaviour))
        if behaviour == "down":
            if p.server is not None:
                p.server.close()
                await p.server.wait_closed()
                p.server = None
            for w in list(p.conns.values()):
                w.transport.abort()
        elif p.server is None:
            await self._listen(p)

    async def _listen(self, p: Port) -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._session(p, r, w)

        p.server = await asyncio.start_server(serve, "127.0.0.1", p.port, reuse_address=True)

    # --- one session ------------------------------------------------------------------------

    async def _session(self, p: Port, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with self.lock:
            self._next_conn += 1
            conn = self._next_conn
        p.conns[conn] = w
        c = Conn(conn)
        try:
            await self._dialogue(p, c, r, w)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if c.last is not None and not c.quit:
                with self.lock:
                    self.cut_short.add(c.last)
            p.conns.pop(conn, None)
            w.transport.abort()

    async def _reply(self, p: Port, w: asyncio.StreamWriter, line: str) -> None:
        """One reply (its lines in one write), late when the port is slow."""
        if p.behaviour == "slow":
            await asyncio.sleep(self.slow_reply)
        w.write(line.encode() + b"\r\n")
        await w.drain()

    async def _dialogue(  # noqa: C901 - one branch per command, kept together on purpose
        self, p: Port, c: Conn, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        if p.behaviour == "mute":
            while await r.read(4096):
                pass
            return
        if p.behaviour == "connect4xx":
            w.write(b"421 4.3.2 Service not available, try later\r\n")
            await w.drain()
            return
        await self._reply(p, w, "220 model.example ESMTP ready")
        sender: str | None = None
        rcpts: list[str] = []
        stored = 0
        while True:
            raw = await r.readuntil(b"\n")
            cmd = raw.decode("utf-8", "replace").strip()
            verb = cmd[:4].upper()
            if verb in ("EHLO", "LHLO"):
                await self._reply(
                    p, w, "250-model.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8"
                )
            elif verb == "HELO":
                await self._reply(p, w, "250 model.example")
            elif verb == "MAIL":
                b = p.behaviour
                if b == "mid421" and stored >= 1:
                    await self._reply(p, w, "421 4.3.2 Going away mid-session")
                    return
                if b == "mail4xx":
                    await self._reply(p, w, "451 4.3.0 Try MAIL later")
                elif b == "rate" and len(p.conns) > 1:
                    await self._reply(p, w, "452 4.4.5 Rate limit exceeded, try again later")
                else:
                    sender = cmd[10:].split(">", 1)[0].lstrip("<")
                    rcpts = []
                    await self._reply(p, w, "250 2.1.0 OK")
            elif verb == "RCPT":
                if sender is None:
                    await self._reply(p, w, "503 5.5.1 MAIL first")
                elif p.behaviour == "rcpt4xx":
                    await self._reply(p, w, "450 4.2.0 Mailbox busy, try later")
                elif p.behaviour == "rcpt5xx":
                    await self._reply(p, w, "550 5.1.1 No such user here")
                else:
                    rcpts.append(cmd[8:].split(">", 1)[0].lstrip("<"))
                    await self._reply(p, w, "250 2.1.5 OK")
            elif verb == "DATA":
                if sender is None or not rcpts:
                    await self._reply(p, w, "503 5.5.1 No valid recipients")
                    continue
                await self._reply(p, w, "354 End data with <CR><LF>.<CR><LF>")
                body = await r.readuntil(b"\r\n.\r\n")
                if p.behaviour == "dot4xx":
                    replies = ["451 4.3.0 Not taken after all, try later"]
                elif p.behaviour == "stored4xx":
                    token = self._store(p, c.number, sender, rcpts, body)
                    with self.lock:
                        self.stored_refused.add(token)
                    replies = ["421 4.3.2 Shutting down"]
                else:
                    if p.behaviour == "twice":
                        self._store(p, c.number, sender, rcpts, body)
                    c.last = self._store(p, c.number, sender, rcpts, body)
                    stored += 1
                    replies = ["250 2.0.0 Queued"]
                if self.lmtp:
                    replies = replies * len(rcpts)
                for line in replies:
                    await self._reply(p, w, line)
                if replies[0].startswith("421"):
                    return  # a 421 closes the connection (RFC 5321 3.8)
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                await self._reply(p, w, "250 2.0.0 OK")
            elif verb == "NOOP":
                await self._reply(p, w, "250 2.0.0 OK")
            elif verb == "QUIT":
                c.quit = True
                await self._reply(p, w, "221 2.0.0 Bye")
                return
            else:
                await self._reply(p, w, "502 5.5.2 Not implemented")

    def _store(self, p: Port, conn: int, sender: str, rcpts: list[str], body: bytes) -> str:
        found = TOKEN.search(body)
        token = found.group(0).decode() if found else "?"
        with self.lock:
            self.arrivals.append(Arrival(token, p.port, conn, sender == "", list(rcpts)))
        return token

    # --- what arrived -----------------------------------------------------------------------

    def mail(self) -> list[Arrival]:
        """Messages (not reports) stored so far."""
        with self.lock:
            return [a for a in self.arrivals if not a.null_sender]

    def bounces(self) -> list[Arrival]:
        with self.lock:
            return [a for a in self.arrivals if a.null_sender]
