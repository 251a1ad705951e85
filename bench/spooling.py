"""Spooling while the listener is down against spooling while it is up (issue 14, item 3).

    .venv/bin/python bench/spooling.py                       # 1000 each, the .deb-style install
    .venv/bin/python bench/spooling.py --installs debian,wheel-venv --count 400 --json out.json
    make bench-spooling

Each case is a spool of its own that receives ``--count`` background-mode ``sendmail``
submissions of a 2 KB message, one after another, as cron or ``mail`` send them: "up" has
its relay at bench/listener.py, "down" at a port nobody listens on. The cases are
interleaved in blocks of ``--block`` submissions, the order rotating each block, so load from
other processes falls on every case alike, and each case still sees its own submissions in a
row (its agent, its growing queue). Per submission: wall time (spawn to reap) and CPU (the
child's user+system time from ``wait4``; the detached agent is not the child's). Per case:
delivery agents started (``/proc`` polled every 20 ms) and their CPU (utime+stime last seen),
and, for "up", that the listener has them all; for "down", that all are in the queue.

Installs (bench/benchlib.py builds them in a temp folder): ``debian`` is the wheel in a
dist-packages folder run by a ``#!/usr/bin/python3 -IS`` script, as the package's
``/usr/sbin/sendmail``; ``wheel-venv`` is the ``sendmail`` script pip installs in a venv.

Trust: a developer's tool; it runs the code under test as the invoking user, loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import postfix as pfx

TICK = os.sysconf("SC_CLK_TCK")


def say(text: str = "") -> None:
    print(text, flush=True)


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


class CpuWatcher(bl.AgentWatcher):
    """AgentWatcher that also keeps each agent's CPU time as last seen."""

    def __init__(self, spool_root: str, interval: float = 0.02) -> None:
        super().__init__(spool_root, interval)
        self.cpu: dict[int, float] = {}

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in bl.agent_pids(self.spool_root):
                self.peaks.setdefault(pid, 0)
                cpu = _cpu_seconds(pid)
                if cpu is not None:
                    self.cpu[pid] = cpu
            self._stop.wait(self.interval)


class Case:
    def __init__(self, work: Path, install: bl.Install, state: str, port: int) -> None:
        self.install = install
        self.state = state  # "up", "down", or "queue" (-odq: the spool write alone)
        names = {"queue": f"{install.key}, queue mode (-odq)", "pass": "`python3 -I -c pass`"}
        self.name = names.get(state, f"{install.key}, listener {state}")
        self.spool = work / f"spool-{install.key}-{state}"
        config = bl.write_config(
            work / f"{install.key}-{state}.toml", port=port, spool=self.spool, mode="background"
        )
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work / "home"),
            "LANG": "C.UTF-8",
            "MAILSHIM_CONFIG": str(config),
            "MAILSHIM_CACHE_DIR": str(work / "cache" / config.stem),
            "MAILSHIM_NO_SYSLOG": "1",
            **install.env,
        }
        odq = ["-odq"] if self.state == "queue" else []
        self.argv = [*install.sendmail, *odq, "-i", bl.RCPT]
        if self.state == "pass":
            self.argv = [bl.SYSTEM_PYTHON, "-I", "-c", "pass"]
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.watcher = CpuWatcher(str(self.spool))
        self.elapsed = 0.0

    def submit(self, scratch: Path, i: int) -> None:
        t0 = time.monotonic()
        r = bl.checked(
            bl.spawn(self.argv, self.env, stdin_data=bl.message(i), scratch=scratch), self.name
        )
        self.elapsed += time.monotonic() - t0
        self.walls.append(r.wall)
        self.cpus.append(r.cpu)


class PostfixCase(Case):
    """Postfix's ``sendmail`` (postdrop, then pickup and qmgr, which defer each message) with
    its relayhost down: the peer figure (bench/postfix.py: unpacked, not installed)."""

    def __init__(self, work: Path, pf: pfx.Postfix) -> None:
        self.install = bl.Install("postfix", f"Postfix {pf.version}", [], [], [], [], [])
        self.state = "postfix"
        self.name = f"Postfix {pf.version} `sendmail`, relayhost down"
        self.spool = work / "postfix-has-no-mailshim-spool"
        self.env = pf.env
        self.argv = [*pf.sendmail, "-i", bl.RCPT]
        self.walls = []
        self.cpus = []
        self.watcher = CpuWatcher(str(self.spool))
        self.elapsed = 0.0


def _warm(case: Case, scratch: Path) -> None:
    """One queue-mode submission, removed again: the spool exists and the config is cached."""
    argv = [*case.install.sendmail, "-odq", "-i", bl.RCPT]
    bl.checked(bl.spawn(argv, case.env, stdin_data=b"\n", scratch=scratch), f"warm {case.name}")
    for name in os.listdir(case.spool / "queue"):
        os.unlink(case.spool / "queue" / name)


def before_install(work: Path, debian: bl.Install, rev: str) -> bl.Install:
    """The Debian-style install with mailshim's files as of git ``rev``: its own copy of the
    dist-packages folder (same dependencies), ``mailshim/`` replaced by ``rev``'s."""
    src = debian.env["PYTHONPATH"]
    target = work / "before" / "dist-packages"
    shutil.copytree(src, target)
    shutil.rmtree(target / "mailshim")
    archive = subprocess.run(
        ["git", "-C", str(bl.REPO), "archive", rev, "src/mailshim"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.11.4+; our own repository's files anyway
            tar.extractall(work / "before", filter="data")
        else:
            tar.extractall(work / "before")
    shutil.move(work / "before" / "src" / "mailshim", target / "mailshim")
    subprocess.run([bl.SYSTEM_PYTHON, "-m", "compileall", "-q", str(target)], check=True)
    script = work / "before" / "sendmail"
    script.write_text(
        f"#!{bl.SYSTEM_PYTHON} -IS\nimport sys\nsys.path.insert(0, {str(target)!r})\n"
        "from mailshim.cli.sendmail import main\nmain()\n"
    )
    script.chmod(0o755)
    return bl.Install(
        "before",
        f"Debian style, mailshim as of {rev}",
        [str(script)],
        [],
        [],
        [bl.SYSTEM_PYTHON],
        [],
        env={"PYTHONPATH": str(target)},
    )


def _cases(args: argparse.Namespace, work: Path, port: int, dead: int) -> list[Case]:
    installs = bl.build_installs(work, lambda m: say(f"  ({m})"))
    if args.before:
        installs["before"] = before_install(work, installs["debian"], args.before)
        args.installs.append("before")
    cases = [
        Case(work, installs[key], state, port if state == "up" else dead)
        for key in args.installs
        for state in ("up", "down", "queue")
        if state in args.cases
    ]
    if "pass" in args.cases:
        cases.append(Case(work, installs[args.installs[0]], "pass", dead))
    return cases


def _interleave(args: argparse.Namespace, cases: list[Case], scratch: Path) -> None:
    """Blocks of ``--block`` submissions per case, the order rotating each block."""
    for b in range(-(-args.count // args.block)):
        order = cases[b % len(cases) :] + cases[: b % len(cases)]
        for case in order:
            for i in range(b * args.block, min(args.count, (b + 1) * args.block)):
                case.submit(scratch, i)


def _settle(args: argparse.Namespace, cases: list[Case], listener: bl.Listener) -> None:
    """Until everything is delivered (up) or its agent has left (down: asked to)."""
    listener.wait(args.count * sum(c.state == "up" for c in cases), 60 + args.count * 0.1)
    for case in cases:
        if case.state == "up":
            bl.wait_agents_gone(str(case.spool), 60)
        elif case.state == "down":
            # It sleeps until the next attempt; asked to leave as `mailshim daemon` does.
            time.sleep(0.1)  # let the watcher see its CPU once more
            bl.stop_agents(str(case.spool))
            bl.wait_agents_gone(str(case.spool), 60)


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    (work / "home").mkdir()
    scratch = work / "scratch"
    scratch.mkdir()
    listener = bl.Listener(bl.free_port())
    pf: pfx.Postfix | None = None
    try:
        dead = bl.free_port()  # nothing listens there: connections are refused
        cases = _cases(args, work, listener.port, dead)
        for case in cases:
            if case.state != "pass":
                _warm(case, scratch)
        if args.postfix:
            pf = pfx.Postfix(dead, log=lambda m: say(f"  ({m})"))
            say(f"  (Postfix {pf.version}, {pf.package}: unpacked, not installed)")
            pf.start()
            cases.append(PostfixCase(work, pf))
        listener.reset()
        say(f"\nload average before: {bl.loadavg()}")
        for case in cases:
            case.watcher.__enter__()
        try:
            _interleave(args, cases, scratch)
            _settle(args, cases, listener)
            if pf is not None:
                pf.wait_queued(args.count, 120 + args.count / 10)  # each one deferred
        finally:
            for case in cases:
                case.watcher.__exit__()
        load_after = bl.loadavg()
        for case in cases:
            if case.state in ("up", "down", "queue"):
                queued = len(os.listdir(case.spool / "queue"))
                want = 0 if case.state == "up" else args.count
                if queued != want:
                    raise bl.BenchError(f"{case.name}: {queued} entries in the queue, not {want}")
        return report(args, cases, load_after)
    except (pfx.PostfixError, OSError, subprocess.SubprocessError) as exc:
        raise bl.BenchError(f"{exc.__class__.__name__}: {exc}") from None
    finally:
        listener.close()
        if pf is not None:
            pf.close()


def report(args: argparse.Namespace, cases: list[Case], load_after: str) -> dict[str, object]:
    say(
        f"\n## {args.count} background-mode submissions per case, 2 KB each, interleaved in "
        f"blocks of {args.block}\n"
    )
    say(
        "| case | median ms | p90 ms | min ms | CPU median ms | total s | rate /s "
        "| agents started | agents' CPU ms/msg |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out: dict[str, object] = {"count": args.count, "block": args.block, "cases": {}}
    for case in cases:
        wall, cpu = bl.summary(case.walls), bl.summary(case.cpus)
        agents_cpu = sum(case.watcher.cpu.values())
        row = {
            "wall": wall,
            "cpu": cpu,
            "total": case.elapsed,
            "rate": args.count / case.elapsed,
            "agents": case.watcher.count,
            "agents_cpu": agents_cpu,
        }
        out["cases"][case.name] = row  # type: ignore[index]
        say(
            f"| {case.name} | {bl.ms(wall['median'])} | {bl.ms(wall['p90'])} "
            f"| {bl.ms(wall['min'])} | {bl.ms(cpu['median'])} | {case.elapsed:.2f} "
            f"| {args.count / case.elapsed:.0f} | {case.watcher.count} "
            f"| {agents_cpu * 1000 / args.count:.2f} |"
        )
    say("")
    for key in args.installs:
        mine = {c.state: c for c in cases if c.install.key == key and c.state != "pass"}
        for a, b in (("down", "up"), ("down", "queue")):
            if a in mine and b in mine:
                w = statistics.median(mine[a].walls) / statistics.median(mine[b].walls)
                c = statistics.median(mine[a].cpus) / statistics.median(mine[b].cpus)
                say(f"- {key}: {a} ÷ {b}, median wall **{w:.2f}×**, median CPU {c:.2f}×")
                out[f"{key}: {a} / {b}"] = {"wall": w, "cpu": c}
    peer = next((c for c in cases if c.state == "postfix"), None)
    for case in cases:
        if peer is not None and case.state == "down":
            w = statistics.median(case.walls) / statistics.median(peer.walls)
            c = statistics.median(case.cpus) / statistics.median(peer.cpus)
            say(f"- {case.install.key}: down ÷ Postfix, median wall {w:.2f}×, median CPU {c:.2f}×")
            out[f"{case.install.key}: down / postfix"] = {"wall": w, "cpu": c}
    if "before" in args.installs:
        now = {c.state: c for c in cases if c.install.key == "debian"}
        then = {c.state: c for c in cases if c.install.key == "before"}
        for state in ("down", "up", "queue"):
            if state in now and state in then:
                w = statistics.median(now[state].walls) / statistics.median(then[state].walls)
                c = statistics.median(now[state].cpus) / statistics.median(then[state].cpus)
                say(f"- {state}: debian ÷ before, median wall {w:.2f}×, median CPU {c:.2f}×")
                out[f"{state}: debian / before"] = {"wall": w, "cpu": c}
    say(f"\nload average after: {load_after}")
    out["load_after"] = load_after
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description="spooling while the listener is down vs up",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--count", type=int, default=1000, help="submissions per case")
    ap.add_argument("--block", type=int, default=25, help="submissions in a row per case")
    ap.add_argument(
        "--installs",
        default="debian",
        help="comma-separated: debian, wheel-venv, dev-venv, wheel-venv-c",
    )
    ap.add_argument(
        "--cases",
        default="up,down",
        help="comma-separated: up, down, queue (-odq: the spool write alone, no agent), "
        "pass (`python3 -I -c pass`, the interpreter alone)",
    )
    ap.add_argument(
        "--before",
        metavar="REV",
        help="also the Debian-style install with src/mailshim as of git REV (interleaved)",
    )
    ap.add_argument(
        "--postfix",
        action="store_true",
        help="also Postfix's sendmail with its relayhost down (root; bench/postfix.py unpacks "
        "Debian's package in a temp folder, nothing is installed)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    args.installs = [v.strip() for v in args.installs.split(",") if v.strip()]
    args.cases = [v.strip() for v in args.cases.split(",") if v.strip()]
    if not set(args.cases) <= {"up", "down", "queue", "pass"}:
        ap.error(f"unknown case in --cases {','.join(args.cases)}")
    if args.count < 1 or args.block < 1:
        ap.error("--count and --block must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="mailshim-spooling-"))
    try:
        say("# spooling while the listener is down vs up\n")
        mach = bl.machine()
        for key, value in mach.items():
            say(f"- {key}: {value}")
        results = run(args, work)
        results["machine"] = mach
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    except bl.BenchError as exc:
        say(f"\nbench failed: {exc}")
        return 1
    except KeyError as exc:
        say(f"\nunknown install: {exc}")
        return 2
    finally:
        for spool in work.glob("spool-*"):
            bl.stop_agents(str(spool))  # only the agents of this run's spools
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
