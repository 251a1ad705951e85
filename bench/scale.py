"""Issue 26: what each command costs at 1,000, 10,000 and 100,000 queued, beside Postfix.

For each size a fresh spool on tmpfs (``/dev/shm``, so the disk is not the limit) gets that
many 2 KB entries made through the spool API (``Spool.new_entry``/``save_state``, as the issue
measured), every one deferred for an hour after a failed attempt except one that is due; the
relay is a port nobody listens on. Then each command runs once through ``bench/maxrss.py``
(wall time and its own peak RSS): ``mailq``, ``mailshim queue``, ``--json``, ``--ids``,
``queue show ID``, ``mailshim check``, ``mailshim run`` (one due entry tried; again, trying
the delay warning that run queued), ``mailshim run`` after the schedule index was deleted
(its rebuild), ``mailshim run`` with nothing due, the bulk commands (``qshape``, a dry
run of ``delete --sender``, and a ``delete --sender`` of 90 %), and last ``mailshim flush``
of the rest to the bench listener (rate = messages / wall).

Postfix (``--postfix``, root): Debian's package unpacked by bench/postfix.py, its queue
on tmpfs too. Its deferred queue is filled by submitting a few messages while its relay is
down and copying their queue files under new queue ids (into the right hashed folder, owner
and mode kept) up to the size; ``postqueue -p`` (served by ``showq``, whose memory is not
counted: it is the master's child), ``postsuper -d ALL deferred`` are timed the same way.

Usage: bench/scale.py [--sizes 1000,10000,100000] [--postfix] [--out FILE]

Trust: a developer's benchmark tool, run on a throwaway machine state.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    DEV_VENV,
    BenchError,
    Listener,
    free_port,
    loadavg,
    machine,
    message,
    spawn_measured,
    write_config,
)

SENDER = "cron@example.org"
OTHER = "alerts@example.org"


def make_spool(root: Path, n: int) -> str:
    """``n`` deferred 2 KB entries (one due), 90 % of them from SENDER; the due one's id."""
    from mailshim import spool, spoolindex

    sp = spool.Spool(str(root))
    sp.ensure()
    body = message(0).replace(b"\n", b"\r\n")
    now = int(time.time())
    due = ""
    for i in range(n):
        sender = SENDER if i % 10 else OTHER
        w = sp.new_entry(sender, [f"user{i % 50}@example.net"], os.getuid(), arrival=now - i)
        w.write(body)
        locked = w.commit(False, keep_lock=True, sync_dir=False)
        assert locked is not None
        state = locked.state()
        state.attempts = 1
        state.first_attempt = state.last_attempt = now - 60
        state.last_error = "connect to 127.0.0.1:9: Connection refused"
        state.next_attempt = now - 1 if i == n // 2 else now + 3600
        if i == n // 2:
            due = w.queue_id
        sp.save_state(w.queue_id, state, sync=False)
        locked.release()
    spoolindex.rebuild(sp)
    return due


def fair_order_time(spool_root: Path, env: dict[str, str]) -> float:
    """Seconds to compute a flush's fair order of the whole spool (in a fresh process)."""
    code = (
        "import sys, time; from mailshim import fair, spool, spoolindex;"
        "sp = spool.Spool(sys.argv[1]); t = time.perf_counter();"
        "n = sum(1 for _ in fair.order(spoolindex.due(sp, time.time(), True)));"
        "print(time.perf_counter() - t, n)"
    )
    out = subprocess.run(
        [str(DEV_VENV / "bin" / "python"), "-c", code, str(spool_root)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return float(out.stdout.split()[0])


def measure(argv: list[str], env: dict[str, str], scratch: Path, timeout: float = 1800) -> dict:
    run = spawn_measured(argv, env, scratch=scratch, timeout=timeout)
    return {"wall": run.wall, "rss_mb": run.maxrss_kb / 1024, "code": run.code, "out": run.stdout}


def mailshim_rows(n: int, work: Path, log) -> list[tuple[str, dict]]:
    bin_ = DEV_VENV / "bin"
    folder = Path(tempfile.mkdtemp(prefix=f"mailshim-scale-{n}-", dir="/dev/shm"))
    try:
        spool_root = folder / "spool"
        t0 = time.monotonic()
        due = make_spool(spool_root, n)
        log(f"  {n} entries made in {time.monotonic() - t0:.1f}s")
        config = write_config(
            folder / "config.toml", port=free_port(), spool=spool_root, mode="queue"
        )
        env = dict(os.environ, MAILSHIM_CONFIG=str(config), MAILSHIM_NO_SYSLOG="1")
        env["MAILSHIM_CACHE_DIR"] = str(folder / "cache")
        rows: list[tuple[str, dict]] = []

        def one(label: str, argv: list[str], ok=(0,)) -> dict:
            got = measure(argv, env, work)
            if ok and got["code"] not in ok:
                raise BenchError(f"{label}: exit {got['code']}")
            rows.append((label, got))
            log(f"  {label}: {got['wall']:.2f}s {got['rss_mb']:.1f} MB")
            return got

        one("mailq", [str(bin_ / "mailq")])
        one("mailshim queue", [str(bin_ / "mailshim"), "queue"])
        one("mailshim queue --json", [str(bin_ / "mailshim"), "queue", "--json"])
        one("mailshim queue --ids", [str(bin_ / "mailshim"), "queue", "--ids"])
        one("mailshim queue show ID", [str(bin_ / "mailshim"), "queue", "show", due])
        one("mailshim check (listener down)", [str(bin_ / "mailshim"), "check"], ok=())
        one("mailshim run (1 due, listener down)", [str(bin_ / "mailshim"), "run"])
        # Not "nothing due": the run before queued a delay warning to the sender, due now.
        one("mailshim run (1 due: the warning the last run queued)",
            [str(bin_ / "mailshim"), "run"])  # fmt: skip
        shutil.rmtree(spool_root / "state" / "schedule")
        one("mailshim run (index deleted: rebuilt)", [str(bin_ / "mailshim"), "run"])
        one("mailshim run (nothing due)", [str(bin_ / "mailshim"), "run"])
        one("mailshim queue shape", [str(bin_ / "mailshim"), "queue", "shape"])
        sender = ["--sender", SENDER]
        one("mailshim queue delete --sender (dry run)",
            [str(bin_ / "mailshim"), "queue", "delete", *sender, "--dry-run"])  # fmt: skip
        before = len(os.listdir(spool_root / "queue"))  # a run may have queued a delay warning
        one("mailshim queue delete --sender (90 %)",
            [str(bin_ / "mailshim"), "queue", "delete", *sender])  # fmt: skip
        left = len(os.listdir(spool_root / "queue"))
        if left != before - (n - (n + 9) // 10):
            raise BenchError(f"delete --sender left {left} of {before}")
        # The flush: a second spool of n entries (the first lost 90 % to the delete).
        shutil.rmtree(spool_root)
        t0 = time.monotonic()
        make_spool(spool_root, n)
        log(f"  {n} entries made again in {time.monotonic() - t0:.1f}s")
        listener = Listener(free_port())
        try:
            write_config(config, port=listener.port, spool=spool_root, mode="queue")
            order = fair_order_time(spool_root, env)
            got = one("mailshim flush (listener up)", [str(bin_ / "mailshim"), "flush"])
            listener.wait(n, 600)
            got["rate"] = n / got["wall"]
            got["order"] = order
            log(f"    {got['rate']:.0f} msg/s; the fair order of {n} took {order:.3f}s")
        finally:
            listener.close()
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class PostfixQueue:
    """Postfix with a deferred queue of a given size (made by copying queue files)."""

    SEED = 20

    def __init__(self, log) -> None:
        import postfix

        tempfile.tempdir = "/dev/shm"  # its queue on tmpfs too
        self.pf = postfix.Postfix(free_port(), log=log)
        tempfile.tempdir = None
        self.pf.start()
        body = message(0)
        for _ in range(self.SEED):
            subprocess.run(
                [*self.pf.sendmail, "-f", SENDER, "sink@example.org"],
                input=body,
                env=self.pf.env,
                check=True,
                timeout=60,
            )
        self.pf.wait_queued(self.SEED, 120)
        deferred = self.pf.queue / "deferred"
        found = [p for p in deferred.rglob("*") if p.is_file()]
        # Kept in memory: postsuper -d ALL removes the files themselves.
        self.seeds = [(p.read_bytes(), p.stat(), p.parent.stat()) for p in found]
        self.count = len(found)

    def fill(self, n: int) -> None:
        deferred = self.pf.queue / "deferred"
        later = time.time() + 3600  # a deferred file's mtime is its next attempt
        made = set()
        while self.count < n:
            data, st, parent = random.choice(self.seeds)
            # A short queue id: 5 hex digits of microseconds and the inode's, here unique.
            qid = f"{random.randrange(16**5):05X}{random.randrange(16**7):07X}"
            if qid in made:
                continue
            made.add(qid)
            folder = deferred / qid[0]
            if not folder.exists():
                folder.mkdir(mode=stat.S_IMODE(parent.st_mode))
                os.chown(folder, parent.st_uid, parent.st_gid)
            dest = folder / qid
            dest.write_bytes(data)
            os.chmod(dest, stat.S_IMODE(st.st_mode))
            os.chown(dest, st.st_uid, st.st_gid)
            os.utime(dest, (later, later))
            self.count += 1

    def rows(self, n: int, work: Path, log) -> list[tuple[str, dict]]:
        self.fill(n)
        root = self.pf.root / "usr" / "sbin"
        conf = ["-c", str(self.pf.conf)]
        out = []
        got = measure([str(root / "postqueue"), *conf, "-p"], self.pf.env, work)
        lines = got["out"].decode(errors="replace").strip().splitlines()
        if got["code"] != 0 or not lines or f"in {n} Request" not in lines[-1]:
            raise BenchError(f"postqueue -p: {lines[-1:]}")
        out.append(("postqueue -p", got))
        log(f"  postqueue -p: {got['wall']:.2f}s {got['rss_mb']:.1f} MB")
        got = measure([str(root / "postsuper"), *conf, "-d", "ALL", "deferred"], self.pf.env, work)
        out.append(("postsuper -d ALL deferred", got))
        log(f"  postsuper -d ALL deferred: {got['wall']:.2f}s {got['rss_mb']:.1f} MB")
        self.count = sum(1 for p in (self.pf.queue / "deferred").rglob("*") if p.is_file())
        return out

    def close(self) -> None:
        self.pf.close()


def table(results: dict[int, list[tuple[str, dict]]]) -> str:
    sizes = sorted(results)
    labels: list[str] = []
    for n in sizes:
        for label, _ in results[n]:
            key = label.split(" (")[0] if label.startswith("mailshim flush") else label
            if key not in labels:
                labels.append(key)
    head = "| command | " + " | ".join(f"{n:,} queued: time, peak RSS" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for key in labels:
        cells = []
        for n in sizes:
            got = next(
                (g for label, g in results[n] if label == key or label.startswith(key + " (")),
                None,
            )
            if got is None:
                cells.append("–")
                continue
            cell = f"{got['wall']:.2f} s, {got['rss_mb']:.0f} MB"
            if "rate" in got:
                cell += f" ({got['rate']:.0f} msg/s; fair order {got['order']:.2f} s)"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--postfix", action="store_true", help="Postfix beside (root)")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="mailshim-scale-work-"))
    pf = PostfixQueue(log) if args.postfix else None
    results: dict[int, list[tuple[str, dict]]] = {}
    try:
        for n in sizes:
            log(f"{n} queued (load {loadavg()})")
            results[n] = mailshim_rows(n, work, log)
            if pf is not None:
                results[n] += pf.rows(n, work, log)
    finally:
        if pf is not None:
            pf.close()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(f"- {k}: {v}" for k, v in info.items())
    text += f"\n- load average at the end: {loadavg()}\n\n" + table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
