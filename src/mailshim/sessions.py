"""How many SMTP sessions a run keeps open at once: a pool of relay clients, one per session.

A flush, ``mailshim run``, the delivery agent and the daemon deliver through a ``Pool``: up
to ``size`` clients (the largest ``concurrency`` of the configured relays), each holding its
own connection and carrying one entry at a time, so the listener works on one message while
the runner reads and records the next. Each relay's own ``concurrency`` caps the connections
open to it (``relay.Slots``), and no more sessions work at once than the relay in play can
take (``width``: a primary that is down and a backup with ``concurrency = 1`` means one).
Back-pressure is met by opening fewer sessions, not by pausing the run: a rate-limit reply
that a fresh connection did not clear, a ``421`` (the listener closing), or a refused extra
connection lowers ``limit`` by one for the rest of the run, never below one. A per-session
message limit (Stalwart's ``452 4.4.5`` after 10 messages in one session) is not
back-pressure: the client opens a new session and the entry goes on it. A session with
nothing left to carry gives its slot back (QUIT) whenever another may want it (runner.py),
and waiting for a slot is bounded by the relay's ``timeout`` (``relay.Slots``).

Trust: runs as the runner or the submitting user, like relay.py; it holds connections and
counts, never message data or secrets.

Raises: nothing of its own; ``relay.RelayClient`` raises ``ConfigError`` (exit 78) for an
invalid HELO name when a client is made.
"""

from __future__ import annotations

from mailshim.relay import RelayClient, Slots

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from mailshim.smtpconnect import RelaySettings
    from mailshim.tlsctx import ContextCache

DEFAULT_CONCURRENCY = 4


class Pool:
    """Up to ``size`` relay clients for one run; ``limit`` of them may be busy at once."""

    def __init__(
        self,
        relays: Sequence[RelaySettings],
        *,
        helo: str,
        transcript: Callable[[str], None] | None = None,
        size: int | None = None,
    ) -> None:
        self._relays = tuple(relays)
        self._helo = helo
        self._transcript = transcript
        wanted = max((getattr(r, "concurrency", 1) for r in self._relays), default=1)
        self.size = max(1, wanted if size is None else size)
        self.limit = self.size
        self.lowered: list[str] = []  # why the limit came down, for the log and the tests
        self._slots = Slots()
        self._contexts: ContextCache | None = None
        self._clients: list[RelayClient] = []
        # Made now, so that an invalid HELO name fails before any entry is touched.
        self.client(0)

    def client(self, index: int) -> RelayClient:
        """The client of session ``index`` (made on first use; it connects when it sends)."""
        while len(self._clients) <= index:
            made = RelayClient(
                self._relays,
                helo=self._helo,
                transcript=self._labelled(len(self._clients)),
                slots=self._slots,
                contexts=self._contexts,
            )
            self._contexts = made.contexts
            self._clients.append(made)
        return self._clients[index]

    def _labelled(self, index: int) -> Callable[[str], None] | None:
        """The transcript (``-v``) with each line naming its session when there are several."""
        say = self._transcript
        if say is None or self.size == 1:
            return say
        return lambda line: say(f"[{index + 1}] {line}")

    def lower(self, why: str) -> bool:
        """One session fewer for the rest of the run; False when only one was left."""
        if self.limit <= 1:
            return False
        self.limit -= 1
        self.lowered.append(why)
        return True

    def width(self) -> int:
        """How many sessions may work at once now: ``limit``, and no more than the relay in
        play can take (the first relay not marked down; a backup with ``concurrency = 1``
        behind a primary that is down takes one, also when the primary was marked down in
        the middle of the pass): a session that could only wait for a slot is not opened,
        and one already at work ends after its entry."""
        return min(self.limit, self._slots.room(self.client(0).in_play()))

    def connected(self) -> int:
        return sum(1 for made in self._clients if made.connected)

    async def close(self) -> None:
        """QUIT every open session."""
        for made in self._clients:
            await made.close()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
