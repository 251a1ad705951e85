"""A runner's housekeeping against an entry being written: the race of issue 24, item 6.

Pickup writes the state of its copy (the recipients the user's agent already saw refused)
before it links the copy into ``queue/``. A runner's ``clean_tmp`` in between must not take
that state for a crash's leftover: the refused recipients would be sent again. The writer
here is held half-way in this process while a real ``mailshim flush`` runs its housekeeping.
"""

from __future__ import annotations

from conftest import queue_config
from mailshim import spool, spoolfmt
from mailshim.reply import Reply


def test_clean_tmp_leaves_the_state_of_an_entry_still_being_written(world):
    queue_config(world)
    target = spool.Spool(str(world.spool))
    target.ensure()
    writer = target.new_entry("a@example.org", ["ok@example.org", "refused@example.org"], 4242)
    writer.write(b"Subject: half-way\r\n\r\nbody\r\n")
    state = spoolfmt.State()
    state.failed = {"refused@example.org": Reply(550, "5.1.1 no such user")}
    target.save_state(writer.queue_id, state)  # as pickup does, before the link
    r = world.run("mailshim", ["flush"])  # a runner's clean_tmp, right now
    assert r.returncode == 0, r.stderr.decode()
    assert (world.spool / "state" / writer.queue_id).exists()
    writer.commit(False)
    r = world.run("mailshim", ["flush"])
    assert r.returncode == 0, r.stderr.decode()
    got = {m.mail_from: m.rcpt_tos for m in world.listener.wait(2)}
    # the refused recipient is not sent again; its refusal goes back to the sender
    assert got == {"a@example.org": ["ok@example.org"], "<>": ["a@example.org"]}


def test_a_crash_leftover_state_still_goes(world):
    queue_config(world)
    target = spool.Spool(str(world.spool))
    target.ensure()
    stray = world.spool / "state" / "0000000000000AAAAAAA"
    stray.write_bytes(spoolfmt.encode_state(spoolfmt.State()))
    r = world.run("mailshim", ["flush"])
    assert r.returncode == 0, r.stderr.decode()
    assert not stray.exists()
