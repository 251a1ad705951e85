"""``mailshim log --summary``: pflogsumm's headline figures from mailshim's own log lines.

Counted as pflogsumm counts them, so the two agree on the same log: ``delivered`` is each
``status=sent`` line (one per recipient), ``deferrals`` each ``status=deferred`` line and
``deferred`` the messages with at least one, ``bounced`` each ``status=bounced`` line;
``expired`` (not in pflogsumm's headline) each recipient given up after its lifetime. A
line counts when its tag is ``mailshim`` or ``mailshim/PROGRAM`` (with a pid), whatever the
time stamp's form; ``--day`` keeps only lines of one day (``YYYY-MM-DD``, matched on the RFC
3339 stamp of the ``[log] file``, or ``Mon DD`` on a classic syslog line).

Trust: reads log files the administrator names or may read; the lines hold other users'
addresses and the listener's text, which are only matched, never printed.

Raises nothing (a line it does not know is skipped).
"""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

FIELDS = ("delivered", "deferred", "deferrals", "bounced", "expired")
# A delivery line after its queue id (delivery.py): the address up to its first ">", as
# pflogsumm reads it, then the relay, the delay and the status word.
_DELIVERY = re.compile(r"to=<[^>]*>, relay=[^,]+, delay=[^,]+, status=(\S+)")
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _message(line: str) -> str | None:
    """The text after a ``mailshim[pid]:`` or ``mailshim/x[pid]:`` tag; None without one."""
    at = line.find(" mailshim")
    while at >= 0:
        rest = line[at + 1 :]
        tag, sep, text = rest.partition(": ")
        name = tag.partition("[")[0]
        if sep and (name == "mailshim" or name.startswith("mailshim/")) and " " not in tag:
            return text
        at = line.find(" mailshim", at + 1)
    return None


def _on_day(line: str, day: str | None) -> bool:
    if day is None:
        return True
    if line.startswith(day + "T"):
        return True
    _, _, rest = day.partition("-")
    month, _, mday = rest.partition("-")
    if not (month.isdigit() and mday.isdigit() and 1 <= int(month) <= 12):
        return False
    return line.startswith(f"{_MONTHS[int(month) - 1]} {int(mday):>2} ") or line.startswith(
        f"{_MONTHS[int(month) - 1]} {int(mday):02d} "
    )


def summarize(lines: Iterable[str], day: str | None = None) -> dict[str, int]:
    """The counts of ``FIELDS`` in ``lines``.

    >>> summarize(["2026-01-02T03:04:05+00:00 h mailshim/smtp[1]: 0123456789ABCDEFGHIJ:"
    ...            " to=<a@b>, relay=r[::1]:25, delay=1, status=sent (250 ok)"])["delivered"]
    1
    """
    counts = dict.fromkeys(FIELDS, 0)
    deferred_ids: set[str] = set()
    for line in lines:
        if not _on_day(line, day):
            continue
        text = _message(line)
        if text is None:
            continue
        qid, _, rest = text.partition(": ")
        if rest.startswith("to=<"):
            # The status field's own place, read from the left as pflogsumm reads it: the
            # reply at the end is the listener's text and often echoes the address, which a
            # user chose ("x, status=sent (250 ok)"@example.org), so the last ", status="
            # may be theirs.
            m = _DELIVERY.match(rest)
            word = m.group(1) if m else ""
            if word == "sent":
                counts["delivered"] += 1
            elif word == "deferred":
                counts["deferrals"] += 1
                deferred_ids.add(qid)
            elif word == "bounced":
                counts["bounced"] += 1
        elif rest.startswith("moved to "):
            # one "<rcpt>: expired in the queue; ..." per recipient given up (policy.py)
            counts["expired"] += rest.count(">: expired in the queue; ")
    counts["deferred"] = len(deferred_ids)
    return counts


def format_summary(counts: dict[str, int]) -> str:
    """Aligned "figure  name" lines, pflogsumm's words."""
    words = {
        "delivered": "delivered",
        "deferred": "deferred",
        "deferrals": "deferrals",
        "bounced": "bounced",
        "expired": "expired",
    }
    width = max(len(str(v)) for v in counts.values())
    lines = []
    for key in FIELDS:
        label = words[key]
        if key == "deferred":
            label = f"deferred  ({counts['deferrals']} deferrals)"
        if key == "deferrals":
            continue
        lines.append(f"{counts[key]:>{width}}   {label}")
    return "\n".join(lines) + "\n"
