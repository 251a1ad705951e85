"""Acting on a backlog by what it is: choose queued entries by sender, recipient, submitting
user, age or ids (``Selection``), and summarize the queue by age and domain (``shape``, like
Postfix's ``qshape``).

A selection streams: the schedule index gives each entry's id and uid (spoolindex), the
envelope is read only when a sender, recipient or age must be compared, and nothing is kept
from one entry to the next, so choosing 90,000 of 100,000 holds no more than choosing one.
The shape holds one row of counters per domain.

Trust: runs as the administrator (root or the runner) or a user on their own spool. Entry
contents are other users' data: domains are reduced to one printable line before they are
shown; an entry that cannot be read matches no sender, recipient or age filter.

Raises ``UsageError`` (64) for a filter value that is not one (an unknown user, an age that
is not a duration); nothing else of its own.
"""

from __future__ import annotations

import time

from mailshim import spool, spoolindex
from mailshim.errors import DataError, UsageError, one_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from mailshim.spoolfmt import Envelope

SHAPE_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's default age buckets


def _address_test(pattern: str) -> tuple[str, str]:
    """("addr", x) for a whole address, ("domain", d) for ``@d`` or ``d``, ("null", "") for
    the null sender ``<>``; compared without case."""
    text = pattern.strip()
    if text in ("<>", ""):
        return "null", ""
    text = text.strip("<>").lower()
    if text.startswith("@"):
        return "domain", text[1:]
    if "@" not in text:
        return "domain", text
    return "addr", text


def _address_matches(tests: list[tuple[str, str]], address: str) -> bool:
    low = address.lower()
    for kind, value in tests:
        if kind == "null" and low == "":
            return True
        if kind == "addr" and low == value:
            return True
        if kind == "domain" and low and low.rpartition("@")[2] == value:
            return True
    return False


def parse_user(text: str) -> int:
    """A login name or a numeric uid."""
    if text.isdigit():
        return int(text)
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise UsageError(f"--user {text!r}: no such user (a login name or a uid)") from None


def parse_age(option: str, text: str) -> int:
    from mailshim.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: not an age such as 30m, 2h or 3d") from None


class Selection:
    """Which entries an action applies to: every test given must hold (several values of
    one test: any of them)."""

    def __init__(
        self,
        *,
        ids: Iterable[str] | None = None,
        senders: Iterable[str] = (),
        recipients: Iterable[str] = (),
        users: Iterable[int] = (),
        older_than: int | None = None,
        newer_than: int | None = None,
    ) -> None:
        self.ids = None if ids is None else {i.strip().rstrip("!*").upper() for i in ids}
        self.ids = None if self.ids is None else {i for i in self.ids if i}
        self.senders = [_address_test(s) for s in senders]
        self.recipients = [_address_test(r) for r in recipients]
        self.users = set(users)
        self.older_than = older_than
        self.newer_than = newer_than

    @property
    def filtered(self) -> bool:
        """Some test beyond ids was given."""
        return bool(
            self.senders
            or self.recipients
            or self.users
            or self.older_than is not None
            or self.newer_than is not None
        )

    @property
    def needs_envelope(self) -> bool:
        return bool(
            self.senders
            or self.recipients
            or self.older_than is not None
            or self.newer_than is not None
        )

    def row_may_match(self, qid: str, uid: int) -> bool:
        """The tests the index answers (id, uid) without opening the entry."""
        if self.ids is not None and qid not in self.ids:
            return False
        return not self.users or uid in self.users

    def envelope_matches(self, env: Envelope | None, now: float) -> bool:
        if not self.needs_envelope:
            return True
        if env is None:
            return False
        if self.users and env.uid not in self.users:
            return False
        if self.senders and not _address_matches(self.senders, env.sender):
            return False
        if self.recipients and not any(
            _address_matches(self.recipients, r) for r in env.recipients
        ):
            return False
        age = now - env.arrival
        if self.older_than is not None and age < self.older_than:
            return False
        return self.newer_than is None or age < self.newer_than

    def queued(self, spools: list[spool.Spool], now: float | None = None) -> Iterator[
        tuple[spool.Spool, str]
    ]:  # fmt: skip
        """The queued entries selected, spool after spool, in arrival order."""
        now = time.time() if now is None else now
        for target in spools:
            for row in spoolindex.rows(target):
                qid, uid = row[0], row[2]
                if not self.row_may_match(qid, uid):
                    continue
                if self.needs_envelope:
                    try:
                        env: Envelope | None = target.read_envelope(qid)
                    except FileNotFoundError:
                        continue  # delivered meanwhile
                    except (DataError, OSError):
                        env = None
                    if not self.envelope_matches(env, now):
                        continue
                yield target, qid

    def dead(self, spools: list[spool.Spool], now: float | None = None) -> Iterator[
        tuple[spool.Spool, str]
    ]:  # fmt: skip
        """The dead letters selected (for requeue)."""
        from mailshim import deadletters

        now = time.time() if now is None else now
        for target in spools:
            for qid in deadletters.ids(target):
                if self.ids is not None and qid not in self.ids:
                    continue
                if self.needs_envelope or self.users:
                    env = deadletters._envelope(target, qid)
                    if env is None or (self.users and env.uid not in self.users):
                        continue
                    if not self.envelope_matches(env, now):
                        continue
                yield target, qid


# --- the shape of the queue (qshape) ---------------------------------------------------


class Shape:
    """Entries per domain and age bucket; the first row is the total."""

    def __init__(self, minutes: tuple[int, ...] = SHAPE_MINUTES) -> None:
        self.minutes = minutes
        self.total = [0] * (len(minutes) + 1)
        self.domains: dict[str, list[int]] = {}

    def bucket(self, age_seconds: float) -> int:
        for i, limit in enumerate(self.minutes):
            if age_seconds < limit * 60:
                return i
        return len(self.minutes)

    def add(self, domains: Iterable[str], age_seconds: float) -> None:
        b = self.bucket(age_seconds)
        self.total[b] += 1
        for domain in domains:
            row = self.domains.get(domain)
            if row is None:
                row = self.domains[domain] = [0] * (len(self.minutes) + 1)
            row[b] += 1

    def rows(self, top: int = 0) -> list[tuple[str, list[int]]]:
        ranked = sorted(self.domains.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        if top > 0:
            ranked = ranked[:top]
        return [("TOTAL", self.total), *ranked]

    def as_dict(self, top: int = 0) -> dict[str, object]:
        labels = [f"<{m}m" for m in self.minutes] + [f">={self.minutes[-1]}m"]
        return {
            "buckets": labels,
            "rows": [
                {"domain": name, "total": sum(counts), "counts": counts}
                for name, counts in self.rows(top)
            ],
        }


def shape(spools: list[spool.Spool], by: str = "recipient", now: float | None = None) -> Shape:
    """The queue by age and by recipient (or sender) domain, reading each envelope once.
    An entry counts once per distinct domain among its recipients still to do."""
    now = time.time() if now is None else now
    out = Shape()
    for target in spools:
        for row in spoolindex.rows(target):
            qid = row[0]
            try:
                env = target.read_envelope(qid)
            except FileNotFoundError:
                continue
            except (DataError, OSError):
                out.add(["(unreadable)"], 0)
                continue
            if by == "sender":
                domains = {_domain(env.sender) or "(null sender)"}
            else:
                done: set[str] = set()
                if "s" in row[4]:
                    try:
                        st = target.stored_state(qid)
                    except (DataError, OSError):
                        st = None
                    if st is not None:
                        done = set(st.done) | set(st.failed)
                domains = {_domain(r) for r in env.recipients if r not in done}
            out.add(sorted(domains), now - env.arrival)
    return out


def _domain(address: str) -> str:
    return one_line(address.rpartition("@")[2].lower()) if address else ""


def format_shape(sh: Shape, top: int = 0) -> str:
    """qshape's layout: a row per domain, its total, then the counts by age (minutes)."""
    header = ["", "T", *(str(m) for m in sh.minutes), f"{sh.minutes[-1]}+"]
    rows = [[name, str(sum(counts)), *map(str, counts)] for name, counts in sh.rows(top)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = []
    for cells in [header, *rows]:
        first = cells[0].rjust(widths[0])
        rest = " ".join(cell.rjust(widths[c + 1]) for c, cell in enumerate(cells[1:]))
        lines.append(f"{first} {rest}")
    return "\n".join(lines) + "\n"
