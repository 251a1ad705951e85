"""The packaged units run the schedule (issue 11, item 1).

The commands are read from packaging/systemd/mailshim-flush.service (its ExecStart) and run
as real processes against a real listener, the way the timer and the path unit start them.
The path unit is played by a real inotify watch with the mask systemd uses for
``PathChanged=`` (src/core/path.c): every event in queue/ or incoming/ starts the command
again, as the path unit would, so a command that changed the spool on every run would loop.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import queue_config, tool

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
PATH_CHANGED = (
    IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
)
MESSAGE = b"Subject: scheduled\n\nbody\n"


def exec_start(unit: str) -> list[str]:
    """The unit's ExecStart as argv, /usr/bin/mailshim replaced by the one under test."""
    for line in (UNITS / unit).read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.split("=", 1)[1])
            assert argv[0] == "/usr/bin/mailshim"
            return [tool("mailshim"), *argv[1:]]
    raise AssertionError(f"{unit} has no ExecStart")


class PathWatch:
    """inotify on the folders a path unit watches, with PathChanged='s mask."""

    def __init__(self, *folders: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        for folder in folders:
            assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), PATH_CHANGED) >= 0

    def fired(self) -> bool:
        """Whether anything happened since the last call (events are drained)."""
        got = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            got = got or bool(data)

    def close(self) -> None:
        os.close(self.fd)


class AttemptLog:
    """Times at which the listener saw RCPT for the recipient."""

    def __init__(self, handler, rcpt: str, reply: str) -> None:
        self.times: list[float] = []
        original = handler.handle_RCPT

        async def handle_rcpt(server, session, envelope, address, options):
            if address == rcpt:
                self.times.append(time.monotonic())
                return reply
            return await original(server, session, envelope, address, options)

        handler.handle_RCPT = handle_rcpt


def run_unit(world, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, env=world.env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def test_the_service_runs_the_schedule_not_a_flush():
    assert exec_start("mailshim-flush.service")[1:] == ["run"]
    assert exec_start("mailshim-daemon.service")[1:] == ["daemon"]


def test_units_started_every_second_for_a_minute_follow_the_schedule(fworld):
    """Issue 11: the units' command started as often as systemd may start it made 32
    attempts in 40 s at a 451. Now: started every second for a minute (and again on every
    PathChanged event), the attempts keep to [queue] retry."""
    steps = (5, 10, 20)
    queue_config(fworld, queue='retry = ["5s", "10s", "20s"]', mode="queue")
    log = AttemptLog(fworld.listener.handler, "bob@example.org", "451 4.3.0 try later")
    assert fworld.sendmail("-i", "bob@example.org", input=MESSAGE).returncode == 0
    watch = PathWatch(fworld.spool / "queue")  # root's spool here: no incoming/
    argv = exec_start("mailshim-flush.service")
    started = time.monotonic()
    runs = path_runs = 0
    try:
        while time.monotonic() - started < 60:
            tick = time.monotonic()
            run_unit(fworld, argv)  # the timer
            runs += 1
            chain = 0
            while watch.fired():  # the path unit
                chain += 1
                assert chain < 5, "the path unit keeps re-triggering itself"
                run_unit(fworld, argv)
                path_runs += 1
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    finally:
        watch.close()
    times = log.times
    # Due at 0, 5, 15, 35, 55 s: five attempts in the minute, whatever the number of runs.
    assert runs >= 20
    assert 3 <= len(times) <= 5, f"{len(times)} attempts in {runs} runs"
    for i, (a, b) in enumerate(itertools.pairwise(times)):
        step = steps[min(i, len(steps) - 1)]
        # next_attempt is whole seconds: an attempt may come up to 1 s before its step ends.
        assert b - a >= step - 1.0, f"attempt {i + 2} came {b - a:.1f}s after the one before"
    assert fworld.queued() != [] and fworld.listener.messages == []
    assert path_runs <= len(times)  # only a run that changed queue/ triggers another


def test_the_path_unit_reaches_a_fixed_point(fworld):
    """A run changes queue/ or incoming/ only by making progress; one that finds nothing due
    changes nothing, so the path unit's chain of triggers ends (packaging's path unit says why)."""
    queue_config(fworld, queue='retry = ["10m"]', mode="queue")
    h = fworld.listener.handler
    h.rcpt_replies = {
        "later@example.org": "451 4.3.0 try later",
        "nobody@example.org": "550 5.1.1 no such user",
    }
    for rcpt in ("ok@example.org", "later@example.org", "nobody@example.org"):
        assert fworld.sendmail("-i", "-f", "alice@example.org", rcpt, input=MESSAGE).returncode == 0
    watch = PathWatch(fworld.spool / "queue")
    argv = exec_start("mailshim-flush.service")
    try:
        chain = 0
        run_unit(fworld, argv)
        while watch.fired():
            chain += 1
            assert chain < 5, "the path unit keeps re-triggering itself"
            run_unit(fworld, argv)
        # Delivered, bounced (the bounce itself delivered), and one deferred left behind.
        assert len(fworld.queued()) == 1
        assert chain >= 1  # the bounce made one more run, which then changed nothing
        for _ in range(3):  # the timer again: nothing is due, nothing changes
            run_unit(fworld, argv)
            assert not watch.fired()
    finally:
        watch.close()


def test_forced_flushes_while_down_do_not_delay_the_next_run(fworld):
    """Three `sendmail -q` while the listener is down keep the entry's first retry step."""
    queue_config(fworld, queue='retry = ["4s", "10m"]', mode="queue")
    fworld.listener.stop()
    assert fworld.sendmail("-i", "bob@example.org", input=MESSAGE).returncode == 0
    argv = exec_start("mailshim-flush.service")
    run_unit(fworld, argv)  # the first attempt finds the listener down
    for _ in range(3):
        assert fworld.sendmail("-q").returncode == 0
    fworld.listener.start()
    deadline = time.monotonic() + 20
    while fworld.queued() and time.monotonic() < deadline:
        run_unit(fworld, argv)
        time.sleep(0.5)
    assert fworld.queued() == [] and len(fworld.listener.messages) == 1


@pytest.fixture(autouse=True)
def _no_syslog(monkeypatch):
    monkeypatch.setenv("MAILSHIM_NO_SYSLOG", "1")
