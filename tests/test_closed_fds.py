"""Closed standard descriptors (issue 11, item 5): every command exits with the code an
ordinary run gives, and a spool entry never becomes stdout or stderr.

The real console scripts run under ``sh -c 'exec CMD 1>&- 2>&-'``: the shell closes the
descriptors and execs, as GNU mailutils starts its mailer with only fd 0 open.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from conftest import tool

CLOSINGS = {
    "stdout": "1>&-",
    "stderr": "2>&-",
    "both": "1>&- 2>&-",
    "all": "0<&- 1>&- 2>&-",
}
MESSAGE = b"Subject: closed fds\n\nbody\n"


def run_closed(world, args: list[str], closing: str, input: bytes = b""):
    cmd = " ".join(shlex.quote(a) for a in [tool(args[0]), *args[1:]])
    return subprocess.run(
        ["sh", "-c", f"exec {cmd} {CLOSINGS[closing]}"],
        input=input,
        env=world.env,
        timeout=60,
        capture_output=True,
    )


@pytest.mark.parametrize("closing", ["stdout", "stderr", "both"])
def test_sendmail_delivers_once_and_exits_0(world, closing):
    world.reconfigure(mode="interactive")
    done = run_closed(world, ["sendmail", "-i", "bob@example.org"], closing, MESSAGE)
    assert done.returncode == 0
    msgs = world.listener.wait(1)
    assert len(msgs) == 1 and b"closed fds" in msgs[0].data
    # Nothing of ours went into the message, and the entry is gone.
    assert b"sendmail:" not in msgs[0].data
    assert world.queued() == []


@pytest.mark.parametrize("closing", ["stdout", "stderr", "both", "all"])
def test_error_exit_codes_are_unchanged(world, closing):
    assert run_closed(world, ["sendmail", "-i"], closing).returncode == 64  # no recipients
    assert run_closed(world, ["sendmail", "-i", "a b c <@>"], closing).returncode == 65


@pytest.mark.parametrize("closing", ["stdout", "stderr", "both", "all"])
def test_mailq_newaliases_and_mailshim_keep_their_codes(world, closing):
    world.reconfigure(mode="queue")
    assert run_closed(world, ["sendmail", "bob@example.org"], "stdout", MESSAGE).returncode == 0
    assert run_closed(world, ["mailq"], closing).returncode == 0
    assert run_closed(world, ["newaliases"], closing).returncode == 0
    assert run_closed(world, ["mailshim", "queue"], closing).returncode == 0
    assert run_closed(world, ["mailshim", "no-such-command"], closing).returncode == 64
    assert world.queued() != []  # listing did not change the queue


def test_queued_entry_is_not_written_to_when_stdout_is_closed(world):
    """With fd 1 closed, the first file sendmail opens would be fd 1; a later write to
    stdout (here -v's transcript goes to stderr, closed too) must not land in it."""
    world.reconfigure(mode="queue")
    done = run_closed(world, ["sendmail", "-v", "bob@example.org"], "both", MESSAGE)
    assert done.returncode == 0
    [qid] = world.queued()
    data = (world.spool / "queue" / qid).read_bytes()
    assert data.count(b"Subject: closed fds") == 1 and b"sendmail:" not in data


def test_queue_listing_into_head_is_clean(world):
    """`mailshim queue | head` and `mailq | head`: the reader leaves early (EPIPE); no
    traceback, no message, the normal exit code; with stderr closed as well."""
    import os

    from mailshim import spool

    target = spool.Spool(str(world.spool))
    target.ensure()
    for i in range(1500):  # far more than a pipe holds
        w = target.new_entry("alice@example.org", [f"r{i}@example.org"], os.getuid())
        w.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
        w.commit(False, sync_dir=False)
    for prog in ("mailshim queue", "mailq"):
        for closing in ("", "2>&-"):
            head = tool(prog.split()[0])
            rest = prog.split()[1:]
            cmd = f"{shlex.quote(head)} {' '.join(rest)} {closing} | head -1"
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", cmd],
                env=world.env,
                capture_output=True,
                timeout=120,
            )
            assert done.returncode == 0, (prog, closing, done.stderr)
            assert done.stderr == b"" and done.stdout.count(b"\n") == 1
