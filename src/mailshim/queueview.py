"""Read-only views of the queue: ``mailq`` / ``sendmail -bp`` and ``mailshim queue``.

Trust: runs as any user; shows only spools that user can read (the per-user spool, and the
system spool for root and the ``mailshim`` user). Entry contents are other users' data: each
field is reduced to one printable line before it is shown.
"""

from __future__ import annotations

import sys
import time

from mailshim import spool
from mailshim.errors import DataError, one_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.spoolfmt import Envelope, State


class Item:
    """One queued message as shown to a person or a script."""

    __slots__ = ("envelope", "error", "queue_id", "spool", "state")

    def __init__(
        self,
        spool_: spool.Spool,
        queue_id: str,
        envelope: Envelope | None,
        state: State | None,
        error: str = "",
    ) -> None:
        self.spool = spool_
        self.queue_id = queue_id
        self.envelope = envelope
        self.state = state
        self.error = error

    def as_dict(self) -> dict[str, object]:
        env, st = self.envelope, self.state
        out: dict[str, object] = {"id": self.queue_id, "spool": self.spool.root}
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
                failed=st.failed,
                pending=st.pending,
            )
        return out


def collect(config: Config) -> list[Item]:
    items: list[Item] = []
    for target in spool.known_spools(config):
        for qid in target.ids():
            try:
                env = target.read_envelope(qid)
                state = target.load_state(qid)
            except (DataError, OSError) as exc:
                text = exc.message if isinstance(exc, DataError) else str(exc.strerror)
                items.append(Item(target, qid, None, None, text))
                continue
            items.append(Item(target, qid, env, state))
    return items


def age(seconds: float) -> str:
    """Compact age: 42s, 7m, 3h12m, 2d4h."""
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


def format_listing(items: list[Item], now: float) -> str:
    if not items:
        return "Mail queue is empty\n"
    lines = [f"{'-Queue ID-':<22}{'--Size--':>9} {'-Age-':>7}  -Sender/Recipient-"]
    total = 0
    for item in items:
        env, st = item.envelope, item.state
        if env is None:
            lines.append(f"{item.queue_id:<22}{'?':>9} {'?':>7}  (unreadable: {one_line(item.error)})")
            continue
        total += env.size
        flag = "!" if st is not None and st.held else ("*" if st and st.attempts == 0 else " ")
        sender = one_line(env.sender) or "<>"
        lines.append(
            f"{item.queue_id + flag:<22}{env.size:>9} {age(now - env.arrival):>7}  {sender}"
        )
        if st is not None and st.last_error:
            when = ""
            if st.next_attempt:
                when = f" [next try in {age(st.next_attempt - now)}]"
            lines.append(f"{'':<40}({one_line(st.last_error)}){when}")
        for rcpt in env.recipients:
            mark = ""
            if st is not None and rcpt in st.done:
                mark = " (delivered)"
            elif st is not None and rcpt in st.failed:
                mark = " (failed)"
            lines.append(f"{'':<40}{one_line(rcpt)}{mark}")
        lines.append("")
    count = len(items)
    lines.append(
        f"-- {max(1, (total + 1023) // 1024)} Kbytes in {count} Request{'s' if count != 1 else ''}."
    )
    return "\n".join(lines) + "\n"


def print_queue(config: Config) -> int:
    sys.stdout.write(format_listing(collect(config), time.time()))
    return 0
