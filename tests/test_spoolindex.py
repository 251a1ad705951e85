"""The schedule index (issue 26, goal 3): a pass reads only what is due, and the index is never
the only copy of anything: deleted, truncated or stale, it is rebuilt from the entries.

The file counts are taken with strace on the real ``mailshim run`` (every ``openat`` of a
name in queue/ or state/, the index's own files aside), so they count what the process does,
not what the code says it does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import queue_entries
from mailshim import spool, spoolindex

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed")


def defer(world, ids, until):
    """Give entries a state (through the spool API) that makes them due at ``until``."""
    target = spool.Spool(str(world.spool))
    for qid in ids:
        locked = target.lock(qid)
        state = locked.state()
        state.attempts = 1
        state.last_error = "421 try later"
        state.next_attempt = int(until)
        locked.save_state(state)
        locked.release()


def opened_entries(
    world, *args: str, prog: str = "mailshim"
) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``mailshim ARGS`` under strace; the names in queue/ and state/ it opened."""
    names, r = opened_list(world, *args, prog=prog)
    return r, set(names)


def opened_list(world, *args: str, prog: str = "mailshim") -> tuple[list[str], object]:
    """Every open of a name in queue/ or state/ by ``PROG ARGS`` (strace), in order."""
    from conftest import tool

    log = world.tmp / "strace.log"
    r = subprocess.run(
        [STRACE, "-f", "-qq", "-e", "trace=openat", "-o", str(log), tool(prog), *args],
        capture_output=True,
        env=world.env,
        timeout=120,
    )
    pattern = re.compile(
        r'openat\([^"]*"' + re.escape(str(world.spool)) + r'/(queue|state)/([0-9A-Z]{20})"'
    )
    return [m.group(1) + "/" + m.group(2) for m in pattern.finditer(log.read_text())], r


def tool_path() -> str:
    from conftest import tool

    return tool("mailshim")


@needs_strace
def test_a_run_with_nothing_due_opens_no_entry_and_no_state(world):
    ids = queue_entries(world, n=60)
    defer(world, ids, time.time() + 3600)
    r, names = opened_entries(world, "run")  # the first run builds the index
    assert r.returncode == 0, r.stderr
    r, names = opened_entries(world, "run")
    assert r.returncode == 0, r.stderr
    assert names == set()
    assert world.listener.messages == []


def spool_bytes_read(world, *args: str) -> tuple[dict[str, int], object]:
    """Bytes ``mailshim ARGS`` read (read, pread64) from each file under the spool, by its
    path relative to the spool (strace -y names the file behind each descriptor)."""
    log = world.tmp / "strace-read.log"
    r = subprocess.run(
        [STRACE, "-f", "-qq", "-y", "-e", "trace=read,pread64", "-o", str(log), tool_path(),
         *args],
        capture_output=True, env=world.env, timeout=120,
    )  # fmt: skip
    pattern = re.compile(
        r"(?:read|pread64)\(\d+<" + re.escape(str(world.spool)) + r"/([^>]*)>.*\) = (\d+)$"
    )
    got: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if m:
            got[m.group(1)] = got.get(m.group(1), 0) + int(m.group(2))
    return got, r


@needs_strace
def test_a_run_with_nothing_due_reads_the_same_bytes_whatever_the_queue(world):
    """Goal 3: nothing due, a run reads the index's header (and trailer), not its rows: the
    same bytes with 10 entries queued as with 1,500 (an index of ~60 KB)."""
    read: list[dict[str, int]] = []
    for n in (10, 1490):
        defer(world, queue_entries(world, n=n), time.time() + 3600)
        r = subprocess.run([tool_path(), "run"], capture_output=True, env=world.env, timeout=120)
        assert r.returncode == 0, r.stderr  # the journal of the new entries folded in
        got, r = spool_bytes_read(world, "run")
        assert r.returncode == 0, r.stderr
        assert not [p for p in got if re.fullmatch(r"(queue|state)/[0-9A-Z]{20}", p)], got
        read.append({p: b for p, b in got.items() if p.startswith("state/schedule/")})
    size = index_file(world).stat().st_size
    assert size > 1500 * 30
    assert read[0] == read[1]
    assert 0 < read[1]["state/schedule/index"] < 4096
    assert world.listener.messages == []


@needs_strace
def test_a_run_opens_only_the_due_entries(world):
    ids = queue_entries(world, n=40)
    defer(world, ids[:37], time.time() + 3600)
    defer(world, ids[37:38], time.time() - 5)  # due: tried before, its time has come
    assert spoolindex.rebuild(spool.Spool(str(world.spool)))  # as the last pass left it
    r, names = opened_entries(world, "run")
    assert r.returncode == 0, r.stderr
    due = set(ids[37:])  # one deferred and due, two new
    assert {n.split("/")[1] for n in names} == due
    assert len(world.listener.wait(3)) == 3
    assert sorted(os.listdir(world.spool / "queue")) == sorted(ids[:37])


def rows_of(world) -> list[tuple[str, int, str]]:
    target = spool.Spool(str(world.spool))
    return sorted((r[0], r[1], r[4]) for r in spoolindex.rows(target))


def index_file(world):
    return world.spool / "state" / "schedule" / "index"


def test_the_index_agrees_with_the_state_files(world):
    ids = queue_entries(world, n=5)
    later = int(time.time()) + 600
    defer(world, ids[:2], later)
    target = spool.Spool(str(world.spool))
    locked = target.lock(ids[2])
    state = locked.state()
    state.held = True
    locked.save_state(state)
    locked.release()
    assert rows_of(world) == sorted(
        [(ids[0], later, "s"), (ids[1], later, "s"), (ids[2], 0, "sh"), (ids[3], 0, "-"),
         (ids[4], 0, "-")]
    )  # fmt: skip
    assert spoolindex.soonest(target) == 0
    assert spoolindex.totals(target) == (5, 4, 0)
    target.lock(ids[3]).remove()
    target.lock(ids[4]).remove()
    assert spoolindex.soonest(target) == later
    assert index_file(world).exists()


def test_the_index_recovers_from_being_deleted(world):
    ids = queue_entries(world, n=4)
    later = int(time.time()) + 600
    defer(world, ids, later)
    before = rows_of(world)
    index_file(world).unlink()
    assert rows_of(world) == before
    assert index_file(world).exists()


@pytest.mark.parametrize("cut", [1, 30, -1])
def test_the_index_recovers_from_being_truncated(world, cut):
    ids = queue_entries(world, n=6)
    defer(world, ids[:3], time.time() + 600)
    before = rows_of(world)
    target = spool.Spool(str(world.spool))
    spoolindex.compact(target)
    data = index_file(world).read_bytes()
    index_file(world).write_bytes(data[:cut] if cut > 0 else data[: len(data) // 2])
    assert rows_of(world) == before
    assert spoolindex.soonest(target) == 0


def test_the_index_sees_entries_added_and_removed_behind_its_back(world):
    ids = queue_entries(world, n=3)
    defer(world, ids, time.time() + 600)
    rows_of(world)  # built
    queue = world.spool / "queue"
    # a hand-made copy of an entry under another id, and a hand-deleted entry
    other = ids[0][:13] + "ZZZZZZZ"
    data = (queue / ids[0]).read_bytes().replace(ids[0].encode(), other.encode())
    (queue / other).write_bytes(data)
    (queue / ids[1]).unlink()
    got = rows_of(world)
    assert [r[0] for r in got] == sorted([ids[0], ids[2], other])
    assert dict((r[0], r[1]) for r in got)[other] == 0  # new: due now


def test_a_state_file_deleted_by_hand_is_seen_at_the_next_rebuild(world):
    """state/ holds other files rewritten at every pass (monitoring's counters), so its time
    tells nothing: a state file deleted by hand counts from the hourly rebuild."""
    ids = queue_entries(world, n=3)
    defer(world, ids, time.time() + 2 * spoolindex.REBUILD_AFTER)
    target = spool.Spool(str(world.spool))
    assert spoolindex.soonest(target) > time.time()
    (world.spool / "state" / ids[1]).unlink()
    later = time.time() + spoolindex.REBUILD_AFTER + 1
    assert spoolindex.soonest(target, later) == 0
    assert [r[0] for r in spoolindex.due(target, later)] == [ids[1]]


def test_other_files_in_state_do_not_make_a_rebuild(world):
    ids = queue_entries(world, n=3)
    defer(world, ids, time.time() + 600)
    target = spool.Spool(str(world.spool))
    assert spoolindex.rebuild(target)
    built = index_file(world).stat().st_ino
    (world.spool / "state" / "metrics").write_text("{}")  # as the monitoring counters are
    assert spoolindex.soonest(target) > time.time()
    assert index_file(world).stat().st_ino == built


def test_a_stale_index_is_rebuilt_once_too_old(world):
    ids = queue_entries(world, n=2)
    defer(world, ids, time.time() + 600)
    target = spool.Spool(str(world.spool))
    rows_of(world)
    # A change nothing could see (same folder times): only the age of the index tells.
    st = os.stat(world.spool / "state")
    path = world.spool / "state" / ids[0]
    path.write_bytes(path.read_bytes().replace(b'"held": false', b'"held": true'))
    os.utime(world.spool / "state", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [r[4] for r in spoolindex.rows(target)] == ["s", "s"]
    later = time.time() + spoolindex.REBUILD_AFTER + 1
    assert [r[4] for r in spoolindex.rows(target, later)] == ["sh", "s"]


def test_the_journal_is_folded_into_the_index(world):
    ids = queue_entries(world, n=3)
    target = spool.Spool(str(world.spool))
    rows_of(world)
    journal = world.spool / "state" / "schedule" / "journal"
    assert journal.stat().st_size == 0
    defer(world, ids[:1], time.time() + 600)
    assert journal.stat().st_size > 0
    assert spoolindex.compact(target)
    assert journal.stat().st_size == 0
    assert index_file(world).read_text().count(f"{ids[0]} ") == 1
    assert dict((r[0], r[1]) for r in spoolindex.rows(target))[ids[0]] > time.time()


def test_make_due_turns_waiting_entries_due(world):
    ids = queue_entries(world, n=3)
    defer(world, ids, time.time() + 600)
    target = spool.Spool(str(world.spool))

    def now_due(qid: str) -> bool:
        locked = target.lock(qid)
        if locked is None:
            return False
        state = locked.state()
        state.next_attempt = 0
        locked.save_state(state)
        locked.release()
        return True

    assert spoolindex.make_due(target, lambda row: row[0] != ids[1], now_due) == 2
    assert [r[0] for r in spoolindex.due(target, time.time())] == [ids[0], ids[2]]


def test_a_journal_too_long_to_merge_makes_a_rebuild(world, monkeypatch):
    """What a flush or a bulk delete leaves is not held as a table: the index is rebuilt."""
    monkeypatch.setattr(spoolindex, "JOURNAL_MAX", 200)
    ids = queue_entries(world, n=8)
    target = spool.Spool(str(world.spool))
    assert spoolindex.rebuild(target)
    for qid in ids[:6]:
        target.lock(qid).remove()
    journal = world.spool / "state" / "schedule" / "journal"
    assert journal.stat().st_size > 200
    assert [r[0] for r in spoolindex.rows(target)] == ids[6:]
    assert journal.stat().st_size == 0
    assert index_file(world).read_text().count("\n") == 2 + 2  # header, 2 rows, trailer


def test_wake_relay_waiters_touches_only_entries_waiting_for_their_relay(world):
    ids = queue_entries(world, n=3)
    later = int(time.time()) + 600
    defer(world, ids, later)
    target = spool.Spool(str(world.spool))
    waiting = hasattr(spoolindex.spoolfmt.State(), "relay_wait")
    if waiting:  # the state's relay_wait (issue 22): set on one entry
        locked = target.lock(ids[1])
        state = locked.state()
        state.relay_wait = True
        locked.save_state(state)
        locked.release()
    assert target.wake_relay_waiters() == (1 if waiting else 0)
    due = [r[0] for r in spoolindex.due(target, time.time())]
    assert due == ([ids[1]] if waiting else [])


@needs_strace
def test_listings_open_each_entry_and_state_once_and_ids_open_none(world):
    ids = queue_entries(world, n=30)
    defer(world, ids[:20], time.time() + 3600)
    assert spoolindex.rebuild(spool.Spool(str(world.spool)))
    for prog, args in (("mailq", ()), ("mailshim", ("queue",)), ("mailshim", ("queue", "--json"))):
        names, r = opened_list(world, *args, prog=prog)
        assert r.returncode == 0, r.stderr
        assert sorted(names) == sorted(
            [f"queue/{q}" for q in ids] + [f"state/{q}" for q in ids[:20]]
        ), (prog, args)
    names, r = opened_list(world, "queue", "--ids")
    assert r.returncode == 0 and r.stdout.decode().split() == ids
    assert names == []
