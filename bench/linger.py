"""The lingering delivery agent: what it costs asleep, and how fast it delivers once the
listener is back, with no runner at all (issue 11, item 2).

    .venv/bin/python bench/linger.py [--idle-seconds 600] [--rounds 5] [--json FILE]

(a) Idle cost: one message is submitted while the listener is down, with `[queue] retry =
["1h"]`, so the agent it starts sleeps for the whole measurement. Its VmRSS, VmHWM, CPU time
(utime+stime from /proc/PID/stat) and context switches (voluntary + involuntary from
/proc/PID/status: each wake-up is at least one) are read at the start and the end of
``--idle-seconds`` of sleep.

(b) Return to delivery: with `[queue] retry = ["5s"]` and `retry_after_failure = 1`, a
message is submitted while the listener is down; the listener comes back 3 s later; nobody
runs `flush`. The figure is the time from the listener's return to the message's arrival
(the first retry step bounds it: the attempt falls due 5 s after the failed one).

Prints Markdown; the machine is described first (nproc, lscpu head, python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import Listener, agent_pids, free_port, summary

VENV_BIN = Path(sys.executable).parent
MESSAGE = b"Subject: linger\n\nbody\n"


def config(path: Path, port: int, spool: Path, retry: str, pause: float) -> None:
    path.write_text(
        f"""[relay]
host = "127.0.0.1"
port = {port}
timeout = 10
helo = "bench.example.org"
retry_after_failure = {pause}

[addresses]
domain = "example.org"

[queue]
dir = "{spool}"
retry = {retry}

[delivery]
mode = "background"
"""
    )


def env_for(cfg: Path, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MAILSHIM_CONFIG=str(cfg),
        MAILSHIM_CACHE_DIR=str(work / "cache"),
        MAILSHIM_NO_SYSLOG="1",
        HOME=str(work / "home"),
    )
    return env


def submit(env: dict[str, str]) -> None:
    done = subprocess.run(
        [str(VENV_BIN / "sendmail"), "-i", "bob@example.org"],
        input=MESSAGE,
        env=env,
        capture_output=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise SystemExit(f"sendmail failed: {done.stderr!r}")


def wait_agent(spool: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = agent_pids(str(spool))
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise SystemExit("no agent started")


def proc_sample(pid: int) -> dict[str, float]:
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_kb": float(status["VmRSS"].split()[0]),
        "hwm_kb": float(status["VmHWM"].split()[0]),
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,  # utime + stime
        "switches": float(
            int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])
        ),
    }


def idle_cost(work: Path, seconds: float) -> dict[str, float]:
    spool = work / "idle-spool"
    cfg = work / "idle.toml"
    config(cfg, free_port(), spool, '["1h"]', 30.0)  # nobody listens on that port
    env = env_for(cfg, work)
    submit(env)
    pid = wait_agent(spool)
    time.sleep(3)  # its first attempt has failed; it is asleep now
    before = proc_sample(pid)
    started = time.monotonic()
    time.sleep(seconds)
    after = proc_sample(pid)
    slept = time.monotonic() - started
    os.kill(pid, 15)
    return {
        "slept_s": slept,
        "rss_kb": after["rss_kb"],
        "hwm_kb": after["hwm_kb"],
        "cpu_s_asleep": after["cpu_s"] - before["cpu_s"],
        "switches_asleep": after["switches"] - before["switches"],
    }


def return_to_delivery(work: Path, rounds: int) -> list[float]:
    out = []
    for i in range(rounds):
        spool = work / f"ret-spool-{i}"
        cfg = work / f"ret-{i}.toml"
        port = free_port()
        config(cfg, port, spool, '["5s"]', 1.0)
        env = env_for(cfg, work)
        submit(env)
        wait_agent(spool)
        time.sleep(3)
        listener = Listener(port)
        back = time.monotonic()
        try:
            listener.wait(1, 60)
            out.append(time.monotonic() - back)
        finally:
            listener.close()
        deadline = time.monotonic() + 30
        while agent_pids(str(spool)) and time.monotonic() < deadline:
            time.sleep(0.05)
    return out


def machine_lines() -> list[str]:
    lines = [f"- nproc: {len(os.sched_getaffinity(0))}"]
    if shutil.which("lscpu"):
        head = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:8]
        lines += [f"- {line.strip()}" for line in head]
    lines.append(f"- python: {sys.version.split()[0]} ({sys.executable})")
    with open("/proc/loadavg") as f:
        lines.append(f"- load average at start: {' '.join(f.read().split()[:3])}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=600.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailshim-linger-") as tmp:
        work = Path(tmp)
        print("## Machine\n")
        print("\n".join(machine_lines()))
        idle = idle_cost(work, args.idle_seconds)
        print(f"\n## (a) A lingering agent asleep for {idle['slept_s']:.0f} s\n")
        print("| RSS | peak RSS | CPU time asleep | context switches asleep |")
        print("|---|---|---|---|")
        print(
            f"| {idle['rss_kb'] / 1024:.1f} MiB | {idle['hwm_kb'] / 1024:.1f} MiB"
            f" | {idle['cpu_s_asleep'] * 1000:.0f} ms | {idle['switches_asleep']:.0f} |"
        )
        times = return_to_delivery(work, args.rounds)
        s = summary(times)
        print(f"\n## (b) Listener back → message delivered, no runner ({len(times)} rounds)\n")
        print("| min | median | max | first retry step |")
        print("|---|---|---|---|")
        print(f"| {s['min']:.2f} s | {s['median']:.2f} s | {max(times):.2f} s | 5 s |")
        if args.json:
            Path(args.json).write_text(json.dumps({"idle": idle, "return_s": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
