"""A user sees her own messages after pickup, and nobody else does (issue 23, item 4).

Real users (useradd) on one system spool: alice submits through the drop folder, the runner
(its own account) takes the entry into the private ``queue/`` and defers it; alice's ``mailq``
and ``mailshim queue show`` show it with its status and next try through ``status/<drop id>``
(ownview.py), bob's show nothing of it. Skipped with a reason when not root.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import tool
from mailshim import spoolfmt
from test_multiuser import MSG, System, built_box, emptied, stop_processes

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and chown files"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed"),
]

# A prefix of this file's own: other test files create and delete their users concurrently.
RUNNER, ALICE, BOB = "mshd2-run", "mshd2-a", "mshd2-b"


@pytest.fixture(scope="module")
def box():
    with built_box((RUNNER, ALICE, BOB), "1h") as system:
        yield system


@pytest.fixture
def mu(box: System) -> System:
    system = emptied(box)
    for name in os.listdir(system.spool / "status"):
        os.unlink(system.spool / "status" / name)
    for user in (system.users[ALICE], system.users[BOB]):
        shutil.rmtree(user.home / ".local", ignore_errors=True)
        shutil.rmtree(user.home / ".cache", ignore_errors=True)
    return system


def _queue_ids(mu: System) -> list[str]:
    return mu.names("queue")


def _mailq(mu: System, user) -> str:
    r = mu.run(user, [tool("mailq")])
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    return r.stdout.decode()


def test_setup_spool_makes_status_enterable_not_listable(mu):
    st = (mu.spool / "status").stat()
    run = mu.users[RUNNER]
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (run.uid, run.gid, 0o711)


@pytest.mark.parametrize("mode", ["-odq", "-odb"])
def test_her_deferred_message_is_hers_to_see_and_nobody_elses(mu, mode):
    alice, bob = mu.users[ALICE], mu.users[BOB]
    mu.listener.handler.rcpt_replies["carol@example.org"] = "451 4.2.0 try again later"
    r = mu.sendmail(alice, mode, "-i", "carol@example.org", input=MSG)
    assert (r.returncode, r.stderr) == (0, b"")
    # Her note names the drop id she submitted under (every delivery mode leaves one).
    notes = [p for p in (alice.home / ".local/state/mailshim").glob("view.*.d/*")]
    assert len(notes) == 1
    drop_id = notes[0].name
    if mode == "-odb":
        # Her own agent would linger on it: the runner takes it over here.
        stop_processes([alice])
    mu.flush()
    (qid,) = _queue_ids(mu)
    assert mu.names("incoming") == []
    assert qid != drop_id

    out = _mailq(mu, alice)
    assert qid in out and "carol@example.org" in out
    assert "451 4.2.0 try again later" in out
    assert re.search(r"\[next try in \w+\]", out), out
    assert "Mail queue is empty" not in out

    # bob sees nothing of it: not the ids, not the recipient, not the error.
    out_bob = _mailq(mu, bob)
    for secret in (qid, drop_id, "carol@example.org", "try again"):
        assert secret not in out_bob
    assert "Mail queue is empty" not in out_bob and "No message of yours" in out_bob
    # ... and cannot list status/ to find names.
    r = mu.run(bob, ["ls", str(mu.spool / "status")])
    assert r.returncode != 0

    for wanted in (qid, drop_id):
        r = mu.mailshim(alice, "queue", "show", wanted)
        assert r.returncode == 0, r.stderr.decode()
        text = r.stdout.decode()
        assert "id:" in text and qid in text and "deferred" in text
        assert "next attempt:" in text and "carol@example.org" in text
        r = mu.mailshim(bob, "queue", "show", wanted)
        assert r.returncode == 64 and b"no such queue id" in r.stderr
        assert b"carol" not in r.stdout + r.stderr

    # Delivered: the view and her note go, and her listing no longer shows it.
    del mu.listener.handler.rcpt_replies["carol@example.org"]
    r = mu.mailshim(mu.users[RUNNER], "flush")
    assert r.returncode == 0
    assert _queue_ids(mu) == [] and mu.names("status") == []
    out = _mailq(mu, alice)
    assert qid not in out and "No message of yours is queued" in out
    assert not list((alice.home / ".local/state/mailshim").glob("view.*.d/*"))


def test_a_view_is_the_runners_file_and_names_only_her_message(mu):
    alice = mu.users[ALICE]
    mu.listener.handler.rcpt_replies["carol@example.org"] = "451 4.2.0 later"
    assert mu.sendmail(alice, "-odq", "-i", "carol@example.org", input=MSG).returncode == 0
    mu.flush()
    (name,) = mu.names("status")
    st = os.lstat(mu.spool / "status" / name)
    run = mu.users[RUNNER]
    assert stat.S_ISREG(st.st_mode) and st.st_uid == run.uid
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_nlink == 1


def test_a_planted_link_in_status_is_never_read_or_followed(mu):
    """The runner account controls status/: a link there under her drop id shows nothing,
    and root's flush replaces the name rather than writing through it."""
    alice = mu.users[ALICE]
    mu.listener.handler.rcpt_replies["carol@example.org"] = "451 4.2.0 later"
    assert mu.sendmail(alice, "-odq", "-i", "carol@example.org", input=MSG).returncode == 0
    (drop_id,) = mu.names("incoming")
    target = mu.base / "roots-file"
    target.write_text("root's\n")
    os.symlink(target, mu.spool / "status" / drop_id)
    r = mu.mailshim(None, "flush")  # root picks up and defers
    assert r.returncode == 0, r.stderr.decode()
    assert target.read_text() == "root's\n"
    assert not (mu.spool / "status" / drop_id).is_symlink()
    assert "451 4.2.0 later" in _mailq(mu, alice)


# --- the runner's copy of the last valid system configuration (issue 23, item 1) ----------

# The real entry points with the system paths aimed at this test's files: /etc/mailshim is
# shared by every test on the machine, so it is never written here.
WRAP = (
    "import sys; from mailshim import paths; paths.SYSTEM_CONFIG, paths.SYSTEM_SPOOL ="
    " sys.argv[1:3]; sys.argv = sys.argv[3:]; from mailshim.cli.{0} import main;"
    " sys.exit(main())"
)


def _as_system(mu: System, user, module: str, argv: list[str], input: bytes = b""):
    env = mu.env(user)
    del env["MAILSHIM_CONFIG"]  # the system file, as cron's and mail's sendmail find it
    code = WRAP.format(module)
    cmd = [sys.executable, "-c", code, str(mu.config), str(mu.spool), *argv]
    kw = {} if user is None else {"user": user.uid, "group": user.gid, "extra_groups": []}
    return subprocess.run(cmd, input=input, capture_output=True, env=env, cwd="/", timeout=60, **kw)


def _rcpts_in_incoming(mu: System) -> list[list[str]]:
    out = []
    for name in mu.names("incoming"):
        if spoolfmt.valid_id(name):
            with open(mu.incoming / name, "rb") as f:
                out.append(spoolfmt.decode_envelope(f)[0].recipients)
    return out


def test_a_user_who_never_sent_mail_addresses_it_as_the_last_valid_system_file_said(mu):
    """bob's sendmail never ran while the system file was good; the file breaks; his mail
    is addressed as the runner's copy of the last valid file says (not bob@<this host>),
    spooled for the runner, and nothing of the copy's paths or relays is taken."""
    bob = mu.users[BOB]
    good = mu.config.read_bytes()
    r = _as_system(mu, mu.users[RUNNER], "entry", ["mailshim", "run"])
    assert r.returncode == 0, r.stderr.decode()
    copy = mu.spool / "status" / "config.toml"
    assert copy.read_bytes() == good
    st = copy.stat()
    assert st.st_uid == mu.users[RUNNER].uid and stat.S_IMODE(st.st_mode) == 0o644

    mu.config.write_bytes(good + b"\n[addresses\nbroken = \n")  # not TOML any more
    try:
        r = _as_system(mu, bob, "sendmail", ["sendmail", "-i", "carol"], input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        assert _rcpts_in_incoming(mu) == [["carol@example.org"]]
        assert mu.listener.messages == []  # never delivered with the copy: the runner does

        # Without the copy, the defaults: the mail would go to carol@<this host>.
        copy.unlink()
        r = _as_system(mu, mu.users[ALICE], "sendmail", ["sendmail", "-i", "dave"], input=MSG)
        assert r.returncode == 0, r.stderr.decode()
        rcpts = _rcpts_in_incoming(mu)
        assert ["carol@example.org"] in rcpts and len(rcpts) == 2, rcpts
        assert ["dave@example.org"] not in rcpts
    finally:
        mu.config.write_bytes(good)
    r = _as_system(mu, mu.users[RUNNER], "entry", ["mailshim", "run"])
    assert r.returncode == 0, r.stderr.decode()
    assert "carol@example.org" in [m.rcpt_tos[0] for m in mu.listener.wait(2)]
    assert copy.read_bytes() == good  # published again


def test_a_copy_others_could_write_or_a_link_is_ignored(mu):
    bob = mu.users[BOB]
    good = mu.config.read_bytes()
    copy = mu.spool / "status" / "config.toml"
    copy.write_bytes(good)
    os.chown(copy, mu.users[BOB].uid, mu.users[BOB].gid)  # not the runner's: ignored
    mu.config.write_bytes(b"[addresses\n")
    try:
        r = _as_system(mu, bob, "sendmail", ["sendmail", "-i", "carol"], input=MSG)
        assert r.returncode == 0
        assert _rcpts_in_incoming(mu) != [["carol@example.org"]]
    finally:
        mu.config.write_bytes(good)
        copy.unlink()
