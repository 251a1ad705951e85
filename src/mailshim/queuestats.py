"""The queue in figures for monitoring: per state, how many entries, how many bytes, the oldest;
and the public summary (``monitor/summary.json``) that lets an unprivileged monitoring user
see those figures without reading the spool.

``snapshot`` takes ``queue/``'s figures from the schedule index (spoolindex keeps them in
its header: one read when nothing changed since it was written) and lists ``dead/`` and
``incoming/`` with ``stat`` results, never an entry's envelope or message. The states are
Postfix's queues in mailshim's words: ``new`` (in ``queue/``, never tried), ``deferred``
(tried, waiting for its next attempt), ``held`` (``mailshim queue hold``), ``dead``
(``dead/``: failed for good) and ``incoming`` (users' entries still in the drop folder,
e.g. over their sending limit). An entry's age counts from its queue id, which is the time
it was spooled (for an entry picked up from the drop folder, the pickup); a dead letter's
and a drop entry's from their file's time.

The runner publishes the figures after each pass in ``monitor/summary.json`` (mode 0644, in a
folder of mode 0755 that ``setup-spool`` makes for the runner user): counts, bytes, ages, the
last delivery, the listeners' last answers; no address, no subject, no queue id. The spool's
other folders stay 0700. ``read_summary`` is how ``mailshim check-queue`` reads it, with the
change times of ``queue/`` and ``incoming/`` (which anyone may ``stat``) to tell mail that
arrived after the last pass.

Trust: ``snapshot`` runs as the runner or root over the runner's folders; names that are not
queue ids are skipped, links are not followed, no entry or state file is read (the index
says which are held). ``publish`` writes through
O_EXCL under a random temporary name and renames it into place. ``read_summary`` runs as
anyone and parses the file strictly (it is the runner's, but a reader trusts only its shape).

Raises nothing: unreadable folders count as empty; ``publish`` returns why it could not write
(or ""), ``read_summary`` raises ``NoInputError`` (66) naming the file and the fix.
"""

from __future__ import annotations

import os
import stat

from mailshim import paths, spoolfmt
from mailshim.errors import NoInputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.mailstats import Counters
    from mailshim.spool import Spool

SCHEMA = 1
QUEUES = ("new", "deferred", "held", "dead", "incoming")
FOLDER = "monitor"
SUMMARY = "summary.json"
# How encode_state writes the flag (json.dumps, sort_keys): a value inside a string would be
# escaped (\"held\"), so these bytes can only be the flag itself.
HELD_BYTES = b'"held": true'
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK


class QueueStat:
    """One queue's figures: entries, bytes, and the oldest file's time (0: empty)."""

    __slots__ = ("count", "oldest", "size")

    def __init__(self, count: int = 0, size: int = 0, oldest: float = 0.0) -> None:
        self.count = count
        self.size = size
        self.oldest = oldest

    def add(self, size: int, when: float) -> None:
        self.count += 1
        self.size += size
        if not self.oldest or when < self.oldest:
            self.oldest = when

    def age(self, now: float) -> float:
        return max(0.0, now - self.oldest) if self.count else 0.0


class Snapshot:
    """A spool's queues at ``taken``, plus (from ``mailstats``) its counters."""

    __slots__ = ("counters", "queues", "spool", "taken")

    def __init__(self, spool_root: str, taken: float) -> None:
        self.spool = spool_root
        self.taken = taken
        self.queues = {name: QueueStat() for name in QUEUES}
        self.counters: Counters | None = None

    def waiting(self) -> int:
        """Entries waiting to be delivered (everything but held and dead)."""
        return sum(self.queues[q].count for q in ("new", "deferred", "incoming"))

    def oldest_waiting(self) -> float:
        """Age in seconds of the oldest entry waiting to be delivered."""
        return max(self.queues[q].age(self.taken) for q in ("new", "deferred", "incoming"))


def _scan(folder: str) -> list[tuple[str, os.stat_result]]:
    out = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if not spoolfmt.valid_id(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # delivered while we looked
                if stat.S_ISREG(st.st_mode):
                    out.append((entry.name, st))
    except OSError:
        pass
    return out


def id_time(qid: str) -> float | None:
    """When entry ``qid`` was spooled (or picked up): its first 13 characters are the
    microseconds in hex (spoolentry.new_queue_id). None for a name not made that way.

    >>> id_time("0000000F4240" + "0ABCDEFGH")
    1.0
    """
    try:
        usec = int(qid[:13], 16)
    except ValueError:
        return None
    return usec / 1e6


def snapshot(target: Spool, now: float) -> Snapshot:
    """The figures of ``target`` now (the caller must be able to read its folders).

    ``queue/``'s come from the schedule index (spoolindex: its header, when nothing changed
    since it was written), not from listing the folder and reading states: a pass with
    nothing due stays as cheap at 100,000 queued as at 10. An entry's time is its queue
    id's."""
    from mailshim import spoolindex

    snap = Snapshot(target.root, now)
    queues = snap.queues
    for name, (count, size, oldest) in spoolindex.figures(target, now).items():
        queues[name] = QueueStat(count, size, oldest)
    for _name, st in _scan(target.dead):
        queues["dead"].add(st.st_size, st.st_mtime)
    for _name, st in _scan(target.incoming):
        queues["incoming"].add(st.st_size, st.st_mtime)
    return snap


# --- the public summary ----------------------------------------------------------------------


def summary_json(snap: Snapshot) -> dict[str, object]:
    """The summary's content: figures only (schema 1, docs/monitoring.md)."""
    counters = snap.counters
    relays: dict[str, object] = {}
    if counters is not None:
        relays = {n: {"up": up, "at": at} for n, (up, at) in sorted(counters.relays.items())}
    return {
        "schema": SCHEMA,
        "spool": snap.spool,
        "written": snap.taken,
        "queues": {
            name: {"length": q.count, "size_bytes": q.size, "oldest": q.oldest or None}
            for name, q in snap.queues.items()
        },
        "last_delivery": (counters.last_delivery or None) if counters is not None else None,
        "relays": relays,
    }


def publish(target: Spool, snap: Snapshot) -> str:
    """Write ``monitor/summary.json`` (temp + rename, mode 0644); "" or why it was not."""
    import json

    folder = os.path.join(target.root, FOLDER)
    try:
        os.mkdir(folder, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"{folder}: {exc.strerror} (mailshim setup-spool makes it)"
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    data = json.dumps(summary_json(snap), sort_keys=True).encode() + b"\n"
    # the monitoring user reads it, whatever the umask
    return paths.publish_file(os.path.join(folder, SUMMARY), data, 0o644)


class Summary:
    """What ``monitor/summary.json`` says, as a reader sees it."""

    __slots__ = ("last_delivery", "queues", "relays", "spool", "written")

    def __init__(self) -> None:
        self.spool = ""
        self.written = 0.0
        self.queues: dict[str, QueueStat] = {}
        self.last_delivery = 0.0
        self.relays: dict[str, bool] = {}


def _num(value: object, what: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(what)
    return float(value)


def parse_summary(raw: bytes) -> Summary:
    """The summary in ``raw``; raises ValueError when it is not schema 1's shape."""
    import json

    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError("not a schema 1 summary")
    out = Summary()
    out.spool = str(data.get("spool", ""))
    out.written = _num(data.get("written"), "written")
    queues = data.get("queues")
    if not isinstance(queues, dict):
        raise ValueError("queues")
    for name in QUEUES:
        q = queues.get(name)
        if not isinstance(q, dict):
            raise ValueError(name)
        out.queues[name] = QueueStat(
            int(_num(q.get("length"), name)),
            int(_num(q.get("size_bytes"), name)),
            _num(q.get("oldest"), name),
        )
    out.last_delivery = _num(data.get("last_delivery"), "last_delivery")
    relays = data.get("relays")
    if not isinstance(relays, dict):
        raise ValueError("relays")
    for name, value in relays.items():
        if not isinstance(value, dict) or not isinstance(value.get("up"), bool):
            raise ValueError("relays")
        out.relays[str(name)] = value["up"]
    return out


def read_summary(root: str) -> Summary:
    """``monitor/summary.json`` of the spool at ``root``; raises NoInputError (66)."""
    path = os.path.join(root, FOLDER, SUMMARY)
    try:
        fd = os.open(path, _READ)
    except OSError as exc:
        raise NoInputError(
            f"{path}: {exc.strerror}: no runner has published the queue's figures yet"
            " (mailshim setup-spool makes the folder; the next pass writes them)"
        ) from None
    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise NoInputError(f"{path} is not a plain file")
            return parse_summary(f.read(1024 * 1024))
    except (ValueError, RecursionError, OSError):
        raise NoInputError(f"{path}: not a summary mailshim wrote (schema {SCHEMA})") from None


def changed_since(root: str) -> float:
    """When ``queue/`` or ``incoming/`` last changed (a name added or removed); 0 if unknown.

    Anyone may stat them: the spool's root is 0711."""
    latest = 0.0
    for name in ("queue", "incoming"):
        try:
            latest = max(latest, os.stat(os.path.join(root, name)).st_mtime)
        except OSError:
            continue
    return latest
