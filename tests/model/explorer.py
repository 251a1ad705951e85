"""The model-based test's explorer: a seed picks an install, a configuration and a sequence of
steps (submissions, listener behaviours, drivers, kills, reboots); the explorer plays them
against the real `sendmail`/`mailshim` programs, real users and a scripted listener, checks the
invariants as it goes, then lets the install settle with the listener up and checks that every
message whose submission succeeded arrived exactly once (issue 22, the systematic part).

A step never waits for the programs it starts (a `sendmail -odi` against a mute listener, a
`mailshim flush`, the daemon run beside the next steps); `tick()` reaps them, checks each
against its time bound and plays the timer of the units. Replaying a seed replays the same
steps; what the programs make of them depends on timing, which is the point of running many.

Invariants (each failure names the seed and the step):
- every program ends within its bound (`BOUNDS`); an agent or daemon sent SIGTERM within the
  relay timeout plus a margin; at the end, no agent outlives the linger time once nothing is
  left to retry;
- once the listener has stayed up for the longest retry step plus `MARGIN`, every message
  whose submission succeeded (exit 0, or 250 after the dot for -bs) and that was neither
  deleted, held nor bounced has arrived exactly once; a duplicate only in a window of
  docs/spool.md section 5: the last message stored on a connection that ended without QUIT
  (windows 1, 2), a drop-folder entry that was in incoming/ when a runner was killed
  (window 4), or a message the listener stored and then answered 421 (window 7); where only
  the agents retry (no retrier), what README "Who retries" leaves waiting (`World.excused`)
  may be missing;
- nothing arrives after a `mailshim queue hold` or `delete` of it returned (until released);
- `mailq` lists every entry that was in queue/ (queue id) or incoming/ (drop id) both before
  and after it ran, root's with `!` when held throughout, and nothing that was in neither; a
  user's listing of the system spool holds her own messages only;
- with failover relays, mail reaches the backup only while the primary fails as a whole
  (unreachable, a 4xx at MAIL or after the dot, a 421), a recipient's 4xx at RCPT moves it
  on, or within the relay-down mark after that; never for back-pressure (issue 22 item 9);
- a background submission made while the listener is up, on an install whose agent is the
  retrier, arrives within the listener-down pause plus the first step plus `MARGIN` (item 4).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from scripted import FAILS_OVER, TOKEN, ScriptedListener

BIN = Path(sys.executable).parent
# roles; the real users are named per process (mshm<pid>r, ...a, ...b): two runs at once (the
# suite and a soak) must not delete each other's users
RUNNER, ALICE, BOB = "runner", "alice", "bob"
USER_NAME = re.compile(r"^mshm([0-9]+)[rab]$")
QUEUE_ID = re.compile(r"[0-9A-Z]{20}")  # queue and drop ids (spoolfmt.valid_id)
KINDS = ("timer", "daemon", "agents", "peruser")
RELAYS = ("one", "failover", "lmtp")
MODES = ("odb", "odi", "odq", "v", "bs", "bs-odi", "t")
ADMIN = ("hold", "release", "retry", "delete", "requeue", "hold-all", "release-all")
RELAY_TIMEOUT = 3  # [relay] timeout: a mute listener costs this per attempt
PAUSE = 1  # [relay] retry_after_failure: the listener-down pause
TIMER = 2.0  # the units' timer, scaled down like the retry steps (OnUnitInactiveSec)
RESTART = 2.0  # mailshim-daemon.service's Restart=on-failure RestartSec, scaled down alike
LIMIT_WINDOW = 4  # [limits] user_window when the send limits are on
MARGIN = 8.0  # seconds on top of the longest step before a missing message is a failure
LINGER = 6.0  # seconds an agent may stay once nothing is left to retry
BOUNDS = {  # the longest each program may run
    "sendmail": 25.0,
    "run": 20.0,
    "flush": 20.0,
    "admin": 20.0,
    "mailq": 20.0,
    "check": 30.0,
}
TERM_BOUND = RELAY_TIMEOUT * 2 + 4.0  # SIGTERM'd agent or daemon: the entry in flight, then out
MARKER = "MAILSHIM_MODEL_RUN"
SERVED_FRESH = 150.0  # how long `sendmail` believes a `served` mark (serving.py)
RCPT = "rcpt@example.org"


def tool(name: str) -> str:
    return str(BIN / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Violation(AssertionError):
    pass


# --- the set-up: install kind, relays, limits -----------------------------------------------


class Setup:
    """What one seed runs on. ``kind``: timer (the packaged units: a `mailshim run` every
    TIMER seconds as the runner user, refreshing the spool's `served` mark so that `sendmail`
    starts no agent), daemon (`mailshim daemon` as the runner user), agents (system spool,
    nothing but the agents: units not enabled), peruser (no system spool: each user's own
    spool and agent). ``retrier`` (agents, peruser): `mailshim retrier install --cron` was
    run as README "Who retries" tells such installs (peruser: by each user for her own
    spool; agents: by the runner user, as /etc/cron.d/mailshim would run it): the crontab's
    `@reboot` line runs at a reboot and its every-minute line every TIMER seconds. Without
    it, mail whose agent died waits for the next submission (documented, not a failure)."""

    def __init__(
        self,
        kind: str = "timer",
        relays: str = "one",
        limits: bool = False,
        retry: tuple[str, ...] = ("1s", "2s"),
        pause: float = PAUSE,
        retrier: bool = False,
    ) -> None:
        assert kind in KINDS and relays in RELAYS
        assert not retrier or kind in ("agents", "peruser"), "only installs with no runner"
        self.retrier = retrier
        self.kind = kind
        self.relays = relays
        self.limits = limits
        self.retry = retry
        self.pause = pause

    @property
    def system(self) -> bool:
        return self.kind != "peruser"

    @property
    def agent_only(self) -> bool:
        """Nothing but the agents retries: mail whose agent died waits for a submission,
        and only a runner bounces or takes `-odq` mail."""
        return self.kind in ("agents", "peruser") and not self.retrier

    @property
    def longest_step(self) -> float:
        return max(_seconds(s) for s in self.retry)

    @property
    def first_step(self) -> float:
        return _seconds(self.retry[0])

    def __repr__(self) -> str:
        return (
            f"Setup(kind={self.kind!r}, relays={self.relays!r}, limits={self.limits}, "
            f"retry={self.retry!r}, pause={self.pause}, retrier={self.retrier})"
        )


def _seconds(step: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(step[:-1]) * units[step[-1]]


# --- users ------------------------------------------------------------------------------


class User:
    def __init__(self, role: str, name: str) -> None:
        pw = pwd.getpwnam(name)
        self.role = role
        self.name = name
        self.uid = pw.pw_uid
        self.gid = pw.pw_gid
        self.home = Path("/nonexistent")  # set per seed


@contextlib.contextmanager
def real_users() -> Iterator[dict[str, User]]:
    """The runner user and two submitters (useradd, as tests/test_multiuser.py does), removed
    afterwards with whatever they still run."""
    for pw in pwd.getpwall():  # users a killed run left behind
        m = USER_NAME.match(pw.pw_name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["userdel", pw.pw_name], capture_output=True)
            subprocess.run(["groupdel", pw.pw_name], capture_output=True)
    roles = {RUNNER: "r", ALICE: "a", BOB: "b"}
    names = {role: f"mshm{os.getpid()}{c}" for role, c in roles.items()}
    for name in names.values():
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)
        subprocess.run(
            ["useradd", "-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
    users = {role: User(role, name) for role, name in names.items()}
    try:
        yield users
    finally:
        uids = {u.uid for u in users.values()}
        for pid in _pids():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid in uids:
                    os.kill(pid, signal.SIGKILL)
        for name in names.values():
            if shutil.which("crontab"):
                subprocess.run(["crontab", "-r", "-u", name], capture_output=True)
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


# --- messages and programs --------------------------------------------------------------


class Message:
    """One submission, identified by its token."""

    def __init__(self, token: str, who: str, mode: str, step: int) -> None:
        self.token = token
        self.who = who
        self.mode = mode
        self.step = step
        self.submitted = time.monotonic()
        self.accepted: bool | None = None  # None while its sendmail runs
        self.killed = False
        self.deleted_at: float | None = None
        self.held_since: float | None = None  # held now, since then (observed in its state)
        self.held_spans: list[tuple[float, float]] = []  # (held, released) times
        self.prompt_by: float | None = None  # item 4: must arrive by then
        # -odq where only agents run: left queued for `sendmail -q`, which nothing runs on
        # its own; it may arrive (a later agent or flush takes it), once at most
        self.needs_runner = False

    def __repr__(self) -> str:
        return f"{self.token} ({self.who} -{self.mode}, step {self.step})"


class Proc:
    def __init__(
        self, popen: subprocess.Popen[bytes], role: str, step: int, msg: Message | None = None
    ) -> None:
        self.popen = popen
        self.role = role
        self.step = step
        self.msg = msg
        self.started = time.monotonic()
        self.bound = BOUNDS.get(role)
        self.termed: float | None = None
        self.out = b""


# --- the world of one seed ----------------------------------------------------------------


class World:
    def __init__(self, seed: int | str, setup: Setup, users: dict[str, User], log=print) -> None:
        self.seed = seed
        self.setup = setup
        self.users = users
        self.log = log
        self.run_id = f"{os.getpid()}-{seed}-{random.getrandbits(32):x}"
        self.base = Path(tempfile.mkdtemp(prefix="mailshim-model-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.spool = self.base / "spool"
        self.config = self.base / "config.toml"
        self.step_no = 0
        self.messages: dict[str, Message] = {}
        self.procs: list[Proc] = []
        self.violations: list[str] = []
        self.known: list[tuple[str, str]] = []  # (issue item, violation) of bugs already filed
        self.events: list[tuple[float, str]] = []  # (when, kill | reboot | hold-all | ...)
        self.pickup_window: set[str] = set()  # drop entries in incoming/ when a runner died
        self.kills = 0
        self.next_timer = 0.0
        self.restart_daemon_at: float | None = None
        self.daemon: Proc | None = None
        self.termed_agents: dict[int, float] = {}  # pid -> when a daemon started (item 6)
        self.stopping = False
        self._drop_ids: set[str] = set()  # drop ids seen in incoming/ (mailq's tolerance)
        ports = [free_port()] + ([free_port()] if setup.relays == "failover" else [])
        self.ports = ports
        self.listener = ScriptedListener(ports, lmtp=setup.relays == "lmtp")
        for user in users.values():
            user.home = self.base / f"home-{user.role}"
            user.home.mkdir()
            os.chown(user.home, user.uid, user.gid)
            os.chmod(user.home, 0o700)
        self._write_config()
        if setup.system:
            r = self.mailshim(None, "setup-spool", "--user", users[RUNNER].name)
            assert r.returncode == 0, r.stderr.decode()
        if setup.kind == "daemon":
            self.start_daemon()
        if setup.kind == "timer":
            self.next_timer = time.monotonic()
        self.cron: list[tuple[User, str, str]] = []  # (whose crontab, @reboot | minute, command)
        self.next_cron = float("inf")
        if setup.retrier:
            self._install_retriers()

    def _install_retriers(self) -> None:
        """`mailshim retrier install --cron` as README "Who retries" tells an install with no
        runner (each user for her own spool; on the system spool its runner user, as the
        packages' /etc/cron.d/mailshim runs `mailshim run`), then the lines it wrote, read
        back with `crontab -l`, are what the model's cron plays."""
        roles = (RUNNER,) if self.setup.system else (ALICE, BOB)
        for role in roles:
            user = self.users[role]
            r = self.mailshim(user, "retrier", "install", "--cron")
            assert r.returncode == 0, r.stderr.decode()
            listing = subprocess.run(
                ["crontab", "-l", "-u", user.name], capture_output=True, text=True, check=True
            )
            for line in listing.stdout.splitlines():
                if line.startswith("@reboot "):
                    self.cron.append((user, "@reboot", line.split(" ", 1)[1]))
                elif line.startswith("* * * * * "):
                    self.cron.append((user, "minute", line[len("* * * * * ") :]))
            assert {(u, w) for u, w, _c in self.cron} >= {(user, "@reboot"), (user, "minute")}, (
                listing.stdout
            )
        self.next_cron = time.monotonic() + TIMER

    def cron_job(self, user: User, command: str) -> None:
        """One line of a crontab, run as cron runs it: `/bin/sh -c` as its user, with cron's
        environment (HOME from the account, a bare PATH; nothing of the shell that installed
        it: the line itself must carry what `mailshim run` needs)."""
        env = {
            "HOME": str(user.home),  # the account's home, as this model's users have it
            "LOGNAME": user.name,
            "SHELL": "/bin/sh",
            "PATH": "/usr/bin:/bin",
            "MAILSHIM_NO_SYSLOG": "1",
            MARKER: self.run_id,
        }
        self.spawn(user.role, ["/bin/sh", "-c", command], "run", env=env).step = -1

    # --- configuration ------------------------------------------------------------------

    def _write_config(self) -> None:
        s = self.setup
        if s.system:
            queue_dir = self.spool
        else:
            # a configured spool no user can reach: each user gets their own (per-user spool)
            hidden = self.base / "hidden"
            hidden.mkdir(mode=0o700)
            queue_dir = hidden / "spool"
        common = f"timeout = {RELAY_TIMEOUT}\nretry_after_failure = {s.pause}\n"
        common += 'helo = "client.example.org"\n'
        if s.relays == "failover":
            relays = (
                f'[[relay]]\nhost = "127.0.0.1"\nport = {self.ports[0]}\n{common}'
                f"concurrency = 4\n\n"
                f'[[relay]]\nhost = "127.0.0.1"\nport = {self.ports[1]}\n{common}'
                f"concurrency = 1\n"
            )
        else:
            proto = 'protocol = "lmtp"\n' if s.relays == "lmtp" else ""
            relays = f'[relay]\nhost = "127.0.0.1"\nport = {self.ports[0]}\n{proto}{common}'
        limits = ""
        if s.limits:
            limits = "[limits]\nuser_messages = 3\nuser_recipients = 6\n"
            limits += f'user_window = "{LIMIT_WINDOW}s"\n'
        retry = ", ".join(f'"{r}"' for r in s.retry)
        self.config.write_text(
            f'{relays}\n[addresses]\ndomain = "example.org"\n\n'
            f'[queue]\ndir = "{queue_dir}"\nretry = [{retry}]\n\n{limits}'
        )
        os.chmod(self.config, 0o644)

    # --- running programs -----------------------------------------------------------------

    def user(self, who: str) -> User | None:
        return None if who == "root" else self.users[who]

    def env(self, user: User | None) -> dict[str, str]:
        home = str(user.home) if user else str(self.base / "roothome")
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "MAILSHIM_CONFIG": str(self.config),
            "MAILSHIM_NO_SYSLOG": "1",
            "HOME": home,
            "LANG": "C.UTF-8",
            MARKER: self.run_id,
        }

    def _kw(self, user: User | None) -> dict[str, object]:
        if user is None:
            return {}
        return {"user": user.uid, "group": user.gid, "extra_groups": []}

    def mailshim(self, user: User | None, *args: str, timeout: float = 60):
        return subprocess.run(
            [tool("mailshim"), *args],
            capture_output=True,
            env=self.env(user),
            cwd="/",
            timeout=timeout,
            **self._kw(user),  # type: ignore[arg-type]
        )

    def spawn(
        self,
        who: str,
        argv: list[str],
        role: str,
        data: bytes = b"",
        msg: Message | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        user = self.user(who)
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env or self.env(user),
            cwd="/",
            **self._kw(user),  # type: ignore[arg-type]
        )
        proc = Proc(popen, role, self.step_no, msg)
        self.procs.append(proc)
        # stdin in one go (messages are small); the pipe is closed so sendmail sees EOF
        try:
            assert popen.stdin is not None
            popen.stdin.write(data)
            popen.stdin.close()
        except OSError:
            pass
        return proc

    def fail(self, what: str, known: str | None = None) -> None:
        """Record a violation; ``known``: the issue item it is an instance of (filed, owned
        by another helper: reported, not failed on, in the random seeds)."""
        line = f"seed {self.seed} step {self.step_no}: {what}"
        if known:
            self.log(f"KNOWN ({known}) {line}")
            self.known.append((known, line))
        else:
            self.log("VIOLATION " + line)
            self.violations.append(line)

    def since(self, when: float, *events: str) -> bool:
        return any(t >= when and e in events for t, e in self.events)

    # --- the spool as root sees it --------------------------------------------------------

    def spools(self) -> list[tuple[str, Path]]:
        """(who administers it, root folder) of every spool of this seed."""
        if self.setup.system:
            return [("root", self.spool)]
        out = []
        for name in (ALICE, BOB):
            root = self.users[name].home / ".local" / "state" / "mailshim" / "spool"
            out.append((name, root))
        return out

    def entries(self, folder: str = "queue") -> dict[str, tuple[str, Path, str, bool]]:
        """token -> (administrator, spool, queue id, held) for the entries in ``folder``."""
        out: dict[str, tuple[str, Path, str, bool]] = {}
        for who, root in self.spools():
            base = root / folder
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                if name.startswith(".") or name.endswith((".reason", ".state")):
                    continue
                try:
                    with open(base / name, "rb") as f:
                        found = TOKEN.search(f.read(1 << 16))
                except OSError:
                    continue
                if not found:
                    continue
                held = False
                if folder == "queue":
                    with contextlib.suppress(OSError, ValueError):
                        held = bool(json.loads((root / "state" / name).read_text()).get("held"))
                out[found.group(0).decode()] = (who, root, name, held)
        return out

    def overdue(self, token: str) -> float:
        """Seconds since the queued entry of ``token`` fell due (0: not queued, or not due)."""
        entry = self.entries("queue").get(token)
        if entry is None:
            return 0.0
        _who, root, qid, _held = entry
        try:
            due = float(json.loads((root / "state" / qid).read_text()).get("next_attempt") or 0)
        except (OSError, ValueError):
            return 0.0
        return max(0.0, time.time() - due) if due else 0.0

    def incoming_tokens(self) -> set[str]:
        if not self.setup.system:
            return set()
        return set(self.entries("incoming"))

    # --- processes --------------------------------------------------------------------------

    def ours(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process of this seed, found by the marker in its
        environment (detached agents included)."""
        mark = f"{MARKER}={self.run_id}".encode()
        out = []
        for pid in _pids():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            out.append((pid, cmd))
        return sorted(out)

    @staticmethod
    def role_of(cmd: str) -> str:
        if "mailshim.agent" in cmd:
            return "drop-agent" if "--incoming" in cmd else "agent"
        found = re.search(r"/mailshim(?: -C \S+)? (daemon|flush|run|queue|check|retrier)\b", cmd)
        if found:
            return found.group(1)
        if "sendmail" in cmd or "mailq" in cmd:
            return "sendmail"
        return "other"

    def tick(self) -> None:
        """Reap finished programs, check each against its bound, play the timer."""
        now = time.monotonic()
        for proc in list(self.procs):
            rc = proc.popen.poll()
            if rc is None:
                if proc.termed is not None and now - proc.termed > TERM_BOUND:
                    self.fail(
                        f"{proc.role} (step {proc.step}) still runs {TERM_BOUND}s after SIGTERM"
                    )
                    proc.termed = None
                    proc.popen.kill()
                elif proc.bound is not None and now - proc.started > proc.bound:
                    self.fail(
                        f"{proc.role} started at step {proc.step} still runs after "
                        f"{proc.bound:.0f}s: {proc.popen.args}"
                    )
                    proc.bound = None
                    proc.popen.kill()
                continue
            self.procs.remove(proc)
            assert proc.popen.stdout is not None
            proc.out = proc.popen.stdout.read()
            proc.popen.stdout.close()
            if proc is self.daemon:
                self.daemon = None
                if self.setup.kind == "daemon" and rc != 0 and not self.stopping:
                    self.restart_daemon_at = now + RESTART  # Restart=on-failure
            if proc.msg is not None:
                self._settle_submission(proc, rc)
        for pid, since in list(self.termed_agents.items()):
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                del self.termed_agents[pid]
            elif now - since > TERM_BOUND:
                self.fail(f"agent {pid} still runs {TERM_BOUND}s after a daemon started")
                del self.termed_agents[pid]
        if self.restart_daemon_at is not None and now >= self.restart_daemon_at:
            self.restart_daemon_at = None
            if self.daemon is None and not self.stopping:
                self.start_daemon()
        self._timers(now)

    def _timers(self, now: float) -> None:
        """The units' timer (kind timer) and the crontab's every-minute line (a retrier)."""
        if self.setup.kind == "timer" and now >= self.next_timer:
            if not any(p.role == "run" and p.step == -1 for p in self.procs):
                # as mailshim-flush.service starts it: the run refreshes the `served` mark,
                # and while the mark is fresh `sendmail` starts no agent
                env = {**self.env(self.users[RUNNER]), "MAILSHIM_SERVED": "units"}
                self.spawn(RUNNER, [tool("mailshim"), "run"], "run", env=env).step = -1
            self.next_timer = now + TIMER
        if now >= self.next_cron:
            for user, when, command in self.cron:
                if when == "minute":
                    self.cron_job(user, command)
            self.next_cron = now + TIMER

    def _settle_submission(self, proc: Proc, rc: int) -> None:
        msg = proc.msg
        assert msg is not None
        if msg.mode.startswith("bs"):
            lines = proc.out.decode("utf-8", "replace").splitlines()
            after = [ln for i, ln in enumerate(lines) if i and lines[i - 1].startswith("354")]
            msg.accepted = rc == 0 and bool(after) and after[0].startswith("250")
        else:
            msg.accepted = rc == 0
        msg.killed = rc < 0
        if rc not in (0, 75) and rc > 0 and not msg.killed:
            # 75 is "queued, try later"-free here: sendmail exits 0 once spooled
            self.log(f"  {msg} exit {rc}: {proc.out[-300:]!r}")

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            self.tick()
            self.check_arrivals()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    # --- invariants checked as it goes ----------------------------------------------------

    def check_arrivals(self) -> None:
        for a in self.listener.mail()[getattr(self, "_seen", 0) :]:
            msg = self.messages.get(a.token)
            if msg is None:
                self.fail(f"a message with no known token arrived: {a}")
                continue
            if msg.deleted_at is not None and a.when > msg.deleted_at:
                self.fail(f"{msg} arrived after `mailshim queue delete` of it returned")
            if msg.held_since is not None and a.when > msg.held_since:
                self.fail(f"{msg} arrived while held (nothing held may arrive)")
            for held, released in msg.held_spans:
                if held < a.when < released:
                    self.fail(f"{msg} arrived while it was held")
            if msg.prompt_by is not None and a.when > msg.prompt_by:
                self.fail(
                    f"{msg} arrived {a.when - msg.submitted:.1f}s after submission with the "
                    f"listener up: later than the pause plus the first step"
                )
            msg.prompt_by = None
            if len(self.ports) == 2 and a.port == self.ports[1]:
                self._check_failover(a)
        self._seen = len(self.listener.mail())
        now = time.monotonic()
        for msg in self.messages.values():
            if msg.prompt_by is not None and now > msg.prompt_by + 1:
                if not any(a.token == msg.token for a in self.listener.mail()):
                    self.fail(
                        f"{msg} not arrived {now - msg.submitted:.1f}s after a submission with "
                        f"the listener up: later than the pause plus the first step"
                    )
                msg.prompt_by = None

    def _check_failover(self, a) -> None:  # type: ignore[no-untyped-def]
        """Mail reaches the backup only while the primary fails as a whole (unreachable, or a
        4xx at MAIL or after the dot, a 421: relay.py's relay-down mark), or a recipient's own
        4xx at RCPT moves it on (relay.py), or within the mark (the pause) plus a relay
        timeout after that; never for back-pressure (`452 4.4.5`, issue 22 item 9)."""
        window = self.setup.pause + RELAY_TIMEOUT + 2.0
        hist = self.listener.history(self.ports[0])
        for i, (since, behaviour) in enumerate(hist):
            until = hist[i + 1][0] if i + 1 < len(hist) else float("inf")
            if behaviour in FAILS_OVER and since <= a.when and a.when <= until + window:
                return
        self.fail(
            f"{a.token} went to the backup relay while the primary could be reached "
            f"(primary was {self.listener.behaviour(self.ports[0])})"
        )

    # --- steps --------------------------------------------------------------------------

    def play(self, step: tuple) -> None:  # type: ignore[type-arg]
        self.step_no += 1
        self.log(f"  step {self.step_no}: {step}")
        name, *args = step
        getattr(self, f"do_{name.replace('-', '_')}")(*args)

    def do_submit(self, who: str, mode: str) -> None:
        if not self.setup.system and who == "root":
            who = ALICE
        token = f"MODELTOK-{self.run_id.split('-')[-1]}-{len(self.messages) + 1}"
        msg = Message(token, who, mode, self.step_no)
        self.messages[token] = msg
        sender = "root" if who == "root" else who
        body = (
            f"From: {sender}@example.org\nTo: {RCPT}\nSubject: model {token}\n\nbody {token}\n"
        ).encode()
        flags = {"odb": ["-odb"], "odi": ["-odi"], "odq": ["-odq"], "v": ["-v"], "t": ["-t"]}
        if mode.startswith("bs"):
            argv = [tool("sendmail"), "-bs"] + (["-odi"] if mode == "bs-odi" else [])
            data = (
                b"EHLO model\r\nMAIL FROM:<%s@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                % (sender.encode(), RCPT.encode())
                + body.replace(b"\n", b"\r\n")
                + b".\r\nQUIT\r\n"
            )
        else:
            argv = [tool("sendmail"), "-i", *flags[mode]] + ([] if mode == "t" else [RCPT])
            data = body
        if (
            self._listener_up()
            and mode in ("odb", "t", "bs")
            and self.setup.kind in ("agents", "peruser")
            and not self.stale_served(time.monotonic())
        ):
            msg.prompt_by = time.monotonic() + self.setup.pause + self.setup.first_step + MARGIN
            if self.setup.limits and who != "root":
                msg.prompt_by += LIMIT_WINDOW
        msg.needs_runner = mode == "odq" and self.setup.agent_only
        self.spawn(who, argv, "sendmail", data, msg)

    def _listener_up(self) -> bool:
        # the prompt check (item 4) holds only while every port simply answers, and stays so
        return all(self.listener.behaviour(p) == "up" for p in self.ports) and not any(
            p.msg is None and p.role in ("run", "flush") for p in self.procs if p.step != -1
        )

    def do_listen(self, which: int, behaviour: str) -> None:
        port = self.ports[which % len(self.ports)]
        self.listener.set(port, behaviour)
        if behaviour != "up":
            for msg in self.messages.values():
                msg.prompt_by = None

    def _runner_user(self, k: int) -> str:
        return RUNNER if self.setup.system else (ALICE, BOB)[k % 2]

    def do_run(self, k: int = 0) -> None:
        self._runner(k, "run")

    def do_flush(self, k: int = 0) -> None:
        self._runner(k, "flush")

    def _runner(self, k: int, what: str) -> None:
        who = self._runner_user(k)
        self.spawn(who, [tool("mailshim"), what], what)

    def do_check(self, k: int = 0) -> None:
        """`mailshim check`; every other time a background submission right behind it (issue
        22 item 5: check looks at `agent.lock` while that `sendmail` decides whether an agent
        runs: the mail must not be left to nobody)."""
        who = "root" if self.setup.system else (ALICE, BOB)[k % 2]
        self.spawn(who, [tool("mailshim"), "check"], "check")
        if k % 2 == 0:
            self.do_submit(who, "odb")

    def start_daemon(self) -> None:
        before = [pid for pid, cmd in self.ours() if self.role_of(cmd) == "agent"]
        self.daemon = self.spawn(RUNNER, [tool("mailshim"), "daemon"], "daemon")
        now = time.monotonic()
        for pid in before:
            self.termed_agents[pid] = now

    def do_daemon_start(self) -> None:
        if self.setup.system and self.daemon is None:
            self.start_daemon()

    def do_daemon_stop(self) -> None:
        if self.daemon is not None and self.setup.kind != "daemon":
            self.daemon.popen.send_signal(signal.SIGTERM)
            self.daemon.termed = time.monotonic()

    def do_admin(self, action: str, k: int) -> None:
        # the entry to act on: the k-th of those queued now (dead ones for requeue)
        table = self.entries("dead" if action == "requeue" else "queue")
        if action.endswith("-all"):
            whos = sorted({who for who, *_ in self.spools()})
            who = whos[k % len(whos)]
            argv = [tool("mailshim"), "queue", action[:-4], "--all"]
            tokens = [t for t, e in table.items() if e[0] == who]
        else:
            if not table:
                self.log("    (no entry to act on)")
                return
            token = sorted(table)[k % len(table)]
            who, _root, qid, _held = table[token]
            argv = [tool("mailshim"), "queue", action, qid]
            tokens = [token]
        started = time.monotonic()
        user = self.user(who)
        try:
            r = subprocess.run(
                argv,
                capture_output=True,
                env=self.env(user),
                cwd="/",
                timeout=BOUNDS["admin"],
                **self._kw(user),  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired:
            self.fail(f"{argv[1:]} did not end within {BOUNDS['admin']}s")
            return
        ended = time.monotonic()
        self.log(f"    -> {r.returncode} {r.stdout.decode().strip()} {r.stderr.decode().strip()}")
        self._observe_holds(started)
        self.events.append((started, action))
        if r.returncode != 0:
            return
        for token in tokens:
            msg = self.messages.get(token)
            if msg is None:
                continue
            if action == "delete":
                msg.deleted_at = ended
            if action == "requeue":
                msg.deleted_at = None

    def _observe_holds(self, started: float) -> None:
        """Held or not, from the entries' own state files, after a hold or release."""
        queued = self.entries("queue")
        now = time.monotonic()
        for token, msg in self.messages.items():
            held = token in queued and queued[token][3]
            if held and msg.held_since is None:
                msg.held_since = now
            elif not held and msg.held_since is not None:
                msg.held_spans.append((msg.held_since, started))
                msg.held_since = None

    def do_kill(self, k: int) -> None:
        live = [(pid, cmd) for pid, cmd in self.ours() if self.role_of(cmd) != "other"]
        if not live:
            self.log("    (nothing to kill)")
            return
        pid, cmd = live[k % len(live)]
        role = self.role_of(cmd)
        self.log(f"    SIGKILL {pid} {role}: {cmd[:100]}")
        if role in ("agent", "run", "flush", "daemon"):
            self.pickup_window |= self.incoming_tokens()
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        self.kills += 1
        self.events.append((time.monotonic(), "kill-" + role))

    def do_reboot(self) -> None:
        """Every process of the install dies at once; then what the install starts at boot."""
        self.pickup_window |= self.incoming_tokens()
        if self.daemon is not None and self.setup.kind != "daemon":
            self.events.append((time.monotonic(), "kill-daemon"))  # its `served` mark stays
        for _ in range(3):
            for pid, _cmd in self.ours():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.kills += 1
        self.events.append((time.monotonic(), "reboot"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p.popen.poll() is None for p in self.procs):
            time.sleep(0.02)
        self.tick()
        if self.setup.kind == "daemon":
            self.start_daemon()
        if self.setup.kind == "timer":
            self.next_timer = time.monotonic() + TIMER
        for user, when, command in self.cron:
            if when == "@reboot":
                self.cron_job(user, command)
        if self.cron:
            self.next_cron = time.monotonic() + TIMER

    def mailq_views(self) -> list[tuple[str, Path]]:
        """(who runs `mailq`, spool): root on the system spool and each user for her own
        messages in it (her drop-folder entries, then their views in status/); on per-user
        spools each user on hers."""
        if self.setup.system:
            return [("root", self.spool), (ALICE, self.spool), (BOB, self.spool)]
        return self.spools()

    def listable(self, root: Path, who: str | None) -> dict[str, tuple[str, bool]]:
        """id -> (token, held) of what `mailq` must list in ``root``: queue/ under queue ids,
        incoming/ under drop ids; ``who``: only her own messages."""
        out: dict[str, tuple[str, bool]] = {}
        for folder in ("queue", "incoming"):
            for token, (_a, where, qid, held) in self.entries(folder).items():
                msg = self.messages.get(token)
                theirs = who is None or (msg is not None and msg.who == who)
                if QUEUE_ID.fullmatch(qid) and where == root and theirs:
                    out[qid] = (token, held)
                    if folder == "incoming":
                        self._drop_ids.add(qid)
        return out

    def do_mailq(self, k: int) -> None:
        """`mailq` agrees with the spool: it lists what was queued (in queue/ or, for root and
        its submitter, in incoming/) before and after it ran, and nothing that was in
        neither; a user's listing of the system spool holds her own messages only."""
        views = self.mailq_views()
        who, root = views[k % len(views)]
        own = who != "root" and self.setup.system
        mine = who if own else None
        busy = any(p.msg is not None for p in self.procs)
        before = self.listable(root, mine)
        others_before = self.listable(root, None) if own else {}
        user = self.user(who)
        r = subprocess.run(
            [tool("mailq")],
            capture_output=True,
            env=self.env(user),
            cwd="/",
            timeout=BOUNDS["mailq"],
            **self._kw(user),  # type: ignore[arg-type]
        )
        after = self.listable(root, mine)
        if r.returncode != 0:
            self.fail(f"mailq as {who} exited {r.returncode}: {r.stderr.decode().strip()}")
            return
        listed = {}
        for line in r.stdout.decode().splitlines():
            m = re.match(r"^([0-9A-Z]{20})(!?)\s", line)
            if m:
                listed[m.group(1)] = m.group(2) == "!"
        for qid, (token, held) in before.items():
            if own and token in self.pickup_window:
                # a runner killed in pickup left a second copy (window 4); her view (named by
                # the drop id) follows the copy the next pickup made: one of the two is listed
                continue
            if qid in after and qid not in listed:
                self.fail(f"mailq as {who} does not list {qid} ({token}), there before and after")
            elif not own and qid in after and held and after[qid][1] and not listed.get(qid):
                # her view's state is the runner's last publication: root's alone is exact
                self.fail(f"mailq as {who} does not mark {qid} held (held before and after)")
        every = set(before) | set(after)
        if own:
            theirs = {
                q: t
                for q, (t, _h) in {**others_before, **self.listable(root, None)}.items()
                if q not in every
            }
            if stolen := [f"{q} ({theirs[q]})" for q in listed if q in theirs]:
                self.fail(f"mailq as {who} lists another user's entries: {stolen}")
                return
        extra = [
            q
            for q in listed
            if q not in every
            and not self._queued_meanwhile(root, q)
            and not (own and q in self._view_ids(root))
            # a drop entry made, picked up and sent while mailq ran leaves no trace
            and not busy
        ]
        # a drop entry picked up and sent while mailq ran: listed under its new queue id
        picked = [q for q in before if q not in after and self._was_dropped(root, q)]
        if len(extra) <= len(picked):
            extra = []
        if extra:
            self.fail(f"mailq as {who} lists {extra}, in queue/ nor incoming/ before or after")

    @staticmethod
    def _queued_meanwhile(root: Path, qid: str) -> bool:
        # an entry made and delivered while mailq ran (a bounce, a picked-up drop entry, one
        # without a token) leaves no trace; only an id never seen in queue/ or dead/ counts
        return (root / "dead" / qid).exists() or (root / "state" / qid).exists()

    def _was_dropped(self, root: Path, qid: str) -> bool:
        return qid in getattr(self, "_drop_ids", set())

    @staticmethod
    def _view_ids(root: Path) -> set[str]:
        """Queue ids the views in status/ name: a view outlives its entry when a SIGKILL or a
        reboot came between the two removals (ownview.py: not durable, only late)."""
        out = set()
        with contextlib.suppress(OSError):
            for name in os.listdir(root / "status"):
                with contextlib.suppress(OSError, ValueError):
                    head = (root / "status" / name).read_bytes().split(b"\n", 1)[0]
                    out.add(str(json.loads(head).get("id")))
        return out

    def do_await(self) -> None:
        """Until every submission started so far has ended (explicit sequences)."""
        deadline = time.monotonic() + BOUNDS["sendmail"] + 5
        while time.monotonic() < deadline and any(p.msg is not None for p in self.procs):
            self.wait(0.05)

    def do_slowness(self, seconds: float) -> None:
        """How long the "slow" behaviour waits before each reply."""
        self.listener.slow_reply = seconds

    def do_sleep(self, seconds: float) -> None:
        self.wait(seconds)

    # --- the end: settle, then the final invariants ----------------------------------------

    def settle(self) -> None:
        """Let in-flight programs end, bring every port up, and wait (running only what the
        install runs) until every message that must arrive has, or the bound has passed."""
        deadline = time.monotonic() + max(BOUNDS.values()) + 5
        while time.monotonic() < deadline and any(
            p.msg is not None or (p.role in ("run", "flush", "check") and p.step != -1)
            for p in self.procs
        ):
            self.wait(0.1)
        for port in self.ports:
            self.listener.set(port, "up")
        up = time.monotonic()
        bound = self.setup.longest_step + self.setup.pause + RELAY_TIMEOUT + MARGIN
        if self.setup.kind == "timer":
            bound += TIMER
        if self.setup.kind == "daemon":
            bound += RESTART
        if self.setup.retrier:
            bound += TIMER
        if self.setup.limits:
            bound += LIMIT_WINDOW
        self.log(f"  settle: every port up; waiting up to {bound:.0f}s")
        while time.monotonic() - up < bound:
            self.wait(0.2)
            if not self.missing() and not self.left_queued():
                break
        self.wait(0.5)
        self.settled = time.monotonic() - up

    def expected(self) -> list[Message]:
        dead = self.entries("dead")
        return [
            m
            for m in self.messages.values()
            if m.accepted
            and m.deleted_at is None
            and m.held_since is None
            and m.token not in dead
            and not m.needs_runner
        ]

    def excused(self, msg: Message) -> str | None:
        """Why a message that did not arrive is what README "Who retries" promises for this
        install, or None (a violation). Only where nothing but the agents retries: after the
        agent died, mail waits for the next submission; a drop-folder entry holding only
        refusals waits for a runner to bounce it."""
        if not self.setup.agent_only:
            return None
        if self.since(msg.submitted, "reboot", "kill-agent", "kill-drop-agent"):
            return "no retrier installed and its agent died: it waits for the next submission"
        if self.stale_served(msg.submitted) and msg.who != "root":
            return "the daemon was killed and its `served` mark left no agent to start"
        if self._refused_only(msg.token):
            return "a drop-folder entry holding only refusals: only a runner bounces it"
        return None

    def known_bug(self, msg: Message) -> str | None:
        """The product bug (found, not fixed) a message left behind is an instance of."""
        queued = self.entries("queue").get(msg.token)
        if self.setup.agent_only and self.setup.system and msg.who != "root" and queued:
            # a user's drop entry taken into queue/ by a hand-run `mailshim run` or `flush`,
            # which deferred it: her drop agent no longer sees it and no agent of the spool
            # was started for it (test_model.py, seed 670648166)
            return "run-strands"
        return None

    def stale_served(self, when: float) -> bool:
        """A daemon started by hand was killed less than SERVED_FRESH before ``when``: its
        `served` mark, which only a clean stop empties, still tells `sendmail` that a daemon
        serves the spool, so a user's `sendmail` starts no agent (docs/spool.md, "The
        `served` mark"), and nothing restarts that daemon on this install."""
        return self.setup.kind == "agents" and any(
            e == "kill-daemon" and t <= when < t + SERVED_FRESH for t, e in self.events
        )

    def _refused_only(self, token: str) -> bool:
        from mailshim import spoolfmt
        from mailshim.errors import DataError

        entry = self.entries("incoming").get(token)
        if entry is None:
            return False
        try:
            with open(entry[1] / "incoming" / entry[2], "rb") as f:
                env, _ = spoolfmt.decode_envelope(f)
        except (OSError, ValueError, DataError):
            return False
        return bool(env.recipients) and set(env.recipients) <= set(env.failed)

    def left_queued(self) -> list[Message]:
        """Messages that must not stay in queue/ and still do (one that arrived may still be
        queued: a listener that stored it and answered 421, window 7, gets it again)."""
        out = []
        for token, (_who, _root, _qid, held) in self.entries("queue").items():
            msg = self.messages.get(token)
            if msg is None or msg.needs_runner or msg.held_since is not None or held:
                continue
            if msg.accepted and msg.deleted_at is None and not self.excused(msg):
                out.append(msg)
        return out

    def missing(self) -> list[Message]:
        got = {a.token for a in self.listener.mail()}
        return [m for m in self.expected() if m.token not in got]

    def final_checks(self) -> None:
        counts: dict[str, int] = {}
        for a in self.listener.mail():
            counts[a.token] = counts.get(a.token, 0) + 1
        for msg in self.missing():
            queued = self.entries("queue").get(msg.token)
            where = f"still queued as {queued[2]}" if queued else "not in queue/"
            if why := self.excused(msg):
                self.log(f"  {msg} not arrived ({where}), as documented: {why}")
                continue
            self.fail(
                f"{msg} was accepted but has not arrived {self.settled:.0f}s after every port "
                f"came up ({where}; {self.setup})",
                known=self.known_bug(msg),
            )
        for token, n in counts.items():
            if n < 2:
                continue
            if token in self.listener.cut_short:
                self.log(f"  duplicate {token} x{n}: window 1/2 (connection ended without QUIT)")
            elif token in self.pickup_window:
                self.log(f"  duplicate {token} x{n}: window 4 (runner killed during pickup)")
            elif token in self.listener.stored_refused:
                self.log(f"  duplicate {token} x{n}: window 7 (stored, then answered 421)")
            else:
                self.fail(f"{self.messages.get(token, token)} arrived {n} times, in no window")
        for token, msg in self.messages.items():
            if msg.accepted is False and not msg.killed and counts.get(token, 0) > 1:
                self.fail(f"{msg} was refused but arrived {counts[token]} times")
        # what is left in queue/: only held entries (and those of refused submissions)
        for token, (_who, _root, qid, held) in self.entries("queue").items():
            msg = self.messages.get(token)
            if msg is None or msg.needs_runner or msg.held_since is not None:
                continue
            if msg.accepted and not held and msg.deleted_at is None and not self.excused(msg):
                self.fail(
                    f"{msg} is still queued as {qid} after settling, not held", self.known_bug(msg)
                )
        self._check_lingering()
        for k in range(len(self.mailq_views())):
            self.do_mailq(k)

    def _check_lingering(self) -> None:
        """Once nothing is left to retry, agents leave within the linger time; the daemon
        leaves within its bound on SIGTERM."""
        self.stopping = True
        if self.daemon is not None:
            self.log(f"  SIGTERM to the daemon {self.daemon.popen.pid}")
            self.daemon.popen.send_signal(signal.SIGTERM)
            self.daemon.termed = time.monotonic()
        waiting = self.entries("queue")
        if any(not held for *_, held in waiting.values()):
            return  # something is still to retry: an agent may rightly stay
        deadline = time.monotonic() + max(LINGER, TERM_BOUND)
        while time.monotonic() < deadline:
            self.tick()
            left = [
                (pid, cmd)
                for pid, cmd in self.ours()
                if self.role_of(cmd) in ("agent", "drop-agent", "daemon")
            ]
            if not left:
                return
            time.sleep(0.2)
        for pid, cmd in left:
            self.fail(f"{self.role_of(cmd)} {pid} outlives its bound with nothing to retry: {cmd}")

    def close(self) -> None:
        for _ in range(3):
            for pid, _cmd in self.ours():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.popen.kill()
            proc.popen.wait(10)
        self.listener.close()
        for user in {u.name for u, _w, _c in self.cron}:
            subprocess.run(["crontab", "-r", "-u", user], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# --- the sequence a seed stands for ---------------------------------------------------------


def setup_for(rng: random.Random, seed: int | str) -> Setup:
    kind = rng.choice(KINDS)
    relays = rng.choice(RELAYS)
    limits = rng.random() < 0.25
    # drawn apart, so that a seed found before the retrier was modelled keeps its steps
    retrier = kind in ("agents", "peruser") and random.Random(f"retrier {seed}").random() < 0.6
    retrier = retrier and shutil.which("crontab") is not None
    return Setup(kind, relays, limits, retrier=retrier)


STEP_WEIGHTS = (
    ("submit", 30),
    ("listen", 14),
    ("run", 4),
    ("flush", 4),
    ("admin", 8),
    ("kill", 5),
    ("reboot", 2),
    ("mailq", 3),
    ("check", 2),
    ("daemon-start", 2),
    ("daemon-stop", 2),
    ("sleep", 8),
)
LISTEN_WEIGHTS = (
    ("up", 10),
    ("down", 4),
    ("connect4xx", 1),
    ("mail4xx", 1),
    ("rate", 1),
    ("rcpt4xx", 1),
    ("dot4xx", 1),
    ("mid421", 1),
    ("mute", 1),
    ("slow", 2),
    ("rcpt5xx", 1),
    ("stored4xx", 1),
)


def steps_for(rng: random.Random, count: int) -> list[tuple]:  # type: ignore[type-arg]
    """``count`` steps; every draw is made whatever the step, so a seed always stands for
    the same sequence."""
    names = [n for n, _ in STEP_WEIGHTS]
    weights = [w for _, w in STEP_WEIGHTS]
    behaviours = [n for n, _ in LISTEN_WEIGHTS]
    bweights = [w for _, w in LISTEN_WEIGHTS]
    out: list[tuple] = []  # type: ignore[type-arg]
    for _ in range(count):
        name = rng.choices(names, weights)[0]
        who = rng.choice(("root", ALICE, BOB))
        mode = rng.choice(MODES)
        k = rng.randrange(1000)
        behaviour = rng.choices(behaviours, bweights)[0]
        action = rng.choice(ADMIN)
        pause = round(rng.uniform(0.2, 1.5), 1)
        step: tuple = {  # type: ignore[type-arg]
            "submit": ("submit", who, mode),
            "listen": ("listen", k, behaviour),
            "run": ("run", k),
            "flush": ("flush", k),
            "admin": ("admin", action, k),
            "kill": ("kill", k),
            "reboot": ("reboot",),
            "mailq": ("mailq", k),
            "check": ("check", k),
            "daemon-start": ("daemon-start",),
            "daemon-stop": ("daemon-stop",),
            "sleep": ("sleep", pause),
        }[name]
        out.append(step)
        out.append(("sleep", round(rng.uniform(0.0, 0.4), 2)))
    return out


class Outcome:
    def __init__(self, seed: int | str, setup: Setup, steps: int, world: World) -> None:
        self.seed = seed
        self.setup = setup
        self.steps = steps
        self.violations = list(world.violations)
        self.known = list(world.known)
        self.messages = len(world.messages)
        self.accepted = sum(1 for m in world.messages.values() if m.accepted)
        self.arrived = len(world.listener.mail())
        self.backup = sum(1 for a in world.listener.mail() if a.port in world.ports[1:])
        self.kills = world.kills
        self.seconds = 0.0


def run(
    seed: int | str,
    users: dict[str, User],
    steps: list[tuple] | None = None,  # type: ignore[type-arg]
    setup: Setup | None = None,
    count: int = 20,
    log=print,
) -> Outcome:
    """Play a seed (or an explicit sequence on an explicit set-up) and check it."""
    started = time.monotonic()
    rng = random.Random(seed)
    setup = setup or setup_for(rng, seed)
    if steps is None:
        steps = steps_for(rng, count)
    log(f"seed {seed}: {setup}")
    world = World(seed, setup, users, log)
    try:
        for step in steps:
            world.play(step)
            world.tick()
            world.check_arrivals()
        world.step_no += 1
        world.settle()
        world.check_arrivals()
        world.final_checks()
        out = Outcome(seed, setup, sum(1 for s in steps if s[0] != "sleep"), world)
    finally:
        world.close()
    out.seconds = time.monotonic() - started
    log(
        f"seed {seed}: {out.steps} steps, {out.messages} submissions ({out.accepted} accepted), "
        f"{out.arrived} arrivals, {out.kills} kills, {len(out.violations)} violations, "
        f"{out.seconds:.1f}s"
    )
    return out


def can_run_as_others() -> bool:
    """Whether an unprivileged user can run this interpreter (not under a private /root)."""
    r = subprocess.run(
        [tool("sendmail"), "-bi"],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "MAILSHIM_NO_SYSLOG": "1"},
        timeout=60,
    )
    return r.returncode == 0


__all__ = ["Outcome", "Setup", "World", "can_run_as_others", "real_users", "run", "steps_for"]
