"""Real listeners nobody here wrote, run by the tests: Dovecot LMTP and Haraka.

Each is started from its own configuration in a private temporary folder, on a free port (and,
for Dovecot, a unix socket), and stopped by the test that started it. Dovecot comes from
Debian (``dovecot-core`` + ``dovecot-lmtpd``), Haraka from npm into a cache folder; both are
installed by ``tests/real-listeners/install.sh`` (run by ``make test`` and ``.ci/run``).

Dovecot runs without root: as the ``dovecot`` system user when the tests run as root, else as
the user running them. Its userdb gives three kinds of mailbox for real per-recipient replies
after DATA: any user (delivered to ``mail/<user>/Maildir``), ``full`` (a 1 KB quota: the quota
plugin answers ``552 5.2.2``), and ``readonly`` (a Maildir without write permission: Dovecot
cannot create its files and answers ``451 4.2.0``).

Haraka runs the ``tls`` plugin with a certificate from a private CA (trustme), an AUTH plugin
with one fixed user that offers AUTH only over TLS, and a queue plugin that writes each
accepted message unchanged (``.eml``) with what the server saw (``.json``: envelope, AUTH
user, TLS, whether the client pipelined).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailshim-tests"
HARAKA_DIR = Path(os.environ.get("MAILSHIM_HARAKA_DIR") or CACHE / "haraka")
HARAKA_BIN = HARAKA_DIR / "node_modules" / "Haraka" / "bin" / "haraka"
INSTALL_HINT = "run `bash tests/real-listeners/install.sh` (make test and .ci/run do)"
HARAKA_USER, HARAKA_PASSWORD = "mailshim-test", "not-a-secret-9f2c"


def _missing(what: str) -> None:
    """Skip, or fail in CI (.ci/run sets MAILSHIM_REQUIRE_LISTENERS): CI installs these
    servers, so a missing one there is a broken setup, not a reason to skip."""
    message = f"{what} is not installed: {INSTALL_HINT}"
    if os.environ.get("MAILSHIM_REQUIRE_LISTENERS") or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _wait_for(check, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            shown = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise AssertionError(f"{what} did not come up; its log ends:\n{shown}")
        time.sleep(0.05)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- Dovecot LMTP --------------------------------------------------------------------


def dovecot_binary() -> str:
    found = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/sbin")
    if not found or not Path("/usr/lib/dovecot/lmtp").exists():
        _missing("Dovecot LMTP (Debian packages dovecot-core, dovecot-lmtpd)")
    assert found is not None
    return found


class Dovecot:
    """One private Dovecot instance serving LMTP on a unix socket and on 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.binary = dovecot_binary()
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="mailshim-dovecot-"))
        self.socket = self.root / "lmtp.sock"
        self.log = self.root / "dovecot.log"
        self.mail = self.root / "mail"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = pwd.getpwnam("dovecot") if os.geteuid() == 0 else pwd.getpwuid(os.getuid())
        for sub in ("run", "state", "mail", "mail/readonly/Maildir/cur"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("new", "tmp"):
            (self.mail / "readonly" / "Maildir" / sub).mkdir()
        self._write_config()
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        for path in (self.mail / "readonly").rglob("*"):
            path.chmod(0o555)
        (self.mail / "readonly").chmod(0o555)

    def _write_config(self) -> None:
        root, user = self.root, self.user
        (root / "users").write_text(
            f"full::{user.pw_uid}:{user.pw_gid}::{self.mail}/full::userdb_quota_rule=*:storage=1K\n"
        )
        (root / "dovecot.conf").write_text(
            f"""# A private LMTP-only instance for mailshim's tests.
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailshim-test-{root.name}
log_path = {self.log}
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_internal_user = {user.pw_name}
default_internal_group = {grp.getgrgid(user.pw_gid).gr_name}
default_login_user = {user.pw_name}
first_valid_uid = {user.pw_uid}
mail_location = maildir:{self.mail}/%n/Maildir
mail_plugins = quota
# quota is checked when the message is saved (after DATA), per recipient
lmtp_rcpt_check_quota = no
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {root}/users
}}
userdb {{
  driver = static
  args = uid={user.pw_uid} gid={user.pw_gid} home={self.mail}/%n allow_all_users=yes
}}
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=100M
}}
service lmtp {{
  unix_listener {self.socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
service log {{
  chroot =
}}
"""
        )

    def start(self) -> None:
        # as root, drop to the dovecot user; otherwise the user running the tests is it
        drop = (
            {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
            if os.geteuid() == 0
            else {}
        )
        self.proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.root / "dovecot.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "stderr", "ab"),  # noqa: SIM115 (the child keeps it)
            cwd=self.root,
            **drop,
        )
        _wait_for(
            lambda: self.socket.exists() and _accepts(self.port), "Dovecot", self.root / "stderr"
        )

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        # the next start() must not find the old socket and think it is up
        self.socket.unlink(missing_ok=True)

    def remove(self) -> None:
        self.stop()
        # without root, the read-only Maildir's files can be removed only once it is writable
        for path in [self.mail, *self.mail.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(self.root, ignore_errors=True)

    def maildir(self, user: str) -> list[bytes]:
        """The messages delivered to ``user``'s INBOX, oldest first (Maildir: LF line ends)."""
        new = self.mail / user / "Maildir" / "new"
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.exists() else []
        return [f.read_bytes() for f in files]


def strip_lmtp_trace(stored: bytes) -> bytes:
    """A Maildir file without the fields Dovecot puts on top: Return-Path, Delivered-To (a
    delivery to one recipient) and its Received."""
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <"), stored[:200]
    at = 2 if lines[1].startswith(b"Delivered-To: ") else 1
    assert lines[at].startswith(b"Received: from "), stored[:400]
    at += 1
    while lines[at][:1] in (b" ", b"\t"):
        at += 1
    return b"\n".join(lines[at:])


# --- Haraka --------------------------------------------------------------------------

_STORE_PLUGIN = """\
// Accept every recipient; write each message as received, and what the server saw.
const fs = require('fs')
const path = require('path')

// Address objects: a method in older Haraka, a property in newer
const addr = (a) => (typeof a.address === 'function' ? a.address() : a.address)

exports.hook_rcpt = function (next) {
    next(OK)
}

exports.hook_queue = function (next, connection) {
    const txn = connection.transaction
    const base = path.join(process.env.MAILSHIM_HARAKA_STORE, txn.uuid)
    const out = fs.createWriteStream(base + '.tmp')
    out.on('close', () => {
        fs.renameSync(base + '.tmp', base + '.eml')
        const seen = {
            mail_from: addr(txn.mail_from),
            mail_params: txn.mail_from.params || null,
            rcpt_to: txn.rcpt_to.map(addr),
            auth_user: connection.notes.auth_user || null,
            tls: connection.tls.enabled,
            pipelining: connection.pipelining,
        }
        fs.writeFileSync(base + '.json.tmp', JSON.stringify(seen))
        fs.renameSync(base + '.json.tmp', base + '.json')
        next(OK)
    })
    txn.message_stream.pipe(out) // unstuffed, CRLF: the message as the client meant it
}

// an authenticated client relays: Haraka calls this hook instead
exports.hook_queue_outbound = exports.hook_queue
"""

_AUTH_PLUGIN = """\
// One fixed test user, AUTH PLAIN/LOGIN offered only over TLS.
exports.register = function () {
    this.inherits('auth/auth_base')
}

exports.hook_capabilities = function (next, connection) {
    if (connection.tls.enabled) {
        connection.capabilities.push('AUTH PLAIN LOGIN')
        connection.notes.allowed_auth_methods = ['PLAIN', 'LOGIN']
    }
    next()
}

exports.get_plain_passwd = function (user, connection, cb) {
    cb(user === process.env.MAILSHIM_HARAKA_USER ? process.env.MAILSHIM_HARAKA_PASSWORD : null)
}
"""


def _dhparams() -> Path:
    """DH parameters for Haraka's TLS, made once: without them Haraka runs ``openssl dhparam
    2048`` at every start (up to 30 s); DSA-style generation takes a fraction of a second."""
    path = HARAKA_DIR / "dhparams.pem"
    if not path.exists():
        tmp = path.with_name(f"dhparams.{os.getpid()}.tmp")
        subprocess.run(
            ["openssl", "dhparam", "-dsaparam", "-out", str(tmp), "2048"],
            check=True,
            capture_output=True,
        )
        tmp.replace(path)
    return path


def haraka_binary() -> Path:
    if not HARAKA_BIN.exists():
        _missing(f"Haraka (npm package, expected in {HARAKA_DIR})")
    if not shutil.which("node"):
        _missing("node (for Haraka)")
    return HARAKA_BIN


class Haraka:
    """One Haraka server on 127.0.0.1:port with STARTTLS (private CA), AUTH and a SIZE limit."""

    def __init__(self, port: int, root: Path, max_bytes: int = 100_000) -> None:
        self.binary = haraka_binary()
        self.port = port
        self.root = root
        self.store = root / "store"
        self.log = root / "haraka.log"
        self.proc: subprocess.Popen[bytes] | None = None
        import trustme

        root.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        config = root / "config"
        for sub in (config, root / "plugins", self.store):
            sub.mkdir(parents=True, exist_ok=True)
        cert.private_key_pem.write_to_path(str(config / "tls_key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(config / "tls_cert.pem"))
        (config / "smtp.ini").write_text(
            f"[main]\nlisten=127.0.0.1:{port}\nnodes=0\ninactivity_timeout=60\n"
            "force_shutdown_timeout=5\n"
        )
        # Haraka reads no defaults for a section its file leaves out: start from its own file.
        shipped = (HARAKA_BIN.parent.parent / "config" / "connection.ini").read_text()
        assert "\nbytes=26214400\n" in shipped
        (config / "connection.ini").write_text(
            shipped.replace("\nbytes=26214400\n", f"\nbytes={max_bytes}\n")
        )
        shutil.copy(_dhparams(), config / "dhparams.pem")
        (config / "tls.ini").write_text("[main]\nkey=tls_key.pem\ncert=tls_cert.pem\n")
        (config / "log.ini").write_text("[main]\nlevel=info\n")
        (config / "me").write_text("haraka.test\n")
        (config / "plugins").write_text("tls\nmailshim_auth\nmailshim_store\n")
        (root / "plugins" / "mailshim_store.js").write_text(_STORE_PLUGIN)
        (root / "plugins" / "mailshim_auth.js").write_text(_AUTH_PLUGIN)

    def start(self) -> None:
        env = dict(
            os.environ,
            MAILSHIM_HARAKA_STORE=str(self.store),
            MAILSHIM_HARAKA_USER=HARAKA_USER,
            MAILSHIM_HARAKA_PASSWORD=HARAKA_PASSWORD,
        )
        self.proc = subprocess.Popen(
            ["node", str(self.binary), "-c", str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=open(self.log, "ab"),  # noqa: SIM115 (the child keeps it)
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env=env,
        )
        _wait_for(lambda: self.proc.poll() is None and _accepts(self.port), "Haraka", self.log)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def received(self) -> list[tuple[dict[str, object], bytes]]:
        """(what the server saw, the message bytes) for each accepted message, oldest first."""
        seen = sorted(self.store.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        return [(json.loads(p.read_text()), p.with_suffix(".eml").read_bytes()) for p in seen]

    def wait(self, count: int = 1, timeout: float = 20.0) -> list[tuple[dict[str, object], bytes]]:
        deadline = time.monotonic() + timeout
        while len(got := self.received()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} message(s), Haraka stored {len(got)}")
            time.sleep(0.05)
        return got
