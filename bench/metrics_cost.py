"""What the monitoring figures cost a pass, at 10,000 queued (issue 25: under 5 %).

Two passes, in this process (the runner's own code, ``runner.flush``), against a real SMTP
listener (bench/listener.py in its own process):

- **run, nothing due**: 10,000 deferred entries (each with a state file, next attempt in an
  hour), ``mailshim run``'s pass: it reads every state and sends nothing. The cheapest pass
  there is at this size, so the hardest ratio: ``metrics.after_pass`` then scans the same
  10,000 entries and their states.
- **flush, all delivered**: 10,000 new entries delivered over the default sessions. The
  metrics' part is the per-recipient notes during the pass (timed by a wrapper around
  ``mailstats.delivery``) plus ``after_pass`` at the end.

``metrics.after_pass`` (counters merged and saved, the queue scanned, the summary published,
the textfile rendered and written) is wrapped to time it alone; the pass's own time is the
rest. Each figure is the median of ``--rounds`` rounds. Prints Markdown (machine included).

    .venv/bin/python bench/metrics_cost.py [--count 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

from benchlib import Listener, free_port, loadavg, machine  # noqa: E402

from mailshim import configload, mailstats, metrics, runner, spool  # noqa: E402
from mailshim.spoolfmt import State  # noqa: E402

BODY = b"From: cron@example.org\r\nSubject: job output\r\n\r\n" + b"x" * 2000 + b"\r\n"


class Timed:
    """Wrap ``owner.name`` and add up the time spent in it."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name
        self.inner = getattr(owner, name)
        self.spent = 0.0
        self.calls = 0

        def wrapper(*args: object, **kw: object) -> object:
            start = time.perf_counter()
            try:
                return self.inner(*args, **kw)
            finally:
                self.spent += time.perf_counter() - start
                self.calls += 1

        setattr(owner, name, wrapper)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.inner)


def fill(target: spool.Spool, count: int, *, deferred: bool) -> None:
    """Queue ``count`` entries through the spool's own writer. Setting up only: fsync is
    skipped (10,000 fsyncs would take minutes and measure nothing of interest here)."""
    target.ensure()
    later = int(time.time()) + 3600
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        _fill(target, count, deferred, later)
    finally:
        os.fsync = real_fsync


def _fill(target: spool.Spool, count: int, deferred: bool, later: int) -> None:
    for _ in range(count):
        w = target.new_entry("cron@example.org", ["admin@example.org"], os.getuid())
        w.write(BODY)
        w.commit(False)
        if deferred:
            state = State()
            state.attempts = 1
            state.first_attempt = state.last_attempt = int(time.time())
            state.next_attempt = later
            state.last_error = "451 4.3.0 try later"
            target.save_state(w.queue_id, state, sync=False)


def one_round(work: Path, port: int, count: int, deferred: bool) -> tuple[float, float, float]:
    """(pass seconds without the metrics, after_pass seconds, notes seconds)."""
    root = work / "spool"
    shutil.rmtree(root, ignore_errors=True)
    textfile = work / "textfile"
    textfile.mkdir(exist_ok=True)
    cfg_path = work / "config.toml"
    cfg_path.write_text(
        f'[relay]\nhost = "127.0.0.1"\nport = {port}\ntimeout = 30\nhelo = "bench.example.org"\n'
        f'[addresses]\ndomain = "example.org"\n[queue]\ndir = "{root}"\n'
        f'[delivery]\nmode = "queue"\n[limits]\nuser_messages = 0\nuser_recipients = 0\n'
        f'[monitoring]\ntextfile_dir = "{textfile}"\n'
    )
    cfg = configload.load(str(cfg_path), use_cache=False)
    target = spool.Spool(str(root))
    fill(target, count, deferred=deferred)
    after = Timed(metrics, "after_pass")
    notes = Timed(mailstats, "delivery")
    try:
        start = time.perf_counter()
        runner.flush(cfg, [target], force=not deferred)
        total = time.perf_counter() - start
    finally:
        after.restore()
        notes.restore()
    if deferred:
        assert len(target.ids()) == count, "the run pass must leave every entry"
    else:
        assert not target.ids(), f"{len(target.ids())} left"
    assert (textfile / "mailshim.prom").exists()
    # the notes run inside the pass: they are the metrics' share of it, not the pass's own
    return total - after.spent - notes.spent, after.spent, notes.spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ["MAILSHIM_NO_SYSLOG"] = "1"
    work = Path(tempfile.mkdtemp(prefix="mailshim-metrics-bench-"))
    listener = Listener(free_port())
    rows = []
    try:
        for name, deferred in (("run, nothing due", True), ("flush, all delivered", False)):
            passes, afters, notes = [], [], []
            for _ in range(args.rounds):
                p, a, n = one_round(work, listener.port, args.count, deferred)
                passes.append(p)
                afters.append(a)
                notes.append(n)
            p, a, n = (statistics.median(v) for v in (passes, afters, notes))
            rows.append((name, p, a, n, (a + n) / p * 100))
    finally:
        listener.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"Machine: {machine()}  \nload average at the end: {loadavg()}\n")
    print(f"{args.count} queued, median of {args.rounds} rounds\n")
    print("| pass | the pass itself | after_pass | notes during the pass | metrics / pass |")
    print("|---|---:|---:|---:|---:|")
    for name, p, a, n, pct in rows:
        print(f"| {name} | {p:.3f} s | {a * 1000:.1f} ms | {n * 1000:.1f} ms | {pct:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
