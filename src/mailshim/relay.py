"""Hand a spooled message to the listener(s): the failover client over relay sessions.

One ``RelayClient`` holds one connection (an ``smtpsession.RelaySession``) for many messages
and tries the configured relays in order. For each message it returns a ``SendResult``: one
``Reply`` per recipient, 2xx sent, 4xx (or code 0: no reply at all, with the failure's kind)
deferred, 5xx bounced, and the relay that decided. A relay that failed as a whole is skipped
for its ``retry_after_failure`` seconds by every client in the process (the relay-down marks);
``Slots`` caps the connections the clients of one pool open to each relay. The dialogue itself
(EHLO/LHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, pipelining) is ``smtpsession``'s.

Failover: recipients with a temporary reply move on to the next relay, except after a final
dot that got no reply (kind ``unanswered``) or a 4xx/421 reply: the first listener may have
stored the message, so it waits for the next attempt instead of going to a second listener in
front of the same store. Back-pressure (a rate limit's ``4.4.5``, greylisting's ``4.2.2``) is
one session's: it neither marks the relay down nor fails over (the runner opens fewer
sessions and tries again later).

Trust: called by the delivery agent and the runner (as the submitting user or the ``mailshim``
user) and by ``sendmail -odi``/``-v``. Addresses come from the spool's envelope: one with a
control character never reaches a session (a 501 reply for it instead). A session's failure
ends as temporary replies within the relay's ``timeout``, never a hang or a traceback.

Raises ``ConfigError`` (exit 78) for an invalid HELO name or no relay at all; a session's
``RelayDown`` or ``wire.LocalFailure`` becomes replies, never an exception of ``send``, except
``SlotBusy`` for a pool's client whose message went nowhere (the pass gives it to another
session: runner.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, BinaryIO, ClassVar

from mailshim import mailstats
from mailshim import reply as kinds
from mailshim.errors import ConfigError
from mailshim.hostnames import valid_helo
from mailshim.policy import pressure_kind
from mailshim.reply import Reply
from mailshim.smtpconnect import RelayDown, silent
from mailshim.smtpsession import RelaySession
from mailshim.tlsctx import ContextCache
from mailshim.wire import LocalFailure

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from mailshim.smtpconnect import RelaySettings
    from mailshim.smtpsession import Outcome

__all__ = ["RelayClient", "SendResult", "SlotBusy", "Slots"]


class SendResult:
    """The outcome of one message: a reply per envelope recipient, and the relay that decided."""

    __slots__ = ("relay", "relay_level", "replies")

    def __init__(
        self, replies: dict[str, Reply], relay: str, relay_level: frozenset[str] = frozenset()
    ) -> None:
        self.replies = replies
        self.relay = relay
        # The deferred recipients whose reply concerns the relay as a whole (unreachable,
        # 421, no reply, 4xx at MAIL or DATA or after the dot), not the recipient (a 4xx at
        # RCPT, greylisting): they may go as soon as the relay takes mail again.
        self.relay_level = relay_level

    def sent(self) -> list[str]:
        return [rcpt for rcpt, reply in self.replies.items() if reply.accepted]

    def deferred(self) -> list[str]:
        return [rcpt for rcpt, reply in self.replies.items() if reply.temporary]

    def bounced(self) -> list[str]:
        return [rcpt for rcpt, reply in self.replies.items() if reply.permanent]

    def __repr__(self) -> str:
        return f"SendResult({self.replies!r}, {self.relay!r})"


def _bad_address(addr: str) -> bool:
    if addr.isprintable():
        return False  # the common case, at C speed: no control character at all
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in addr)


class SlotBusy(RelayDown):
    """No connection slot of a relay came free within its ``timeout`` (the sessions holding
    them are busy): not a failure of the relay, so it is not marked down."""


def _maybe_taken(reply: Reply, outcome: Outcome) -> bool:
    """The listener may have stored the message: no reply to the final dot, or any reply
    to it (a 4xx or 421 there may come from a listener that stored it first)."""
    return reply.kind == kinds.UNANSWERED or (outcome.dotted and reply.code != 0)


def _relay_wide(reply: Reply, outcome: Outcome) -> bool:
    """A temporary reply that concerns the relay, not the recipient (see SendResult)."""
    if not reply.temporary or pressure_kind(reply) is not None:
        return False
    if outcome.own:
        return reply.code in (0, 421)  # LMTP after the dot: this recipient's own reply
    return reply.code in (0, 421) or outcome.relay_failed


class Slots:
    """How many connections each relay may have open at once, shared by the clients of one
    pool (a relay's ``concurrency``; 1 when it names none). A client waits for a free slot
    rather than skip a healthy relay for one further down the list, but never longer than the
    relay's ``timeout``: a pass must always end, whatever holds the slots."""

    def __init__(self) -> None:
        self._free: dict[tuple[str, str | None, int, str | None], asyncio.Semaphore] = {}

    def _semaphore(self, relay: RelaySettings) -> asyncio.Semaphore:
        key = RelayClient._key(relay)
        sem = self._free.get(key)
        if sem is None:
            sem = self._free[key] = asyncio.Semaphore(self.room(relay))
        return sem

    async def take(self, relay: RelaySettings) -> None:
        """A slot of ``relay``; ``SlotBusy`` when none came free within its ``timeout``."""
        try:
            await asyncio.wait_for(self._semaphore(relay).acquire(), max(0.1, relay.timeout))
        except asyncio.TimeoutError:
            raise SlotBusy(
                Reply(0, f"no free connection to {relay.name} (all busy)", kind=kinds.NOT_TRIED)
            ) from None

    def room(self, relay: RelaySettings) -> int:
        """How many connections ``relay`` may have open at once."""
        return max(1, getattr(relay, "concurrency", 1))

    def give(self, relay: RelaySettings) -> None:
        self._semaphore(relay).release()


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
        slots: Slots | None = None,
        contexts: ContextCache | None = None,
    ) -> None:
        if not relays:
            raise ConfigError("no relay configured")
        for name in [helo, *(r.helo for r in relays if r.helo)]:
            if not valid_helo(name):
                raise ConfigError(f"invalid HELO name {name!r}: one word of printable ASCII")
        self._relays = tuple(relays)
        self._helo = helo
        self._transcript = transcript
        self._session: RelaySession | None = None
        # TLS contexts by settings, shared with the other clients of a pool.
        self.contexts = contexts or ContextCache()
        self._slots = slots
        self._lock: asyncio.Lock | None = None
        # The SIZE the last listener greeted with announced (see RelaySession.size_limit).
        self.listener_size: int | None = None
        # Called once a connection is open (greeted, EHLO, TLS, AUTH): the listener is up.
        self.on_connect: Callable[[], None] | None = None

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """QUIT the open connection, if any."""
        await self._drop()

    @property
    def connected(self) -> bool:
        """A connection is open and may carry the next message."""
        return self._session is not None and self._session.alive

    def in_play(self) -> RelaySettings:
        """The relay this client's next message goes to first: the first relay not marked
        down (``send`` tries them in that order, whatever its open connection is to: a
        connection to a relay marked down since it opened carries nothing more)."""
        return self._candidates()[0]

    async def connect(self) -> Reply | None:
        """Open a connection to the relay in play, before any message is at stake (a pool's
        extra sessions): None once connected, else its failure. Never one further down the
        list: an extra session that relay will not take (at its connection limit, or just
        gone) means one session fewer, not mail to the backup while the primary serves the
        sessions it has (the first session's messages decide a failover)."""
        if self.connected:
            return None
        relay = self.in_play()
        try:
            await self._session_for(relay)
        except RelayDown as down:
            # Not marked as failed (SlotBusy included): a listener refusing one more
            # session still serves the ones it has, and the pool only opens fewer.
            return down.reply
        except LocalFailure as local:
            return local.reply
        return None

    @classmethod
    def forget_failures(cls) -> None:
        """Try every relay again at once (``mailshim flush``; tests)."""
        cls._down_until.clear()

    def _say(self, line: str) -> None:
        if self._transcript is not None:
            self._transcript(line)

    @staticmethod
    def _key(relay: RelaySettings) -> tuple[str, str | None, int, str | None]:
        return (relay.name, relay.host, relay.port, relay.socket)

    def _candidates(self) -> list[RelaySettings]:
        now = time.monotonic()
        usable = [r for r in self._relays if self._down_until.get(self._key(r), 0.0) <= now]
        # When every relay failed recently, trying them beats giving up.
        return usable or list(self._relays)

    def _mark(self, relay: RelaySettings, failed: bool) -> None:
        mailstats.relay_state(relay.name, not failed, time.time())  # mailshim_relay_up
        if failed:
            until = time.monotonic() + max(0.0, relay.retry_after_failure)
            self._down_until[self._key(relay)] = until
        else:
            self._down_until.pop(self._key(relay), None)

    async def _session_for(self, relay: RelaySettings) -> RelaySession:
        """The open connection when it goes to ``relay`` and may carry more; else a new one."""
        current = self._session
        if current is not None and not current.alive:
            self._session = None
            await self._quit(current)
            current = None
        if current is not None and current.relay is relay:
            return current
        if self._slots is not None:
            if current is not None:
                # A client never waits for a slot while it holds another: no two clients
                # can then wait for each other's.
                await self._drop()
                current = None
            await self._slots.take(relay)
        try:
            fresh = await RelaySession.open(
                relay,
                helo=self._helo,
                say=self._say if self._transcript is not None else silent,
                contexts=self.contexts,
            )
        except BaseException:
            if self._slots is not None:
                self._slots.give(relay)
            raise
        self.listener_size = fresh.size_limit()
        if self.on_connect is not None:
            self.on_connect()
        # The old connection (to a relay further down the list) goes only once this one works.
        if current is not None:
            self._session = None
            await self._quit(current)
        self._session = fresh
        return fresh

    async def _quit(self, session: RelaySession) -> None:
        try:
            await session.quit()
        finally:
            if self._slots is not None:
                self._slots.give(session.relay)

    async def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await self._quit(session)

    async def _attempt(
        self,
        relay: RelaySettings,
        sender: str,
        recipients: list[str],
        message: BinaryIO,
        start: int,
        size: int,
        eightbit: bool,
    ) -> tuple[RelaySession, Outcome]:
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
        with CRLF. Recipients with a temporary reply move on to the next relay (not after an
        unanswered final dot); a relay that failed as a whole is skipped for
        ``retry_after_failure`` seconds. Raises ``SlotBusy`` (a pool's client only) when no
        slot of a relay came free in time and nothing of the message was accepted yet.
        """
        wanted = list(dict.fromkeys(recipients))
        replies: dict[str, Reply] = {}
        for rcpt in wanted:
            if _bad_address(sender) or _bad_address(rcpt):
                replies[rcpt] = Reply(501, "5.1.3 control character in address")
        pending = [r for r in wanted if r not in replies]
        used = "none"
        wide: set[str] = set()
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
                except SlotBusy as busy:
                    if not any(reply.accepted for reply in replies.values()):
                        # Nothing of this message went anywhere: the caller (a pass whose
                        # other sessions hold every slot) gives the entry to a session that
                        # has one; an attempt that never reached a listener is no attempt.
                        raise
                    for rcpt in pending:
                        replies[rcpt] = busy.reply
                    wide.update(pending)
                    continue
                except RelayDown as down:
                    self._mark(relay, True)
                    for rcpt in pending:
                        replies[rcpt] = down.reply
                    wide.update(pending)
                    continue
                except LocalFailure as local:
                    await self._drop()
                    for rcpt in pending:
                        replies[rcpt] = local.reply
                    break
                used = session.label
                self._mark(relay, outcome.relay_failed)
                replies.update(outcome.replies)
                for rcpt, got in outcome.replies.items():
                    if _relay_wide(got, outcome):
                        wide.add(rcpt)
                    else:
                        wide.discard(rcpt)
                # An unanswered final dot, or a 4xx after it, never fails over: that listener
                # may have the message, and a second one in front of the same store would
                # deliver it twice. Back-pressure is this session's: no failover either.
                pending = [
                    r
                    for r in pending
                    if replies[r].temporary
                    and not _maybe_taken(replies[r], outcome)
                    and pressure_kind(replies[r]) is None
                ]
        final = {rcpt: replies[rcpt] for rcpt in wanted}
        level = frozenset(r for r in wide if r in final and final[r].temporary)
        return SendResult(final, used, level)
