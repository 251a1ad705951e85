"""Durable delivery counters for monitoring: what this process saw since its last pass, added
once per pass into the spool's ``state/metrics`` file.

During a pass the runner notes each recipient's outcome (``delivery``: relay, status, reply
class, delay), each recipient that expired (``expired``), each entry held by the sending
limits (``limited``) and whether each listener answered (``relay_state``, from relay.py's
failover). These notes cost a dict update each. At the end of the pass ``merge`` adds them to
the counters kept in ``state/metrics``: under an flock on ``state/metrics.lock`` (two runners
on one spool never lose each other's counts), read, add, write ``state/metrics.<random>.tmp``
and rename it over the old file, so a reader or a crash sees the old counters or the new,
never half of them. The file is not fsynced: after a power cut the counters may go back by a
pass, which Prometheus treats as a counter reset.

Counters only grow; ``since`` says when they started (a new file, or one that could not be
read). Format: JSON, ``{"schema": 1, ...}``; docs/monitoring.md documents the metrics built
from it.

Trust: the runner (root or the ``mailshim`` user, or a user on their own spool) writes it;
``state/`` is the runner's 0700 folder. The file is still parsed strictly: anything that is
not the expected shape is dropped and counting starts again (logged by the caller). Relay
names and statuses come from the configuration and from constants, never from the listener.

Raises nothing: ``merge`` returns the counters even when they could not be saved (the
textfile is still written) and says why in ``Counters.error``.
"""

from __future__ import annotations

import os

SCHEMA = 1
FILE = "metrics"
LOCK = "metrics.lock"
# Delivery delay buckets (seconds): a minute's hiccup to the 5-day lifetime.
BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 432000.0)
STATUSES = ("sent", "deferred", "bounced", "expired")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class Counters:
    """The counters of one spool (or this pass's notes, before they are merged)."""

    __slots__ = ("delays", "deliveries", "error", "last_delivery", "limited", "relays", "since")

    def __init__(self, since: float = 0.0) -> None:
        # (relay, status, class) -> recipients; class is "2xx", "4xx", "5xx" or "none"
        self.deliveries: dict[tuple[str, str, str], int] = {}
        # status -> [count per bucket (not cumulative)..., count above the last, sum]
        self.delays: dict[str, list[float]] = {}
        self.last_delivery = 0.0  # when a recipient was last accepted (epoch seconds)
        self.relays: dict[str, tuple[bool, float]] = {}  # name -> (answered, when)
        self.limited = 0  # entries held for their submitter's next window
        self.since = since
        self.error = ""  # why the counters could not be read or saved, if so

    def empty(self) -> bool:
        return not (self.deliveries or self.relays or self.limited)

    def add(self, other: Counters) -> None:
        for key, n in other.deliveries.items():
            self.deliveries[key] = self.deliveries.get(key, 0) + n
        for status, row in other.delays.items():
            mine = self.delays.setdefault(status, [0.0] * (len(BUCKETS) + 2))
            for i, value in enumerate(row):
                mine[i] += value
        self.last_delivery = max(self.last_delivery, other.last_delivery)
        for name, (up, when) in other.relays.items():
            if when >= self.relays.get(name, (False, 0.0))[1]:
                self.relays[name] = (up, when)
        self.limited += other.limited

    def as_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "since": self.since,
            "deliveries": [[r, s, c, n] for (r, s, c), n in sorted(self.deliveries.items())],
            "delays": {s: row for s, row in sorted(self.delays.items())},
            "last_delivery": self.last_delivery,
            "relays": {name: [up, when] for name, (up, when) in sorted(self.relays.items())},
            "limited": self.limited,
        }

    @classmethod
    def from_json(cls, data: object) -> Counters:
        """The counters in ``data``; raises ValueError when it is not their shape."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError("not a metrics file of schema 1")
        out = cls(_number(data.get("since")))
        rows = data.get("deliveries")
        if not isinstance(rows, list):
            raise ValueError("deliveries")
        for row in rows:
            if not (
                isinstance(row, list) and len(row) == 4 and all(isinstance(v, str) for v in row[:3])
            ):
                raise ValueError("a delivery row")
            out.deliveries[(row[0], row[1], row[2])] = int(_number(row[3]))
        delays = data.get("delays")
        if not isinstance(delays, dict):
            raise ValueError("delays")
        for status, row in delays.items():
            if status not in STATUSES or not isinstance(row, list) or len(row) != len(BUCKETS) + 2:
                raise ValueError("a delay row")
            out.delays[status] = [_number(v) for v in row]
        relays = data.get("relays")
        if not isinstance(relays, dict):
            raise ValueError("relays")
        for name, pair in relays.items():
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], bool)):
                raise ValueError("a relay")
            out.relays[str(name)] = (pair[0], _number(pair[1]))
        out.last_delivery = _number(data.get("last_delivery"))
        out.limited = int(_number(data.get("limited")))
        return out


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("not a count")
    return float(value)


# --- this process's notes ------------------------------------------------------------------

_notes = Counters()


def code_class(code: int) -> str:
    """ "2xx", "4xx", "5xx", or "none" when no reply came (connection failures, timeouts)."""
    return f"{code // 100}xx" if 200 <= code < 600 else "none"


def relay_name(label: str) -> str:
    """The configured relay's name from a log label ("relay[127.0.0.1]:25" -> "relay")."""
    return label.partition("[")[0] or "none"


def delivery(relay: str, status: str, code: int, delay: float, now: float) -> None:
    """One recipient's outcome at one attempt (status: sent, deferred or bounced)."""
    key = (relay_name(relay), status, code_class(code))
    _notes.deliveries[key] = _notes.deliveries.get(key, 0) + 1
    row = _notes.delays.setdefault(status, [0.0] * (len(BUCKETS) + 2))
    for i, bound in enumerate(BUCKETS):
        if delay <= bound:
            row[i] += 1
            break
    else:
        row[len(BUCKETS)] += 1
    row[-1] += delay
    if status == "sent":
        _notes.last_delivery = max(_notes.last_delivery, now)


def expired(count: int, delay: float) -> None:
    """``count`` recipients given up after ``[queue] lifetime`` (their entry went to dead/)."""
    for _ in range(count):
        delivery("none", "expired", 0, delay, 0.0)


def limited() -> None:
    """An entry held for its submitter's next sending window."""
    _notes.limited += 1


def relay_state(name: str, answered: bool, now: float) -> None:
    """Whether listener ``name`` answered at this attempt."""
    _notes.relays[name] = (answered, now)


def take_notes() -> Counters:
    """This process's notes since the last call (and forget them)."""
    global _notes
    notes, _notes = _notes, Counters()
    return notes


# --- the file ------------------------------------------------------------------------------


def load(state_dir: str) -> Counters:
    """The counters saved in a spool's ``state_dir`` (empty ones, with ``error`` set, when
    unreadable)."""
    path = os.path.join(state_dir, FILE)
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return Counters()
    except OSError as exc:
        out = Counters()
        out.error = f"{path}: {exc.strerror}"
        return out
    import json
    import stat

    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a plain file")
            return Counters.from_json(json.loads(f.read(4 * 1024 * 1024)))
    except (OSError, ValueError, RecursionError) as exc:
        out = Counters()
        out.error = f"{path}: unreadable ({exc}); counting starts again"
        return out


def merge(state_dir: str, notes: Counters, now: float) -> Counters:
    """Add ``notes`` to the counters in a spool's ``state_dir`` and save them; returns the new
    totals."""
    import fcntl

    lock_fd = -1
    try:
        lock_fd = os.open(
            os.path.join(state_dir, LOCK),
            os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK,
            0o600,
        )
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    except OSError as exc:
        if lock_fd >= 0:
            os.close(lock_fd)
        totals = load(state_dir)
        totals.add(notes)
        totals.error = f"{state_dir}: {exc.strerror}; counters not saved"
        return totals
    try:
        totals = load(state_dir)
        if not totals.since:
            totals.since = now
        totals.add(notes)
        if not notes.empty() or totals.error:
            error = totals.error
            totals.error = ""
            _save(state_dir, totals)
            totals.error = error
        return totals
    except OSError as exc:
        totals.error = f"{state_dir}/{FILE}: {exc.strerror}; counters not saved"
        return totals
    finally:
        os.close(lock_fd)


def _save(state_dir: str, counters: Counters) -> None:
    import json

    data = json.dumps(counters.as_json(), sort_keys=True).encode() + b"\n"
    path = os.path.join(state_dir, FILE)
    tmp = f"{path}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
