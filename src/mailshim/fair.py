"""The order in which a pass delivers due entries: round-robin by submitting uid, by work.

Each uid gets ``quantum`` bytes of credit per round (deficit round-robin): an entry goes when
its owner's credit covers its size, which counts the envelope (every recipient is a record
in it) and the message. So a user with 256 entries of 10,000 recipients each gets about one
entry per round while another user's small message goes in the first round, and a user
with thousands of small entries gets many per round but never more bytes than anyone
else. Queue ids are chosen by the runner (pickup gives every drop-folder entry a fresh one),
and order only entries of one uid among themselves, by arrival.

Trust: runs as the runner. The uid comes from the entry's ``uid`` record, which in ``queue/``
only root and the runner write (pickup sets it to the drop-folder file's owner).

Raises: nothing; an entry that cannot be read is put first, so the pass quarantines it.
"""

from __future__ import annotations

import io
import os

from mailshim import spoolfmt
from mailshim.errors import DataError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.spool import Spool

QUANTUM = 256 * 1024  # bytes of credit per uid per round
PEEK_BYTES = 4096  # magic, id, arrival and uid records: at most ~100 bytes when well formed
# Entries in queue/ never change, so what was read of one stays true: a daemon's passes read
# each entry's uid once (20,000 entries: 450 ms the first time on this machine).
_known: dict[tuple[str, str], tuple[int, int]] = {}


def order(target: Spool, ids: list[str], quantum: int = QUANTUM) -> list[str]:
    """``ids`` (queue ids in arrival order) in the order a pass should try them."""
    items: list[tuple[str, int, int]] = []
    unreadable: list[str] = []
    live = set()
    for qid in ids:
        key = (target.queue, qid)
        live.add(key)
        got = _known.get(key) or _uid_and_size(os.path.join(target.queue, qid))
        if got is None:
            unreadable.append(qid)
        else:
            _known[key] = got
            items.append((qid, got[0], got[1]))
    for key in [k for k in _known if k[0] == target.queue and k not in live]:
        del _known[key]
    return unreadable + round_robin(items, quantum)


def known_size(target: Spool, qid: str) -> int | None:
    """The size of entry ``qid`` as a pass in this process read it (None: not read here)."""
    got = _known.get((target.queue, qid))
    return got[1] if got is not None else None


def round_robin(items: list[tuple[str, int, int]], quantum: int) -> list[str]:
    """Deficit round-robin over (id, uid, cost) in arrival order; uids take turns in the
    order of their oldest entry.

    >>> round_robin([("a1", 1, 900), ("a2", 1, 900), ("b1", 2, 10)], 1000)
    ['a1', 'b1', 'a2']
    """
    queues: dict[int, list[tuple[str, int]]] = {}
    for qid, uid, cost in items:
        queues.setdefault(uid, []).append((qid, cost))
    credit = dict.fromkeys(queues, 0)
    heads = dict.fromkeys(queues, 0)
    out: list[str] = []
    active = list(queues)
    while active:
        still = []
        for uid in active:
            entries = queues[uid]
            credit[uid] += quantum
            i = heads[uid]
            while i < len(entries) and entries[i][1] <= credit[uid]:
                credit[uid] -= entries[i][1]
                out.append(entries[i][0])
                i += 1
            heads[uid] = i
            if i < len(entries):
                still.append(uid)
        active = still
    return out


def _uid_and_size(path: str) -> tuple[int, int] | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        # The magic line and the id, arrival and uid records of any readable entry fit in
        # far fewer bytes (each is bounded); one read, no file object: this runs once per
        # entry in every pass.
        head = os.read(fd, PEEK_BYTES)
        uid = spoolfmt.peek_uid(io.BytesIO(head))
        # A short read of a regular file is all of it: its size, without an fstat.
        size = len(head) if len(head) < PEEK_BYTES else os.fstat(fd).st_size
        return uid, max(size, 1)
    except (OSError, DataError):
        return None
    finally:
        os.close(fd)
