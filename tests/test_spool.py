"""spool: durable entries, locks, state, and the drop folder's defences, on a real folder.

Most drop-folder cases need root to give planted files to another uid (any number will do:
the uid need not exist); the multi-user tests with real users are in test_multiuser.py.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time

import pytest

from mailshim import pickup, spool, spoolentry, spoolfmt, spoolsetup
from mailshim.config import Config
from mailshim.errors import CantCreateError, DataError
from mailshim.reply import Reply
from mailshim.spoolfmt import Envelope

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to chown planted files")
USER = 4242  # a uid nobody has: planted files are "from" this user
MAX_SIZE = 1_000_000


@pytest.fixture
def sp(tmp_path) -> spool.Spool:
    s = spool.Spool(str(tmp_path / "spool"))
    s.ensure()
    return s


@pytest.fixture
def dropsp(sp) -> spool.Spool:
    os.mkdir(sp.incoming)
    os.chmod(sp.incoming, spool.INCOMING_MODE)
    return sp


def make_entry(sp: spool.Spool, body: bytes = b"Subject: x\r\n\r\nhello\r\n", **kw) -> str:
    w = sp.new_entry(kw.get("sender", "a@example.org"), kw.get("rcpts", ["b@example.org"]), 0)
    w.write(body)
    w.commit(False)
    return w.queue_id


def drop_bytes(qid: str, body: bytes = b"Subject: x\r\n\r\nhello\r\n", **kw) -> bytes:
    env = Envelope(
        kw.get("id_record", qid),
        kw.get("sender", "u@example.org"),
        kw.get("rcpts", ["b@example.org"]),
        kw.get("arrival", int(time.time())),
        kw.get("uid", 0),  # a forged uid record: the runner must not believe it
        False,
        kw.get("size", len(body)),
    )
    return spoolfmt.encode_envelope(env).data + body


def plant(sp: spool.Spool, name: str, data: bytes, uid: int = USER) -> str:
    path = os.path.join(sp.incoming, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o640)
    if ROOT:
        os.chown(path, uid, -1)
    return path


def pick(sp: spool.Spool, max_size: int = MAX_SIZE) -> dict[str, pickup.Pickup]:
    cfg = Config()
    cfg.max_size, cfg.max_recipients, cfg._domain = max_size, 100, "example.org"
    return {p.name: p for p in pickup.pickup(sp, cfg)}


# --- entries ------------------------------------------------------------------------------


def test_an_entry_is_visible_only_once_committed(sp):
    w = sp.new_entry("a@example.org", ["b@example.org"], 0)
    w.write(b"Subject: x\r\n\r\nbody\r\n")
    assert sp.ids() == [] and os.listdir(sp.tmp) == [os.path.basename(w.tmp_path)]
    w.commit(True)
    assert sp.ids() == [w.queue_id] and os.listdir(sp.tmp) == []
    env = sp.read_envelope(w.queue_id)
    assert env.size == len(b"Subject: x\r\n\r\nbody\r\n") and env.eightbit
    assert stat.S_IMODE(os.stat(sp.path(w.queue_id)).st_mode) == 0o600


def test_abort_leaves_nothing(sp):
    w = sp.new_entry("a@example.org", ["b@example.org"], 0)
    w.write(b"half")
    w.abort()
    assert os.listdir(sp.tmp) == [] and sp.ids() == []


def test_lock_is_exclusive_and_follows_the_name(sp):
    qid = make_entry(sp)
    first = sp.lock(qid)
    assert first is not None and sp.lock(qid) is None
    first.release()
    again = sp.lock(qid)
    assert again is not None
    assert again.envelope.recipients == ["b@example.org"]
    with again.message() as body:
        assert body.read() == b"Subject: x\r\n\r\nhello\r\n"
    assert again.headers() == b"Subject: x\r\n"
    again.remove()
    assert sp.ids() == [] and sp.lock(qid) is None


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink"])
def test_lock_refuses_what_is_not_a_plain_entry(sp, tmp_path, kind):
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    qid = spoolentry.new_queue_id()
    path = sp.path(qid)
    if kind == "symlink":
        os.symlink(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.link(victim, path)
    with pytest.raises(DataError):
        sp.lock(qid)
    sp.quarantine(qid, "test")
    assert victim.read_bytes() == b"secret" and sp.ids() == []


def test_state_round_trip_and_a_planted_link_is_not_written_through(sp, tmp_path):
    qid = make_entry(sp)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.link(victim, os.path.join(sp.state_dir, f"{qid}.{os.getpid()}.tmp"))
    state = sp.load_state(qid)
    state.attempts = 2
    state.pending["b@example.org"] = Reply(451, "later")
    sp.save_state(qid, state)
    assert sp.load_state(qid).pending == {"b@example.org": Reply(451, "later")}
    assert victim.read_bytes() == b"keep me"


def test_bury_keeps_entry_reason_and_state_and_ignores_a_planted_link(sp, tmp_path):
    qid = make_entry(sp)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, os.path.join(sp.dead, qid + ".reason"))
    locked = sp.lock(qid)
    state = locked.state()
    state.failed["b@example.org"] = Reply(550, "no")
    locked.save_state(state)
    where = locked.bury("dead", "<b@example.org>: 550 no")
    # the taken name is left as it is: the entry goes under a fresh id beside it
    assert os.path.dirname(where) == sp.dead and where != os.path.join(sp.dead, qid)
    assert sp.ids() == [] and os.path.islink(os.path.join(sp.dead, qid + ".reason"))
    with open(where + ".reason") as f:
        assert f.read() == "<b@example.org>: 550 no\n"
    assert os.path.exists(where + ".state") and victim.read_bytes() == b"keep me"


@pytest.mark.parametrize("folder", ["dead", "corrupt"])
def test_bury_never_replaces_a_file_in_dead_or_corrupt(sp, folder):
    qid = make_entry(sp)
    for suffix in ("", ".reason", ".state"):
        with open(os.path.join(sp.root, folder, qid + suffix), "w") as f:
            f.write("someone else's" + suffix)
    locked = sp.lock(qid)
    state = locked.state()
    state.failed["b@example.org"] = Reply(550, "no")
    locked.save_state(state)
    where = locked.bury(folder, "why")
    for suffix in ("", ".reason", ".state"):
        with open(os.path.join(sp.root, folder, qid + suffix)) as f:
            assert f.read() == "someone else's" + suffix
    assert os.path.exists(where + ".state") and sp.ids() == []
    assert not os.path.exists(os.path.join(sp.state_dir, qid))


def test_a_stale_temp_file_never_makes_a_create_fail(sp):
    qid = spoolentry.new_queue_id()
    for name in (qid, f"{qid}.tmp"):  # what the old, predictable names would have hit
        with open(os.path.join(sp.tmp, name), "w") as f:
            f.write("stale")
    w = sp.new_entry("a@example.org", ["b@example.org"], 0, queue_id=qid)
    w.write(b"x\r\n")
    w.commit(False)
    assert sp.ids() == [qid]


def test_a_writer_stopped_between_link_and_unlink_leaves_a_lockable_entry(sp):
    w = sp.new_entry("a@example.org", ["b@example.org"], 0)
    w.write(b"x\r\n")
    os.fsync(w.fd)
    w._file.flush()
    os.link(w.tmp_path, sp.path(w.queue_id))  # the first half of the commit, then a crash
    os.close(w.fd)
    locked = sp.lock(w.queue_id)
    assert locked is not None and os.listdir(sp.tmp) == []
    locked.release()


def test_clean_tmp_spares_a_writer_still_at_work(sp):
    w = sp.new_entry("a@example.org", ["b@example.org"], 0)
    w.write(b"x")
    old = time.time() - 3600
    os.utime(w.tmp_path, (old, old))
    assert sp.clean_tmp() == 0  # its writer holds the lock (cronie keeps stdin open for hours)
    w._file.close()
    os.close(w.fd)  # the writer dies without cleaning up
    w._done = True
    os.utime(w.tmp_path, (old, old))
    assert sp.clean_tmp() == 1 and os.listdir(sp.tmp) == []


def test_agent_lock_is_exclusive(sp):
    fd = sp.try_agent_lock()
    assert fd is not None and sp.try_agent_lock() is None
    os.close(fd)
    fd = sp.try_agent_lock()
    assert fd is not None
    os.close(fd)


# --- setup-spool --------------------------------------------------------------------------


@needs_root
def test_setup_sets_owners_and_modes_and_is_idempotent(tmp_path):
    sp = spool.Spool(str(tmp_path / "sys" / "mailshim"))
    changes = spoolsetup.setup(sp, USER, USER + 1)
    assert changes
    st = os.stat(sp.root)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o711)
    for name in spool.SUBDIRS:
        st = os.stat(os.path.join(sp.root, name))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER + 1, 0o700)
    st = os.stat(sp.incoming)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER + 1, 0o3733)
    st = os.stat(os.path.join(sp.root, "agent.lock"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (USER, 0o600)
    # Every submitter may read the listener's size; only the runner user may write it.
    st = os.stat(os.path.join(sp.root, "listener-size"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER + 1, 0o644)
    assert spoolsetup.setup(sp, USER, USER + 1) == []


@needs_root
def test_setup_refuses_a_planted_link_and_gives_only_single_link_files(tmp_path):
    sp = spool.Spool(str(tmp_path / "sys"))
    spoolsetup.setup(sp, USER, USER)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's")
    os.link(victim, os.path.join(sp.queue, "linked"))
    own = os.path.join(sp.queue, spoolentry.new_queue_id())
    open(own, "wb").close()
    spoolsetup.setup(sp, USER, USER)
    assert os.stat(own).st_uid == USER
    assert os.stat(victim).st_uid == 0  # a hard link is never chowned
    os.rmdir(sp.corrupt)
    os.symlink(str(tmp_path), sp.corrupt)
    with pytest.raises(CantCreateError):
        spoolsetup.setup(sp, USER, USER)
    assert os.stat(tmp_path).st_uid == 0


@needs_root
def test_root_gives_what_it_writes_to_the_spool_owner(tmp_path):
    sp = spool.Spool(str(tmp_path / "sys"))
    spoolsetup.setup(sp, USER, USER)
    qid = make_entry(sp)
    locked = sp.lock(qid)
    locked.save_state(locked.state())
    locked.release()
    for path in (sp.path(qid), os.path.join(sp.state_dir, qid)):
        assert os.stat(path).st_uid == USER


# --- the drop folder: the runner's side ----------------------------------------------------


@needs_root
def test_pickup_records_the_owner_not_the_uid_record(dropsp):
    qid = spoolentry.new_queue_id()
    plant(dropsp, qid, drop_bytes(qid, uid=0))
    (p,) = pick(dropsp).values()
    assert (p.status, p.uid) == ("picked", USER)
    assert p.queue_id != qid  # a fresh id: the user's choice decides no name in the spool
    assert os.listdir(dropsp.incoming) == []
    env = dropsp.read_envelope(p.queue_id)
    assert env.uid == USER and env.sender == "u@example.org"
    locked = dropsp.lock(p.queue_id)
    with locked.message() as body:
        data = body.read()
    # u@example.org is not uid 4242's address: the warning and a trace line go on top
    assert data.endswith(b"Subject: x\r\n\r\nhello\r\n")
    assert data.startswith(b"Received: by ") and b"from userid 4242" in data
    assert b"X-Authentication-Warning: " in data and b" set sender to u@example.org" in data
    assert os.stat(dropsp.path(p.queue_id)).st_uid == os.geteuid()  # a copy the runner owns


@pytest.mark.parametrize("skew", [10**6, -(10**6)])
def test_pickup_normalises_line_ends_and_takes_arrival_from_pickup(dropsp, skew):
    qid = spoolentry.new_queue_id()
    body = b"Subject: x\n\nline\r.\r\nSMUGGLED\ncaf\xc3\xa9"
    plant(dropsp, qid, drop_bytes(qid, body, arrival=int(time.time()) + skew))
    before = int(time.time())
    p = pick(dropsp)[qid]
    assert p.status == "picked"
    env = dropsp.read_envelope(p.queue_id)
    assert before <= env.arrival <= time.time() and env.eightbit
    with dropsp.lock(p.queue_id).message() as f:
        data = f.read()
    assert data.endswith(b"Subject: x\r\n\r\nline\r\n.\r\nSMUGGLED\r\ncaf\xc3\xa9\r\n")
    assert env.size == len(data)


def test_pickup_removes_a_symlink_without_touching_its_target(dropsp, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(drop_bytes("X" * 20))
    before = victim.stat()
    qid = spoolentry.new_queue_id()
    os.symlink(victim, os.path.join(dropsp.incoming, qid))
    p = pick(dropsp)[qid]
    assert p.status == "rejected" and "not a regular file" in p.reason
    assert os.listdir(dropsp.incoming) == [] and dropsp.ids() == []
    after = victim.stat()
    assert victim.read_bytes() == drop_bytes("X" * 20)
    assert (after.st_mtime_ns, after.st_nlink) == (before.st_mtime_ns, before.st_nlink)


def test_pickup_removes_a_hard_link_and_leaves_the_other_name(dropsp, tmp_path):
    qid = spoolentry.new_queue_id()
    victim = tmp_path / "victim"
    victim.write_bytes(drop_bytes(qid))  # even a valid entry: a second name is refused
    os.link(victim, os.path.join(dropsp.incoming, qid))
    p = pick(dropsp)[qid]
    assert p.status == "rejected" and "more than one link" in p.reason
    assert dropsp.ids() == [] and victim.stat().st_nlink == 1
    assert victim.read_bytes() == drop_bytes(qid)


def test_pickup_does_not_block_on_a_fifo(dropsp):
    qid = spoolentry.new_queue_id()
    os.mkfifo(os.path.join(dropsp.incoming, qid))
    done = []
    t = threading.Thread(target=lambda: done.append(pick(dropsp)))
    t.start()
    t.join(10)
    assert done, "pickup blocked on a FIFO"
    assert done[0][qid].status == "rejected" and os.listdir(dropsp.incoming) == []


def test_pickup_refuses_a_huge_file_without_reading_it(dropsp):
    qid = spoolentry.new_queue_id()
    path = os.path.join(dropsp.incoming, qid)
    with open(path, "wb") as f:
        f.write(drop_bytes(qid))
        f.truncate(50 * 1024**3)  # sparse: 50 GB of nothing
    p = pick(dropsp)[qid]
    assert p.status == "rejected" and "over the limit" in p.reason
    assert dropsp.ids() == [] and os.listdir(dropsp.incoming) == []


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda q: drop_bytes(q, id_record="0" * 20), "claims to be"),
        (lambda q: drop_bytes(q, size=3), "envelope says"),
        (lambda q: b"#!/bin/sh\nrm -rf /\n", "not a mailshim spool entry"),
        (lambda q: drop_bytes(q, rcpts=[f"r{i}@x" for i in range(101)]), "recipients"),
    ],
)
def test_pickup_moves_an_invalid_entry_to_corrupt(dropsp, mutate, why):
    qid = spoolentry.new_queue_id()
    plant(dropsp, qid, mutate(qid))
    p = pick(dropsp)[qid]
    assert p.status == "corrupt" and why in p.reason
    assert dropsp.ids() == [] and os.listdir(dropsp.incoming) == []
    kept = os.path.join(dropsp.corrupt, f"incoming.{qid}")
    with open(kept + ".reason") as f:
        assert why in f.read()


def test_pickup_leaves_an_entry_its_owner_holds(dropsp):
    qid = spoolentry.new_queue_id()
    path = plant(dropsp, qid, drop_bytes(qid))
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert pick(dropsp)[qid].status == "busy"
        assert os.listdir(dropsp.incoming) == [qid] and dropsp.ids() == []
    finally:
        os.close(fd)
    assert pick(dropsp)[qid].status == "picked"


def test_pickup_never_overwrites_a_queued_entry(dropsp):
    qid = make_entry(dropsp, sender="other@example.org")
    plant(dropsp, qid, drop_bytes(qid))
    p = pick(dropsp)[qid]
    assert p.status == "picked" and p.queue_id != qid
    assert dropsp.read_envelope(qid).sender == "other@example.org"
    assert dropsp.read_envelope(p.queue_id).sender == "u@example.org"


def test_pickup_refuses_a_sparse_entry_without_copying_it(dropsp):
    qid = spoolentry.new_queue_id()
    size = 8 * 1024 * 1024
    head = drop_bytes(qid, b"Subject: x\r\n\r\n", size=size)
    path = plant(dropsp, qid, head)
    with open(path, "r+b") as f:
        f.truncate(len(head) + size)  # a valid entry whose message is one big hole
    p = pick(dropsp, max_size=2 * size)[qid]
    assert p.status == "corrupt" and "sparse" in p.reason
    assert dropsp.ids() == [] and os.listdir(dropsp.incoming) == []


def pick_with_failed_record(sp: spool.Spool, reply: str) -> pickup.Pickup:
    """A drop entry for a@ and b@ whose agent recorded ``reply`` as a@'s refusal."""
    qid = spoolentry.new_queue_id()
    env = Envelope(qid, "u@example.org", ["a@example.org", "b@example.org"], 1, 0, False, 3)
    env.failed = {"a@example.org": reply}
    plant(sp, qid, spoolfmt.encode_envelope(env).data + b"x\r\n")
    return pick(sp)[qid]


def test_pickup_moves_failed_records_into_the_state(dropsp):
    p = pick_with_failed_record(dropsp, "550 5.1.1 no such user")
    assert p.status == "picked"
    state = dropsp.load_state(p.queue_id)
    assert {r: str(reply) for r, reply in state.failed.items()} == {
        "a@example.org": "550 5.1.1 no such user"
    }
    assert state.open_recipients(dropsp.read_envelope(p.queue_id)) == ["b@example.org"]


def test_clean_incoming_keeps_live_temp_files_and_removes_the_rest(dropsp):
    qid = spoolentry.new_queue_id()
    live = plant(dropsp, spoolfmt.temp_name(qid, "A" * 12), b"partial")
    stale = plant(dropsp, spoolfmt.temp_name(spoolentry.new_queue_id(), "B" * 12), b"partial")
    old = time.time() - 2 * pickup.STALE_TEMP
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its writer is still at it (stdin open for hours)
    junk = plant(dropsp, "README", b"x")
    os.symlink("/etc/passwd", os.path.join(dropsp.incoming, ".evil.tmp"))
    os.mkdir(os.path.join(dropsp.incoming, "adir"))
    try:
        pickup.clean_incoming(dropsp, now=time.time() + 0)
        left = set(os.listdir(dropsp.incoming))
    finally:
        os.close(fd)
    # the stale one is young by ctime (just planted): kept until its ctime is old too
    assert os.path.basename(live) in left and not os.path.exists(junk)
    assert ".evil.tmp" not in left and "adir" not in left
    pickup.clean_incoming(dropsp, now=time.time() + 2 * pickup.STALE_TEMP)
    assert os.listdir(dropsp.incoming) == []


# --- the drop folder: the submitter's side ----------------------------------------------------


def test_drop_writer_uses_a_temp_name_and_a_group_readable_mode(dropsp):
    s = spool.Spool(dropsp.root, drop=True)
    w = s.new_entry("a@example.org", ["b@example.org", "c@example.org"], 1000)
    (temp,) = os.listdir(s.incoming)
    assert spoolfmt.is_temp_name(temp) and temp.startswith(f".{w.queue_id}.")
    w.write(b"Subject: x\r\n\r\nhi\r\n")
    entry = w.commit(False, keep_lock=True)
    assert isinstance(entry, spoolentry.DropEntry)
    assert os.listdir(s.incoming) == [w.queue_id]
    assert stat.S_IMODE(os.stat(entry.path).st_mode) == 0o640
    assert pick(dropsp)[w.queue_id].status == "busy"  # its submitter holds it
    entry.rewrite(["c@example.org"])  # b was delivered by the submitter's agent
    p = pick(dropsp)[w.queue_id]
    assert p.status == "picked"
    env = dropsp.read_envelope(p.queue_id)
    assert env.recipients == ["c@example.org"] and env.uid == os.geteuid()


def test_drop_entry_remove_only_removes_its_own_file(dropsp):
    s = spool.Spool(dropsp.root, drop=True)
    w = s.new_entry("a@example.org", ["b@example.org"], 1000)
    w.write(b"x\r\n")
    entry = w.commit(False, keep_lock=True)
    assert entry.still_here()
    os.rename(entry.path, entry.path + ".moved")
    plant(dropsp, w.queue_id, b"someone else's")
    assert not entry.still_here()
    entry.remove()
    assert sorted(os.listdir(s.incoming)) == [w.queue_id, w.queue_id + ".moved"]


def test_headers_of_an_entry_without_a_body(sp):
    qid = make_entry(sp, body=b"Subject: only headers\r\n")
    assert sp.lock(qid).headers() == b"Subject: only headers\r\n"


def test_read_envelope_rejects_an_entry_claiming_another_id(sp):
    qid = make_entry(sp)
    other = spoolentry.new_queue_id()
    os.rename(sp.path(qid), sp.path(other))
    with pytest.raises(DataError):
        sp.read_envelope(other)
    with pytest.raises(DataError):
        _ = sp.lock(other).envelope


def test_decode_of_a_written_entry_matches(sp):
    qid = make_entry(sp, rcpts=["x@example.org", "y@example.org"])
    with open(sp.path(qid), "rb") as f:
        env, _ = spoolfmt.decode_envelope(f)
    assert env.recipients == ["x@example.org", "y@example.org"] and env.queue_id == qid


def test_a_drop_entry_handed_over_as_an_fd_names_itself(dropsp):
    """The agent need not carry the id in its argv (/proc shows it to every user)."""
    s = spool.Spool(dropsp.root, drop=True)
    w = s.new_entry("a@example.org", ["b@example.org"], 1000)
    w.write(b"x\r\n")
    entry = w.commit(False, keep_lock=True)
    adopted = spoolentry.open_drop_entry(s, "", entry.fd)
    assert adopted.queue_id == w.queue_id and adopted.still_here()
    entry.release()


def test_clean_tmp_at_any_step_of_a_bury_keeps_the_state(sp):
    """Issue 12 item 12: bury gives the state its new name before the entry leaves queue/,
    so clean_tmp (which drops a state whose entry is gone) never finds it orphaned."""
    qid = make_entry(sp)
    locked = sp.lock(qid)
    state = locked.state()
    state.done["b@example.org"] = Reply(250, "ok")
    locked.save_state(state)
    locked.release()
    state_path = os.path.join(sp.state_dir, qid)
    os.link(state_path, os.path.join(sp.dead, qid + ".state"))  # bury's first step
    sp.clean_tmp(older_than=0)
    assert os.path.exists(state_path) and sp.ids() == [qid]
    os.rename(sp.path(qid), os.path.join(sp.dead, qid))  # its second; then a stop
    sp.clean_tmp(older_than=0)
    with open(os.path.join(sp.dead, qid + ".state"), "rb") as f:
        assert spoolfmt.decode_state(f.read()).done == {"b@example.org": Reply(250, "ok")}


def test_pickup_refuses_a_failed_record_that_is_not_a_refusal(dropsp):
    p = pick_with_failed_record(dropsp, "250 2.0.0 fine, thanks")
    assert p.status == "corrupt" and "no 5xx reply" in p.reason and dropsp.ids() == []


# --- reading and removing a locked entry cheaply (issue 14: a flush's CPU per message) ------


BIG = spoolentry.HEAD_READ


@pytest.mark.parametrize("size", [0, 100, BIG - 300, BIG, 3 * BIG + 7])
def test_a_locked_entry_gives_back_its_message_whatever_its_size(sp, size):
    """Small entries are read whole at once, big ones streamed from the fd: same bytes."""
    body = bytes(i % 251 for i in range(size))
    qid = make_entry(sp, body)
    locked = sp.lock(qid)
    assert locked.envelope.size == size
    for _ in range(2):  # a report reads it again after the attempt
        with locked.message() as f:
            start = f.tell()
            assert f.read() == body
            f.seek(start)
            assert f.read(10) == body[:10]
    locked.release()


def test_an_envelope_longer_than_the_first_read_is_read_in_full(sp):
    rcpts = [f"recipient-{i:05d}@example.org" for i in range(BIG // 20)]
    qid = make_entry(sp, b"Subject: many\r\n\r\nhi\r\n", rcpts=rcpts)
    assert os.path.getsize(sp.path(qid)) > BIG
    locked = sp.lock(qid)
    assert locked.envelope.recipients == rcpts
    with locked.message() as f:
        assert f.read() == b"Subject: many\r\n\r\nhi\r\n"
    locked.release()


@pytest.mark.parametrize("size", [100, 2 * BIG])
def test_a_message_shorter_than_its_envelope_says_is_a_data_error(sp, size):
    qid = make_entry(sp, b"x" * size)
    os.truncate(sp.path(qid), os.path.getsize(sp.path(qid)) - 1)
    locked = sp.lock(qid)
    with pytest.raises(DataError, match="envelope says"):
        locked.message()
    locked.release()


def test_remove_takes_a_state_written_under_the_same_lock(sp):
    """state() found none, then the holder wrote one: remove() must not skip its unlink."""
    qid = make_entry(sp)
    locked = sp.lock(qid)
    state = locked.state()
    state.attempts = 1
    locked.save_state(state)
    assert os.path.exists(os.path.join(sp.state_dir, qid))
    locked.remove()
    assert not sp.exists(qid) and os.listdir(sp.state_dir) == []


def test_a_mark_this_process_writes_is_cleared_by_its_next_delivery(sp):
    """clear_relay_down looks at most once a second, but never trusts a look older than
    this process's own "listener unreachable" mark."""
    sp.clear_relay_down()  # looked: no mark
    fd = sp.try_agent_lock()
    assert fd is not None
    try:
        sp.mark_relay(fd, False)
        assert sp.relay_down_since() is not None
        sp.clear_relay_down()
        assert sp.relay_down_since() is None
    finally:
        os.close(fd)
