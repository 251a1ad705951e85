"""Where mailshim's own CPU goes in a flush: per-message cost, start-up, syscalls, profile.

    .venv/bin/python bench/flushprofile.py                 # 1000 messages, every section
    .venv/bin/python bench/flushprofile.py --count 300 --rounds 3 --only cpu,startup

Sections (``--only``, comma-separated; default all):

``cpu``      N entries are written straight into a fresh spool with mailshim's own spool API
             (no ``sendmail`` processes: only the flush is measured), bench/listener.py runs
             in its own process, and the real ``mailshim flush`` runs as a child reaped with
             ``wait4``: its user+system CPU, its wall time, the listener's CPU. The same on an
             empty spool gives the fixed cost (start-up, config, connection); the difference
             over N is the CPU per message. ``--rounds`` repeats both; medians are printed.
``spool``    the spool side alone, no network: order, state, lock, envelope, message read and
             remove of N entries, CPU per entry (``process_time``, in a child).
``startup``  ``python -X importtime`` of the same ``mailshim flush`` on an empty spool: the
             heaviest modules by cumulative and by self time (median of the runs).
``strace``   ``strace -f -c`` of one flush of N: syscall counts per message (skipped when
             strace is not installed).
``profile``  ``runner.flush`` in this process under cProfile (the listener still apart):
             the top functions by own time and by cumulative time in µs per message, and the
             own time summed per module. cProfile slows Python calls down (2-5×), so use
             the ``cpu`` figures for totals and this for the split.

``--compare SRC`` runs ``cpu``, ``spool`` and ``strace`` also with the ``mailshim`` package
under SRC (another tree's ``src``), the two alternating within each round.

Each flush runs against bench/listener.py with PIPELINING offered (``--lockstep``: not), the
config is bench/run.py's (background mode, ``MAILSHIM_NO_SYSLOG=1``: a syslog write per line
is left out, as in the other benchmarks), and every message is ``benchlib.message(i)`` (2 KB)
with CRLF line ends, as ``sendmail`` spools it.

Trust: a benchmark tool run by a developer, on loopback, in a temporary folder it removes.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl

SECTIONS = ("cpu", "spool", "startup", "strace", "profile")
ENTRY_CODE = "from mailshim.cli.entry import main; import sys; sys.argv[0] = 'mailshim'; main()"


def say(text: str = "") -> None:
    print(text, flush=True)


def fill(root: Path, n: int) -> None:
    """``n`` entries of 2 KB for one recipient, written with mailshim's spool API."""
    from mailshim import spool as spool_mod
    from mailshim import spoolentry, spoolfs

    target = spool_mod.Spool(str(root))
    target.ensure()
    uid = os.geteuid()
    t0 = time.time_ns()
    for i in range(n):
        body = bl.message(i).replace(b"\n", b"\r\n")
        # Distinct, increasing arrival stamps: the ids sort as a real queue's would.
        qid = spoolentry.new_queue_id(t0 + i * 1000)
        writer = target.new_entry("bench@example.org", [bl.RCPT], uid, queue_id=qid)
        writer.write(body)
        writer.commit(False, sync_dir=False)
    spoolfs._fsync_dir(target.queue)
    left = len(os.listdir(target.queue))
    if left != n:
        raise bl.BenchError(f"{left} entries in the queue, expected {n}")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.scratch = work / "scratch"
        self.scratch.mkdir()
        self.listener = bl.Listener(bl.free_port())
        self.listener.pipelining(not args.lockstep)
        self.spool = work / "spool"
        self.config = bl.write_config(
            work / "flush.toml", port=self.listener.port, spool=self.spool, mode="background"
        )
        if args.concurrency:
            text = self.config.read_text()
            text = text.replace("[relay]\n", f"[relay]\nconcurrency = {args.concurrency}\n", 1)
            self.config.write_text(text)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "LANG": "C.UTF-8",
            "MAILSHIM_CONFIG": str(self.config),
            "MAILSHIM_CACHE_DIR": str(work / "cache"),
            "MAILSHIM_NO_SYSLOG": "1",
        }
        self.argv = [sys.executable, "-I", "-c", ENTRY_CODE, "flush"]

    def reset(self, n: int) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)
        fill(self.spool, n)

    def command(self, src: str | None = None) -> list[str]:
        """``mailshim flush`` as a child: this tree's, or the one whose ``src`` folder is
        given (``--compare``: put first on ``sys.path``, so that it wins)."""
        if src is None:
            return list(self.argv)
        code = f"import sys; sys.path.insert(0, {src!r}); {ENTRY_CODE}"
        return [sys.executable, "-I", "-c", code, "flush"]

    def flush(
        self, n: int, prefix: list[str] | None = None, src: str | None = None
    ) -> dict[str, float]:
        """One ``mailshim flush`` child of a spool of ``n``: wall, CPU, listener CPU."""
        self.reset(n)
        cpu0 = float(self.listener.reset()["cpu"])
        argv = [*(prefix or []), *self.command(src)]
        run = bl.checked(bl.spawn(argv, self.env, scratch=self.scratch, timeout=120 + n), "flush")
        stats = self.listener.wait(n, 120) if n else self.listener.stats()
        left = len(os.listdir(self.spool / "queue"))
        if left:
            raise bl.BenchError(f"{left} entries left in the queue after the flush")
        return {
            "wall": run.wall,
            "cpu": run.cpu,
            "listener_cpu": float(stats["cpu"]) - cpu0,
            "sessions": float(stats["sessions"]),
        }

    def close(self) -> None:
        self.listener.close()


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def section_cpu(b: Bench) -> None:
    n, rounds = b.args.count, b.args.rounds
    builds = _builds(b)
    say(f"\n## `mailshim flush` of {n} queued 2 KB messages: CPU (wait4), {rounds} rounds")
    if len(builds) > 1:
        say("(the builds alternate within each round, so that load hits both alike)")
    empty: dict[str, list[dict[str, float]]] = {name: [] for name, _ in builds}
    full: dict[str, list[dict[str, float]]] = {name: [] for name, _ in builds}
    for _, src in builds:
        b.flush(0, src=src)  # unrecorded: writes the build's .pyc files and config cache
    for i in range(rounds):
        for name, src in builds if i % 2 == 0 else builds[::-1]:
            empty[name].append(b.flush(0, src=src))
            full[name].append(b.flush(n, src=src))
    say("\n| build | flush wall s (median) | CPU s, empty spool (median / min) |")
    say("|---|---:|---:|")
    for name, _ in builds:
        e = empty[name]
        say(
            f"| {name}, empty spool | {med(e, 'wall'):.3f} | {med(e, 'cpu'):.3f} /"
            f" {min(r['cpu'] for r in e):.3f} |"
        )
    say("\n| build | round | wall s | mailshim CPU s | listener CPU s |")
    say("|---|---:|---:|---:|---:|")
    for name, _ in builds:
        for i, r in enumerate(full[name], 1):
            say(f"| {name} | {i} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['listener_cpu']:.3f} |")
    for name, _ in builds:
        rows, e_cpu = full[name], med(empty[name], "cpu")
        f_cpu, f_min = med(rows, "cpu"), min(r["cpu"] for r in rows)
        per = (f_cpu - e_cpu) / n
        per_min = (f_min - min(r["cpu"] for r in empty[name])) / n
        say(
            f"\n{name}: flush of {n} {med(rows, 'wall'):.3f} s wall (median), mailshim CPU "
            f"{f_cpu:.3f} s median / {f_min:.3f} s min: fixed {e_cpu * 1000:.0f} ms + "
            f"**{per * 1e6:.0f} µs per message** (min-based {per_min * 1e6:.0f} µs); listener"
            f" CPU {med(rows, 'listener_cpu'):.3f} s, {med(rows, 'sessions'):.0f} session(s)"
        )


# The spool side of a flush without the network: what runpass.run_pass and deliver_entry do
# to each entry (order, state, lock, envelope, message read, remove), timed in a child.
SPOOL_CODE = """
import sys, time
sys.path[:0] = [p for p in sys.argv[1:3] if p]
from mailshim import fair, spool
import flushprofile
target = spool.Spool(sys.argv[3])
n = int(sys.argv[4])
flushprofile.fill(target.root, n)
t0 = time.process_time()
for qid in fair.order(target, target.ids()):
    target.load_state(qid)
    locked = target.lock(qid)
    state = locked.state()
    env = locked.envelope
    with locked.message() as body:
        while body.read(65536):
            pass
    locked.remove()
target.sync(force=True)
print((time.process_time() - t0) / n)
"""


def section_spool(b: Bench) -> None:
    n, rounds = b.args.count, max(5, b.args.rounds)
    builds = [(name, src or "") for name, src in _builds(b)]
    say(f"\n## The spool side alone: {n} entries ordered, locked, read, removed ({rounds} rounds)")
    bench_dir = str(Path(__file__).resolve().parent)
    got: dict[str, list[float]] = {name: [] for name, _ in builds}
    for i in range(rounds):
        for name, src in builds if i % 2 == 0 else builds[::-1]:
            root = b.work / "spool-side"
            shutil.rmtree(root, ignore_errors=True)
            argv = [sys.executable, "-I", "-c", SPOOL_CODE, src, bench_dir, str(root), str(n)]
            run = bl.checked(bl.spawn(argv, b.env, scratch=b.scratch, timeout=120 + n), "spool")
            got[name].append(float(run.stdout))
    say("\n| build | CPU µs per entry, median | min |")
    say("|---|---:|---:|")
    for name, _ in builds:
        say(f"| {name} | {statistics.median(got[name]) * 1e6:.1f} | {min(got[name]) * 1e6:.1f} |")


def _importtime(text: str) -> list[tuple[str, int, int]]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        parts = line[len("import time:") :].split("|")
        rows.append((parts[2].strip(), int(parts[0]), int(parts[1])))
    return rows


def section_startup(b: Bench) -> None:
    runs = max(3, b.args.rounds)
    say(f"\n## Start-up of `mailshim flush` (empty spool): `-X importtime`, median of {runs}")
    b.reset(0)
    argv = [sys.executable, "-X", "importtime", *b.argv[1:]]
    tables = []
    for _ in range(runs):
        run = bl.checked(bl.spawn(argv, b.env, scratch=b.scratch), "importtime", quiet=False)
        tables.append(_importtime(run.stderr.decode()))
    self_us: dict[str, list[int]] = {}
    cum_us: dict[str, list[int]] = {}
    for table in tables:
        for name, own, cum in table:
            self_us.setdefault(name, []).append(own)
            cum_us.setdefault(name, []).append(cum)
    own = {k: statistics.median(v) for k, v in self_us.items()}
    cum = {k: statistics.median(v) for k, v in cum_us.items()}
    say(f"\n{len(own)} modules imported, {sum(own.values()) / 1000:.1f} ms of import time")
    say("\n| heaviest (cumulative) | cumulative ms | self ms |")
    say("|---|---:|---:|")
    for name in sorted(cum, key=lambda k: -cum[k])[: b.args.top]:
        say(f"| {name} | {cum[name] / 1000:.2f} | {own[name] / 1000:.2f} |")
    mine = sorted((k for k in own if k.startswith("mailshim")), key=lambda k: -cum[k])
    say("\nmailshim modules: " + ", ".join(f"{k} {cum[k] / 1000:.1f}" for k in mine))


def _builds(b: Bench) -> list[tuple[str, str | None]]:
    """This tree, and the one named by ``--compare`` (its ``src`` folder)."""
    builds: list[tuple[str, str | None]] = [("this tree", None)]
    if b.args.compare:
        builds.append((f"--compare {b.args.compare}", str(Path(b.args.compare).resolve())))
    return builds


def section_strace(b: Bench) -> None:
    strace = shutil.which("strace")
    n = b.args.count
    say(f"\n## Syscalls of one `mailshim flush` of {n} (`strace -f -c`)")
    if strace is None:
        say("\nstrace is not installed: skipped")
        return
    out = b.scratch / "strace.txt"
    counted: dict[str, dict[str, tuple[int, int]]] = {}
    for name, src in _builds(b):
        b.flush(n, prefix=[strace, "-f", "-c", "-o", str(out)], src=src)
        rows: dict[str, tuple[int, int]] = {}
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) < 5 or not parts[3].isdigit() or parts[-1] == "total":
                continue
            errors = int(parts[4]) if len(parts) == 6 and parts[4].isdigit() else 0
            rows[parts[-1]] = (int(parts[3]), errors)
        counted[name] = rows
    names = list(counted)
    for name in names:
        total = sum(calls for calls, _ in counted[name].values())
        say(f"\n{name}: {total} syscalls, **{total / n:.1f} per message** (start-up included)")
    first = counted[names[0]]
    calls = sorted(
        {k for rows in counted.values() for k in rows}, key=lambda k: -first.get(k, (0, 0))[0]
    )
    say("\n| syscall | " + " | ".join(f"{name}: per message (errors)" for name in names) + " |")
    say("|---|" + "---:|" * len(names))
    for call in calls[: b.args.top]:
        cells = []
        for name in names:
            got, errors = counted[name].get(call, (0, 0))
            cells.append(f"{got / n:.2f} ({errors})")
        say(f"| {call} | " + " | ".join(cells) + " |")


def section_profile(b: Bench) -> None:
    n = b.args.count
    say(f"\n## `runner.flush` of {n} under cProfile, in this process")
    os.environ.update(b.env)
    from mailshim import configload, runner
    from mailshim import spool as spool_mod

    cfg = configload.load(str(b.config))
    b.reset(n)
    b.listener.reset()
    spools = [spool_mod.Spool(str(b.spool))]
    t0 = time.process_time()
    plain = runner.flush(cfg, spools)
    cpu_plain = time.process_time() - t0
    b.listener.wait(n, 120)
    if plain.sent != n:
        raise bl.BenchError(f"in-process flush: {plain.sent} sent of {n}")
    b.reset(n)
    b.listener.reset()
    prof = cProfile.Profile(time.process_time) if b.args.timer == "cpu" else cProfile.Profile()
    counts = prof.runcall(runner.flush, cfg, spools)
    b.listener.wait(n, 120)
    if counts.sent != n:
        raise bl.BenchError(f"profiled flush: {counts.sent} sent of {n}")
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    say(
        f"\nwithout the profiler: {cpu_plain * 1e6 / n:.0f} µs CPU per message in-process "
        f"(no start-up); under cProfile {total * 1e6 / n:.0f} µs"
    )

    def label(func: tuple[str, int, str]) -> str:
        path, line, name = func
        if path == "~":
            return name
        parts = Path(path).parts
        short = "/".join(parts[-2:]) if "mailshim" in parts else parts[-1]
        return f"{short}:{line} {name}"

    say("\n| top own time | calls per message | own µs/msg | cumulative µs/msg |")
    say("|---|---:|---:|---:|")
    for func, (_cc, nc, tt, ct, _callers) in sorted(raw.items(), key=lambda kv: -kv[1][2])[
        : b.args.top
    ]:
        say(f"| `{label(func)}` | {nc / n:.1f} | {tt * 1e6 / n:.1f} | {ct * 1e6 / n:.1f} |")
    say("\n| top cumulative (mailshim) | calls per message | cumulative µs/msg |")
    say("|---|---:|---:|")
    mine = [kv for kv in raw.items() if "/mailshim/" in kv[0][0]]
    for func, (_cc, nc, _tt, ct, _callers) in sorted(mine, key=lambda kv: -kv[1][3])[: b.args.top]:
        say(f"| `{label(func)}` | {nc / n:.1f} | {ct * 1e6 / n:.1f} |")
    by_module: dict[str, float] = {}
    for (path, _line, name), v in raw.items():
        if path == "~":
            key = "builtins: " + name.split(" of ")[0].strip("<>").split(" ")[-1]
        elif "/mailshim/" in path:
            key = "mailshim/" + path.split("/mailshim/", 1)[1]
        elif "/asyncio/" in path:
            key = "asyncio"
        elif "/aiosmtplib/" in path:
            key = "aiosmtplib"
        else:
            key = Path(path).name
        by_module[key] = by_module.get(key, 0.0) + v[2]
    say("\n| own time by module | µs/msg |")
    say("|---|---:|")
    for key, tt in sorted(by_module.items(), key=lambda kv: -kv[1])[: b.args.top]:
        say(f"| {key} | {tt * 1e6 / n:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="messages per flush")
    ap.add_argument("--rounds", type=int, default=3, help="(cpu) rounds of each flush")
    ap.add_argument("--only", default=",".join(SECTIONS), help="cpu,startup,strace,profile")
    ap.add_argument("--top", type=int, default=20, help="rows in each table")
    ap.add_argument(
        "--timer", choices=("cpu", "wall"), default="cpu", help="(profile) cProfile's clock"
    )
    ap.add_argument(
        "--concurrency", type=int, default=0, help="[relay] concurrency (default: the config's)"
    )
    ap.add_argument("--lockstep", action="store_true", help="the listener offers no PIPELINING")
    ap.add_argument(
        "--compare",
        metavar="SRC",
        help="(cpu) also time the mailshim package under SRC (e.g. an older tree's src/)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    for name in wanted:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r} (choose from {', '.join(SECTIONS)})")
    if args.count < 1:
        ap.error("--count must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="mailshim-flushprofile-"))
    say(f"# mailshim flush profile ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    say(f"load average {bl.loadavg()}; python {sys.version.split()[0]}; {args.count} messages")
    b = Bench(args, work)
    try:
        for name in SECTIONS:
            if name in wanted:
                globals()[f"section_{name}"](b)
    except bl.BenchError as exc:
        print(f"flushprofile: {exc}", file=sys.stderr)
        return 1
    finally:
        b.close()
        if args.keep:
            say(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
