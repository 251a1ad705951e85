"""The order in which a pass delivers due entries: round-robin by submitting uid, by work.

Each uid gets ``quantum`` bytes of credit per round (deficit round-robin): an entry goes when
its owner's credit covers its size, which counts the envelope (every recipient is a record
in it) and the message. So a user with 256 entries of 10,000 recipients each gets about one
entry per round while another user's small message goes in the first round, and a user
with thousands of small entries gets many per round but never more bytes than anyone
else. Queue ids are chosen by the runner (pickup gives every drop-folder entry a fresh one),
and order only entries of one uid among themselves, by arrival.

Trust: runs as the runner. The uid and size come from the schedule index (spoolindex), made
from the entry's ``uid`` record, which in ``queue/`` only root and the runner write (pickup
sets it to the drop-folder file's owner), and from the file's size.

Raises: nothing; an entry that cannot be read is put first, so the pass quarantines it.
"""

from __future__ import annotations

from array import array

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from mailshim.spoolindex import Row

QUANTUM = 256 * 1024  # bytes of credit per uid per round
ID_BYTES = 20  # a queue id's length (spoolfmt): ids are kept packed, 20 bytes each
COST_MAX = 2**32 - 1  # bytes: a bigger entry costs this much (it still goes alone a round)


class _Lane:
    """One uid's entries in arrival order, packed: 24 bytes an entry (the id, its cost in
    4 bytes), not a tuple each (a flush of 100,000 entries holds ~2.4 MB here)."""

    __slots__ = ("costs", "credit", "head", "ids")

    def __init__(self) -> None:
        self.ids = bytearray()
        self.costs = array("I")  # 4 bytes: a cost is capped at COST_MAX
        self.credit = 0
        self.head = 0


def order(rows: Iterable[Row], quantum: int = QUANTUM) -> Iterator[str]:
    """The ids of ``rows`` (schedule rows in arrival order: spoolindex) in the order a pass
    should try them; an entry that cannot be read comes first (the pass quarantines it)."""
    unreadable: list[str] = []
    lanes: dict[int, _Lane] = {}
    for qid, _due, uid, size, flags in rows:
        if uid < 0 or "x" in flags or len(qid) != ID_BYTES:
            unreadable.append(qid)
            continue
        lane = lanes.get(uid)
        if lane is None:
            lane = lanes[uid] = _Lane()
        lane.ids += qid.encode("ascii")
        lane.costs.append(min(max(size, 1), COST_MAX))
    yield from unreadable
    yield from _drr(list(lanes.values()), quantum)


def _drr(active: list[_Lane], quantum: int, width: int = ID_BYTES) -> Iterator[str]:
    """Deficit round-robin: each lane gets ``quantum`` bytes of credit a round and gives up
    entries while its credit covers them; lanes take turns in the order given."""
    while active:
        still = []
        for lane in active:
            lane.credit += quantum
            i, costs, n = lane.head, lane.costs, len(lane.costs)
            while i < n and costs[i] <= lane.credit:
                lane.credit -= costs[i]
                yield lane.ids[i * width : (i + 1) * width].decode("ascii")
                i += 1
            lane.head = i
            if i < n:
                still.append(lane)
        active = still


def round_robin(items: list[tuple[str, int, int]], quantum: int) -> list[str]:
    """Deficit round-robin over (id, uid, cost) in arrival order; uids take turns in the
    order of their oldest entry (ids of any length: for the table of tests).

    >>> round_robin([("a1", 1, 900), ("a2", 1, 900), ("b1", 2, 10)], 1000)
    ['a1', 'b1', 'a2']
    """
    width = max((len(qid) for qid, _, _ in items), default=1)
    lanes: dict[int, _Lane] = {}
    for qid, uid, cost in items:
        lane = lanes.setdefault(uid, _Lane())
        lane.ids += qid.ljust(width).encode("ascii")
        lane.costs.append(min(max(cost, 0), COST_MAX))
    return [packed.rstrip() for packed in _drr(list(lanes.values()), quantum, width)]
