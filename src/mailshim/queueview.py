"""Read-only views of the queue: ``mailq`` / ``sendmail -bp`` and ``mailshim queue``.

Two layouts of the same items: ``format_listing`` is Postfix's (a block per entry, recipients
under the sender, "-- N Kbytes in M Requests." last, "Mail queue is empty" when it is), for
people and scripts used to ``mailq``; ``format_table`` is one aligned row per entry with its
status, for ``mailshim queue``. Ages read "42s", "7m", "3h12m", "2d4h". Colour only on a
terminal, never with ``NO_COLOR`` set or ``TERM=dumb``.

Trust: runs as any user; shows only spools that user can read (the per-user spool, and the
system spool for root and the ``mailshim`` user). Entry contents are other users' data: each
field is reduced to one printable line before it is shown.

Raises nothing of its own: an entry or state that cannot be read is listed as such, and
``print_queue`` returns 0.
"""

from __future__ import annotations

import itertools
import os
import stat
import sys
import time

from mailshim import paths, spool, spoolchoice, spoolfmt, spoolmarks
from mailshim.errors import DataError, one_line
from mailshim.paint import painter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from mailshim.config import Config
    from mailshim.deadletters import DeadItem
    from mailshim.reply import Reply
    from mailshim.spoolfmt import Envelope, State

_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0) | os.O_NONBLOCK

STYLES = {
    "id": "1",
    "held": "33",
    "deferred": "33",
    "failed": "31",
    "error": "31",
    "delivered": "32",
    "new": "36",
    "waiting": "33",
    "dim": "2",
    "partial": "33",
    "unreadable": "31;1",
}


JSON_SCHEMA = 1  # the shape of `queue --json` (docs/monitoring.md); a new shape, a new number


def json_doc(key: str, items: list[dict[str, object]]) -> dict[str, object]:
    """``mailshim queue --json``'s document: ``{"schema": 1, KEY: [item, ...]}``."""
    return {"schema": JSON_SCHEMA, key: items}


class Item:
    """One queued message as shown to a person or a script."""

    __slots__ = (
        "down_since",
        "down_until",
        "drop_id",
        "envelope",
        "error",
        "queue_id",
        "spool",
        "state",
    )

    def __init__(
        self,
        spool_: spool.Spool,
        queue_id: str,
        envelope: Envelope | None,
        state: State | None,
        error: str = "",
        drop_id: str = "",
    ) -> None:
        self.spool = spool_
        self.queue_id = queue_id
        self.envelope = envelope
        self.state = state
        self.error = error
        self.drop_id = drop_id  # a user's own entry seen through its view: her drop id
        # The spool's listener-down mark (Spool.relay_down_since) and when the pause after
        # it ends: an entry never tried meanwhile waits for the listener, it is not "new".
        self.down_since = 0.0
        self.down_until = 0.0

    @property
    def status(self) -> str:
        """held | new | waiting | deferred | partial | unreadable.

        waiting: never tried, and the listener was found unreachable (the spool's mark):
        it goes when the listener answers again, not at once as "new" would say."""
        st = self.state
        if self.envelope is None:
            return "unreadable"
        if st is None or (st.attempts == 0 and not st.held and not st.done and not st.failed):
            return "waiting" if self.down_since else "new"
        if st.held:
            return "held"
        if st.done or st.failed:
            return "partial"
        return "deferred"

    def next_try(self, now: float) -> str:
        """ "due now", "in 4m", or "" (held, or nothing scheduled)."""
        if self.status == "waiting":
            return "due now" if self.down_until <= now else f"in {age(self.down_until - now)}"
        return _next_try(self.state, now)

    def as_dict(self) -> dict[str, object]:
        env, st = self.envelope, self.state
        out: dict[str, object] = {"id": self.queue_id, "spool": self.spool.root}
        if self.drop_id:
            out["submitted_as"] = self.drop_id
        out["status"] = self.status
        if env is None:
            out["error"] = self.error
            return out
        out.update(
            size=env.size,
            arrival=env.arrival,
            sender=env.sender,
            recipients=env.recipients,
            uid=env.uid,
        )
        if st is not None:
            out.update(
                attempts=st.attempts,
                next_attempt=st.next_attempt,
                held=st.held,
                last_error=st.last_error,
                done=sorted(st.done),
                failed={rcpt: str(reply) for rcpt, reply in st.failed.items()},
                pending={rcpt: str(reply) for rcpt, reply in st.pending.items()},
            )
        if self.status == "waiting":
            out.update(listener_down_since=self.down_since, next_attempt=self.down_until)
        return out


WINDOW = 1000  # entries a listing holds to size its columns; the rest stream by those widths


def iter_items(config: Config) -> Iterator[Item]:
    """The queued messages: what waits in drop folders and the user's own, then one spool
    after another, each in arrival order (the schedule index's order: spoolindex), read one
    at a time: memory does not grow with the queue."""
    from mailshim import spoolindex

    known = spoolchoice.known_spools(config)
    marks: dict[str, float | None] = {}
    # The drop folders' entries first (few: the runner takes them within seconds).
    for target in known:
        yield from _marked(config, _drop_items(target, mine=False), marks)
    yield from _marked(config, own_items(config, known), marks)
    for target in known:
        since = target.relay_down_since()
        until = since + config.down_pause if since else 0.0
        for row in spoolindex.rows(target):
            # "-": no state file when the index was read: none is looked for.
            item = read_item(target, row[0], stateless=row[4] == "-")
            if item is not None:
                if since:  # as _marked does, looked up once per spool
                    item.down_since, item.down_until = since, until
                yield item


def read_item(target: spool.Spool, qid: str, stateless: bool = False) -> Item | None:
    """One entry with its state; None when it left meanwhile (delivered while we looked)."""
    try:
        env = target.read_envelope(qid)
        state = spoolfmt.State() if stateless else target.load_state(qid)
    except FileNotFoundError:
        return None
    except (DataError, OSError) as exc:
        text = exc.message if isinstance(exc, DataError) else str(exc.strerror)
        return Item(target, qid, None, None, text)
    return Item(target, qid, env, state)


def collect(config: Config) -> list[Item]:
    """Every queued message (all held at once: for small queues and tests; listings stream
    with ``iter_items``)."""
    return list(iter_items(config))


def _marked(
    config: Config, items: Iterable[Item], marks: dict[str, float | None]
) -> Iterator[Item]:
    """``items`` with the spool's listener-down mark (``mark_waiting``), looked up once."""
    for item in items:
        root = item.spool.root
        if root not in marks:
            marks[root] = item.spool.relay_down_since()
        since = marks[root]
        if since:
            item.down_since = since
            item.down_until = since + config.down_pause
        yield item


def _window(items: Iterable[Item]) -> tuple[list[Item], Iterator[Item]]:
    """The first ``WINDOW`` items (to size columns by) and an iterator over the rest."""
    it = iter(items)
    return list(itertools.islice(it, WINDOW)), it


def json_lines(key: str, items: Iterable[Item]) -> Iterator[str]:
    """``json_doc(key, [item.as_dict(), ...])`` as text, one item at a time: the same text
    as ``json.dumps(doc, indent=2)`` and a newline, without holding the list."""
    import json

    yield f'{{\n  "schema": {JSON_SCHEMA},\n  {json.dumps(key)}: ['
    first = True
    for item in items:
        yield ("\n    " if first else ",\n    ") + indented_json(item.as_dict(), "    ")
        first = False
    yield "]\n}\n" if first else "\n  ]\n}\n"


def indented_json(value: object, indent: str = "") -> str:
    """``json.dumps(value, indent=2)`` (each line after the first led by ``indent``), for
    what an item holds: tables, lists, text, numbers, true/false/null. The same text; with
    an indent, ``json`` encodes in Python, which cost 20 µs an item of ``queue --json``
    (100,000 of them); here the text goes through its C encoder."""
    from json.encoder import encode_basestring_ascii as text

    def dump(value: object, indent: str) -> str:
        if type(value) is str:
            return text(value)
        if type(value) is int:
            return int.__repr__(value)
        if value is None or value is True or value is False:
            return "null" if value is None else ("true" if value else "false")
        inner = indent + "  "
        if type(value) is dict:
            if not value:
                return "{}"
            parts = []
            for k, v in value.items():
                kind = type(v)  # the common leaves here, the rest through dump
                if kind is str:
                    cell = text(v)
                elif kind is int:
                    cell = int.__repr__(v)
                elif kind is bool:
                    cell = "true" if v else "false"
                else:
                    cell = dump(v, inner)
                parts.append(f"{inner}{text(str(k))}: {cell}")
            return "{\n" + ",\n".join(parts) + "\n" + indent + "}"
        if type(value) is list:
            if not value:
                return "[]"
            parts = [inner + dump(v, inner) for v in value]
            return "[\n" + ",\n".join(parts) + "\n" + indent + "]"
        import json  # anything else (a float, a subclass): as json writes it, indent and all

        return json.dumps(value, indent=2).replace("\n", "\n" + indent)

    return dump(value, indent)


def mark_waiting(config: Config, items: list[Item]) -> None:
    """Entries never tried while their spool's listener-down mark stands wait for it."""
    for _ in _marked(config, items, {}):
        pass


def own_items(config: Config, known: list[spool.Spool] | None = None) -> list[Item]:
    """A user's own entries in the system spool she may not list: those still in its drop
    folder, and (through their views, ownview.py) those the runner has taken into its
    private queue, with their state. Empty for whoever may list that spool."""
    from mailshim import dropagent, ownview

    system = spool.Spool(config.queue_dir or paths.SYSTEM_SPOOL)
    if known is None:
        known = spoolchoice.known_spools(config)
    if any(t.root == system.root for t in known) or not system.droppable():
        return []
    notes = dict(ownview.noted(system.root))
    views = ownview.exists(system.root)
    now = time.time()
    out = []
    for qid in sorted(set(notes) | set(dropagent.noted(system.root))):
        if not spoolfmt.valid_id(qid):
            continue
        there = _drop_item(system, qid, mine=True)
        if isinstance(there, Item):
            out.append(there)
        if there is not None:
            continue
        # Not in the drop folder: pickup writes the view before it removes the original,
        # and delivery removes the view after the entry, so one of the two is found.
        seen = ownview.read(system.root, qid)
        if seen is not None:
            env, state = seen
            out.append(Item(system, env.queue_id, env, state, drop_id=qid))
        elif qid in notes and (views or now - notes[qid] > ownview.NOTES_KEPT):
            ownview.forget(system.root, qid)  # delivered, refused or bounced: done
    return out


def unseen(config: Config) -> list[str]:
    """Queue folders that exist but this user may not read (the system spool's private
    queue/, for a user): a listing says so rather than "empty" (issue 23)."""
    root = config.queue_dir or paths.SYSTEM_SPOOL
    queue = os.path.join(root, "queue")
    if os.path.isdir(queue) and not os.access(queue, os.R_OK | os.X_OK):
        return [queue]
    return []


def _drop_items(target: spool.Spool, mine: bool) -> list[Item]:
    """Every entry in ``target``'s drop folder, for whoever may list it (root, the runner)."""
    try:
        ids = sorted(os.listdir(target.incoming))
    except OSError:
        return []
    out = []
    for qid in ids:
        if spoolfmt.valid_id(qid):
            item = _drop_item(target, qid, mine)
            if isinstance(item, Item):
                out.append(item)
    return out


def _drop_item(target: spool.Spool, qid: str, mine: bool) -> Item | bool | None:
    """``incoming/<qid>`` as an item; None when there is none, False when it is not the
    caller's (``mine``) or not a plain file."""
    try:
        fd = os.open(os.path.join(target.incoming, qid), _OPEN)
    except OSError:
        return None  # picked up, delivered, or never there
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (mine and st.st_uid != os.geteuid()):
            return False
        try:
            env, _ = spoolfmt.decode_envelope(f)
        except DataError as exc:
            return Item(target, qid, None, None, f"in the drop folder: {exc.message}")
    env.uid = st.st_uid  # the owner as the kernel knows it, as pickup takes it
    return Item(target, qid, env, None)


def age(seconds: float) -> str:
    """Compact age: 42s, 7m, 3h12m, 2d4h.

    >>> age(11520)
    '3h12m'
    """
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def human_size(size: int) -> str:
    """Bytes for a column: 812, 1.2K, 34K, 5.6M, 1.1G.

    >>> human_size(1234)
    '1.2K'
    """
    value = float(size)
    for unit in ("", "K", "M", "G"):
        if value < 1000 or unit == "G":
            if not unit:
                return str(size)
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return str(size)  # pragma: no cover


def use_color(stream: object = None) -> bool:
    """Colour only on a terminal, never with NO_COLOR set (https://no-color.org) or TERM=dumb."""
    target = sys.stdout if stream is None else stream
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(target, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # closed stream
        return False


def _waiting_note(item: Item, now: float) -> str:
    return f"not tried yet: the listener was unreachable {age(now - item.down_since)} ago"


def _next_try(st: State | None, now: float) -> str:
    if st is None or st.held or not st.next_attempt:
        return ""
    if st.next_attempt <= now:
        return "due now"
    return f"in {age(st.next_attempt - now)}"


# --- mailshim queue show: one entry, for a person -----------------------------------------


def when(t: float, now: float) -> str:
    """A local date with how long ago (or until) it is: "2026-12-02 02:00:55 +0100 (3h12m ago)"."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))
    if t <= now:
        return f"{stamp} ({age(now - t)} ago)"
    return f"{stamp} (in {age(t - now)})"


def _replies(table: dict[str, Reply]) -> list[str]:
    return [f"<{one_line(rcpt)}>: {one_line(str(reply))}" for rcpt, reply in table.items()]


def show_fields(item: Item, now: float) -> list[tuple[str, list[str]]]:
    """(label, lines) for ``mailshim queue show``: human dates and sizes; empty fields left
    out. ``Item.as_dict`` keeps the raw values (``--json``)."""
    env, st = item.envelope, item.state
    out: list[tuple[str, list[str]]] = [("id", [item.queue_id]), ("status", [item.status])]
    if item.drop_id:
        out.append(("submitted as", [item.drop_id]))
    if item.status == "waiting":
        out.append(("waiting", [_waiting_note(item, now)]))
        out.append(("next attempt", [when(max(item.down_until, now), now)]))
    if env is None:
        return [*out, ("error", [one_line(item.error)]), ("spool", [item.spool.root])]
    size = human_size(env.size)
    out.append(("size", [f"{size} ({env.size} bytes)" if size != str(env.size) else size]))
    out.append(("arrived", [when(env.arrival, now)]))
    out.append(("sender", [one_line(env.sender) or "<> (null sender: a bounce)"]))
    out.append(("recipients", [one_line(r) for r in env.recipients]))
    try:
        import pwd

        owner = f"{pwd.getpwuid(env.uid).pw_name} (uid {env.uid})"
    except (KeyError, OverflowError):
        owner = f"uid {env.uid}"
    out.append(("submitted by", [owner]))
    if st is not None:
        if st.held:
            out.append(("held", ["yes: not delivered until released (mailshim queue release)"]))
        if st.attempts or st.throttled:
            tries = f"{st.attempts}"
            if st.throttled:
                tries += f" (and {st.throttled} slowed down by the listener)"
            out.append(("attempts", [tries]))
        if st.last_attempt:
            out.append(("last attempt", [when(st.last_attempt, now)]))
        if st.next_attempt and not st.held:
            out.append(("next attempt", [when(st.next_attempt, now)]))
        if st.last_error:
            out.append(("last error", [one_line(st.last_error)]))
        for label, table in (
            ("delivered to", st.done),
            ("failed", st.failed),
            ("waiting for", st.pending),
        ):
            if table:
                out.append((label, _replies(table)))
    out.append(("spool", [item.spool.root]))
    return out


def format_show(item: Item, now: float) -> str:
    """The fields of ``show_fields`` as aligned "label: value" lines, lists one per line."""
    fields = show_fields(item, now)
    width = max(len(label) for label, _ in fields) + 1
    lines = []
    for label, values in fields:
        first, *rest = values or [""]
        lines.append(f"{label + ':':<{width}} {first}".rstrip())
        lines.extend(f"{'':<{width}} {v}" for v in rest)
    return "\n".join(lines) + "\n"


# --- mailq: Postfix's layout ------------------------------------------------------------


def format_listing(items: Iterable[Item], now: float, color: bool = False) -> str:
    """``mailq`` as one string (see ``listing_lines``)."""
    return "".join(listing_lines(items, now, color))


def listing_lines(items: Iterable[Item], now: float, color: bool = False) -> Iterator[str]:
    """``mailq``: a block per entry, Postfix style, with the age instead of the arrival date;
    text in pieces, as the entries are read (columns sized by the first ``WINDOW``).

    The id is followed by ``!`` when the entry is held; the last error comes in parentheses
    before the recipients, as Postfix shows it.
    """
    head, rest = _window(items)
    if not head:
        yield "Mail queue is empty\n"
        return
    paint = painter(color, STYLES)
    id_width = max(10, max(len(i.queue_id) for i in head) + 1)
    size_width = max([8, *(len(str(i.envelope.size)) for i in head if i.envelope is not None)])
    head_id = "-Queue ID-".ljust(id_width)
    head_size = "--Size--".rjust(size_width)
    yield f"{head_id} {head_size} {'-Age-':>7}  -Sender/Recipient-------\n"
    indent = " " * (id_width + 1 + size_width + 1 + 7 + 2)
    total = count = 0
    for item in itertools.chain(head, rest):
        count += 1
        lines = []
        env, st = item.envelope, item.state
        if env is None:
            cell = item.queue_id.ljust(id_width)
            lines.append(
                f"{paint('id', cell)} {'?':>{size_width}} {'?':>7}  "
                + paint("unreadable", f"(unreadable: {one_line(item.error)})")
            )
            yield "\n".join(lines) + "\n\n"
            continue
        total += env.size
        held = st is not None and st.held
        cell = (item.queue_id + ("!" if held else "")).ljust(id_width)
        sender = _sender(env, "MAILER-DAEMON")
        lines.append(
            f"{paint('id', cell)} {env.size:>{size_width}} {age(now - env.arrival):>7}  {sender}"
        )
        if item.status == "waiting":
            note = f"({_waiting_note(item, now)})"
            lines.append(indent + paint("waiting", note) + f" [next try {item.next_try(now)}]")
        elif st is not None and st.last_error:
            note = f"({one_line(st.last_error)})"
            when = _next_try(st, now)
            lines.append(indent + paint("error", note) + (f" [next try {when}]" if when else ""))
        elif held:
            lines.append(indent + paint("held", "(held: no delivery until released)"))
        for rcpt in env.recipients:
            lines.append(indent + _recipient(rcpt, st, paint))
        yield "\n".join(lines) + "\n\n"
    kbytes = (total + 1023) // 1024
    yield f"-- {kbytes} Kbytes in {count} Request{'s' if count != 1 else ''}.\n"


_logins: dict[int, str] = {}


def _sender(env: Envelope, null: str) -> str:
    """The sender, and the submitting user next to it when it is not theirs (issue 12)."""
    if not env.sender:
        return null
    shown = one_line(env.sender)
    if env.uid == 0:
        return shown
    login = _logins.get(env.uid)
    if login is None:
        import pwd

        try:
            login = pwd.getpwuid(env.uid).pw_name
        except KeyError:
            login = f"uid {env.uid}"
        _logins[env.uid] = login
    if env.sender.rpartition("@")[0].lower() != login.lower():
        shown += f" (from {one_line(login)})"
    return shown


def _recipient(rcpt: str, st: State | None, paint: Callable[[str, str], str]) -> str:
    text = one_line(rcpt)
    if st is not None and rcpt in st.done:
        return paint("dim", f"{text} (delivered)")
    if st is not None and rcpt in st.failed:
        return paint("failed", f"{text} (failed: {one_line(str(st.failed[rcpt]))})")
    return text


def print_queue(config: Config) -> int:
    """``mailq``: Postfix's listing, then one line about dead letters when there are any;
    printed as the entries are read."""
    from mailshim import deadletters, ownview

    out = sys.stdout
    items = iter_items(config)
    first = list(itertools.islice(items, 1))
    hidden = unseen(config)
    # Never "Mail queue is empty" about a queue this user could not read.
    if first or not hidden:
        for piece in listing_lines(itertools.chain(first, items), time.time(), use_color(out)):
            out.write(piece)
    for queue in hidden:
        if ownview.exists(os.path.dirname(queue)):
            if not first:
                out.write("No message of yours is queued (by your sendmail's notes)\n")
            out.write(
                f"-- other users' messages in {queue} are private; root's mailq lists them all\n"
            )
        else:
            out.write(
                f"-- {queue} is private to the mailshim user: your messages there are not"
                " listed; mailshim log ID follows one, root's mailq lists them all\n"
            )
    dead = deadletters.count(config)
    if dead:
        out.write(
            f"-- {dead} dead letter{'s' if dead != 1 else ''} (failed for good):"
            " mailshim queue --dead lists them\n"
        )
    out.write(held_lines(config))
    return 0


def held_lines(config: Config) -> str:
    """Why mail waits in the system spool's drop folder (its owners over their budget, as
    the runner last wrote): every user's for those who may list it, else the caller's own."""
    from mailshim import paths, spool

    target = spool.Spool(config.queue_dir or paths.SYSTEM_SPOOL)
    try:
        uids = sorted(
            int(n[len(spoolmarks.HELD_NOTICE) :])
            for n in os.listdir(target.incoming)
            if n.startswith(spoolmarks.HELD_NOTICE) and n[len(spoolmarks.HELD_NOTICE) :].isdigit()
        )
    except OSError:
        uids = [os.geteuid()]
    out = ""
    for uid in uids:
        why = target.held_notice(uid)
        if why:
            out += f"-- uid {uid}: mail waits in the drop folder: {one_line(why)}\n"
    return out


def format_dead(items: list[DeadItem], now: float, color: bool = False) -> str:
    """``mailshim queue --dead``: one row per dead letter, its reason below it."""
    if not items:
        return "No dead letters\n"
    paint = painter(color, STYLES)
    header = ("ID", "DEAD FOR", "SIZE", "SENDER", "RECIPIENTS")
    rows = []
    for item in items:
        env = item.envelope
        rcpts = [one_line(r) for r in env.recipients] if env else []
        shown = rcpts[0] + (f" +{len(rcpts) - 1}" if len(rcpts) > 1 else "") if rcpts else "?"
        rows.append((
            item.queue_id,
            age(max(0.0, now - item.buried)),
            human_size(env.size) if env else "?",
            (one_line(env.sender) or "<>") if env else "?",
            shown,
        ))  # fmt: skip
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(widths[c]) if c in (1, 2) else cell.ljust(widths[c])
            for c, cell in enumerate(cells)
        ).rstrip()

    lines = [paint("dim", line(header))]
    for item, cells in zip(items, rows, strict=True):
        lines.append(paint("failed", line(cells)))
        if item.reason:
            lines.append(" " * (widths[0] + 2) + paint("error", one_line(item.reason)))
    count = len(items)
    lines.append("")
    lines.append(
        f"{count} dead letter{'s' if count != 1 else ''}:"
        " mailshim queue requeue ID puts one back; [queue] keep_dead ages them out"
    )
    return "\n".join(lines) + "\n"


# --- mailshim queue: one row per entry ------------------------------------------------


def format_table(items: Iterable[Item], now: float, color: bool = False) -> str:
    """``mailshim queue`` as one string (see ``table_lines``)."""
    return "".join(table_lines(items, now, color))


def _table_cells(item: Item, now: float) -> tuple[str, ...]:
    env, st = item.envelope, item.state
    if env is None:
        return (item.queue_id, "?", "?", "?", "unreadable", "", "")
    status = item.status
    when = item.next_try(now)
    if status in ("deferred", "waiting") and when:
        status = f"{status}, next {when}"
    rcpts = env.recipients
    shown = one_line(rcpts[0]) + (f" +{len(rcpts) - 1}" if len(rcpts) > 1 else "") if rcpts else ""
    return (
        item.queue_id,
        age(now - env.arrival),
        human_size(env.size),
        str(st.attempts if st is not None else 0),
        status,
        _sender(env, "<>"),
        shown,
    )


def table_lines(items: Iterable[Item], now: float, color: bool = False) -> Iterator[str]:
    """``mailshim queue``: aligned columns, one row per entry, its last error below it; in
    pieces as the entries are read (columns sized by the first ``WINDOW``)."""
    head, rest = _window(items)
    if not head:
        yield "Mail queue is empty\n"
        return
    paint = painter(color, STYLES)
    header = ("ID", "AGE", "SIZE", "TRIES", "STATUS", "SENDER", "RECIPIENTS")
    sized = [_table_cells(item, now) for item in head]
    widths = [max(len(header[c]), *(len(r[c]) for r in sized)) for c in range(len(header))]
    right = {1, 2, 3}

    def line(cells: tuple[str, ...], styles: tuple[str | None, ...]) -> str:
        out = []
        for c, cell in enumerate(cells):
            padded = cell.rjust(widths[c]) if c in right else cell.ljust(widths[c])
            if c == len(cells) - 1:
                padded = cell
            style = styles[c]
            out.append(paint(style, padded) if style else padded)
        return "  ".join(out).rstrip()

    yield line(header, ("dim",) * len(header)) + "\n"
    counts: dict[str, int] = {}
    total = count = 0
    window = len(sized)
    for n, item in enumerate(itertools.chain(head, rest)):
        cells = sized[n] if n < window else _table_cells(item, now)
        if n == window - 1:
            sized = []  # the window is printed: let it go
        count += 1
        status = item.status
        counts[status] = counts.get(status, 0) + 1
        total += item.envelope.size if item.envelope else 0
        text = line(cells, ("id", None, None, None, status, None, None)) + "\n"
        note = ""
        if item.envelope is None:
            note = f"unreadable: {one_line(item.error)}"
        elif status == "waiting":
            note = _waiting_note(item, now)
        elif item.state is not None and item.state.last_error:
            note = one_line(item.state.last_error)
        if note:
            text += " " * (widths[0] + 2) + paint("error", note) + "\n"
        yield text
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    size = f"{total} bytes" if total < 1000 else human_size(total)
    yield f"\n{count} message{'s' if count != 1 else ''}, {size}: {summary}\n"
