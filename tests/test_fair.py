"""fair: the order of a delivery pass, round-robin by uid and by bytes of work."""

from __future__ import annotations

import os

import pytest

from mailshim import fair, spool, spoolentry, spoolindex


@pytest.mark.parametrize(
    "items, quantum, expected",
    [
        # one user's heavy entries cannot hold another's light one behind them
        ([("a1", 1, 900), ("a2", 1, 900), ("b1", 2, 10)], 1000, ["a1", "b1", "a2"]),
        ([("a1", 1, 5000), ("a2", 1, 5000), ("b1", 2, 10)], 1000, ["b1", "a1", "a2"]),
        # many light entries go together, up to the round's bytes
        (
            [("a1", 1, 10), ("a2", 1, 10), ("a3", 1, 10), ("b1", 2, 10)],
            20,
            ["a1", "a2", "b1", "a3"],
        ),
        # within one uid, arrival order is kept; uids take turns by their oldest entry
        ([("b1", 2, 1), ("a1", 1, 1), ("b2", 2, 1), ("a2", 1, 1)], 1, ["b1", "a1", "b2", "a2"]),
        ([], 1000, []),
    ],
)
def test_round_robin_table(items, quantum, expected):
    assert fair.round_robin(items, quantum) == expected


def test_order_reads_the_uid_record_and_puts_unreadable_entries_first(tmp_path):
    sp = spool.Spool(str(tmp_path / "spool"))
    sp.ensure()
    ids = []
    for uid, body in ((1, b"x" * 5000), (1, b"x" * 5000), (2, b"small")):
        w = sp.new_entry("a@example.org", ["b@example.org"], uid)
        w.write(body)
        w.commit(False)
        ids.append(w.queue_id)
    broken = spoolentry.new_queue_id()
    (tmp_path / "spool" / "queue" / broken).write_bytes(b"not an entry")
    order = list(fair.order(spoolindex.rows(sp), quantum=1024))
    assert order == [broken, ids[2], ids[0], ids[1]]


@pytest.mark.parametrize("body_size", [0, 1000, spoolindex.PEEK_BYTES, 20_000])
def test_an_entry_costs_its_whole_size_read_or_not(tmp_path, body_size):
    """The cost counts every byte of the file, whether one read held it all or not."""
    sp = spool.Spool(str(tmp_path / "spool"))
    sp.ensure()
    w = sp.new_entry("a@example.org", ["b@example.org"], 7)
    w.write(b"x" * body_size)
    w.commit(False)
    path = sp.path(w.queue_id)
    assert spoolindex._peek(path) == (7, os.path.getsize(path))
    (row,) = spoolindex.rows(sp)
    assert row[2:4] == (7, os.path.getsize(path))


def queue(sp: spool.Spool, uid: int, size: int) -> str:
    w = sp.new_entry("a@example.org", ["b@example.org"], uid)
    w.write(b"x" * size)
    w.commit(False)
    return w.queue_id


def test_turns_go_by_uid_not_by_entry_size(tmp_path):
    """Two users whose entries have the same size are still two users; one user's entries
    of different sizes are still one user's (a quantum that covers them all: one round)."""
    sp = spool.Spool(str(tmp_path / "spool"))
    sp.ensure()
    a_small, a_big, b_small = queue(sp, 1, 10), queue(sp, 1, 3000), queue(sp, 2, 10)
    rows = list(spoolindex.rows(sp))
    assert list(fair.order(rows, quantum=10**6)) == [a_small, a_big, b_small]
    # and with a quantum smaller than one entry, the uids alternate
    assert list(fair.order(rows, quantum=1)) == [a_small, b_small, a_big]


def test_each_entrys_uid_and_size_come_from_the_index_and_leave_with_it(tmp_path):
    """What fair.py once cached per process is the schedule index's: read once per entry
    (when it is committed, or at a rebuild), dropped when the entry leaves."""
    one, two = spool.Spool(str(tmp_path / "one")), spool.Spool(str(tmp_path / "two"))
    for sp in (one, two):
        sp.ensure()
    ids_one = [queue(one, 1, 10), queue(one, 2, 10)]
    ids_two = [queue(two, 3, 10)]
    size = os.path.getsize(one.path(ids_one[0]))
    assert [r[:1] + r[2:4] for r in spoolindex.rows(one)] == [
        (ids_one[0], 1, size), (ids_one[1], 2, size),
    ]  # fmt: skip
    one.lock(ids_one[0]).remove()
    assert [r[0] for r in spoolindex.rows(one)] == ids_one[1:]
    assert [r[0] for r in spoolindex.rows(two)] == ids_two


def test_a_symlink_or_a_fifo_in_the_queue_is_unreadable_and_never_blocks(tmp_path):
    import signal

    sp = spool.Spool(str(tmp_path / "spool"))
    sp.ensure()
    good = queue(sp, 1, 10)
    link, fifo = spool.new_queue_id(), spool.new_queue_id()
    os.symlink(sp.path(good), sp.path(link))
    os.mkfifo(sp.path(fifo))

    def hung(*_args):
        raise TimeoutError("opening a FIFO in queue/ blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        got = list(fair.order(spoolindex.rows(sp)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert got == [link, fifo, good]


def _row(qid: str, uid: int, size: int, flags: str = "") -> tuple[str, int, int, int, str]:
    return (qid, 0, uid, size, flags)


def test_rows_that_cannot_be_read_come_first_and_root_takes_its_turn():
    """An index row flagged unreadable ("x"), with no uid (-1) or with an id of the wrong
    length goes first (the pass quarantines it); root's mail (uid 0) is ordinary mail."""
    good = [f"{n:020d}" for n in range(4)]
    rows = [
        _row(good[0], 0, 100),  # root: a lane like any other
        _row(good[1], 1000, 100, "x"),  # flagged unreadable, uid known
        _row(good[2], -1, 100),  # no uid, not flagged
        _row("SHORT", 1000, 100),  # not a queue id
        _row(good[3], 1000, 100),
    ]
    assert list(fair.order(rows)) == [good[1], good[2], "SHORT", good[0], good[3]]


def test_cost_is_the_size_and_a_big_entry_still_goes():
    """Deficit round-robin in bytes: with 1 byte of credit a round, a 1-byte entry goes each
    round and a 2-byte one every other round; an entry over 2 GiB is capped, not refused."""
    a1, a2, b1 = "A" * 20, "B" * 20, "C" * 20
    assert list(fair.order([_row(a1, 1, 1), _row(a2, 1, 1), _row(b1, 2, 2)], quantum=1)) == [
        a1, a2, b1,
    ]  # fmt: skip
    huge = 3 * 2**30  # over 2**31: kept in an unsigned 4-byte cost
    assert list(fair.order([_row(a1, 1, huge), _row(b1, 2, 10)])) == [b1, a1]


def test_round_robin_keeps_ids_of_any_length_and_free_entries_go_at_once():
    """The table's helper pads ids to one width and takes the padding off again; an entry
    that costs nothing goes in the same turn as the one before it."""
    assert fair.round_robin([("a", 1, 1), ("bbb", 2, 1)], 1) == ["a", "bbb"]
    assert fair.round_robin([("a1", 1, 0), ("a2", 1, 0), ("b1", 2, 1)], 1) == ["a1", "a2", "b1"]
