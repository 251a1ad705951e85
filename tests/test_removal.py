"""What removing the package stops (removal.py), against real processes: a root
``mailshim -C FILE daemon`` and a lingering agent for the spool are found; a real user's own
``mailshim daemon`` (a pip install serving her per-user spool) is not.

Only ``removal.find`` is run: ``stop`` signals every process it finds on the machine, and
other tests' agents and daemons run beside these. What ``find`` returns is what ``stop``
signals (through the same pidfds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import free_port, tool

MESSAGE = b"Subject: removal\n\nwaits for a listener that is down\n"


def _config(path, spool: str, port: int) -> None:
    path.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {port}
timeout = 5
retry_after_failure = 1

[addresses]
domain = "example.org"

[queue]
dir = "{spool}"
retry = ["10m"]
"""
    )
    path.chmod(0o644)


def _find(root: str) -> set[int]:
    from mailshim import removal

    found = removal.find(root)
    for fd in found.values():
        os.close(fd)
    return set(found)


def _agents(root: str) -> list[int]:
    from mailshim import removal

    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            argv = removal._cmdline(int(name))
            if "mailshim.agent" in argv and root in " ".join(argv):
                out.append(int(name))
    return out


def _wait(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.root
def test_removal_finds_what_serves_the_spool_and_leaves_a_users_own_daemon(tmp_path):
    """Before: root's daemon started with `-C FILE` was missed (its subcommand is not the
    word after `mailshim`), an agent started for `[queue] dir = "ROOT/"` was missed (its
    `--spool` was compared as written), and any `mailshim daemon`, a real user's own for her
    per-user spool included, was taken for the package's."""
    from conftest import others_can_run

    if os.geteuid() != 0 or not others_can_run():
        pytest.skip("needs root, and an interpreter other users can run")
    from test_multiuser import users_in_tmp

    port = free_port()  # nothing listens: the agent lingers with the deferred entry
    os.chmod(tmp_path, 0o755)
    spool = tmp_path / "spool"
    root_cfg = tmp_path / "root.toml"
    _config(root_cfg, f"{spool}/", port)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MAILSHIM_NO_SYSLOG": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    with users_in_tmp("mailshim-removal-", ("mshra-rmu",)) as (base, users):
        user = users["mshra-rmu"]
        try:
            sent = subprocess.run(
                [tool("sendmail"), "-C", str(root_cfg), "-i", "bob@example.org"],
                input=MESSAGE, env=env, capture_output=True, timeout=60,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            (agent,) = _wait(lambda: _agents(str(spool)), "the spool's lingering agent")

            user_cfg = base / "user.toml"
            _config(user_cfg, str(user.home / "spool"), port)
            user_env = {**env, "HOME": str(user.home), "MAILSHIM_CONFIG": str(user_cfg)}
            users_daemon = subprocess.Popen(
                [tool("mailshim"), "daemon"], env=user_env, user=user.uid, group=user.gid,
                extra_groups=[], cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(users_daemon)
            _wait(lambda: os.path.exists(user.home / "spool" / "served"), "her daemon's round")

            # The spool's agent serves it; a daemon started by hand waits to take it over.
            roots_daemon = subprocess.Popen(
                [tool("mailshim"), "-C", str(root_cfg), "daemon"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(roots_daemon)
            from mailshim import removal

            _wait(lambda: "daemon" in removal._cmdline(roots_daemon.pid), "root's daemon")
            found = _find(str(spool))
            seen = (agent in found, roots_daemon.pid in found, users_daemon.pid in found)
            assert seen == (True, True, False), "(agent, root's daemon, her daemon) found"
            assert users_daemon.poll() is None and roots_daemon.poll() is None
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            for pid in _agents(str(spool)):
                os.kill(pid, signal.SIGKILL)
