"""The default size limit follows the listener's own (its EHLO ``SIZE``), on real processes.

The delivery side records the last ``SIZE`` it saw in ``listener-size`` at the spool's root;
``sendmail`` then refuses with 65, keeping nothing, exactly what the listener would refuse,
and never less (Stalwart takes 75 MB by default; mailshim's own default is 50 MB).
``[submission] max_size``, when set, still wins.
"""

from __future__ import annotations

import os

import pytest
from aiosmtpd.controller import Controller

from conftest import Env, Listener, LongLineSMTP, free_port, tool, write_config
from mailshim import errors
from test_limits import _chain, lines_of, run_measured, spool_is_clean

MB = 1000 * 1000


class SizedListener(Listener):
    """The test listener, announcing ``SIZE limit`` in EHLO and enforcing it (aiosmtpd)."""

    def __init__(self, port: int, limit: int) -> None:
        super().__init__(port)
        self.limit = limit

    def start(self) -> None:
        class SizedController(Controller):
            def factory(self):
                return LongLineSMTP(self.handler, **self.SMTP_kwargs)

        self.controller = SizedController(
            self.handler,
            hostname="127.0.0.1",
            port=self.port,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=self.limit,
        )
        self.controller.start()


@pytest.fixture
def sized_world(tmp_path):
    """A factory: a test world whose listener announces (and enforces) ``SIZE limit``."""
    started: list[Listener] = []

    def make(limit: int) -> Env:
        listener = SizedListener(free_port(), limit)
        listener.start()
        started.append(listener)
        world = Env(tmp_path, listener)
        write_config(world.config, listener.port, world.spool)
        return world

    yield make
    for listener in started:
        listener.stop()


def recorded(world) -> bytes | None:
    path = world.spool / "listener-size"
    return path.read_bytes() if path.exists() else None


def deliver_one(world) -> None:
    r = world.sendmail("-odi", "-i", "bob@example.net", input=b"Subject: s\n\nsmall\n")
    assert r.returncode == 0, r.stderr


def test_delivery_records_the_listener_size(sized_world):
    world = sized_world(3 * MB)
    assert recorded(world) is None
    deliver_one(world)
    assert recorded(world) == b"3000000\n"
    assert os.stat(world.spool / "listener-size").st_mode & 0o777 == 0o644


def test_over_the_listener_size_is_65_before_anything_is_kept(sized_world):
    world = sized_world(3 * MB)
    deliver_one(world)
    feed = _chain([b"Subject: big\nTo: bob@example.net\n\n"], lines_of(4 * MB))
    m = run_measured(world, ["-i", "bob@example.net"], feed)
    assert m.code == errors.EX_DATAERR, m
    line = m.stderr.decode()
    assert line.count("\n") == 1 and "Traceback" not in line, m
    assert "the listener's own limit" in line and "3000000 bytes" in line, m
    assert "nothing was kept" in line, m
    spool_is_clean(world)
    # Just under the listener's limit goes through, all of it.
    body = b"x" * 76 + b"\n"
    text = b"Subject: fits\n\n" + body * ((3 * MB - 2000) // 78)
    r = world.sendmail("-odi", "-i", "bob@example.net", input=text)
    assert r.returncode == 0, r.stderr
    assert len(world.listener.wait(2)[1].data) > 2 * MB


def test_a_listener_taking_more_than_50m_raises_the_default(sized_world):
    world = sized_world(75 * MB)
    deliver_one(world)
    assert recorded(world) == b"75000000\n"
    feed = _chain([b"Subject: 55 MB\nTo: bob@example.net\n\n"], lines_of(55 * MB))
    m = run_measured(world, ["-i", "-odq", "bob@example.net"], feed)
    assert m.code == 0, m  # over mailshim's old 50 MB default, under the listener's 75 MB
    (qid,) = world.queued()
    assert os.path.getsize(world.spool / "queue" / qid) > 55 * MB  # all of it, CRLF'd


def test_explicit_max_size_still_wins(sized_world):
    world = sized_world(75 * MB)
    deliver_one(world)
    world.reconfigure(extra='[submission]\nmax_size = "1M"\n', port=world.listener.port)
    feed = _chain([b"Subject: big\nTo: bob@example.net\n\n"], lines_of(2 * MB))
    m = run_measured(world, ["-i", "bob@example.net"], feed)
    assert m.code == errors.EX_DATAERR, m
    assert b"[submission] max_size (1000000 bytes)" in m.stderr, m
    spool_is_clean(world)


def test_bs_announces_the_listener_size(sized_world):
    world = sized_world(3 * MB)
    r = world.sendmail("-bs", input=b"EHLO c.example.org\r\nQUIT\r\n")
    assert b"250-SIZE 50000000\r\n" in r.stdout or b"250 SIZE 50000000\r\n" in r.stdout
    deliver_one(world)
    r = world.sendmail("-bs", input=b"EHLO c.example.org\r\nQUIT\r\n")
    assert b"SIZE 3000000\r\n" in r.stdout, r.stdout


def test_a_planted_size_file_of_another_user_is_ignored(sized_world):
    """Only the spool owner's (or root's) figure counts: it decides what others may send."""
    world = sized_world(3 * MB)
    deliver_one(world)
    path = world.spool / "listener-size"
    os.chown(path, 65534, 65534)  # nobody: not the spool's owner
    feed = _chain([b"Subject: big\nTo: bob@example.net\n\n"], lines_of(4 * MB))
    m = run_measured(world, ["-i", "-odq", "bob@example.net"], feed)
    assert m.code == 0, m  # the default 50 MB applies


def test_mailshim_config_shows_where_max_size_comes_from(sized_world):
    import subprocess

    world = sized_world(3 * MB)
    deliver_one(world)
    r = subprocess.run([tool("mailshim"), "config"], capture_output=True, env=world.env, timeout=60)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.decode().splitlines() if x.startswith("submission.max_size")]
    assert "3M" in line and "listener" in line, line


# --- the system spool: the runner records, every user's sendmail reads -------------------------

from test_multiuser import ALICE, box, mu  # noqa: E402,F401  (fixtures: real users, setup-spool)


def test_system_spool_users_get_the_listener_size_the_runner_recorded(mu):  # noqa: F811
    mu.listener.stop()
    sized = SizedListener(mu.listener.port, 3 * MB)
    sized.start()
    try:
        alice = mu.users[ALICE]
        r = mu.sendmail(alice, "-odq", "-i", "bob@example.net", input=b"Subject: s\n\nsmall\n")
        assert r.returncode == 0, r.stderr
        mu.flush()  # the runner user picks it up and delivers it
        sized.wait(1)
        path = mu.spool / "listener-size"
        assert path.read_bytes() == b"3000000\n"
        st = path.stat()
        assert st.st_uid == mu.users["mshtest-run"].uid and st.st_mode & 0o777 == 0o644
        big = b"Subject: big\n\n" + (b"y" * 76 + b"\n") * (4 * MB // 77)
        r = mu.sendmail(alice, "-odq", "-i", "bob@example.net", input=big)
        assert r.returncode == errors.EX_DATAERR, r.stderr
        assert b"the listener's own limit (its EHLO SIZE) (3000000 bytes)" in r.stderr
        assert mu.names("incoming") == []  # nothing kept
    finally:
        sized.stop()
        mu.listener.start()
