"""One delivery pass over many entries: the fair order, the parallel sessions, back-pressure
and the pass's summary (``Counts``).

``run_pass`` takes the entries of one spool in fair order (fair.py; held back by their
submitter's sending limit: sendlimits.py) and hands each to whichever session is free
(sessions.py); delivery.py carries out one entry's attempt and policy.py's action. Who runs a
pass, and when, is runner.py's (flush, ``mailshim run``, the agent) and daemon.py's.

Back-pressure is not failure: Stalwart's ``452 4.4.5`` (more than 10 messages in a session,
or 5 a second) makes the pass reconnect, pause and go on with one session fewer; a pass that
keeps meeting it, or finds the listener unreachable, ends early and leaves the rest for later
rather than failing every entry the same way. A pass always ends: every wait in it is bounded
(docs/spool.md, section 4).

Trust: runs as the submitting user on their own spool (the agent), or as root or the
``mailshim`` user (the runners). Entry names and states are parsed strictly (spoolfmt);
unreadable entries are quarantined by delivery.py.

Raises ``TempFailError`` (exit 75) when the spool is too full to record an outcome, and
``MailshimError`` when a spool cannot be written; problems with one entry or with the listener
never escape (they are logged, retried, bounced or quarantined).
"""

from __future__ import annotations

import os
import time

from mailshim import (
    delivery,
    fair,
    maillog,
    mailstats,
    policy,
    sendlimits,
    spool,
    spoolindex,
)
from mailshim.constants import (
    DEFERRED,
    LIMITED,
    QUARANTINED,
    SENT,
    THROTTLED,
)
from mailshim.errors import DataError, MailshimError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterator

    from mailshim.config import Config
    from mailshim.relay import RelayClient
    from mailshim.reply import Reply
    from mailshim.sessions import Pool
    from mailshim.spoolentry import LockedEntry

RATE_PAUSE = 1.0  # seconds to wait after a rate-limit reply before trying the entry again
RATE_RETRIES = 2  # in-pass retries of one entry after rate limiting
PRESSURE_STREAK = 5  # consecutive throttled entries that end a pass ("the listener is busy")
SPOOL_RESERVE = 1024 * 1024  # bytes: less free space than this is a full spool for a pass


class Counts:
    __slots__ = (
        "bounced",
        "deferred",
        "errors",
        "limited",
        "quarantined",
        "sent",
        "skipped",
        "throttled",
    )

    def __init__(self) -> None:
        self.sent = 0
        self.deferred = 0
        self.bounced = 0
        self.skipped = 0
        self.quarantined = 0
        self.throttled = 0
        self.errors = 0  # entries left for their next attempt after a local error
        self.limited = 0  # held for their submitter's next window (sendlimits)

    def total(self) -> int:
        return self.sent + self.deferred + self.bounced + self.quarantined + self.throttled

    def add(self, status: str) -> None:
        if status == SENT:
            self.sent += 1
        elif status == DEFERRED:
            self.deferred += 1
        elif status == THROTTLED:
            self.throttled += 1
        elif status == QUARANTINED:
            self.quarantined += 1
        elif status == LIMITED:
            self.limited += 1
        else:
            self.bounced += 1

    def summary(self, untried: int = 0) -> str:
        """One short sentence naming only what happened: "2 delivered, 1 deferred."

        ``untried``: entries left alone because the listener could not be reached.
        """
        parts = [
            (self.sent, "delivered"),
            (self.deferred, "deferred"),
            (self.bounced, "bounced"),
            (self.throttled, "slowed down by the listener"),
            (self.quarantined, "unreadable (moved to corrupt/)"),
            (self.limited, "held by the sending limits"),
            (untried, "not tried (the listener is unreachable)"),
            (self.skipped, "not due yet, held or busy"),
            (self.errors, "left after a local error (mailshim log ID says why)"),
        ]
        said = [f"{n} {what}" for n, what in parts if n > 0]
        return (", ".join(said) if said else "Nothing to deliver") + "."


def pool_for(config: Config, transcript: Callable[[str], None] | None = None) -> Pool:
    from mailshim.sessions import Pool

    return Pool(config.relays, helo=config.helo_name, transcript=transcript)


async def sleep(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set."""
    import asyncio

    if seconds <= 0:
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class Taken:
    """The entries a run has looked at, so that a later sweep of the same run passes them
    over: a table of packed keys (open addressing), ~19 bytes an entry where a set of ints
    costs ~60 (a flush of 100,000 holds ~2 MB here, not 6). A key is the queue id read as a
    base-36 number (20 characters: 13 bytes), plus one so that zeros mark a free slot."""

    WIDTH = 13
    __slots__ = ("count", "mask", "table")

    def __init__(self) -> None:
        self.count = 0
        self.mask = 1023
        self.table = bytearray(self.WIDTH * (self.mask + 1))

    def __len__(self) -> int:
        return self.count

    def __contains__(self, qid: str) -> bool:
        key = self._key(qid)
        at = self._slot(key)
        return self.table[at : at + self.WIDTH] == key

    def add(self, qid: str) -> None:
        key = self._key(qid)
        at = self._slot(key)
        if self.table[at : at + self.WIDTH] == key:
            return
        self.table[at : at + self.WIDTH] = key
        self.count += 1
        if self.count * 10 > (self.mask + 1) * 7:
            self._grow()

    @classmethod
    def _key(cls, qid: str) -> bytes:
        # Queue ids are 20 base-36 digits (spoolfmt.valid_id): 36**20 < 2**104.
        return (int(qid[:20], 36) + 1).to_bytes(cls.WIDTH, "big")

    def _slot(self, key: bytes) -> int:
        """The offset of ``key``'s slot, or of the free slot where it would go."""
        width, table, mask = self.WIDTH, self.table, self.mask
        free = bytes(width)
        i = hash(key) & mask
        while True:
            at = i * width
            got = table[at : at + width]
            if got in (key, free):
                return at
            i = (i + 1) & mask

    def _grow(self) -> None:
        width, old = self.WIDTH, self.table
        free = bytes(width)
        self.mask = self.mask * 2 + 1
        self.table = bytearray(width * (self.mask + 1))
        for at in range(0, len(old), width):
            key = bytes(old[at : at + width])
            if key != free:
                slot = self._slot(key)
                self.table[slot : slot + width] = key


class _Pass:
    """One sweep: the fair order, which entries are taken, and how the sweep ends. Its
    sessions share it (one event loop: no locks are needed)."""

    def __init__(
        self,
        config: Config,
        target: spool.Spool,
        counts: Counts,
        *,
        force: bool,
        only: set[str] | None,
        seen: Taken | None,
        stop: asyncio.Event | None,
    ) -> None:
        self.target = target
        self.counts = counts
        self.force = force
        self.only = only
        self.seen = seen
        self.first = not seen  # the first sweep of a run (``seen`` still empty)
        self.stop = stop
        self.now = time.time()
        self.limiter = sendlimits.limiter_for(config, target) if target.has_incoming() else None
        # From the schedule index: the entries due (every one, forced), with their uid and
        # size; nothing else is opened, so a pass with nothing due costs nothing per entry.
        self.order = fair.order(self._due_rows(), config.user_round_bytes)
        self.ended = ""  # "down", "busy" or "stopped" once the pass must end early
        self.streak = 0  # consecutive throttled entries, whichever session met them
        self.answered = False  # the listener greeted a session: the others may open
        self.returned: list[str] = []  # taken by a session that could not connect
        self.hold_until = 0.0  # monotonic: no message starts before (a rate limit's pause)
        self.working = 0  # sessions past their start, not yet ended
        self.recovered = False  # a relay took mail in this pass (see relay_recovered)
        self.relay_waiting: list[str] = []  # not due, but waiting only for the relay
        self.recovering: list[str] = []  # such entries, due since a relay took mail
        # Rows the index flags as waiting only for their relay (not due, not held): packed
        # ids, not opened unless a relay takes mail in this pass (then each is vetted by
        # _wanted, which reads its state). A listener outage flags every deferred entry so.
        self.relay_index = bytearray()
        self.relay_at = 0
        self.gated: set[str] = set()  # counted by the sending limits, then given back

    def _due_rows(self) -> Iterator[spoolindex.Row]:
        if not self.force and self.only is None:
            count, _live, soonest = spoolindex.totals(self.target, self.now)
            if soonest > self.now:  # nothing due: the index's header said so
                self.counts.skipped += count if self.first else 0
                return
        for row in spoolindex.rows(self.target, self.now):
            if spoolindex.is_due(row, self.now, self.force):
                yield row
            elif "w" in row[4] and "h" not in row[4] and len(row[0]) == fair.ID_BYTES:
                if self.only is None or row[0] in self.only:
                    self.relay_index += row[0].encode("ascii")
            elif self.first and (self.only is None or row[0] in self.only):
                # Held or not due: known without opening it, and not remembered in ``seen``
                # (at 100,000 deferred that set would be most of the memory); counted by the
                # first sweep of a run only.
                self.counts.skipped += 1

    async def hold(self) -> None:
        """Wait out a rate limit's pause (or until ``stop``)."""
        await sleep(self.hold_until - time.monotonic(), self.stop)

    def relay_recovered(self) -> None:
        """A relay took mail: entries deferred only for the relay's sake are due at once (those
        this pass passed over join it now, the rest are taken as the pass reaches them), while
        a recipient's own 4xx keeps its schedule (policy.due_after_recovery). The one place
        that acts on a recovery: the entries the index flags as waiting for their relay are
        read only now (``relay_index``)."""
        if self.recovered:
            return
        self.recovered = True
        waiting, self.relay_waiting = self.relay_waiting, []
        self.recovering.extend(waiting)

    def relay_left(self) -> int:
        """Entries flagged as waiting for their relay and not looked at (once a relay took
        mail in this pass, each is vetted as it is taken)."""
        return (len(self.relay_index) - self.relay_at) // fair.ID_BYTES

    def next_entry(self) -> str | None:
        """The next entry to try, taken for good (no other session gets it); None at the end.
        A stop is looked at first: what was given back or recovered waits like the rest."""
        if self.stop is not None and self.stop.is_set():
            self.ended = self.ended or "stopped"
            return None
        if self.returned:
            return self.returned.pop(0)  # already vetted: an extra session gave it back
        if self.recovering:
            return self.recovering.pop(0)
        if self.recovered:
            while self.relay_at < len(self.relay_index):
                at, self.relay_at = self.relay_at, self.relay_at + fair.ID_BYTES
                qid = self.relay_index[at : self.relay_at].decode("ascii")
                if self._wanted(qid):
                    return qid
        for qid in self.order:
            if self.stop is not None and self.stop.is_set():
                self.ended = self.ended or "stopped"
                return None
            if self._wanted(qid):
                return qid
        return None

    def _wanted(self, qid: str) -> bool:
        if self.only is not None and qid not in self.only:
            return False
        if self.seen is not None:
            if qid in self.seen:
                return False
            self.seen.add(qid)
        try:
            state = self.target.load_state(qid)
        except DataError:
            state = None  # deliver_entry quarantines the entry
        if state is not None and (state.held or (not self.force and state.next_attempt > self.now)):
            if policy.due_after_recovery(state):
                if self.recovered:
                    return True
                self.relay_waiting.append(qid)
                return False
            self.counts.skipped += 1
            return False
        return True


async def run_pass(
    config: Config,
    pool: Pool,
    target: spool.Spool,
    counts: Counts,
    *,
    force: bool,
    only: set[str] | None = None,
    seen: Taken | None = None,
    progress: Callable[[str, str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> str:
    """One sweep over the queue, over up to ``pool.limit`` sessions at once: "done", or why it
    ended early: "down" (the listener is unreachable: the rest is left for later rather than
    failing every entry the same way), "busy" (the listener keeps asking us to slow down),
    "stopped" (``stop`` was set).

    The entries go out in fair order, each to whichever session is free; an entry is taken
    by one session only. The first session goes alone until the listener has greeted it, so
    a listener that is down costs one entry an attempt, not one per session.
    """
    import asyncio

    run = _Pass(config, target, counts, force=force, only=only, seen=seen, stop=stop)
    opened = asyncio.Event()

    def listener_up() -> None:
        # The first session is through EHLO (and TLS, AUTH): the others may open now, while
        # its first message is still on the way (a big one takes a while).
        run.answered = True
        opened.set()

    first = pool.client(0)
    if first.connected:
        listener_up()
    first.on_connect = listener_up

    async def session(index: int) -> None:
        client = pool.client(index)
        if index > 0:
            await opened.wait()
        run.working += 1
        try:
            while not run.ended and index < pool.width() and (index == 0 or run.answered):
                await run.hold()
                qid = run.next_entry()
                if qid is None:
                    return
                if index > 0 and not await _open_extra(pool, client, run, qid, index):
                    return
                if not await _deliver_one(config, pool, client, run, qid, progress, index):
                    return  # other sessions hold the relay's slots: it makes way for them
                if run.answered:
                    opened.set()
        except BaseException:
            run.ended = run.ended or "error"  # the other sessions finish what they carry
            raise
        finally:
            opened.set()  # the first session is done: the others find out why, or nothing left
            run.working -= 1
            # Nothing left to carry: the slot goes back (QUIT) whenever another session may
            # want it. An extra session always gives it back (the next pass starts with the
            # first session alone); the first keeps its connection for the next pass (the
            # agent, the daemon) only when it is the last one at work.
            if index > 0 or run.working > 0 or run.ended:
                await client.close()

    try:
        done = await asyncio.gather(
            *(session(i) for i in range(pool.limit)), return_exceptions=True
        )
    finally:
        first.on_connect = None
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    while (
        run.returned or run.recovering or (run.recovered and run.relay_left())
    ) and not run.ended:
        await session(0)  # what refused extra sessions gave back, or a late recovery made due
    counts.skipped += len(run.relay_waiting) + len(run.recovering) + run.relay_left()
    return run.ended or "done"


async def _open_extra(pool: Pool, client: RelayClient, run: _Pass, qid: str, index: int) -> bool:
    """Connect extra session ``index`` before it carries ``qid``; False when the listener
    will not take it (421, too many connections): one session fewer, and the entry waits
    for another."""
    if client.connected:
        return True
    failed = await client.connect()
    if failed is None:
        return True
    run.returned.append(qid)
    _lower(pool, f"session {index + 1} refused: {failed}")
    return False


def _lower(pool: Pool, why: str) -> None:
    if pool.lower(why):
        maillog.log(f"the listener is pushing back ({why}): {pool.limit} session(s) from now on")


async def _deliver_one(
    config: Config,
    pool: Pool,
    client: RelayClient,
    run: _Pass,
    qid: str,
    progress: Callable[[str, str], None] | None,
    index: int,
) -> bool:
    """One entry on session ``index``, and what its outcome means for the whole pass;
    False when the session should end (the entry went back to the pass)."""
    target, counts = run.target, run.counts
    try:
        status, replies = await _attempt_with_pauses(config, pool, client, run, qid, index)
    except MailshimError as exc:
        # One entry's trouble (a stale temp file in the way of its bounce, a file it may
        # not write) is that entry's: it waits for its next attempt and the pass goes on.
        # Only a spool that cannot record anything (read-only, full) ends the pass.
        _spool_wide(target)
        counts.errors += 1
        maillog.log(f"{qid}: {exc.message}; left in the queue for its next attempt", error=True)
        return True
    if status == _MADE_WAY:
        return False
    if status == "":
        return True
    counts.add(status)
    if progress is not None:
        progress(qid, status)
    if status == QUARANTINED:
        run.streak = 0
        return True
    if status == DEFERRED and delivery.is_connection_failure(replies):
        if not run.ended:
            # What waits untried is listed as waiting for the listener, not as new
            # (queueview.py), whoever runs the pass: the agent, a run, a flush, the daemon.
            target.mark_relay_down()
        run.ended = run.ended or "down"
        return True
    run.answered = True
    if status == SENT:
        target.clear_relay_down()  # new submissions may start agents again
        run.relay_recovered()
    if any(r.code == 421 for r in replies.values()):
        _lower(pool, f"421 from the listener: {next(iter(replies.values()))}")
    run.streak = run.streak + 1 if status == THROTTLED else 0
    if run.streak >= PRESSURE_STREAK:
        run.ended = run.ended or "busy"
    return True


def _spool_wide(target: spool.Spool) -> None:
    """Raise when nothing can be recorded in ``target`` any more: a read-only or missing
    folder, or a full file system (the next entry would be sent and not recorded)."""
    from mailshim.errors import TempFailError

    target.check_usable()
    try:
        st = os.statvfs(target.queue)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < SPOOL_RESERVE or (st.f_files and st.f_favail == 0):
        raise TempFailError(f"the spool {target.root} is full (nothing more can be recorded)")


_MADE_WAY = "made-way"  # _attempt_with_pauses: the entry went back to the pass (SlotBusy)


def _held_meanwhile(locked: LockedEntry) -> bool:
    """Whether the locked entry is held now (its state read again under the lock)."""
    try:
        return locked.state().held
    except DataError:
        return False  # deliver_entry quarantines it


async def _attempt_with_pauses(
    config: Config, pool: Pool, client: RelayClient, run: _Pass, qid: str, index: int = 0
) -> tuple[str, dict[str, Reply]]:
    """Deliver one entry; on a rate limit, one session fewer for the run, then reconnect,
    pause (no session starts a message meanwhile) and try it again a few times. A session
    the lowering leaves out gives the entry back to the ones left, first in line."""
    from mailshim.relay import SlotBusy

    target, counts, stop = run.target, run.counts, run.stop
    tries = 0
    while True:
        try:
            locked = target.lock(qid)
        except DataError as exc:
            target.quarantine(qid, exc.message)
            maillog.log(f"{qid}: moved to corrupt/: {exc.message}", error=True)
            return QUARANTINED, {}
        if locked is None:
            counts.skipped += 1
            return "", {}
        if _held_meanwhile(locked):
            # The pass vetted it without the lock; a `mailshim queue hold` that took the lock
            # since then must hold: nothing held goes out (the model test's seed 2).
            locked.release()
            counts.skipped += 1
            return "", {}
        # Counted against its owner's sending limit under the lock this attempt keeps.
        limiter = run.limiter if tries == 0 and qid not in run.gated else None
        if limiter is not None and not sendlimits.gate(limiter, locked, run.now):
            locked.release()
            counts.add(LIMITED)
            mailstats.limited()
            return "", {}
        try:
            status, replies = await delivery.deliver_entry(config, client, locked)
        except SlotBusy:
            # Other sessions of this pass hold every slot of the relay in play (a failover
            # in the middle of the pass onto a backup with fewer): nothing was sent or
            # recorded; the entry goes back to the pass, first in line, and this session
            # ends (the pass's last session takes what is left). Deferring it "all busy"
            # would cost it a whole retry step with both relays healthy.
            if limiter is not None:
                run.gated.add(qid)  # counted once: the next try of it in this pass is not
            if run.working <= 1:
                run.ended = run.ended or "busy"  # nobody else holds a slot: not waiting on
            run.returned.insert(0, qid)
            return _MADE_WAY, {}
        if status != THROTTLED:
            return status, replies
        kinds = {policy.pressure_kind(r) for r in replies.values()}
        if policy.RATE in kinds:
            _lower(pool, f"rate limited: {next(iter(replies.values()))}")
            if index >= pool.limit and not (stop is not None and stop.is_set()):
                run.returned.insert(0, qid)
                run.hold_until = max(run.hold_until, time.monotonic() + RATE_PAUSE)
                return "", {}
        if (
            policy.RATE not in kinds
            or tries >= RATE_RETRIES
            or (stop is not None and stop.is_set())
        ):
            return status, replies
        tries += 1
        # A fresh connection clears a per-session limit; the pause, a per-second one, which
        # the other sessions would only run into again: they wait it out too.
        await client.close()
        run.hold_until = max(run.hold_until, time.monotonic() + RATE_PAUSE * tries)
        await run.hold()
