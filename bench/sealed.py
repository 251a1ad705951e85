"""Sealed mode: submit-to-listener latency of a user's mail that only the runner can deliver.

Run as root (it creates two users with useradd and removes them at the end):

    .venv/bin/python bench/sealed.py [--count 30] [--command run]

The box: a spool made by ``mailshim setup-spool --user RUNNER``, a listener (aiosmtpd, in a
thread) that requires AUTH, and a ``password_file`` owned by the runner user, mode 0600, so
the submitting user is sealed out. Each round times one ``sendmail`` run as the user, from
just before it starts until the listener has the message:

- **daemon**: ``mailshim daemon`` runs as the runner user throughout;
- **path unit**: what ``mailshim-flush.path`` does on a change in ``incoming/``: the unit's
  command (``--command``, default ``run``, as packaging/systemd/mailshim-flush.service)
  started as the runner once ``sendmail`` has exited. systemd's own part (inotify to the
  service starting, its sandbox set-up) is not in this figure; add it from
  ``systemd-analyze`` on a real box.

Prints the median, 90th percentile and maximum of each, in seconds.

Trust: a benchmark for a throwaway machine; it adds and deletes users named mshbench-*.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

RUNNER, USER = "mshbench-run", "mshbench-u"
PASSWORD = "bench-relay-pass"
BIN = Path(sys.executable).parent


class Handler:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        with self.cond:
            self.count += 1
            self.cond.notify_all()
        return "250 2.0.0 OK"

    def wait(self, count: int, timeout: float = 60.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.count >= count, timeout):
                raise SystemExit(f"the listener got {self.count} messages, wanted {count}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def useradd(name: str) -> tuple[int, int]:
    import pwd

    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)
    subprocess.run(
        ["useradd", "-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def as_user(ids: tuple[int, int] | None) -> dict[str, object]:
    if ids is None:
        return {}
    return {"user": ids[0], "group": ids[1], "extra_groups": []}


def summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (
        f"| {name} | {len(times)} | {statistics.median(times):.3f} | {p90:.3f} |"
        f" {ordered[-1]:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--command", default="run", help="the path unit's mailshim verb")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's per-session chatter
    if os.geteuid() != 0:
        raise SystemExit("run as root (it creates users)")
    base = Path(tempfile.mkdtemp(prefix="mailshim-bench-sealed-", dir="/tmp"))
    os.chmod(base, 0o755)
    handler = Handler()
    port = free_port()
    users = {b"mailshim": PASSWORD.encode()}

    def authenticator(server, session, envelope, mechanism, data):
        ok = getattr(data, "login", None) in users and users[data.login] == data.password
        return AuthResult(success=ok, handled=False, auth_data=data)

    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_require_tls=False,
        auth_required=True,
    )
    try:
        runner, user = useradd(RUNNER), useradd(USER)
        secret = base / "relay.secret"
        secret.write_text(PASSWORD + "\n")
        os.chown(secret, *runner)
        os.chmod(secret, 0o600)
        config = base / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [relay]
                host = "127.0.0.1"
                port = {port}
                helo = "bench.example.org"
                username = "mailshim"
                password_file = "{secret}"

                [addresses]
                domain = "example.org"

                [queue]
                dir = "{base / "spool"}"
                """
            )
        )
        os.chmod(config, 0o644)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "MAILSHIM_CONFIG": str(config),
            "MAILSHIM_NO_SYSLOG": "1",
            "HOME": "/nonexistent",
        }
        subprocess.run(
            [str(BIN / "mailshim"), "setup-spool", "--user", RUNNER], env=env, check=True
        )
        controller.start()
        message = b"Subject: bench\n\n" + b"x" * 2000 + b"\n"

        def submit() -> float:
            start = time.monotonic()
            subprocess.run(
                [str(BIN / "sendmail"), "-i", "rcpt@example.org"],
                input=message,
                env=env,
                check=True,
                cwd="/",
                **as_user(user),  # type: ignore[arg-type]
            )
            return start

        print("| runner | messages | median s | p90 s | max s |")
        print("|---|---|---|---|---|")
        daemon = subprocess.Popen(
            [str(BIN / "mailshim"), "daemon"],
            env=env,
            cwd="/",
            stderr=subprocess.DEVNULL,
            **as_user(runner),  # type: ignore[arg-type]
        )
        times = []
        try:
            time.sleep(1.0)
            for i in range(args.count):
                # Submissions at random moments, not in step with the daemon's last pass
                # (it looks at the folders every 0.5 s).
                time.sleep(random.uniform(0.0, 0.6))
                start = submit()
                handler.wait(i + 1)
                times.append(time.monotonic() - start)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        print(summary("mailshim daemon", times))
        done = handler.count
        times = []
        for i in range(args.count):
            start = submit()
            subprocess.run(
                [str(BIN / "mailshim"), args.command],
                env=env,
                cwd="/",
                check=True,
                stdout=subprocess.DEVNULL,
                **as_user(runner),  # type: ignore[arg-type]
            )
            handler.wait(done + i + 1)
            times.append(time.monotonic() - start)
        print(
            summary(f"path unit's command (mailshim {args.command}, systemd not included)", times)
        )
    finally:
        if getattr(controller, "server", None) is not None:
            controller.stop()
        for name in (RUNNER, USER):
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
