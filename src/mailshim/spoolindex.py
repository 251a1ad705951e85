"""The schedule index: when each queued entry is next due, so a pass reads only what is due.

``state/schedule/index`` holds one line per entry in ``queue/``, sorted by queue id (=
arrival): its id, next attempt, the submitter's uid, the file's size and flags (held, waiting
for its relay, has a state, unreadable). A header says when it was built, the soonest due
time, the figures per class (new, deferred, held) and the change time of ``queue/`` it
accounts for; a trailer ``end N`` shows it is whole. ``state/schedule/journal`` gets one line
appended (``O_APPEND``) by every change made through the spool API since (an entry added, a
state saved, an entry gone), each with the folders' change times seen just after it. A
reader folds the journal into a new index (written beside it, renamed over it) once it has
grown, or rebuilds the index when it has grown too long to merge in flat memory.

The index is never the only copy of anything: the entries and their state files are the
truth, the pass still reads an entry's state before it tries it, and the index is rebuilt
from them (``rebuild``) whenever it is missing, truncated or unparsable, older than
``REBUILD_AFTER``, written in another boot (a power cut can keep a change and lose its
journal line, which is not fsynced), or ``queue/`` changed in a way no journal line accounts
for (an entry added or removed by hand, or by a release without the index). ``state/``'s
own time is not compared: other files live there (the monitoring counters, the agent's pid),
rewritten at each pass; a state file changed by hand is seen at the next rebuild, and a pass
reads the state of every entry it tries. A change to ``queue/`` behind the API's back in the
same clock tick as a journalled one is also seen at the latest by the next rebuild.

Trust: runs as the runner (root or the spool's owner) and as root's or the owner's
``sendmail`` (the journal); the system spool's ``state/`` is the runner's, 0700, and the
index's folder is opened without following a link, every name in it relative to that fd.
The journal is never truncated except by the holder of its exclusive lock, and appended to
only when it is a plain file with one link (root must not append to a file the runner
linked elsewhere); the index is replaced by a temp name (O_EXCL, random) renamed over it.
What the files say decides only the order and timing of attempts: a false "due" costs one
state read, a false "not due" lasts until the next rebuild at most.

Raises nothing: an index that cannot be read is rebuilt, one that cannot be written is done
without (the rows come from the entries themselves), a journal line that cannot be written
is skipped (the folder's change time then differs and the next reader rebuilds).
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
import time

from mailshim import spoolfmt
from mailshim.errors import DataError
from mailshim.spoolfs import _B32, _O_CLOEXEC, _O_NOFOLLOW, _READ, TEMP_TRIES

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO, Protocol

    from mailshim.spoolfmt import State

    class IndexedSpool(Protocol):
        """What the index uses of its spool (``spool.Spool``; a protocol: no import circle)."""

        queue: str
        state_dir: str

        def give(self, fd: int) -> None: ...


FOLDER = "schedule"  # state/schedule/: a folder of its own, so writing the index and the
# journal does not change the time of state/, which tells of state files changed behind them
INDEX = "index"
JOURNAL = "journal"
SWEPT = "swept"
MAGIC = "MAILSHIM-SCHEDULE 2"  # 2: the header names the boot it was written in
BOOT_ID = "/proc/sys/kernel/random/boot_id"
REBUILD_AFTER = 3600  # seconds: an index older than this is rebuilt from the entries
SWEEP_EVERY = 3600  # seconds between the runners' looks at every name in state/ (sweep_due)
COMPACT_LINES = 2048  # journal lines beyond which a reader folds them into the index
JOURNAL_MAX = 512 * 1024  # bytes (~8,000 lines): a longer journal is not merged, its changes
# would be held at once; the index is rebuilt from the entries instead (which are fewer then:
# such a journal is what a flush or a bulk delete leaves)
PEEK_BYTES = 4096  # the magic, id, arrival and uid records of an entry fit in far less
NEVER = 2**62  # the due time of a held entry: never by the clock

# A row: (queue id, due epoch seconds (0 = now), submitter uid (-1: unreadable), size, flags)
# flags: "h" held, "w" waiting for its relay (due again when a relay takes mail), "s" has a
# state file, "x" the state or the entry cannot be read (the pass quarantines it), "-" none.
Row = tuple[str, int, int, int, str]


def _folder(sp: IndexedSpool, create: bool = False) -> int | None:
    """An fd of ``state/schedule/`` (not followed if a link), made when ``create``; None when
    it is not there or not a folder. Every name in it is opened relative to this fd."""
    path = os.path.join(sp.state_dir, FOLDER)
    flags = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        sp.give(fd)
    except OSError:
        pass
    return fd


def _open_in(sp: IndexedSpool, name: str, flags: int, create: bool = False) -> int | None:
    folder = _folder(sp, create)
    if folder is None:
        return None
    try:
        return os.open(name, flags, 0o600, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)


def stamps(sp: IndexedSpool) -> tuple[int, int]:
    """The change times of ``queue/`` and ``state/`` (ns): what the index must account for."""
    try:
        return os.stat(sp.queue).st_mtime_ns, os.stat(sp.state_dir).st_mtime_ns
    except OSError:
        return 0, 0


# --- the journal: what the API's writers append --------------------------------------------


def flags_of(state: State | None) -> str:
    if state is None:
        return "-"
    out = "s"
    if state.held:
        out += "h"
    if getattr(state, "relay_wait", False):
        out += "w"
    return out


def note_added(sp: IndexedSpool, qid: str, uid: int, size: int) -> None:
    """A new entry is in ``queue/`` (its writer still holds its lock)."""
    _append(sp, f"+ {qid} {uid} {size}")


def note_state(sp: IndexedSpool, qid: str, state: State) -> None:
    """The state of ``qid`` was saved (by the holder of its lock)."""
    _append(sp, f"= {qid} {max(0, state.next_attempt)} {flags_of(state)}")


def note_gone(sp: IndexedSpool, qid: str) -> None:
    """``qid`` left ``queue/`` (delivered, buried, deleted)."""
    _append(sp, f"- {qid}")


def _append(sp: IndexedSpool, line: str) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK
    fd = _open_in(sp, JOURNAL, flags)
    if fd is None:
        return  # no journal: the folders' times now differ from the index, which is rebuilt
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return
        if st.st_size == 0:
            sp.give(fd)
        # Shared: appends of many writers interleave whole (O_APPEND); a reader folding the
        # journal into the index takes it exclusively, so no line is lost to its truncate.
        fcntl.flock(fd, fcntl.LOCK_SH)
        q, s = stamps(sp)
        os.write(fd, f"{line} {q} {s}\n".encode("ascii", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading ----------------------------------------------------------------------------


CLASSES = ("new", "deferred", "held")  # figures kept in the header, for monitoring
HEADER_BYTES = 320


def row_class(flags: str) -> str:
    """new (no state file), held, or deferred (tried; or its state cannot be read)."""
    if "h" in flags:
        return "held"
    return "new" if flags == "-" else "deferred"


class Figures:
    """Entries, bytes and the oldest id time (microseconds, 0: none) per class of row."""

    __slots__ = ("table",)

    def __init__(self) -> None:
        self.table = {name: [0, 0, 0] for name in CLASSES}

    def add(self, row: Row) -> None:
        cell = self.table[row_class(row[4])]
        cell[0] += 1
        cell[1] += row[3]
        try:
            usec = int(row[0][:13], 16)
        except ValueError:
            usec = 0
        if usec and (not cell[2] or usec < cell[2]):
            cell[2] = usec

    def words(self) -> str:
        return " ".join(f"{c[0]} {c[1]} {c[2]}" for c in self.table.values())


class _Header:
    __slots__ = ("boot", "built", "count", "figures", "live", "q", "s", "soonest")

    def __init__(self) -> None:
        self.built = 0
        self.count = 0
        self.live = 0  # rows not held
        self.q = 0
        self.s = 0
        self.soonest = 0  # the soonest due time of a row that is not held; NEVER when none
        self.figures = Figures()
        self.boot = "-"


def _parse_header(line: bytes) -> _Header | None:
    words = line.decode("ascii", "replace").split()
    if len(words) != 9 + 3 * len(CLASSES) or " ".join(words[:2]) != MAGIC:
        return None
    head = _Header()
    try:
        numbers = [int(w) for w in words[2:-1]]
    except ValueError:
        return None
    head.built, head.count, head.live, head.q, head.s, head.soonest = numbers[:6]
    head.boot = words[-1]
    for i, name in enumerate(CLASSES):
        head.figures.table[name] = numbers[6 + 3 * i : 9 + 3 * i]
    return head


def _parse_row(line: bytes) -> Row:
    qid, due, uid, size, flags = line.decode("ascii").split()
    if not spoolfmt.valid_id(qid):
        raise ValueError(qid)
    return qid, int(due), int(uid), int(size), flags


class _Journal:
    """The journal, read: per id the changes since the index (the last one wins)."""

    def __init__(self) -> None:
        self.changes: dict[str, list[object]] = {}  # qid -> [gone, due, uid, size, flags]
        self.lines = 0
        self.last: tuple[int, int] | None = None  # the folders' times after the last change
        self.too_long = False  # not read: its table would grow with it (rebuild instead)

    def read(self, f: BinaryIO) -> None:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a line being written: the times will differ, or it is done next time
            words = raw.decode("ascii", "replace").split()
            try:
                op, qid = words[0], words[1]
                q, s = int(words[-2]), int(words[-1])
                if not spoolfmt.valid_id(qid):
                    continue
                cur = self.changes.setdefault(qid, [False, None, None, None, None])
                if op == "+":
                    cur[0], cur[2], cur[3] = False, int(words[2]), int(words[3])
                elif op == "=":
                    cur[0], cur[1], cur[4] = False, int(words[2]), words[3]
                elif op == "-":
                    self.changes[qid] = [True, None, None, None, None]
                else:
                    continue
            except (IndexError, ValueError):
                continue
            self.lines += 1
            self.last = (q, s)


class _Broken(Exception):
    """The index is not whole: rebuild it."""


def _open_index(sp: IndexedSpool) -> tuple[BinaryIO, _Header] | None:
    fd = _open_in(sp, INDEX, _READ)
    if fd is None:
        return None
    f = open(fd, "rb", buffering=256 * 1024)  # noqa: SIM115 - returned to the caller
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Broken
        # The header alone (a fixed width): a caller that wants only it (a pass with nothing
        # due, a wake) reads no row; one that wants the rows reads on from there.
        line = os.pread(fd, HEADER_BYTES + 1, 0)
        head = _parse_header(line) if line.endswith(b"\n") else None
        if head is None:
            raise _Broken
        f.seek(len(line))
        # Whole: the trailer names the count of the header (a truncated file has none).
        tail = os.pread(fd, 64, max(0, st.st_size - 64))
        if not tail.endswith(f"\nend {head.count}\n".encode()):
            raise _Broken
        return f, head
    except (_Broken, OSError):
        f.close()
        return None


def _read_journal(sp: IndexedSpool) -> _Journal:
    journal = _Journal()
    fd = _open_in(sp, JOURNAL, _READ)
    if fd is None:
        return journal
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if st.st_size > JOURNAL_MAX:
            journal.too_long = True  # a flush of 100,000 leaves 100,000 lines
        elif stat.S_ISREG(st.st_mode):
            journal.read(f)
    return journal


_boot: list[str] = []


def this_boot() -> str:
    """The kernel's id of this boot ("-" where there is none): an index written in another
    boot is rebuilt. The journal is appended after the change it records and not fsynced,
    so a power cut can keep an entry's link into ``queue/`` and lose its line; the folder's
    time then tells it only when the two fell in different clock ticks (issue 27)."""
    if not _boot:
        try:
            with open(BOOT_ID, "rb") as f:
                _boot.append(f.read(64).decode("ascii", "replace").strip().replace("-", "") or "-")
        except OSError:
            _boot.append("-")
    return _boot[0]


def _fresh(sp: IndexedSpool, head: _Header, journal: _Journal, now: float) -> bool:
    """The index and its journal account for every change to the folders."""
    if journal.too_long:
        return False
    if head.boot != this_boot():
        return False  # a power cut may have kept a change and lost its journal line
    if not 0 <= now - head.built < REBUILD_AFTER:
        return False
    recorded = journal.last if journal.last is not None else (head.q, head.s)
    return recorded[0] == stamps(sp)[0]


def _merged(f: BinaryIO, head: _Header, journal: _Journal, sp: IndexedSpool) -> Iterator[Row]:
    """The index's rows with the journal's changes, in id order. Raises _Broken."""
    extra = {
        qid: c for qid, c in journal.changes.items() if not c[0]
    }  # added or changed: those not met in the index come in id order between its rows
    pending = sorted(extra)
    at = 0
    seen = 0
    for raw in f:
        if raw.startswith(b"end "):
            if seen != head.count:
                raise _Broken
            break
        try:
            row = _parse_row(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Broken from None
        seen += 1
        qid = row[0]
        while at < len(pending) and pending[at] < qid:
            new = _journal_row(sp, pending[at], extra[pending[at]], None)
            at += 1
            if new is not None:
                yield new
        change = journal.changes.get(qid)
        if change is None:
            yield row
            continue
        if at < len(pending) and pending[at] == qid:
            at += 1
        if change[0]:
            continue  # gone
        new = _journal_row(sp, qid, change, row)
        if new is not None:
            yield new
    else:
        raise _Broken  # no trailer
    for qid in pending[at:]:
        new = _journal_row(sp, qid, extra[qid], None)
        if new is not None:
            yield new


def _journal_row(sp: IndexedSpool, qid: str, change: list[object], old: Row | None) -> Row | None:
    _, due, uid, size, flags = change
    if old is not None:
        due = old[1] if due is None else due
        uid = old[2] if uid is None else uid
        size = old[3] if size is None else size
        flags = old[4] if flags is None else flags
    if uid is None or size is None:
        peeked = _peek(os.path.join(sp.queue, qid))
        if peeked is None:
            if not os.path.lexists(os.path.join(sp.queue, qid)):
                return None  # gone (requeued then delivered, or removed by hand)
            peeked = (-1, 1)
        uid, size = peeked
    assert isinstance(uid, int) and isinstance(size, int)
    return (
        qid,
        due if isinstance(due, int) else 0,
        uid,
        size,
        flags if isinstance(flags, str) else "-",
    )


def _peek(path: str) -> tuple[int, int] | None:
    """(uid, size) of an entry from one read; None when it cannot be opened or read."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None
    try:
        head = os.read(fd, PEEK_BYTES)
        uid = spoolfmt.peek_uid(io.BytesIO(head))
        size = len(head) if len(head) < PEEK_BYTES else os.fstat(fd).st_size
        return uid, max(size, 1)
    except (OSError, DataError):
        return None
    finally:
        os.close(fd)


def rows(sp: IndexedSpool, now: float | None = None) -> Iterator[Row]:
    """Every entry's row, in id (arrival) order, from an index that accounts for every change
    (rebuilt or brought up to date first when needed). Memory: the journal's changes only.

    When the index cannot be written here, the rows come from the entries themselves."""
    now = time.time() if now is None else now
    for attempt in range(2):
        opened = _open_index(sp)
        journal = _read_journal(sp)
        if opened is None or not _fresh(sp, opened[1], journal, now):
            if opened is not None:
                opened[0].close()
            if not rebuild(sp, now):
                break
            continue
        f, head = opened
        if journal.lines > COMPACT_LINES and attempt == 0:
            f.close()
            compact(sp, now)
            continue
        with f:
            try:
                yield from _merged(f, head, journal, sp)
                return
            except _Broken:
                pass
        # Found broken while read (bytes changed by hand): what is left of this pass is
        # missed, the next reader rebuilds it.
        _remove_index(sp)
        return
    yield from _scan(sp)


def _current_header(sp: IndexedSpool, now: float) -> _Header | None:
    """The header of an index that accounts for every change, the journal folded in first
    (or the index rebuilt); None when that cannot be written here."""
    for _ in range(2):
        opened = _open_index(sp)
        journal = _read_journal(sp)
        if opened is None:
            if rebuild(sp, now):
                continue
            return None
        opened[0].close()
        head = opened[1]
        fresh = _fresh(sp, head, journal, now)
        if fresh and journal.lines == 0:
            return head
        if not (compact(sp, now) if fresh else rebuild(sp, now)):
            return None
    return None


def totals(sp: IndexedSpool, now: float | None = None) -> tuple[int, int, int]:
    """(entries, entries not held, the soonest due time of those: ``NEVER`` when none).
    Nothing changed since the index: one header read; else the journal is folded in first."""
    now = time.time() if now is None else now
    head = _current_header(sp, now)
    if head is not None:
        return head.count, head.live, head.soonest
    count, live, best = 0, 0, NEVER
    for row in rows(sp, now):
        count += 1
        if "h" not in row[4]:
            live += 1
            best = min(best, row[1])
    return count, live, best


def figures(sp: IndexedSpool, now: float | None = None) -> dict[str, tuple[int, int, float]]:
    """Per class (``CLASSES``): entries, bytes, and the oldest one's id time (epoch seconds,
    0.0 when none), for monitoring: from the header when nothing changed since the index."""
    now = time.time() if now is None else now
    head = _current_header(sp, now)
    if head is not None:
        got = head.figures
    else:
        got = Figures()
        for row in rows(sp, now):
            got.add(row)
    return {name: (c[0], c[1], c[2] / 1e6) for name, c in got.table.items()}


def soonest(sp: IndexedSpool, now: float | None = None) -> int | None:
    """The soonest due time of an entry not held; None when there is none to retry."""
    _, live, best = totals(sp, now)
    return None if live == 0 else best


def is_due(row: Row, now: float, force: bool = False) -> bool:
    """Whether a pass should look at this entry: due by ``now`` (every one, forced) and not
    held; or its state could not be read (the pass quarantines it)."""
    flags = row[4]
    return "x" in flags or ("h" not in flags and (force or row[1] <= now))


def due(sp: IndexedSpool, now: float, force: bool = False) -> Iterator[Row]:
    """The rows ``is_due`` selects. Not forced and nothing due by the header's soonest time:
    no row is read (the cost of a pass with nothing due does not grow with the queue)."""
    if not force:
        _, live, best = totals(sp, now)
        if live == 0 or best > now:
            return
    for row in rows(sp, now):
        if is_due(row, now, force):
            yield row


def sweep_due(sp: IndexedSpool, now: float | None = None) -> bool:
    """Whether it is time for a runner's look at every state file (orphans left by a crash):
    at most once per ``SWEEP_EVERY`` per spool, so a pass costs what is due. The time of the
    last look is that of ``state/schedule/swept`` (one stat; touched when it says yes)."""
    now = time.time() if now is None else now
    folder = _folder(sp, create=True)
    if folder is None:
        return True
    try:
        try:
            if (
                0
                <= now - os.stat(SWEPT, dir_fd=folder, follow_symlinks=False).st_mtime
                < SWEEP_EVERY
            ):
                return False
        except FileNotFoundError:
            pass
        try:
            fd = os.open(SWEPT, os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK,
                         0o600, dir_fd=folder)  # fmt: skip
            try:
                sp.give(fd)
                os.utime(fd, (now, now))
            finally:
                os.close(fd)
        except OSError:
            pass
        return True
    except OSError:
        return True
    finally:
        os.close(folder)


# --- writing ----------------------------------------------------------------------------


def _scan(sp: IndexedSpool) -> Iterator[Row]:
    """Rows read from the entries and state files themselves (unsorted: folder order)."""
    try:
        it = os.scandir(sp.queue)
    except OSError:
        return
    with it:
        for ent in it:
            if spoolfmt.valid_id(ent.name):
                row = _row_from_files(sp, ent.name)
                if row is not None:
                    yield row


def _row_from_files(sp: IndexedSpool, qid: str) -> Row | None:
    peeked = _peek(os.path.join(sp.queue, qid))
    if peeked is None:
        if not os.path.lexists(os.path.join(sp.queue, qid)):
            return None
        return qid, 0, -1, 1, "x"
    uid, size = peeked
    try:
        fd = os.open(os.path.join(sp.state_dir, qid), _READ)
    except FileNotFoundError:
        return qid, 0, uid, size, "-"
    except OSError:
        return qid, 0, uid, size, "x"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return qid, 0, uid, size, "x"
        state = spoolfmt.decode_state(os.read(fd, 16 * 1024 * 1024))
    except (OSError, DataError):
        return qid, 0, uid, size, "x"
    finally:
        os.close(fd)
    return qid, max(0, state.next_attempt), uid, size, flags_of(state)


def _remove_index(sp: IndexedSpool) -> None:
    folder = _folder(sp)
    if folder is not None:
        try:
            os.unlink(INDEX, dir_fd=folder)
        except OSError:
            pass
        finally:
            os.close(folder)


def _write(
    sp: IndexedSpool, lines: Callable[[], Iterator[Row]], q: int, s: int, now: float
) -> bool:
    """Write rows (in id order) as the new index, accounting for folder times (q, s): a temp
    name (O_EXCL, random) in the index's folder, fsynced, renamed over ``index``."""
    folder = _folder(sp, create=True)
    if folder is None:
        return False
    tmp = ""
    try:
        for _ in range(TEMP_TRIES):
            rand = int.from_bytes(os.urandom(8), "big")
            tmp = "index." + "".join(_B32[(rand >> (5 * i)) & 31] for i in range(12)) + ".tmp"
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600,
                             dir_fd=folder)  # fmt: skip
                break
            except FileExistsError:
                continue
        else:
            return False
        with open(fd, "wb", buffering=256 * 1024) as out:
            sp.give(fd)
            out.write(b" " * HEADER_BYTES + b"\n")  # the header, once the figures are known
            count, live, best = 0, 0, NEVER
            figures = Figures()
            for row in lines():
                qid, when, uid, size, flags = row
                out.write(f"{qid} {when} {uid} {size} {flags}\n".encode("ascii", "replace"))
                count += 1
                figures.add(row)
                if "h" not in flags:
                    live += 1
                    best = min(best, when)
            out.write(f"end {count}\n".encode())
            out.flush()
            head = (
                f"{MAGIC} {int(now)} {count} {live} {q} {s} {best} {figures.words()} {this_boot()}"
            )
            os.pwrite(fd, head.encode().ljust(HEADER_BYTES) + b"\n", 0)
            os.fsync(fd)
        os.rename(tmp, INDEX, src_dir_fd=folder, dst_dir_fd=folder)
        return True
    except OSError:
        if tmp:
            try:
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
        return False
    finally:
        os.close(folder)


def rebuild(sp: IndexedSpool, now: float | None = None) -> bool:
    """Build the index from the entries and their states (the truth). False when it cannot
    be written here. The journal is emptied: the new index accounts for all of it.

    Holds one short line per entry to sort them (~90 bytes each, freed at the end)."""
    now = time.time() if now is None else now
    lock = _lock_journal(sp)  # makes the folder first: that changes the time of state/
    try:
        q, s = stamps(sp)  # before the scan: a change during it makes them differ later
        found = sorted(_scan(sp))
        ok = _write(sp, lambda: iter(found), q, s, now)
        found.clear()
        if ok and lock is not None:
            os.ftruncate(lock, 0)
        return ok
    except OSError:
        return False
    finally:
        if lock is not None:
            os.close(lock)


def compact(sp: IndexedSpool, now: float | None = None) -> bool:
    """Fold the journal into a new index (streaming: flat memory). False when it cannot."""
    now = time.time() if now is None else now
    lock = _lock_journal(sp)
    if lock is None:
        return False
    try:
        if os.fstat(lock).st_size > JOURNAL_MAX:
            os.close(lock)
            lock = -1
            return rebuild(sp, now)
        opened = _open_index(sp)
        if opened is None:
            return False
        f, head = opened
        journal = _Journal()
        with open(os.dup(lock), "rb") as jf:
            jf.seek(0)
            journal.read(jf)
        if not _fresh(sp, head, journal, now):
            f.close()
            return False
        q, s = journal.last if journal.last is not None else (head.q, head.s)
        with f:
            try:
                ok = _write(sp, lambda: _merged(f, head, journal, sp), q, s, head.built)
            except _Broken:
                return False
        if ok:
            os.ftruncate(lock, 0)
        return ok
    except OSError:
        return False
    finally:
        if lock >= 0:
            os.close(lock)


def _lock_journal(sp: IndexedSpool) -> int | None:
    """The journal, open and locked exclusively (no append in between), or None."""
    flags = os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK
    fd = _open_in(sp, JOURNAL, flags, create=True)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            return None
        sp.give(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError:
        os.close(fd)
        return None


def make_due(
    sp: IndexedSpool, wanted: Callable[[Row], bool], lock_and_save: Callable[[str], bool]
) -> int:
    """Make the entries whose row ``wanted`` selects due now; returns how many were.

    ``lock_and_save(qid)`` locks the entry, sets its state's next attempt to now (and clears
    what made it wait) and saves it (which journals it); it returns False when the entry is
    busy or gone. The one place that turns "not due" into "due" for a whole class of
    entries: the relay-level deferrals when a relay takes mail again (flag ``w``)."""
    done = 0
    for row in rows(sp):
        if "h" not in row[4] and wanted(row) and lock_and_save(row[0]):
            done += 1
    return done
