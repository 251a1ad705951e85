"""fair: the order of a delivery pass, round-robin by uid and by bytes of work."""

from __future__ import annotations

import os

import pytest

from mailshim import fair, spool, spoolentry


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
    order = fair.order(sp, sorted([*ids, broken]), quantum=1024)
    assert order == [broken, ids[2], ids[0], ids[1]]


@pytest.mark.parametrize("body_size", [0, 1000, fair.PEEK_BYTES, 20_000])
def test_an_entry_costs_its_whole_size_read_or_not(tmp_path, body_size):
    """The cost counts every byte of the file, whether one read held it all or not."""
    sp = spool.Spool(str(tmp_path / "spool"))
    sp.ensure()
    w = sp.new_entry("a@example.org", ["b@example.org"], 7)
    w.write(b"x" * body_size)
    w.commit(False)
    path = sp.path(w.queue_id)
    assert fair._uid_and_size(path) == (7, os.path.getsize(path))


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
    assert fair.order(sp, [a_small, a_big, b_small], quantum=10**6) == [a_small, a_big, b_small]
    # and with a quantum smaller than one entry, the uids alternate
    assert fair.order(sp, [a_small, a_big, b_small], quantum=1) == [a_small, b_small, a_big]


def test_what_was_read_is_kept_for_live_entries_and_forgotten_when_they_leave(tmp_path):
    one, two = spool.Spool(str(tmp_path / "one")), spool.Spool(str(tmp_path / "two"))
    for sp in (one, two):
        sp.ensure()
    ids_one = [queue(one, 1, 10), queue(one, 2, 10)]
    ids_two = [queue(two, 3, 10)]
    fair.order(one, ids_one)
    fair.order(two, ids_two)
    assert {(one.queue, q) for q in ids_one} | {(two.queue, ids_two[0])} <= set(fair._known)
    # entries in queue/ never change: a second pass trusts what the first one read
    size = os.path.getsize(one.path(ids_one[0]))
    assert fair._known[(one.queue, ids_one[0])] == (1, size)
    # what queue statistics ask for: the size this process read, not the uid; by spool
    assert fair.known_size(one, ids_one[0]) == size and size > 10
    assert fair.known_size(two, ids_two[0]) == os.path.getsize(two.path(ids_two[0]))
    assert fair.known_size(two, ids_one[0]) is None  # read in the other spool only
    assert fair.known_size(one, spool.new_queue_id()) is None  # never read here
    # the first entry left the queue: it is forgotten, the other spool's are kept
    fair.order(one, ids_one[1:])
    assert (one.queue, ids_one[0]) not in fair._known
    assert fair.known_size(one, ids_one[0]) is None
    assert (one.queue, ids_one[1]) in fair._known and (two.queue, ids_two[0]) in fair._known


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
        got = fair.order(sp, [good, link, fifo])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert got == [link, fifo, good]
