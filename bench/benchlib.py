"""Plumbing for bench/run.py: installs to measure, timed children, the listener, statistics.

Children are started with ``os.posix_spawn`` and reaped with ``os.wait4`` (through a pidfd, so
every wait has a time limit); the wall time is taken around exactly that, and ``wait4`` also
gives the child's peak RSS. Every file lives in one temporary folder; only loopback is used.

Trust: a benchmark tool run by a developer; nothing here faces untrusted input.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEV_VENV = Path(sys.prefix)
SYSTEM_PYTHON = (
    "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
)
DEPENDENCIES = ("aiosmtplib", "click", "platformdirs")
RCPT = "sink@example.org"
SENDMAIL_CODE = (
    "from mailshim.cli.sendmail import main; import sys; sys.argv[0] = 'sendmail'; main()"
)

# What a queue- or background-mode sendmail imports (see bench/RESULTS.md's importtime list).
IMPORTS_CODE = "import mailshim.cli.sendmail, mailshim.config, mailshim.configload, mailshim.submit"


class BenchError(Exception):
    """Something in the set-up or a measured run went wrong: the figure would be a lie."""


# --- timed children ---------------------------------------------------------------------


class Run:
    __slots__ = ("cpu", "maxrss_kb", "status", "stderr", "stdout", "wall")

    def __init__(
        self, wall: float, status: int, maxrss_kb: int, cpu: float, stdout: bytes, stderr: bytes
    ) -> None:
        self.wall = wall
        self.status = status
        self.maxrss_kb = maxrss_kb
        self.cpu = cpu  # user + system seconds of the child (and its reaped children)
        self.stdout = stdout
        self.stderr = stderr

    @property
    def code(self) -> int:
        return os.waitstatus_to_exitcode(self.status)


def spawn(
    argv: list[str],
    env: dict[str, str],
    *,
    stdin_data: bytes | None = None,
    stdin_path: str | None = None,
    timeout: float = 120.0,
    scratch: Path,
) -> Run:
    """Run ``argv`` to completion; wall time from spawn to reap. Raises BenchError on timeout.

    ``maxrss_kb`` is not the child's own peak here: the kernel keeps the spawning process's
    peak across exec (see ``spawn_measured``)."""
    out_path, err_path = scratch / "child.out", scratch / "child.err"
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if stdin_path is not None:
        in_fd = os.open(stdin_path, os.O_RDONLY)
    elif stdin_data is not None:
        if len(stdin_data) > 60000:
            raise BenchError("stdin_data must fit in a pipe buffer; use stdin_path")
        in_fd, w = os.pipe()
        os.write(w, stdin_data)
        os.close(w)
    else:
        in_fd = os.open(os.devnull, os.O_RDONLY)
    actions = [
        (os.POSIX_SPAWN_DUP2, in_fd, 0),
        (os.POSIX_SPAWN_DUP2, out_fd, 1),
        (os.POSIX_SPAWN_DUP2, err_fd, 2),
    ]
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        pidfd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.wait4(pid, 0)
                raise BenchError(f"timed out after {timeout}s: {argv[:6]}")
            _, status, usage = os.wait4(pid, 0)
            wall = time.perf_counter() - t0
        finally:
            os.close(pidfd)
    finally:
        for fd in (in_fd, out_fd, err_fd):
            os.close(fd)
    cpu = usage.ru_utime + usage.ru_stime
    return Run(wall, status, usage.ru_maxrss, cpu, out_path.read_bytes(), err_path.read_bytes())


def spawn_measured(argv: list[str], env: dict[str, str], *, scratch: Path, **kw: object) -> Run:
    """Like ``spawn``, but the peak RSS and wall time are the command's own (bench/maxrss.py)."""
    result = scratch / "maxrss.out"
    helper = [SYSTEM_PYTHON, "-I", "-S", str(BENCH / "maxrss.py"), str(result), *argv]
    run = spawn(helper, env, scratch=scratch, **kw)  # type: ignore[arg-type]
    kb, wall, _code = result.read_text().split()
    run.maxrss_kb, run.wall = int(kb), float(wall)
    return run


def checked(run: Run, what: str, quiet: bool = True) -> Run:
    """A run that must have exited 0 (and, when ``quiet``, said nothing on stderr)."""
    if run.code != 0 or (quiet and run.stderr):
        raise BenchError(
            f"{what}: exit {run.code}, stderr: {run.stderr.decode(errors='replace').strip()!r}"
        )
    return run


# --- statistics ----------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    vals = sorted(values)
    n = len(vals)
    p90 = vals[min(n - 1, max(0, round(0.9 * n + 0.5) - 1))]  # nearest rank
    return {"n": n, "min": vals[0], "median": statistics.median(vals), "p90": p90}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# --- the listener process --------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Listener:
    """bench/listener.py in its own process, driven over a pipe."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "listener.py"), "--port", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.close()
            raise BenchError(f"listener did not start: {line!r}")

    def _ask(self, line: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise BenchError("the listener died")
        return dict(json.loads(answer))

    def stats(self) -> dict[str, float]:
        return self._ask("stats")

    def reset(self) -> dict[str, float]:
        return self._ask("reset")

    def pipelining(self, on: bool) -> None:
        """Offer PIPELINING in EHLO replies (real listeners do) or not (lock-step clients)."""
        self._ask("pipelining on" if on else "pipelining off")

    def wait(self, count: int, timeout: float) -> dict[str, float]:
        got = self._ask(f"wait {count} {timeout}")
        if got["messages"] < count:
            raise BenchError(f"listener has {got['messages']} of {count} messages after {timeout}s")
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --- delivery agents (detached: not our children) ----------------------------------------------


def agent_pids(spool_root: str) -> list[int]:
    """Processes running ``mailshim.agent`` for this spool."""
    marker, root = b"mailshim.agent", spool_root.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker in cmd and root in cmd:
            found.append(int(name))
    return found


def stop_agents(spool_root: str) -> None:
    """SIGTERM the agents serving this spool (the bench's own, found by their spool path)."""
    for pid in agent_pids(spool_root):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass  # gone meanwhile


def peak_rss_kb(pid: int) -> int | None:
    """VmHWM of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class AgentWatcher:
    """Polls /proc for this spool's agents: how many ran, and each one's last-seen VmHWM."""

    def __init__(self, spool_root: str, interval: float = 0.05) -> None:
        self.spool_root = spool_root
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> AgentWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in agent_pids(self.spool_root):
                peak = peak_rss_kb(pid)
                if peak is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0))
            self._stop.wait(self.interval)

    @property
    def count(self) -> int:
        return len(self.peaks)


def wait_agents_gone(spool_root: str, timeout: float = 60.0) -> float:
    """Wait until no agent runs for this spool; returns the seconds waited."""
    t0 = time.monotonic()
    while agent_pids(spool_root):
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"an agent for {spool_root} still runs after {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0


# --- messages and configs ----------------------------------------------------------------------


def message(i: int, size: int = 2048) -> bytes:
    """A plain-text message of exactly ``size`` bytes (LF line ends, as callers pipe them)."""
    head = (
        "From: Bench <bench@example.org>\n"
        f"To: {RCPT}\n"
        f"Subject: benchmark message {i}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
    body = bytearray()
    while len(head) + len(body) < size:
        body += line
    data = head + bytes(body)
    return data[: size - 1] + b"\n"


def write_big_message(path: Path, megabytes: int) -> int:
    """A ``megabytes`` MB message of 76-character base64-like lines, as attachments look."""
    head = (
        f"From: Bench <bench@example.org>\nTo: {RCPT}\nSubject: big\nMIME-Version: 1.0\n"
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    ).encode()
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    lines = [(alphabet[i % 64 :] + alphabet)[:76] + b"\n" for i in range(64)]
    block = b"".join(lines) * 256  # ~1.2 MB
    want = megabytes * 1000 * 1000
    with open(path, "wb") as f:
        f.write(head)
        written = len(head)
        while written + len(block) <= want:
            f.write(block)
            written += len(block)
        tail = want - written
        f.write(block[: tail - tail % 77])
        written += tail - tail % 77
    return written


def write_config(
    path: Path,
    *,
    port: int,
    spool: Path,
    mode: str,
    max_size: str = "1G",
    concurrency: int | None = None,
) -> Path:
    sessions = "" if concurrency is None else f"concurrency = {concurrency}\n"
    path.write_text(
        f"""# written by bench/run.py
[relay]
host = "127.0.0.1"
port = {port}
timeout = 20
helo = "bench.example.org"
{sessions}
[addresses]
domain = "example.org"

[queue]
dir = "{spool}"

[delivery]
mode = "{mode}"

[submission]
max_size = "{max_size}"
"""
    )
    return path


# --- the ways mailshim is installed --------------------------------------------------------------


class Install:
    """One way to run ``sendmail``/``mailshim``: argv prefixes, with and without -X importtime."""

    def __init__(
        self,
        key: str,
        label: str,
        sendmail: list[str],
        sendmail_importtime: list[str],
        mailshim: list[str],
        python: list[str],
        imports_only: list[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.key = key
        self.label = label
        self.sendmail = sendmail
        self.sendmail_importtime = sendmail_importtime
        self.mailshim = mailshim
        self.python = python  # runs a bench helper script with this install's mailshim
        self.imports_only = imports_only  # imports what sendmail imports, does nothing
        self.env = env or {}


def _copy_distribution(name: str, site: Path) -> None:
    """Copy an installed distribution (from the running venv) into ``site`` (offline)."""
    dist = importlib.metadata.distribution(name)
    root = Path(str(dist.locate_file(""))).resolve()
    for entry in dist.files or ():
        src = Path(str(dist.locate_file(entry))).resolve()
        try:
            rel = src.relative_to(root)
        except ValueError:
            continue  # console scripts and the like, outside site-packages
        if "__pycache__" in rel.parts or not src.is_file():
            continue
        dest = site / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _compileall(python: str, folder: Path) -> None:
    subprocess.run([python, "-m", "compileall", "-q", str(folder)], check=True)


def _script(path: Path, shebang: str, body: str) -> None:
    path.write_text(f"#!{shebang}\n{body}")
    path.chmod(0o755)


def build_installs(work: Path, log) -> dict[str, Install]:
    """The dev venv (editable), a wheel in a fresh venv, and a Debian-style tree."""
    installs: dict[str, Install] = {}
    dev_py = str(DEV_VENV / "bin" / "python")
    installs["dev-venv"] = Install(
        "dev-venv",
        "dev venv, editable install, console script",
        [str(DEV_VENV / "bin" / "sendmail")],
        [dev_py, "-X", "importtime", str(DEV_VENV / "bin" / "sendmail")],
        [str(DEV_VENV / "bin" / "mailshim")],
        [dev_py],
        [dev_py, "-I", "-c", IMPORTS_CODE],
    )

    # A wheel built from a copy of the tree: the build does not touch the working tree.
    src = work / "src-copy"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "__pycache__",
            "*.egg-info",
            "build",
            "dist",
            ".*cache",
            "bench",
            "tests",
            ".hypothesis",
        ),
    )
    wheels = work / "wheels"
    log("building the wheel (pip wheel . --no-deps)")
    built = subprocess.run(
        [dev_py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise BenchError(f"pip wheel failed:\n{built.stdout}{built.stderr}")
    (wheel,) = wheels.glob("mailshim-*.whl")

    venv = work / "wheel-venv"
    log("creating a venv with Debian's python3 and its own pip (ensurepip)")
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
    vpy = str(venv / "bin" / "python")
    subprocess.run(
        [vpy, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    site = Path(
        subprocess.run(
            [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for dep in DEPENDENCIES:
        _copy_distribution(dep, site)
    _compileall(vpy, site)
    installs["wheel-venv"] = Install(
        "wheel-venv",
        "wheel in a venv (the `sendmail` pip installs)",
        [str(venv / "bin" / "sendmail")],
        [vpy, "-X", "importtime", str(venv / "bin" / "sendmail")],
        [str(venv / "bin" / "mailshim")],
        [vpy],
        [vpy, "-I", "-c", IMPORTS_CODE],
    )
    installs["wheel-venv-c"] = Install(
        "wheel-venv-c",
        "wheel in a venv, python -I -c (no wrapper)",
        [vpy, "-I", "-c", SENDMAIL_CODE],
        [vpy, "-I", "-X", "importtime", "-c", SENDMAIL_CODE],
        [str(venv / "bin" / "mailshim")],
        [vpy],
        [vpy, "-I", "-c", IMPORTS_CODE],
    )

    # Debian style: the package's files in one folder, run by /usr/bin/python3 -IS from a
    # two-line script as /usr/sbin/sendmail will be. The agent is started as
    # "python3 -m mailshim.agent" without -I, so PYTHONPATH points it at the same folder
    # (sendmail itself, under -I, ignores PYTHONPATH).
    target = work / "debian" / "dist-packages"
    log("installing the wheel into a Debian-style folder (pip install --target)")
    subprocess.run(
        [
            vpy,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    for dep in DEPENDENCIES:
        _copy_distribution(dep, target)
    _compileall(SYSTEM_PYTHON, target)
    sbin = work / "debian" / "sbin"
    sbin.mkdir()
    prelude = f"import sys\nsys.path.insert(0, {str(target)!r})\n"
    # -IS as packaging/install-scripts.py writes it: no site module, the folder put on
    # sys.path by the script itself
    _script(
        sbin / "sendmail",
        f"{SYSTEM_PYTHON} -IS",
        prelude + "from mailshim.cli.sendmail import main\nmain()\n",
    )
    _script(
        sbin / "mailshim",
        f"{SYSTEM_PYTHON} -IS",
        prelude + "from mailshim.cli.entry import main\nmain()\n",
    )
    installs["debian"] = Install(
        "debian",
        "Debian style: /usr/bin/python3 -IS script, files in a dist-packages folder",
        [str(sbin / "sendmail")],
        [SYSTEM_PYTHON, "-IS", "-X", "importtime", str(sbin / "sendmail")],
        [str(sbin / "mailshim")],
        [SYSTEM_PYTHON],
        [SYSTEM_PYTHON, "-IS", "-c", prelude + IMPORTS_CODE],
        env={"PYTHONPATH": str(target)},
    )
    return installs


# --- the machine ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    def first(path: str, key: str) -> str:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    sys_py = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    mem_kb = first("/proc/meminfo", "MemTotal").split()[0]
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    fs = "?"
    try:
        best = ""
        with open("/proc/mounts") as f:
            tmp = os.path.realpath(os.environ.get("TMPDIR", "/tmp"))
            for line in f:
                dev, mnt, kind = line.split()[:3]
                if (tmp + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                    best, fs = mnt, f"{kind} ({dev} on {mnt})"
    except OSError:
        pass
    versions = {}
    for name in ("aiosmtplib", "aiosmtpd", "click", "platformdirs"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "-"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": first("/proc/cpuinfo", "model name"),
        "ram": f"{int(mem_kb) / 1024 / 1024:.1f} GiB" if mem_kb.isdigit() else "?",
        "kernel": platform.release(),
        "python (system)": f"{SYSTEM_PYTHON} {sys_py}",
        "python (bench venv)": sys.version.split()[0],
        "aiosmtplib": versions["aiosmtplib"],
        "aiosmtpd (listener)": versions["aiosmtpd"],
        "click": versions["click"],
        "platformdirs": versions["platformdirs"],
        "temp filesystem": fs,
        "load average at start": load,
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
