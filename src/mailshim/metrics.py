"""The Prometheus text format for ``mailshim metrics`` and node_exporter's textfile collector,
and what the runner does after each pass (counters, public summary, textfile).

Names follow telegraf's postfix input and the postfix exporters, so that a dashboard for one
reads like the other: ``mailshim_queue_length``, ``mailshim_queue_size_bytes`` and
``mailshim_queue_age_seconds`` per ``queue`` (telegraf's ``postfix_queue`` length, size and
age), ``mailshim_smtp_delivery_delay_seconds`` (a histogram by ``status``, as the exporters'
``postfix_smtp_delivery_delay_seconds``), ``mailshim_smtp_deliveries_total`` (by relay,
status and reply class), ``mailshim_relay_up`` (the exporters' ``postfix_up``, per listener),
``mailshim_last_delivery_timestamp_seconds`` and ``mailshim_limit_holds_total``.
``mailshim_info`` carries the schema version (``SCHEMA``); docs/monitoring.md lists every
metric, and a change of name, label or meaning is a new schema version.

``after_pass`` is the runner's one call at the end of a pass: merge this pass's notes into the
durable counters (mailstats), take the queue's figures (queuestats), publish the summary for
monitoring users and, when ``[monitoring] textfile_dir`` is set, write ``mailshim.prom``
there (a temporary name, then a rename: node_exporter never reads half a file; mode 0644 so
the exporter's user can read it). With the option unset nothing is written there.

Trust: the runner (root or the ``mailshim`` user; a user's agent on their own spool) writes;
the textfile folder is the administrator's (often writable by a group): the temporary file is
created with O_EXCL|O_NOFOLLOW under a random name, and the rename replaces only the name
``mailshim.prom`` itself. Label values come from the configuration (relay names, the spool
path) and constants, and are escaped as the format requires.

Raises nothing: ``after_pass`` logs why a file could not be written (once until it changes)
and never makes a pass fail.
"""

from __future__ import annotations

import os

from mailshim import __version__, maillog, mailstats, queuestats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.mailstats import Counters
    from mailshim.queuestats import Snapshot
    from mailshim.spool import Spool

SCHEMA = 1
TEXTFILE = "mailshim.prom"
_said: dict[str, str] = {}  # what after_pass last logged per spool: logged again only on change


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs) + "}"


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Out:
    """The text, one metric family at a time (HELP and TYPE once per family)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.seen: set[str] = set()

    def family(self, name: str, kind: str, text: str) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.lines.append(f"# HELP {name} {text}")
            self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: list[tuple[str, str]], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")


def render(snaps: list[Snapshot]) -> str:
    """The Prometheus text exposition (version 0.0.4) of ``snaps``, families grouped."""
    out = _Out()
    out.family("mailshim_info", "gauge", "mailshim's version and the metrics' schema version.")
    info = [("version", __version__), ("schema", str(SCHEMA))]
    # One per spool: the system spool's textfile and a user's lie side by side in
    # node_exporter's folder, and a series twice over is dropped with an error each scrape.
    for snap in snaps:
        out.sample("mailshim_info", [("spool", snap.spool), *info], 1)
    if not snaps:
        out.sample("mailshim_info", info, 1)
    families = (
        ("mailshim_queue_length", "Entries in each queue (new, deferred, held, dead, incoming)."),
        ("mailshim_queue_size_bytes", "Bytes of the entries in each queue."),
        ("mailshim_queue_age_seconds", "Age of the oldest entry in each queue (0 when empty)."),
    )
    for index, (name, text) in enumerate(families):
        out.family(name, "gauge", text)
        for snap in snaps:
            for queue, q in snap.queues.items():
                figure = (q.count, q.size, round(q.age(snap.taken)))[index]
                out.sample(name, [("spool", snap.spool), ("queue", queue)], figure)
    with_counters = [(s, s.counters) for s in snaps if s.counters is not None]
    _counters(out, with_counters)
    out.family("mailshim_metrics_timestamp_seconds", "gauge", "When these figures were taken.")
    for snap in snaps:
        out.sample("mailshim_metrics_timestamp_seconds", [("spool", snap.spool)], round(snap.taken))
    return "\n".join(out.lines) + "\n"


def _counters(out: _Out, pairs: list[tuple[Snapshot, Counters]]) -> None:
    name = "mailshim_smtp_deliveries_total"
    out.family(name, "counter", "Recipients by relay, outcome (sent, deferred, bounced, expired)"
               " and reply class (2xx, 4xx, 5xx, none: no reply).")  # fmt: skip
    for snap, c in pairs:
        for (relay, status, cls), count in sorted(c.deliveries.items()):
            labels = [("spool", snap.spool), ("relay", relay), ("status", status), ("class", cls)]
            out.sample(name, labels, count)
    name = "mailshim_smtp_delivery_delay_seconds"
    out.family(name, "histogram", "Time from arrival to each recipient's outcome, by status.")
    for snap, c in pairs:
        for status in mailstats.STATUSES:
            row = c.delays.get(status, [0.0] * (len(mailstats.BUCKETS) + 2))
            base = [("spool", snap.spool), ("status", status)]
            running = 0.0
            for bound, n in zip(mailstats.BUCKETS, row, strict=False):
                running += n
                out.sample(name + "_bucket", [*base, ("le", _num(bound))], running)
            running += row[len(mailstats.BUCKETS)]
            out.sample(name + "_bucket", [*base, ("le", "+Inf")], running)
            out.sample(name + "_sum", base, row[-1])
            out.sample(name + "_count", base, running)
    name = "mailshim_last_delivery_timestamp_seconds"
    out.family(name, "gauge", "When a recipient was last accepted by a listener (0: never).")
    for snap, c in pairs:
        out.sample(name, [("spool", snap.spool)], round(c.last_delivery))
    name = "mailshim_relay_up"
    out.family(name, "gauge", "Whether the listener answered at the last attempt (1) or not (0).")
    for snap, c in pairs:
        for relay, (up, _) in sorted(c.relays.items()):
            out.sample(name, [("spool", snap.spool), ("relay", relay)], 1 if up else 0)
    name = "mailshim_relay_last_attempt_timestamp_seconds"
    out.family(name, "gauge", "When the listener was last tried.")
    for snap, c in pairs:
        for relay, (_, when) in sorted(c.relays.items()):
            out.sample(name, [("spool", snap.spool), ("relay", relay)], round(when))
    name = "mailshim_limit_holds_total"
    out.family(name, "counter", "Entries held for their submitter's next sending window.")
    for snap, c in pairs:
        out.sample(name, [("spool", snap.spool)], c.limited)
    name = "mailshim_counters_start_timestamp_seconds"
    out.family(name, "gauge", "Since when the counters count (their last reset).")
    for snap, c in pairs:
        out.sample(name, [("spool", snap.spool)], round(c.since))


def textfile_name(config: Config, target: Spool) -> str:
    """``mailshim.prom`` for the system spool; a user's spool gets a name of its own."""
    from mailshim import paths

    if target.root == (config.queue_dir or paths.SYSTEM_SPOOL):
        return TEXTFILE
    return f"mailshim-uid{os.geteuid()}.prom"


def write_textfile(folder: str, name: str, text: str) -> str:
    """Put ``text`` in ``folder/name`` (temp + rename, mode 0644); "" or why it was not."""
    from mailshim import paths

    return paths.publish_file(os.path.join(folder, name), text.encode(), 0o644)


def collect(target: Spool, now: float, counters: Counters | None = None) -> Snapshot:
    """The figures of ``target`` with its counters (as saved, unless given)."""
    snap = queuestats.snapshot(target, now)
    snap.counters = counters if counters is not None else mailstats.load(target.state_dir)
    return snap


def after_pass(config: Config, target: Spool, now: float) -> None:
    """The runner's call after each pass over ``target`` (see the module docstring)."""
    problems = []
    counters = mailstats.merge(target.state_dir, mailstats.take_notes(), now)
    if counters.error:
        problems.append(counters.error)
    snap = collect(target, now, counters)
    why = queuestats.publish(target, snap)
    if why:
        problems.append(f"queue summary not published: {why}")
    folder = config.metrics_textfile_dir
    if folder is not None:
        why = write_textfile(folder, textfile_name(config, target), render([snap]))
        if why:
            problems.append(f"metrics textfile not written: {why}")
    said = "; ".join(problems)
    if said != _said.get(target.root, ""):
        _said[target.root] = said
        if said:
            maillog.log(f"monitoring: {said}", error=True)
