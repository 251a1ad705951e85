"""A throwaway Postfix null client for the side-by-side benchmark (``make bench-postfix``).

Nothing is installed: Debian's ``postfix`` package is fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` into the benchmark's temporary folder; dpkg never hears of it,
so it cannot conflict with mailshim's own package (which Conflicts with
mail-transport-agent), no service starts, and removing the folder removes Postfix. Its
binaries find their libraries through ``LD_LIBRARY_PATH`` (their RUNPATH names
/usr/lib/postfix) and every directory is set in its own ``main.cf``; ``master.cf`` has no
listener (no port 25) and no chroot. Postfix refuses to run without its own unprivileged
user and group: the bench creates ``mailshim-pfbench`` and ``mailshim-pfdrop`` (system
accounts, no home) when missing and deletes them in ``close()``.

The configuration is a null client: ``relayhost = [127.0.0.1]:PORT``, no local delivery,
loopback only, default concurrency and connection caching (Postfix's defaults are what it is
measured against). Postfix's ``sendmail`` runs as root here, so ``postdrop`` needs no set-gid.

Trust: a developer's benchmark tool run as root on a throwaway machine state; it starts and
stops only its own master process (by the pid file in its own queue folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

USER, GROUP = "mailshim-pfbench", "mailshim-pfdrop"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(Exception):
    pass


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise PostfixError(f"{' '.join(argv[:3])}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Postfix:
    """Postfix unpacked in a temporary folder of its own, a null client relaying to ``port``.

    The folder is not inside the benchmark's (mode 700): Postfix's own user must reach its
    queue. ``close()`` removes it.
    """

    def __init__(self, port: int, log=print) -> None:
        if os.geteuid() != 0:
            raise PostfixError("the Postfix benchmark runs as root (Postfix's master needs it)")
        folder = Path(tempfile.mkdtemp(prefix="mailshim-bench-postfix-"))
        folder.chmod(0o755)
        self.folder = folder
        self.root = folder / "root"
        self.conf = folder / "etc"
        self.queue = folder / "queue"
        self.data = folder / "data"
        self._log = log
        self._made_accounts: list[tuple[str, str]] = []
        self.env = dict(
            os.environ,
            LD_LIBRARY_PATH=str(self.root / "usr" / "lib" / "postfix"),
            MAIL_CONFIG=str(self.conf),
        )
        self._started = False
        try:
            self._unpack()
            self._accounts()
            self._configure(port)
        except BaseException:
            self.close()
            raise
        self.version = self.postconf("-h", "mail_version").strip()

    # -- setting up -----------------------------------------------------------------------

    def _unpack(self) -> None:
        self._log("fetching Debian's postfix package (apt-get download; nothing is installed)")
        done = subprocess.run(
            ["apt-get", "download", "-qq", "postfix"],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        debs = sorted(self.folder.glob("postfix_*.deb"))
        if done.returncode != 0 or not debs:
            raise PostfixError(f"apt-get download postfix failed: {done.stderr.strip()}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(self.root)])
        self.package = debs[0].name

    def _accounts(self) -> None:
        try:
            _run(["getent", "group", GROUP])
        except PostfixError:
            _run(["groupadd", "--system", GROUP])
            self._made_accounts.append(("groupdel", GROUP))
        try:
            _run(["getent", "passwd", USER])
        except PostfixError:
            _run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    USER,
                ]
            )
            # userdel removes the user's own group too
            self._made_accounts.insert(0, ("userdel", USER))

    def _configure(self, port: int) -> None:
        root = self.root
        self.conf.mkdir()
        self.queue.mkdir()  # root's; postfix-script makes what is inside, owned by USER
        self.data.mkdir()
        shutil.chown(self.data, USER, USER)
        (self.conf / "master.cf").write_text(MASTER_CF)
        (self.conf / "main.cf").write_text(
            f"""# written by bench/postfix.py: a null client for the benchmark
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
command_directory = {root}/usr/sbin
daemon_directory = {root}/usr/lib/postfix/sbin
meta_directory = {root}/etc/postfix
shlib_directory = {root}/usr/lib/postfix
sendmail_path = {root}/usr/sbin/sendmail
newaliases_path = {root}/usr/bin/newaliases
mailq_path = {root}/usr/bin/mailq
manpage_directory = {root}/usr/share/man
html_directory = no
readme_directory = no
mail_owner = {USER}
setgid_group = {GROUP}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH
export_environment = TZ MAIL_CONFIG LANG LD_LIBRARY_PATH
maillog_file = {self.folder}/maillog
maillog_file_prefixes = {self.folder}
myhostname = postfix-bench.example.org
mydomain = example.org
myorigin = $mydomain
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{port}
smtp_tls_security_level = none
biff = no
"""
        )

    # -- running --------------------------------------------------------------------------

    def postconf(self, *args: str) -> str:
        return _run(
            [str(self.root / "usr" / "sbin" / "postconf"), "-c", str(self.conf), *args], self.env
        )

    def _postfix(self, *args: str) -> str:
        return _run(
            [str(self.root / "usr" / "sbin" / "postfix"), "-c", str(self.conf), *args], self.env
        )

    def start(self) -> None:
        try:
            self._postfix("start")
        except PostfixError as exc:
            raise PostfixError(f"{exc}\n{self._why()}") from None
        self._started = True
        self._wait_for(lambda: (self.queue / "public" / "pickup").exists(), "pickup's fifo")

    def _why(self) -> str:
        """What ``postfix check`` says: Postfix's commands log to stderr only on a tty."""
        command = f"{self.root}/usr/sbin/postfix -c {self.conf} check"
        done = subprocess.run(
            ["script", "-qc", command, "/dev/null"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        return done.stdout.strip()

    def relay_to(self, port: int) -> None:
        """Point relayhost at ``port`` and reload (a fresh qmgr forgets the dead host)."""
        self.postconf("-e", f"relayhost = [127.0.0.1]:{port}")
        self._postfix("reload")

    def flush(self) -> None:
        _run([str(self.root / "usr" / "sbin" / "postqueue"), "-c", str(self.conf), "-f"], self.env)

    @property
    def sendmail(self) -> list[str]:
        return [str(self.root / "usr" / "sbin" / "sendmail")]

    def count(self, *queues: str) -> int:
        total = 0
        for name in queues:
            for _, _, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def wait_queued(self, n: int, timeout: float) -> None:
        """Until ``n`` messages wait in ``deferred`` and nothing is in flight."""
        self._wait_for(
            lambda: (
                self.count("deferred") >= n and self.count("maildrop", "incoming", "active") == 0
            ),
            f"{n} deferred messages",
            timeout,
        )

    def _wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"Postfix: no {what} after {timeout}s (see {self.folder}/maillog)"
                )
            time.sleep(0.05)

    def close(self) -> None:
        """Stop our master (only ours: the pid file in our queue folder), drop the accounts."""
        if self._started:
            try:
                self._postfix("stop")
            except (PostfixError, subprocess.TimeoutExpired):
                pid_file = self.queue / "pid" / "master.pid"
                if pid_file.exists():
                    try:
                        os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                    except (OSError, ValueError):
                        pass
            self._started = False
            time.sleep(0.5)  # the master's children exit after it
        for command, name in self._made_accounts:
            subprocess.run([command, name], capture_output=True, timeout=60)
        self._made_accounts = []
        shutil.rmtree(self.folder, ignore_errors=True)
