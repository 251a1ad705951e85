"""Acting on a backlog by what it is (issue 26, goal 6): hold, release, retry, delete and
requeue by sender, recipient, user and age, ids on stdin, dry runs, the log, and the shape.

Entries are made through the spool API with chosen senders, recipients and arrival times;
every command runs as the real ``mailshim``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from conftest import queue_entries, tool
from mailshim import spool


def mailshim(world, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [tool("mailshim"), *args], input=input, capture_output=True, env=world.env, timeout=60
    )


def backlog(world) -> dict[str, list[str]]:
    """10 alerts from cron (two hours old), 3 messages from alice (new), 1 null-sender bounce."""
    world.reconfigure(mode="queue", extra=f'[log]\nfile = "{world.tmp / "mail.log"}"\n')
    old = int(time.time()) - 7200
    return {
        "alerts": queue_entries(
            world, sender="cron@example.org", rcpts=("ops@example.net",), arrival=old, n=10
        ),
        "alice": queue_entries(
            world, sender="alice@example.org", rcpts=("bob@example.com", "ops@example.net"), n=3
        ),
        "bounce": queue_entries(world, sender="", rcpts=("cron@example.org",), n=1),
    }


def states(world) -> dict[str, bool]:
    """id -> held, for every queued entry."""
    target = spool.Spool(str(world.spool))
    return {qid: target.load_state(qid).held for qid in target.ids()}


def test_delete_by_sender_dry_run_then_for_real_each_logged(world):
    made = backlog(world)
    r = mailshim(world, "queue", "delete", "--sender", "cron@example.org", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "delete: 10 entries would be touched (dry run: nothing changed)\n"
    assert len(world.queued()) == 14
    r = mailshim(world, "queue", "delete", "--sender", "CRON@example.org")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "delete: 10 entries\n"
    assert world.queued() == sorted(made["alice"] + made["bounce"])
    log = (world.tmp / "mail.log").read_text()
    for qid in made["alerts"]:
        assert f"{qid}: delete by uid {os.getuid()} (mailshim queue delete)" in log
    assert not any(qid in log for qid in made["alice"])


def test_filters_combine_and_repeat(world):
    made = backlog(world)
    r = mailshim(world, "queue", "hold", "--recipient", "@example.net", "--newer-than", "1h")
    assert r.returncode == 0, r.stderr
    held = {q for q, h in states(world).items() if h}
    assert held == set(made["alice"])
    r = mailshim(world, "queue", "hold", "--sender", "<>", "--sender", "cron@example.org",
                 "--older-than", "90m")  # fmt: skip
    assert r.stdout.decode() == "hold: 10 entries\n"  # the bounce is new: too young
    r = mailshim(world, "queue", "release", "--user", str(os.getuid()), "--sender", "example.org")
    assert r.stdout.decode() == "release: 13 entries\n"  # every address at example.org
    assert not any(states(world).values())


def test_ids_on_stdin_from_queue_ids(world):
    made = backlog(world)
    ids = mailshim(world, "queue", "--ids")
    assert ids.returncode == 0
    listed = ids.stdout.decode().split()
    assert sorted(listed) == world.queued()
    chosen = "\n".join(listed[:4]) + "\n"
    r = mailshim(world, "queue", "retry", "-", input=chosen.encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "retry: 4 entries\n"
    r = mailshim(world, "queue", "hold", "-", "--sender", "alice@example.org",
                 input=ids.stdout)  # fmt: skip
    assert r.stdout.decode() == "hold: 3 entries\n"
    assert {q for q, h in states(world).items() if h} == set(made["alice"])


def test_bad_filters_are_one_line_usage_errors(world):
    backlog(world)
    for args in (
        ["--user", "no-such-user-here"],
        ["--older-than", "soon"],
        [],
    ):
        r = mailshim(world, "queue", "delete", *args)
        assert r.returncode == 64, (args, r.stdout)
        assert len(r.stderr.decode().splitlines()) == 1
        assert b"Traceback" not in r.stderr
    assert len(world.queued()) == 14


def test_requeue_dead_letters_by_recipient(world):
    made = backlog(world)
    target = spool.Spool(str(world.spool))
    for qid in made["alerts"][:3] + made["alice"][:1]:
        target.lock(qid).bury("dead", "550 refused")
    r = mailshim(world, "queue", "requeue", "--recipient", "bob@example.com", "-n")
    assert r.stdout.decode() == "requeue: 1 entry would be touched (dry run: nothing changed)\n"
    r = mailshim(world, "queue", "requeue", "--sender", "cron@example.org")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "requeue: 3 entries\n"
    assert sorted(os.listdir(world.spool / "dead")) == sorted(
        [made["alice"][0], made["alice"][0] + ".reason"]
    )


def test_shape_counts_by_domain_and_age(world):
    backlog(world)
    r = mailshim(world, "queue", "shape")
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.decode().splitlines()]
    assert lines[0] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    rows = {cells[0]: [int(c) for c in cells[1:]] for cells in lines[1:]}
    # alerts: 120 minutes old (the 160 bucket); alice and the bounce: new (the 5 bucket)
    assert rows["TOTAL"] == [14, 4, 0, 0, 0, 0, 10, 0, 0, 0, 0]
    assert rows["example.net"] == [13, 3, 0, 0, 0, 0, 10, 0, 0, 0, 0]
    assert rows["example.com"][0] == 3 and rows["example.org"][0] == 1
    r = mailshim(world, "queue", "shape", "--by", "sender", "--json", "--top", "1")
    doc = json.loads(r.stdout)
    assert [(row["domain"], row["total"]) for row in doc["rows"]] == [
        ("TOTAL", 14), ("example.org", 13),
    ]  # fmt: skip
