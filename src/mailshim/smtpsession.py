"""One mail transaction on an open SMTP or LMTP link: MAIL, RCPT, DATA and the final dot's replies.

A ``RelaySession`` is a ``smtpconnect.Link`` that carries messages. With PIPELINING (RFC 2920)
offered, MAIL, every RCPT and DATA go out in one write and the replies are matched to them in
order; without it, lock-step. RSET only after a transaction that ended before its final dot.
Each ``transaction`` returns an ``Outcome``: one ``Reply`` per recipient (2xx sent, 4xx or code
0 deferred, 5xx bounced), whether the relay as a whole failed, and whether the replies answer
the final dot. Which relay to try, and when to try the next, is ``relay``'s (the failover
client); opening the link is ``smtpconnect``'s; the streamed DATA is ``wire``'s.

Trust: called by ``relay.RelayClient`` as the submitting user or the ``mailshim`` user. The
message file comes from the spool and is sent byte for byte; the listener is hostile-or-broken
by assumption, and every failure of the transaction ends as a temporary reply within the
relay's ``timeout``.

Raises nothing of its own: a ``wire.LocalFailure`` (the message file could not be read) passes
through ``transaction``; failures on the listener's side are replies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from mailshim import reply as kinds
from mailshim.constants import STAGE_MAIL, STAGE_SIZE
from mailshim.policy import pressure_kind
from mailshim.reply import Reply, clean_text
from mailshim.smtpconnect import Link
from mailshim.wire import LocalFailure

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Outcome", "RelaySession"]


def _wire_address(addr: str) -> str:
    """The address between the angle brackets; ``""`` and ``"<>"`` are the null sender."""
    if len(addr) >= 2 and addr.startswith("<") and addr.endswith(">"):
        return addr[1:-1]
    return addr


class Outcome:
    """What one transaction on one relay decided."""

    __slots__ = ("dotted", "own", "relay_failed", "replies", "retry_fresh")

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        # The relay as a whole failed (421, no reply, 4xx at RSET/MAIL/DATA, but not
        # back-pressure such as a rate limit at MAIL): skip it a while.
        self.relay_failed = False
        # The replies answer the final dot: the listener may have stored the message even
        # when it said 4xx, so it never goes to another relay in the same attempt.
        self.dotted = False
        # Each reply is its recipient's own (LMTP's after the dot): one recipient's 421 or
        # missing reply says nothing of another's 452 (mailbox full), which keeps its schedule.
        self.own = False
        # Nothing was accepted and nothing refused for good, on a connection that already
        # carried mail: a fresh one may well succeed (idle timeout, Stalwart's limit of
        # 10 messages per session).
        self.retry_fresh = False

    def all(self, recipients: Sequence[str], reply: Reply) -> None:
        for rcpt in recipients:
            self.replies[rcpt] = reply


class RelaySession(Link):
    """A ``Link`` that carries messages: one transaction at a time."""

    # -- one message ------------------------------------------------------------------------

    async def transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        message: BinaryIO,
        start: int,
        size: int,
        eightbit: bool,
    ) -> Outcome:
        out = Outcome()
        if self._open:
            # The last transaction ended before its final dot (refused recipients or DATA):
            # the listener may still hold its sender. After a completed one, no RSET.
            reply = await self.command(b"RSET")
            if reply.code != 250:
                if not reply.temporary:
                    reply = Reply(0, str(reply), kind=kinds.PROTOCOL)
                out.all(recipients, reply)
                out.relay_failed = out.retry_fresh = True
                return out
            self._open = False
        self.messages += 1

        sender = _wire_address(sender)
        utf8 = not sender.isascii() or not all(r.isascii() for r in recipients)
        if utf8 and "smtputf8" not in self.extensions:
            recipients = self._refuse_utf8(out, sender, recipients)
            if not recipients:
                return out
            utf8 = False
        encoding = "utf-8" if utf8 else "ascii"

        mail = (b"MAIL", b"FROM:<" + sender.encode(encoding) + b">")
        commands: list[tuple[tuple[bytes, ...], tuple[int, ...]]] = [
            ((*mail, *self._mail_params(size, eightbit, utf8)), (250,))
        ]
        for rcpt in recipients:
            wire = _wire_address(rcpt).encode(encoding)
            commands.append(((b"RCPT", b"TO:<" + wire + b">"), (250, 251)))
        commands.append(((b"DATA",), (354,)))
        self._open = True
        dialogue = _Dialogue(self, commands, "pipelining" in self.extensions)

        reply = await dialogue.next()
        if reply.code != 250:
            if reply.permanent:
                # The message (its size, its sender) was refused, not a recipient.
                reply = reply.at(self._mail_stage(size))
            out.all(recipients, reply)
            out.retry_fresh = reply.temporary
            # A rate limit at MAIL is this session's (too many messages on it, or a second):
            # the runner opens fewer sessions; the relay is not down for the others.
            out.relay_failed = reply.temporary and pressure_kind(reply) is None
            dialogue.abandon()
            return out
        accepted = await self._recipients(out, recipients, dialogue)
        if not accepted:
            # Every RCPT deferred (Stalwart's 452 4.4.5 may come here instead of at MAIL):
            # on a connection that already carried mail, a fresh one is worth one try.
            out.retry_fresh = all(reply.temporary for reply in out.replies.values())
            dialogue.abandon()
            return out

        reply = await dialogue.next()
        if reply.code != 354:
            out.all(accepted, reply)
            out.relay_failed = reply.temporary
            return out
        replies = await self._data(message, start, len(accepted) if self.lmtp else 1)
        out.dotted = True
        if self.lmtp:
            for rcpt, final in zip(accepted, replies, strict=True):
                out.replies[rcpt] = final
            out.relay_failed = any(r.code in (0, 421) for r in replies)
            out.own = True
        else:
            out.all(accepted, replies[0])
            # A rate limit after the dot is back-pressure on this session, as at MAIL: the
            # relay is not down for the other sessions (issue 22 item 9).
            out.relay_failed = replies[0].temporary and pressure_kind(replies[0]) is None
        return out

    def size_limit(self) -> int | None:
        """The largest message the listener announced (EHLO ``SIZE n``); None when it gave
        no figure or 0 (RFC 1870: no fixed limit)."""
        value = self.extensions.get("size", "").strip()
        if value.isdigit() and value.isascii() and 0 < int(value) < 1 << 62:
            return int(value)
        return None

    def _mail_stage(self, size: int) -> str:
        """``size`` when the declared size is over the listener's advertised SIZE limit."""
        limit = self.size_limit()
        return STAGE_SIZE if limit is not None and size > limit else STAGE_MAIL

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
        self, out: Outcome, recipients: Sequence[str], dialogue: _Dialogue
    ) -> list[str]:
        """The RCPT replies, in order; refusals go into ``out``; returns the accepted ones."""
        accepted: list[str] = []
        for rcpt in recipients:
            reply = await dialogue.next()
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

    def _refuse_utf8(self, out: Outcome, sender: str, recipients: Sequence[str]) -> list[str]:
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
        try:
            replies, reusable = await self._wire.send_body(message, start, owed, self._show)
        except LocalFailure:
            self.alive = False
            raise
        if reusable:
            self._open = False
        else:
            self.alive = False
        return replies


class _Dialogue:
    """The replies to MAIL, each RCPT and DATA, in order: each command sent when its reply is
    asked for (lock-step), or all of them in one write at the first ask (PIPELINING)."""

    def __init__(
        self,
        session: RelaySession,
        commands: Sequence[tuple[tuple[bytes, ...], tuple[int, ...]]],
        pipelined: bool,
    ) -> None:
        self._session = session
        self._commands = commands
        self._pipelined = pipelined
        self._replies: list[Reply] | None = None
        self._asked = 0

    async def next(self) -> Reply:
        index = self._asked
        self._asked += 1
        if not self._pipelined:
            args, ok = self._commands[index]
            return await self._session.command(*args, ok=ok)
        if self._replies is None:
            self._replies = await self._session.pipelined(self._commands)
        return self._replies[index]

    def abandon(self) -> None:
        """The transaction ends before the message. A pipelined DATA answered 354 (MAIL
        refused, or no recipient accepted) waits for a body that must not come, not even a
        lone dot: the connection is dropped instead."""
        if self._replies is not None and self._replies[-1].code == 354:
            self._session.kill()
