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
