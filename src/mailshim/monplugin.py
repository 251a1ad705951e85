"""``mailshim check-queue``: the queue as a Nagios/Icinga check, after the Monitoring Plugins
development guidelines (https://www.monitoring-plugins.org/doc/guidelines.html).

One status line, ``MAILSHIM STATUS: text | perfdata``, and the exit code: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN (bad arguments, an unreadable configuration or spool). Perfdata is
``'label'=value[UOM];[warn];[crit];[min];[max]``: ``waiting`` (entries new, deferred or in the
drop folder), ``oldest`` (s), ``held``, ``dead``, ``stall`` (s) and ``size`` (B). Thresholds
are ranges as the guidelines define them: ``10`` (alert outside 0..10), ``10:`` (below 10),
``~:10`` (above 10), ``10:20`` (outside), ``@10:20`` (inside, ends included).

The stall is what a listener's own health check cannot see: mail is waiting and nothing has
been delivered for a while. Its value is 0 when nothing waits, else the shorter of "since the
last delivery" and "since the oldest waiting entry arrived". By default it warns at 15
minutes and is critical at an hour; the other thresholds are off until given.

No network: the figures come from the spool when the caller may read it (root, the runner
user), else from the summary the runner publishes after each pass (queuestats), which holds
counts and ages only. ``queue/`` and ``incoming/`` changing after that summary was written
means mail arrived that no pass has seen: it counts as waiting since that summary (the
latest change says only when the last of it came). ``--probe``
also runs ``mailshim check``'s connection to each listener.

Trust: any user, typically an unprivileged monitoring account, every minute. It reads what
that user may read and prints figures only: no address, subject or queue id.

Raises ``PluginError`` (the caller prints it as UNKNOWN and exits 3).
"""

from __future__ import annotations

import os
import time

from mailshim import queuestats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS_WORDS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
SERVICE = "MAILSHIM"
DEFAULT_STALL = ("900", "3600")  # warn, crit (seconds)


class PluginError(Exception):
    """Why the check could not be made (printed as UNKNOWN, exit 3)."""


class Range:
    """A threshold range of the guidelines: alert when the value is outside ``start..end``
    (or inside, with ``@``)."""

    __slots__ = ("end", "inside", "start", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        body = text[1:] if text.startswith("@") else text
        self.inside = text.startswith("@")
        start, sep, end = body.partition(":")
        if not sep:
            start, end = "0", body
        try:
            self.start = float("-inf") if start == "~" else _finite(start or "0")
            self.end = float("inf") if end == "" else _finite(end)
        except ValueError:
            raise PluginError(
                f"threshold {text!r} is not a range (10, 10:, ~:10, @10:20)"
            ) from None
        if self.start > self.end:
            raise PluginError(f"threshold {text!r}: the start is above the end")

    def alert(self, value: float) -> bool:
        """Whether ``value`` raises this threshold's alert.

        >>> [Range("10").alert(v) for v in (-1, 0, 10, 11)]
        [True, False, False, True]
        >>> [Range("@10:20").alert(v) for v in (9, 10, 20, 21)]
        [False, True, True, False]
        """
        within = self.start <= value <= self.end
        return within if self.inside else not within


def _finite(text: str) -> float:
    """A range's end: a number (float() also takes "nan" and "inf", which no range means:
    nan compares false with every value, so it would alert for good)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


class Metric:
    """One figure with its unit and thresholds."""

    __slots__ = ("crit", "label", "unit", "value", "warn")

    def __init__(
        self, label: str, value: float, unit: str = "", warn: str | None = None,
        crit: str | None = None,
    ) -> None:  # fmt: skip
        self.label = label
        self.value = value
        self.unit = unit
        self.warn = Range(warn) if warn else None
        self.crit = Range(crit) if crit else None

    def state(self) -> int:
        if self.crit is not None and self.crit.alert(self.value):
            return CRITICAL
        if self.warn is not None and self.warn.alert(self.value):
            return WARNING
        return OK

    def perfdata(self) -> str:
        warn = self.warn.text if self.warn else ""
        crit = self.crit.text if self.crit else ""
        value = int(self.value) if self.value == int(self.value) else round(self.value, 3)
        return f"'{self.label}'={value}{self.unit};{warn};{crit};0;"


class Figures:
    """What the check judges, from the spool or from the summary."""

    __slots__ = ("dead", "held", "last_delivery", "oldest", "size", "source", "waiting")

    def __init__(self) -> None:
        self.waiting = 0
        self.oldest = 0.0  # epoch of the oldest waiting entry (0: none)
        self.held = 0
        self.dead = 0
        self.size = 0
        self.last_delivery = 0.0
        self.source = ""


def from_snapshot(snap: queuestats.Snapshot) -> Figures:
    out = Figures()
    waiting = [snap.queues[q] for q in ("new", "deferred", "incoming")]
    out.waiting = sum(q.count for q in waiting)
    out.oldest = min((q.oldest for q in waiting if q.count), default=0.0)
    out.held = snap.queues["held"].count
    out.dead = snap.queues["dead"].count
    out.size = sum(q.size for name, q in snap.queues.items() if name != "dead")
    if snap.counters is not None:
        out.last_delivery = snap.counters.last_delivery
    return out


def from_summary(summary: queuestats.Summary, changed: float) -> Figures:
    """The summary's figures; a spool changed after it was written adds unseen mail."""
    snap = queuestats.Snapshot(summary.spool, summary.written)
    snap.queues.update(summary.queues)
    out = from_snapshot(snap)
    out.last_delivery = summary.last_delivery
    if changed > summary.written + 1:
        # Something arrived (or left) after the last pass, and no pass has seen it since.
        # This reader cannot list queue/: the latest change is all it sees, and counting from
        # it would restart the wait at each arrival (a stopped runner on a busy host would
        # stay OK for good). The unseen mail may have waited since the summary, and nothing
        # can have been delivered since (a pass would have written a new one); the timer
        # writes one every minute, so a running spool's summary is never that old.
        out.waiting = max(out.waiting, 1)
        out.oldest = min(out.oldest, summary.written) if out.oldest else summary.written
    return out


def gather(target_root: str, now: float) -> Figures:
    """The figures of the spool at ``target_root``: read directly when this user may, else
    from the runner's summary. Raises PluginError."""
    from mailshim import metrics
    from mailshim.errors import MailshimError
    from mailshim.spool import Spool

    target = Spool(target_root)
    if not os.path.isdir(target.root):
        raise PluginError(f"no spool at {target.root}")
    if os.access(target.queue, os.R_OK | os.X_OK) and os.access(
        target.state_dir, os.R_OK | os.X_OK
    ):
        figures = from_snapshot(metrics.collect(target, now))
        figures.source = "spool"
        return figures
    try:
        summary = queuestats.read_summary(target.root)
    except MailshimError as exc:
        raise PluginError(exc.message) from None
    figures = from_summary(summary, queuestats.changed_since(target.root))
    figures.source = f"summary of {_age(now - summary.written)} ago"
    return figures


def _age(seconds: float) -> str:
    from mailshim.queueview import age

    return age(seconds)


def stall(figures: Figures, now: float) -> float:
    """Seconds mail has waited with nothing delivered (0 when nothing waits)."""
    if not figures.waiting or not figures.oldest:
        return 0.0
    waited = now - figures.oldest
    if figures.last_delivery:
        waited = min(waited, now - figures.last_delivery)
    return max(0.0, waited)


def judge(
    figures: Figures, now: float, thresholds: dict[str, tuple[str | None, str | None]]
) -> tuple[int, str]:
    """(exit code, the one status line) for ``figures`` under ``thresholds``
    (label -> (warn, crit) range texts). Raises PluginError for a bad range."""
    oldest = max(0.0, now - figures.oldest) if figures.oldest else 0.0
    stalled = stall(figures, now)
    metrics = [
        Metric("waiting", figures.waiting, "", *thresholds.get("waiting", (None, None))),
        Metric("oldest", round(oldest), "s", *thresholds.get("oldest", (None, None))),
        Metric("held", figures.held, "", *thresholds.get("held", (None, None))),
        Metric("dead", figures.dead, "", *thresholds.get("dead", (None, None))),
        Metric("stall", round(stalled), "s", *thresholds.get("stall", DEFAULT_STALL)),
        Metric("size", figures.size, "B"),
    ]
    state = max(m.state() for m in metrics)
    why = [_why(m) for m in metrics if m.state() == state and state != OK]
    parts = [f"{figures.waiting} waiting"]
    if figures.waiting:
        parts[0] += f" (oldest {_age(oldest)})"
    parts.append(f"{figures.held} held")
    parts.append(f"{figures.dead} dead")
    if figures.last_delivery:
        parts.append(f"last delivery {_age(now - figures.last_delivery)} ago")
    else:
        parts.append("no delivery recorded")
    text = ", ".join(parts)
    if why:
        text = "; ".join(why) + " - " + text
    perf = " ".join(m.perfdata() for m in metrics)
    return state, f"{SERVICE} {STATUS_WORDS[state]}: {text} | {perf}"


def _why(metric: Metric) -> str:
    value = _age(metric.value) if metric.unit == "s" else f"{int(metric.value)}"
    if metric.label == "stall":
        return f"nothing delivered for {value} while mail waits"
    return f"{metric.label} {value}"


def _plain(text: str) -> str:
    """``text`` as one line without "|": Nagios and Icinga read whatever follows a "|" as
    perfdata, and this text holds paths and listeners' replies."""
    from mailshim.errors import one_line

    return one_line(text).replace("|", "/")


def unknown(message: str) -> str:
    """The status line for a check that could not be made."""
    return f"{SERVICE} UNKNOWN: {_plain(message)}"


def probe(config_path: str | None) -> tuple[int, str]:
    """``--probe``: ``mailshim check``'s connection to each listener; (state, words)."""
    from mailshim import check

    report = check.run(config_path, [])
    if report.exit_code == 0:
        return OK, "listener answers"
    first = next((f for f in report.findings if f.level == "error"), None)
    words = first.text if first is not None else f"mailshim check exit {report.exit_code}"
    return CRITICAL, _plain(words)


def run(
    config: Config,
    config_path: str | None,
    thresholds: dict[str, tuple[str | None, str | None]],
    *,
    spool_root: str | None,
    with_probe: bool,
) -> tuple[int, str]:
    """The whole check: (exit code, status line). Raises PluginError."""
    from mailshim import paths

    now = time.time()
    root = spool_root or config.queue_dir or paths.SYSTEM_SPOOL
    figures = gather(root, now)
    state, line = judge(figures, now, thresholds)
    if with_probe:
        probed, words = probe(config_path)
        if probed > state:
            head, _, perf = line.partition(" | ")
            text = head.split(": ", 1)[1]
            line = f"{SERVICE} {STATUS_WORDS[probed]}: {words}; {text} | {perf}"
            state = probed
    return state, line
