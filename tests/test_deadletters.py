"""Dead letters are first-class (issue 11, item 3): listed with their reason, put back with a
fresh schedule, aged out after [queue] keep_dead, counted by mailq, warned about by check.

A real listener refuses recipients; the real `sendmail`, `mailq` and `mailshim` run as
subprocesses on a real spool.
"""

from __future__ import annotations

import json
import os
import time

from conftest import queue_config
from mailshim import spool

MESSAGE = b"Subject: doomed\n\nbody\n"


def bury(world, rcpts=("nobody@example.org",)) -> str:
    """Submit a message the listener refuses; returns its id once it is in dead/."""
    queue_config(world, queue='retry = ["1s"]', mode="queue")
    done = world.sendmail("-i", "-f", "alice@example.org", *rcpts, input=MESSAGE)
    assert done.returncode == 0, done.stderr
    [qid] = world.queued()
    assert world.run("mailshim", ["flush"]).returncode == 0
    assert (world.spool / "dead" / qid).exists()
    return qid


def refuse(world, *rcpts: str) -> None:
    world.listener.handler.rcpt_replies = {r: "550 5.1.1 no such user" for r in rcpts}


def test_queue_lists_dead_letters_with_their_reason(fworld):
    refuse(fworld, "nobody@example.org")
    qid = bury(fworld)
    shown = fworld.run("mailshim", ["queue"])
    assert shown.returncode == 0
    out = shown.stdout.decode()
    # The bounce went out, so the queue itself is empty; the dead letter is still visible.
    assert "Mail queue is empty" in out and "Dead letters" in out
    assert qid in out and "550 5.1.1 no such user" in out
    only = fworld.run("mailshim", ["queue", "--dead"]).stdout.decode()
    assert qid in only and "Mail queue is empty" not in only
    [item] = json.loads(fworld.run("mailshim", ["queue", "--dead", "--json"]).stdout)["dead"]
    assert item["id"] == qid and item["sender"] == "alice@example.org"
    assert "no such user" in item["reason"]
    assert fworld.run("mailshim", ["queue", "--dead", "--ids"]).stdout.decode().split() == [qid]


def test_mailq_ends_with_the_dead_letter_count(fworld):
    refuse(fworld, "nobody@example.org")
    bury(fworld)
    out = fworld.run("mailq", []).stdout.decode().splitlines()
    assert out[-1] == "-- 1 dead letter (failed for good): mailshim queue --dead lists them"


def test_mailq_says_nothing_about_dead_letters_when_there_are_none(world):
    out = world.run("mailq", []).stdout.decode()
    assert out == "Mail queue is empty\n"


def test_requeue_puts_it_back_with_a_fresh_schedule(fworld):
    refuse(fworld, "nobody@example.org")
    qid = bury(fworld, rcpts=("ok@example.org", "nobody@example.org"))
    assert [m.rcpt_tos for m in fworld.listener.messages if m.mail_from != "<>"] == [
        ["ok@example.org"]
    ]
    refuse(fworld)  # the address exists now
    done = fworld.run("mailshim", ["queue", "requeue", qid])
    assert done.returncode == 0 and b"requeue: 1 entry" in done.stdout
    assert not (fworld.spool / "dead" / qid).exists()
    assert not (fworld.spool / "dead" / f"{qid}.reason").exists()
    state = spool.Spool(str(fworld.spool)).load_state(qid)
    assert state.attempts == 0 and state.next_attempt == 0 and state.failed == {}
    assert "ok@example.org" in state.done and state.requeued > 0
    assert fworld.run("mailshim", ["run"]).returncode == 0
    second = [m.rcpt_tos for m in fworld.listener.messages if m.mail_from != "<>"][1:]
    assert second == [["nobody@example.org"]]  # the delivered recipient was not sent again
    assert fworld.queued() == []


def test_requeue_of_an_unknown_id_is_a_usage_error(fworld):
    done = fworld.run("mailshim", ["queue", "requeue", "A" * 20])
    assert done.returncode == 64 and b"no such dead letter" in done.stderr
    assert fworld.run("mailshim", ["queue", "requeue"]).returncode == 64


def test_keep_dead_ages_dead_letters_out(fworld):
    refuse(fworld, "nobody@example.org")
    qid = bury(fworld)
    queue_config(fworld, queue='retry = ["1s"]\nkeep_dead = "1d"', mode="queue")
    reason = fworld.spool / "dead" / f"{qid}.reason"
    assert fworld.run("mailshim", ["run"]).returncode == 0
    assert reason.exists()  # buried just now: kept
    old = time.time() - 2 * 86400
    os.utime(reason, (old, old))
    assert fworld.run("mailshim", ["run"]).returncode == 0
    assert os.listdir(fworld.spool / "dead") == []


def test_check_warns_while_dead_letters_are_recent(fworld):
    refuse(fworld, "nobody@example.org")
    qid = bury(fworld)
    out = fworld.run("mailshim", ["check"]).stdout.decode()
    assert "1 message failed for good in the last 7 days" in out
    old = time.time() - 8 * 86400
    os.utime(fworld.spool / "dead" / f"{qid}.reason", (old, old))
    assert "failed for good" not in fworld.run("mailshim", ["check"]).stdout.decode()
