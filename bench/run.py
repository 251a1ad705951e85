"""mailshim's benchmarks: start-up, a burst of submissions, peak memory, and the queue flush.

    make bench                                 # everything, default sizes (about 5 minutes)
    .venv/bin/python bench/run.py --only a     # one benchmark: a|startup b|burst c|rss d|flush
    .venv/bin/python bench/run.py --only a,c --iterations 10 --size-mb 50 --json out.json

(a) startup  one ``sendmail`` of a 2 KB message, queue and background mode, for each way
             mailshim is installed, interleaved with ``python3 -I -c pass``; target <= 2.5x it.
             Plus ``-X importtime`` of the fastest way and a time breakdown.
(b) burst    N sequential submissions in background mode: time until the listener has them all,
             how many agent processes and SMTP sessions that took.
(c) rss      peak RSS of ``sendmail`` (-odq), ``sendmail -q``, the detached agent and
             ``mailshim flush`` for a big message; target < 40 MB each.
(d) flush    N messages spooled while the listener is down (spooling rate), then one
             ``mailshim flush`` against one SMTP session per message; target >= 5x faster.
(f) postfix  opt-in (``make bench-postfix``, root): the same N spooled while the listener is
             down and flushed, by mailshim (lock-step and pipelined) and by a throwaway Postfix
             null client (bench/postfix.py) against the same listener; reports the ratio.

The listener (bench/listener.py, aiosmtpd) runs in its own process on 127.0.0.1. Everything
lives in a temporary folder that is removed at the end (unless --keep). Each wait has a limit.

Trust: a developer's tool; it runs the code under test as the invoking user, loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import postfix as pfx

ALIASES = {"a": "startup", "b": "burst", "c": "rss", "d": "flush", "f": "postfix"}
ORDER = ("startup", "burst", "rss", "flush", "postfix")
DEFAULT = ("startup", "burst", "rss", "flush")  # postfix only when asked for


def say(text: str = "") -> None:
    print(text, flush=True)


class Ctx:
    """What every benchmark shares: the temp folder, the installs, the listener, the results."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.scratch = work / "scratch"
        self.scratch.mkdir()
        self.cache = work / "cache"
        self.home = work / "home"
        self.home.mkdir()
        self.installs: dict[str, bl.Install] = {}
        self.listener: bl.Listener | None = None
        self.results: dict[str, object] = {}

    def env(self, config: Path, install: bl.Install | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "MAILSHIM_CONFIG": str(config),
            # One cache folder per config: the config cache holds one file, so two configs
            # sharing it would make every other run a cache miss (tomllib, ~11 ms) and
            # charge it to whichever install happens to come first after a switch.
            "MAILSHIM_CACHE_DIR": str(self.cache / config.stem),
            "MAILSHIM_NO_SYSLOG": "1",
        }
        if install is not None:
            env.update(install.env)
        return env

    def spawn(self, argv: list[str], env: dict[str, str], **kw: object) -> bl.Run:
        return bl.spawn(argv, env, scratch=self.scratch, **kw)  # type: ignore[arg-type]

    def main_install(self) -> bl.Install:
        return self.installs[self.args.install]


# --- (a) start-up -------------------------------------------------------------------------------


def parse_importtime(text: str) -> list[tuple[str, int, int, int]]:
    """``-X importtime`` lines → (module, self µs, cumulative µs, depth), in output order."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        parts = line[len("import time:") :].split("|")
        self_us, cum_us, raw = parts[0].strip(), parts[1].strip(), parts[2]
        stripped = raw.lstrip(" ")
        depth = (len(raw) - len(stripped) - 1) // 2
        rows.append((stripped.strip(), int(self_us), int(cum_us), depth))
    return rows


def importtime_report(ctx: Ctx, install: bl.Install, env: dict[str, str]) -> dict[str, object]:
    runs = []
    for i in range(ctx.args.importtime_runs):
        r = ctx.spawn([*install.sendmail_importtime, "-i", bl.RCPT], env, stdin_data=bl.message(i))
        if r.code != 0:
            raise bl.BenchError(f"importtime run failed: {r.stderr[-500:]!r}")
        runs.append(parse_importtime(r.stderr.decode()))
    names = [row[0] for row in runs[0]]
    depth = {row[0]: row[3] for row in runs[0]}

    def med(idx: int) -> dict[str, float]:
        out = {}
        for name in names:
            vals = [row[idx] for run in runs for row in run if row[0] == name]
            out[name] = statistics.median(vals) if vals else 0.0
        return out

    self_us, cum_us = med(1), med(2)
    top_level = [(n, cum_us[n]) for n in names if depth[n] == 0]
    total = sum(c for _, c in top_level)
    heaviest = sorted(names, key=lambda n: -self_us[n])[:15]
    say(f"\n`-X importtime` of `{install.label}` (median of {len(runs)} runs, queue mode):")
    say(f"total import time {total / 1000:.1f} ms (importtime's own overhead included)\n")
    say("| top-level import (in order) | cumulative ms |")
    say("|---|---:|")
    for name, cum in top_level:
        say(f"| {name} | {cum / 1000:.2f} |")
    say("\n| module (heaviest self time) | self ms | cumulative ms |")
    say("|---|---:|---:|")
    for name in heaviest:
        indent = "  " * depth[name]
        say(f"| {indent}{name} | {self_us[name] / 1000:.2f} | {cum_us[name] / 1000:.2f} |")
    return {
        "install": install.key,
        "total_us": total,
        "top_level": top_level,
        "heaviest": [(n, self_us[n], cum_us[n]) for n in heaviest],
        "modules": sorted(names),
    }


def fsync_floor(folder: Path, rounds: int = 20) -> float:
    """Median seconds for what a durable spool write costs at least: write, fsync, rename,
    fsync of the folder (done in this process, no Python start-up)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = bl.message(0)
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        tmp, final = folder / f"t{i}", folder / f"f{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Cmd:
    """One command of the start-up rounds."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], mode: str | None, spool: Path | None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.mode = mode  # None: a baseline, run every round
        self.spool = spool
        self.rounds: list[int] = []
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.latency: list[float] = []


def _startup_commands(ctx: Ctx, variants: list[bl.Install], product: bl.Install) -> list[_Cmd]:
    assert ctx.listener is not None
    wheel_py = ctx.installs["wheel-venv"].python[0]
    cmds: list[_Cmd] = []
    for mode in ("queue", "background"):
        spool = ctx.work / f"spool-startup-{mode}"
        config = bl.write_config(
            ctx.work / f"startup-{mode}.toml", port=ctx.listener.port, spool=spool, mode=mode
        )
        if mode == "queue":
            env = ctx.env(config)
            cmds.append(_Cmd("python3 -I -c pass", [bl.SYSTEM_PYTHON, "-I", "-c", "pass"],
                             env, None, None))  # fmt: skip
            cmds.append(_Cmd("venv python -I -c pass", [wheel_py, "-I", "-c", "pass"],
                             env, None, None))  # fmt: skip
            cmds.append(_Cmd(f"imports only ({product.key})", product.imports_only,
                             ctx.env(config, product), None, None))  # fmt: skip
        for inst in variants:
            argv = [*inst.sendmail, "-i", bl.RCPT]
            cmds.append(_Cmd(inst.key, argv, ctx.env(config, inst), mode, spool))
    return cmds


def _startup_rounds(ctx: Ctx, cmds: list[_Cmd]) -> list[float]:
    """Every command, round-robin with a rotating order; queue- and background-mode
    sendmails and the baselines share the rounds, so load from elsewhere hits all alike.
    Background-mode runs are spread over the rounds (--bg-iterations of them); after each,
    the agent it started must deliver and exit before anything else runs."""
    args = ctx.args
    assert ctx.listener is not None
    rounds = max(args.iterations, 1)
    bg = min(args.bg_iterations, rounds)
    floors: list[float] = []
    ctx.listener.reset()
    expected = 0
    for rnd in range(-args.warmup, rounds):
        with_bg = rnd < 0 or (rnd + 1) * bg // rounds > rnd * bg // rounds
        # the disk's share, measured in the same rounds: one durable 2 KB write, in-process
        floors.append(fsync_floor(ctx.work / "fsync-floor", rounds=1))
        todo = [c for c in cmds if c.mode != "background" or with_bg]
        shift = rnd % len(todo)
        for cmd in todo[shift:] + todo[:shift]:
            t_mono = time.monotonic()
            r = bl.checked(ctx.spawn(cmd.argv, cmd.env, stdin_data=bl.message(rnd)), cmd.name)
            if cmd.mode == "background":
                # Wait for the agent this sendmail started to deliver and exit, so that the
                # next measurement does not share the CPUs with it.
                expected += 1
                got = ctx.listener.wait(expected, 60)
                bl.wait_agents_gone(str(cmd.spool))
                if rnd >= 0:
                    cmd.latency.append(float(got["last"]) - t_mono)
            if rnd >= 0:
                cmd.rounds.append(rnd)
                cmd.walls.append(r.wall)
                cmd.cpus.append(r.cpu)
    for cmd in cmds:
        if cmd.mode == "queue":
            queued = len(os.listdir(cmd.spool / "queue"))  # type: ignore[operator]
            want = (rounds + args.warmup) * (len([c for c in cmds if c.mode == "queue"]))
            if queued != want:
                raise bl.BenchError(f"queue mode: {queued} entries spooled, expected {want}")
            break
    return floors[args.warmup :]


def bench_startup(ctx: Ctx) -> None:
    args = ctx.args
    variants = [ctx.installs[k] for k in args.variants]
    product = ctx.installs["debian"]  # what the Debian package will run
    cmds = _startup_commands(ctx, variants, product)
    bg = min(args.bg_iterations, args.iterations)
    say(
        f"\n## (a) start-up: {args.iterations} interleaved rounds (+{args.warmup} warm-up); "
        f"background-mode runs in {bg} of them"
    )
    floors = _startup_rounds(ctx, cmds)
    by_name = {(c.name, c.mode): c for c in cmds}
    pass_cmd = by_name[("python3 -I -c pass", None)]
    venv_cmd = by_name[("venv python -I -c pass", None)]

    def base(cmd: _Cmd, ref: _Cmd) -> float:
        # the baseline over the same rounds as this command
        pairs = zip(ref.rounds, ref.walls, strict=True)
        return statistics.median(w for r, w in pairs if r in cmd.rounds)

    say(
        "\n| command | mode | median ms | p90 ms | min ms | CPU ms (median) "
        "| × python3 -I -c pass | × venv python -I -c pass |"
    )
    say("|---|---|---:|---:|---:|---:|---:|---:|")
    rows: dict[str, dict[str, float]] = {}
    for cmd in cmds:  # baselines, then queue mode, then background mode
        s = bl.summary(cmd.walls)
        s["cpu"] = statistics.median(cmd.cpus)
        s["ratio"] = s["median"] / base(cmd, pass_cmd)
        s["ratio_venv"] = s["median"] / base(cmd, venv_cmd)
        if cmd.latency:
            s["delivered_median"] = statistics.median(cmd.latency)
        label = ctx.installs[cmd.name].label if cmd.name in ctx.installs else cmd.name
        say(
            f"| {label} | {cmd.mode or '-'} | {bl.ms(s['median'])} | {bl.ms(s['p90'])} "
            f"| {bl.ms(s['min'])} | {bl.ms(s['cpu'])} | {s['ratio']:.2f} "
            f"| {s['ratio_venv']:.2f} |"
        )
        rows[f"{cmd.name} ({cmd.mode})" if cmd.mode else cmd.name] = s
    fl = bl.summary(floors)
    rows["fsync floor"] = fl
    say(
        f"| (in-process write+fsync+rename+fsync(dir) of 2 KB) | - | {bl.ms(fl['median'])} "
        f"| {bl.ms(fl['p90'])} | {bl.ms(fl['min'])} | | | |"
    )
    say("\nspawn → message at the listener (agent start-up + delivery), median:")
    for cmd in cmds:
        if cmd.latency:
            say(f"- {cmd.name}: {bl.ms(statistics.median(cmd.latency))} ms")
    out: dict[str, object] = {"rows": rows}
    if product in variants:
        whole = by_name[(product.key, "queue")]
        imp = by_name[(f"imports only ({product.key})", None)]
        b = base(whole, pass_cmd)
        imp_m = base(whole, imp)
        work = rows[f"{product.key} (queue)"]["median"] - imp_m
        say(
            f"\nbreakdown of `{product.key}` in queue mode (medians over the same rounds): "
            f"interpreter {bl.ms(b)} ms, mailshim's imports +{bl.ms(imp_m - b)} ms, the work "
            f"(config, spool write, fsyncs, exit) +{bl.ms(work)} ms; "
            f"write+fsync+rename+fsync(dir) alone costs {bl.ms(fl['median'])} ms on this disk"
        )
    queue_cmds = [c for c in cmds if c.mode == "queue"]
    fastest = min(queue_cmds, key=lambda c: statistics.median(c.walls))
    inst = ctx.installs[fastest.name]
    env = ctx.env(
        bl.write_config(
            ctx.work / "importtime.toml",
            port=ctx.listener.port,
            spool=ctx.work / "spool-importtime",
            mode="queue",
        ),
        inst,
    )
    ctx.spawn([*inst.sendmail, "-i", bl.RCPT], env, stdin_data=bl.message(0))  # warm cache
    out["importtime"] = importtime_report(ctx, inst, env)
    ctx.results["startup"] = out


# --- (b) burst ---------------------------------------------------------------------------------


def bench_burst(ctx: Ctx) -> None:
    args, inst = ctx.args, ctx.main_install()
    assert ctx.listener is not None
    n = args.count
    spool = ctx.work / "spool-burst"
    config = bl.write_config(
        ctx.work / "burst.toml", port=ctx.listener.port, spool=spool, mode="background"
    )
    env = ctx.env(config, inst)
    bl.checked(ctx.spawn([*inst.sendmail, "-odq", "-i", bl.RCPT], env, stdin_data=b"\n"), "warm")
    os.unlink(spool / "queue" / os.listdir(spool / "queue")[0])
    cpu0 = float(ctx.listener.reset()["cpu"])
    say(f"\n## (b) {n} sequential submissions, background mode ({inst.label})")
    say(f"load average before: {bl.loadavg()}")
    walls = []
    with bl.AgentWatcher(str(spool)) as watcher:
        t0 = time.monotonic()
        for i in range(n):
            r = bl.checked(
                ctx.spawn([*inst.sendmail, "-i", bl.RCPT], env, stdin_data=bl.message(i)), "burst"
            )
            walls.append(r.wall)
        t_sub = time.monotonic()
        stats = ctx.listener.wait(n, 60 + n * 0.5)
        bl.wait_agents_gone(str(spool), 60)
    left = os.listdir(spool / "queue")
    res = {
        "count": n,
        "submit_total": t_sub - t0,
        "submit": bl.summary(walls),
        "all_delivered": float(stats["last"]) - t0,
        "after_last_submit": float(stats["last"]) - t_sub,
        "agents": watcher.count,
        "sessions": stats["sessions"],
        "messages": stats["messages"],
        "left_in_queue": len(left),
        "listener_cpu": float(stats["cpu"]) - cpu0,
    }
    say(
        f"- submissions: {res['submit_total']:.2f} s ({n / res['submit_total']:.0f}/s); "
        f"each: median {bl.ms(res['submit']['median'])} ms, p90 {bl.ms(res['submit']['p90'])} ms"
    )
    say(
        f"- all {n} at the listener {res['all_delivered']:.2f} s after the first submission "
        f"({res['after_last_submit']:.2f} s after the last)"
    )
    say(
        f"- agent processes: {res['agents']}; SMTP sessions: {res['sessions']}; "
        f"messages received: {res['messages']}; left in the queue: {res['left_in_queue']}"
    )
    say(f"load average after: {bl.loadavg()}")
    ctx.results["burst"] = res


# --- (c) peak RSS ------------------------------------------------------------------------------


def bench_rss(ctx: Ctx) -> None:
    args, inst = ctx.args, ctx.main_install()
    assert ctx.listener is not None
    big = ctx.work / "big.eml"
    size = bl.write_big_message(big, args.size_mb)
    spool = ctx.work / "spool-rss"
    config = bl.write_config(
        ctx.work / "rss.toml", port=ctx.listener.port, spool=spool, mode="background"
    )
    env = ctx.env(config, inst)
    ctx.listener.reset()
    say(f"\n## (c) peak RSS, a {size / 1e6:.0f} MB message ({inst.label})")
    res: dict[str, object] = {"size": size}
    limit = 120 + args.size_mb

    def child(name: str, argv: list[str], stdin: str | None = None) -> bl.Run:
        run = bl.spawn_measured(argv, env, scratch=ctx.scratch, stdin_path=stdin, timeout=limit)
        r = bl.checked(run, name, quiet=False)
        res[name] = {"maxrss_kb": r.maxrss_kb, "wall": r.wall}
        say(f"- {name}: peak RSS {r.maxrss_kb / 1024:.1f} MiB, {r.wall:.2f} s")
        return r

    base = bl.spawn_measured([bl.SYSTEM_PYTHON, "-I", "-c", "pass"], env, scratch=ctx.scratch)
    say(f"- (python3 -I -c pass: peak RSS {base.maxrss_kb / 1024:.1f} MiB)")
    res["python_pass_kb"] = base.maxrss_kb
    child("sendmail -odq", [*inst.sendmail, "-odq", "-i", bl.RCPT], str(big))
    child("sendmail -q", [*inst.sendmail, "-q"])
    got = ctx.listener.wait(1, limit)
    if int(got["largest"]) < size:
        raise bl.BenchError(f"the listener got {got['largest']} bytes, expected >= {size}")
    # With concurrency on: several big messages at once, for the agent and for a flush.
    many = args.rss_parallel
    with bl.AgentWatcher(str(spool), interval=0.02) as watcher:
        t0 = time.monotonic()
        for k in range(many):
            child(f"sendmail (background) {k + 1}", [*inst.sendmail, "-i", bl.RCPT], str(big))
        got = ctx.listener.wait(1 + many, limit * many)
        bl.wait_agents_gone(str(spool), limit)
    agent_kb = max(watcher.peaks.values()) if watcher.peaks else 0
    res["agent"] = {
        "maxrss_kb": agent_kb,
        "agents": watcher.count,
        "messages": many,
        "delivered_after": float(got["last"]) - t0,
    }
    say(
        f"- delivery agent, {many} messages (VmHWM polled from /proc every 20 ms, "
        f"{watcher.count} agent): peak RSS {agent_kb / 1024:.1f} MiB"
    )
    for k in range(many):
        child(f"sendmail -odq (again) {k + 1}", [*inst.sendmail, "-odq", "-i", bl.RCPT], str(big))
    before = ctx.listener.reset()
    child(f"mailshim flush ({many} queued, parallel sessions)", [*inst.mailshim, "flush"])
    got = ctx.listener.wait(many, limit * many)
    res["flush_sessions"] = got["sessions"]
    say(f"- that flush used {got['sessions']} SMTP sessions (before: {before['messages']})")
    ctx.results["rss"] = res


# --- (d) flush -----------------------------------------------------------------------------------


def _spool_many(
    ctx: Ctx, inst: bl.Install, env: dict[str, str], spool: Path, n: int, label: str
) -> dict[str, object]:
    walls = []
    with bl.AgentWatcher(str(spool)) as watcher:
        t0 = time.monotonic()
        for i in range(n):
            r = bl.checked(
                ctx.spawn([*inst.sendmail, "-i", bl.RCPT], env, stdin_data=bl.message(i)), label
            )
            walls.append(r.wall)
        total = time.monotonic() - t0
        # With the listener down, the agent lingers until its entries fall due (agent.py);
        # the flush that follows is what is measured, so it is asked to leave, as
        # `mailshim daemon` does (SIGTERM).
        bl.stop_agents(str(spool))
        bl.wait_agents_gone(str(spool), 120)
    queued = len(os.listdir(spool / "queue"))
    if queued != n:
        raise bl.BenchError(f"{label}: {queued} entries in the queue, expected {n}")
    res = {"total": total, "rate": n / total, "each": bl.summary(walls), "agents": watcher.count}
    say(
        f"- spooling {n} ({label}): {total:.2f} s, {n / total:.0f}/s, each median "
        f"{bl.ms(res['each']['median'])} ms p90 {bl.ms(res['each']['p90'])} ms; "
        f"agent processes started: {watcher.count}"
    )
    return res


def bench_flush(ctx: Ctx) -> None:
    args, inst = ctx.args, ctx.main_install()
    assert ctx.listener is not None
    n, port = args.count, ctx.listener.port
    say(f"\n## (d) flush of {n} queued messages ({inst.label})")
    res: dict[str, object] = {"count": n}

    # 1. Spool while the listener is down (background mode: each submission tries an agent).
    spool_a = ctx.work / "spool-flush"
    config_a = ctx.work / "flush.toml"
    bl.write_config(config_a, port=bl.free_port(), spool=spool_a, mode="background")
    env_a = ctx.env(config_a, inst)
    res["spool_listener_down"] = _spool_many(ctx, inst, env_a, spool_a, n, "listener down")

    # 2. One `mailshim flush` once the listener is back; first its fixed cost, on an empty
    # spool (start-up, imports, scanning; it connects only when there is mail).
    empty = ctx.work / "flush-empty.toml"
    bl.write_config(empty, port=port, spool=ctx.work / "spool-empty", mode="queue")
    env_e = ctx.env(empty, inst)  # the spool is made by a submission, emptied by a flush
    bl.checked(ctx.spawn([*inst.sendmail, "-i", bl.RCPT], env_e, stdin_data=bl.message(0)), "e")
    bl.checked(ctx.spawn([*inst.mailshim, "flush"], env_e), "flush", quiet=False)
    fixed = [
        bl.checked(ctx.spawn([*inst.mailshim, "flush"], env_e), "flush", quiet=False).wall
        for _ in range(5)
    ]
    res["flush_empty"] = bl.summary(fixed)
    say(
        "- `mailshim flush` of an empty spool (its fixed cost): "
        f"median {bl.ms(statistics.median(fixed))} ms"
    )
    bl.write_config(config_a, port=port, spool=spool_a, mode="background")
    cpu0 = float(ctx.listener.reset()["cpu"])
    t0 = time.monotonic()
    r = bl.checked(
        ctx.spawn([*inst.mailshim, "flush"], env_a, timeout=60 + n), "flush", quiet=False
    )
    stats = ctx.listener.wait(n, 60)
    flush = {
        "wall": r.wall,
        "delivered": float(stats["last"]) - t0,
        "sessions": stats["sessions"],
        "client_cpu": r.cpu,
        "listener_cpu": float(stats["cpu"]) - cpu0,
    }
    res["flush"] = flush
    say(
        f"- mailshim flush: all {n} delivered in {flush['delivered']:.2f} s "
        f"(process {r.wall:.2f} s), {flush['sessions']} SMTP session(s), CPU: mailshim "
        f"{r.cpu:.2f} s, listener {flush['listener_cpu']:.2f} s; "
        f"stdout tail: {r.stdout.decode(errors='replace').strip().splitlines()[-1:]}"
    )

    # 3. The same, one SMTP session per message (same runner code, RelayClient capped at 1).
    spool_b = ctx.work / "spool-per-session"
    config_b = bl.write_config(
        ctx.work / "per-session.toml", port=port, spool=spool_b, mode="queue"
    )
    env_b = ctx.env(config_b, inst)
    res["spool_queue_mode"] = _spool_many(ctx, inst, env_b, spool_b, n, "queue mode")
    cpu0 = float(ctx.listener.reset()["cpu"])
    t0 = time.monotonic()
    r = bl.checked(
        ctx.spawn(
            [*inst.python, str(bl.BENCH / "one_per_session.py"), str(config_b)],
            env_b,
            timeout=120 + n,
        ),
        "one_per_session",
        quiet=False,
    )
    stats = ctx.listener.wait(n, 60)
    per = {
        "wall": r.wall,
        "delivered": float(stats["last"]) - t0,
        "sessions": stats["sessions"],
        "client_cpu": r.cpu,
        "listener_cpu": float(stats["cpu"]) - cpu0,
    }
    res["one_session_per_message"] = per
    say(
        f"- one session per message (one process): {per['delivered']:.2f} s, "
        f"{per['sessions']} sessions, CPU: mailshim {r.cpu:.2f} s, listener "
        f"{per['listener_cpu']:.2f} s → flush is "
        f"{per['delivered'] / flush['delivered']:.1f}× faster"
    )

    # 4. One process and one session per message: `sendmail -qI<id>` in a loop (a sample).
    # Each entry is spooled (untimed) just before its -qI, so the spool holds only that entry:
    # with other entries present, `-qI` currently never returns (see bench/RESULTS.md).
    k = min(args.qi_count, n)
    if k:
        spool_c = ctx.work / "spool-qi"
        config_c = bl.write_config(ctx.work / "qi.toml", port=port, spool=spool_c, mode="queue")
        env_c = ctx.env(config_c, inst)
        ctx.listener.reset()
        walls = []
        for i in range(k):
            bl.checked(
                ctx.spawn([*inst.sendmail, "-i", bl.RCPT], env_c, stdin_data=bl.message(i)),
                "spool for -qI",
            )
            (qid,) = os.listdir(spool_c / "queue")
            rr = bl.checked(
                ctx.spawn([*inst.sendmail, f"-qI{qid}"], env_c, timeout=30), "-qI", quiet=False
            )
            walls.append(rr.wall)
        stats = ctx.listener.wait(k, 60)
        took = sum(walls)
        qi = {
            "count": k,
            "delivered": took,
            "per_message": took / k,
            "extrapolated": took / k * n,
            "each": bl.summary(walls),
            "sessions": stats["sessions"],
        }
        res["qI_loop"] = qi
        say(
            f"- `sendmail -qI<id>` per message, {k} messages: {bl.ms(took / k)} ms each "
            f"(median {bl.ms(qi['each']['median'])}), {stats['sessions']} sessions → {n} would "
            f"take ≈{qi['extrapolated']:.1f} s; flush is "
            f"≈{qi['extrapolated'] / flush['delivered']:.0f}× faster"
        )
    say("- Postfix null client on this kind of machine (FACTS.md): 1000 queued in ≈1.8 s")
    ctx.results["flush"] = res


def _spool_down(ctx: Ctx, inst: bl.Install, n: int) -> tuple[Path, dict[str, object]]:
    """Spool ``n`` with ``sendmail`` while the listener is down; the spool is then copied for
    each way of flushing it, so that every flush starts from the same entries."""
    spool = ctx.work / "spool-made"
    shutil.rmtree(spool, ignore_errors=True)
    config = ctx.work / "made.toml"
    bl.write_config(config, port=bl.free_port(), spool=spool, mode="background")
    env = ctx.env(config, inst)
    return spool, _spool_many(ctx, inst, env, spool, n, "mailshim, listener down")


def _flush_mailshim(
    ctx: Ctx,
    inst: bl.Install,
    n: int,
    name: str,
    made: Path,
    *,
    pipelining: bool,
    concurrency: int | None,
) -> dict[str, object]:
    """One ``mailshim flush`` of a copy of ``made`` once the listener is up."""
    assert ctx.listener is not None
    spool = ctx.work / f"spool-{name}"
    shutil.rmtree(spool, ignore_errors=True)
    shutil.copytree(made, spool, symlinks=True)
    config = ctx.work / f"{name}.toml"
    env = ctx.env(config, inst)
    bl.write_config(
        config, port=ctx.listener.port, spool=spool, mode="background", concurrency=concurrency
    )
    ctx.listener.pipelining(pipelining)
    cpu0 = float(ctx.listener.reset()["cpu"])
    t0 = time.monotonic()
    r = bl.checked(ctx.spawn([*inst.mailshim, "flush"], env, timeout=60 + n), "flush", quiet=False)
    stats = ctx.listener.wait(n, 120)
    ctx.listener.pipelining(True)
    left = len(os.listdir(spool / "queue"))
    if stats["messages"] != n or left:
        raise bl.BenchError(f"flush ({name}): {stats['messages']} arrived, {left} left queued")
    out = {
        "delivered": float(stats["last"]) - t0,
        "sessions": stats["sessions"],
        "client_cpu": r.cpu,
        "listener_cpu": float(stats["cpu"]) - cpu0,
    }
    say(
        f"- mailshim flush ({name}): {n} delivered in {out['delivered']:.2f} s, "
        f"{out['sessions']} session(s), CPU mailshim {r.cpu:.2f} s, listener "
        f"{out['listener_cpu']:.2f} s"
    )
    return out


def _flush_postfix(ctx: Ctx, pf: pfx.Postfix, n: int, down: int) -> dict[str, object]:
    """Postfix spools ``n`` while its relayhost is down, then ``postqueue -f`` once it is up."""
    assert ctx.listener is not None
    walls = []
    t0 = time.monotonic()
    for i in range(n):
        r = bl.checked(
            ctx.spawn([*pf.sendmail, "-i", bl.RCPT], pf.env, stdin_data=bl.message(i)),
            "Postfix sendmail",
        )
        walls.append(r.wall)
    total = time.monotonic() - t0
    pf.wait_queued(n, 120 + n / 10)
    settled = time.monotonic() - t0
    spooled = {"total": total, "rate": n / total, "each": bl.summary(walls), "settled": settled}
    say(
        f"- spooling {n} (Postfix sendmail, relayhost down): {total:.2f} s, {n / total:.0f}/s, "
        f"each median {bl.ms(spooled['each']['median'])} ms p90 "
        f"{bl.ms(spooled['each']['p90'])} ms; all deferred after {settled:.2f} s"
    )
    pf.relay_to(ctx.listener.port)
    cpu0 = float(ctx.listener.reset()["cpu"])
    t0 = time.monotonic()
    pf.flush()
    stats = ctx.listener.wait(n, 120)
    out = {
        "delivered": float(stats["last"]) - t0,
        "sessions": stats["sessions"],
        "listener_cpu": float(stats["cpu"]) - cpu0,
        "spool": spooled,
    }
    pf.relay_to(down)
    say(
        f"- Postfix flush (postqueue -f): {n} delivered in {out['delivered']:.2f} s, "
        f"{out['sessions']} session(s), listener CPU {out['listener_cpu']:.2f} s"
    )
    return out


def bench_postfix(ctx: Ctx) -> None:
    args, inst = ctx.args, ctx.main_install()
    n = args.count
    say(f"\n## (f) side by side with Postfix: {n} queued while the listener is down, then flushed")
    say(f"- load average before: {bl.loadavg()}")
    down = bl.free_port()
    try:
        pf = pfx.Postfix(down, log=lambda m: say(f"  ({m})"))
    except (pfx.PostfixError, OSError, subprocess.SubprocessError) as exc:
        raise bl.BenchError(f"Postfix: {exc}") from None
    rounds: list[dict[str, object]] = []
    try:
        pf.start()
        say(f"- Postfix {pf.version} ({pf.package}, unpacked, not installed)")
        for k in range(args.rounds):
            say(f"\n### round {k + 1} of {args.rounds}")
            made, spooled = _spool_down(ctx, inst, n)
            one = {
                "mailshim_spooling_down": spooled,
                "mailshim_parallel": _flush_mailshim(
                    ctx, inst, n, "parallel", made, pipelining=True, concurrency=None
                ),
                "mailshim_pipelined": _flush_mailshim(
                    ctx, inst, n, "pipelined", made, pipelining=True, concurrency=1
                ),
                "mailshim_lockstep": _flush_mailshim(
                    ctx, inst, n, "lock-step", made, pipelining=False, concurrency=1
                ),
                "postfix": _flush_postfix(ctx, pf, n, down),
            }
            rounds.append(one)
            par, piped, serial, post = (
                float(one[key]["delivered"])  # type: ignore[index]
                for key in (
                    "mailshim_parallel",
                    "mailshim_pipelined",
                    "mailshim_lockstep",
                    "postfix",
                )
            )
            say(
                f"- mailshim/Postfix: **{par / post:.2f}×** parallel, {piped / post:.2f}× one "
                f"pipelined session, {serial / post:.2f}× one lock-step session; pipelining "
                f"gains {serial / piped:.2f}×, parallel sessions {piped / par:.2f}× more"
            )
    except (pfx.PostfixError, subprocess.SubprocessError) as exc:
        raise bl.BenchError(f"Postfix: {exc}") from None
    finally:
        pf.close()
    ctx.results["postfix"] = {
        "version": pf.version,
        "package": pf.package,
        "count": n,
        "rounds": rounds,
        "load_after": bl.loadavg(),
    }
    say(f"- load average after: {bl.loadavg()}")


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description="mailshim benchmarks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help="comma-separated: startup,burst,rss,flush,postfix (or a,b,c,d,f)",
    )
    ap.add_argument("--iterations", type=int, default=30, help="(a) interleaved rounds")
    ap.add_argument(
        "--bg-iterations",
        type=int,
        default=12,
        help="(a) how many rounds also run background mode (each waits for its agent)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="(a) unrecorded rounds first")
    ap.add_argument("--importtime-runs", type=int, default=7, help="(a) -X importtime runs")
    ap.add_argument(
        "--variants",
        default="dev-venv,wheel-venv,wheel-venv-c,debian",
        help="(a) installs to compare",
    )
    ap.add_argument("--count", type=int, default=1000, help="(b, d, f) number of messages")
    ap.add_argument("--size-mb", type=int, default=200, help="(c) message size in MB")
    ap.add_argument(
        "--rss-parallel", type=int, default=4, help="(c) big messages delivered at once"
    )
    ap.add_argument(
        "--qi-count",
        type=int,
        default=100,
        help="(d) messages delivered by a `sendmail -qI<id>` loop (0: skip)",
    )
    ap.add_argument(
        "--install",
        default="debian",
        choices=["debian", "wheel-venv", "dev-venv"],
        help="(b, c, d) which install",
    )
    ap.add_argument("--rounds", type=int, default=2, help="(f) rounds of each flush")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    wanted = [ALIASES.get(w.strip(), w.strip()) for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in ORDER]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    work = Path(tempfile.mkdtemp(prefix="mailshim-bench-"))
    ctx = Ctx(args, work)
    started = time.monotonic()
    try:
        say("# mailshim benchmark\n")
        mach = bl.machine()
        for key, value in mach.items():
            say(f"- {key}: {value}")
        ctx.results["machine"] = mach
        ctx.installs = bl.build_installs(work, lambda m: say(f"  ({m})"))
        bad = [v for v in args.variants if v not in ctx.installs]
        if bad:
            ap.error(f"unknown install(s): {', '.join(bad)}")
        ctx.listener = bl.Listener(bl.free_port())
        for name in ORDER:
            if name in wanted:
                globals()[f"bench_{name}"](ctx)
        ctx.results["seconds"] = time.monotonic() - started
        say(f"\ndone in {ctx.results['seconds']:.0f} s; load average now {bl.loadavg()}")
        if args.json:
            Path(args.json).write_text(json.dumps(ctx.results, indent=2, default=str))
    except bl.BenchError as exc:
        say(f"\nbench failed: {exc}")
        return 1
    finally:
        if ctx.listener is not None:
            ctx.listener.close()
        for spool in work.glob("spool-*"):
            for pid in bl.agent_pids(str(spool)):
                try:
                    os.kill(pid, 15)  # an agent we started, found by its spool path
                except OSError:
                    pass
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
