"""Say whether mail would flow, and why not: the findings behind ``mailshim check``.

``run()`` validates the configuration, the secrets' permissions, the spool's owners and modes
and whether anything will retry deferred mail, then probes each listener the way delivery
would reach it (``relay.Session.open``: TCP or socket, TLS, EHLO, AUTH) and tries ``MAIL
FROM`` with the default sender and ``RCPT TO`` for root's alias and any extra recipients,
then ``RSET`` and ``QUIT``: no message is sent. The result is a ``Report`` of ``Finding``
objects (ok / warning / error, a topic, one line of text, what to change) plus what each
relay said, for the CLI to print or dump as JSON.

Probes are kept few on purpose: one connection per relay, one MAIL, one RCPT per distinct
recipient and at most ``MAX_RCPT_FAILURES`` refused ones, because Stalwart bans an address
(loopback included) after repeated recipient failures.

Trust: run by administrators and users, with their own privileges; it reads what that user
can read and changes nothing (no file is written, no message sent). The listener is treated
as hostile-or-broken: replies are cleaned to one line, the certificate is parsed by a small
bounds-checked DER reader that gives up on anything odd, and every wait has the relay's
timeout.
"""

from __future__ import annotations

import os
import stat

from mailshim import paths
from mailshim.errors import (
    EX_CONFIG,
    EX_NOPERM,
    EX_OK,
    EX_UNAVAILABLE,
    ConfigError,
    DataError,
    MailshimError,
    one_line,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from mailshim.config import Config, RelayConfig
    from mailshim.relay import Reply, Session

OK = "ok"
WARNING = "warning"
ERROR = "error"
LEVELS = (OK, WARNING, ERROR)

MAX_RCPT_FAILURES = 3
SYSTEMD_UNITS = ("mailshim-flush.timer", "mailshim-flush.path", "mailshim-daemon.service")
RETRYING_UNITS = ("mailshim-flush.timer", "mailshim-daemon.service")
CERT_EXPIRY_WARNING = 14 * 86400
STALWART_DOC = "docs/stalwart.md"


class Finding:
    """One line of the verdict."""

    __slots__ = ("code", "fix", "level", "relay", "text", "topic")

    def __init__(
        self,
        level: str,
        topic: str,
        text: str,
        fix: str = "",
        code: int = EX_OK,
        relay: str | None = None,
    ) -> None:
        self.level = level
        self.topic = topic
        self.text = one_line(text)
        self.fix = one_line(fix)
        self.code = code if level == ERROR else EX_OK
        self.relay = relay

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"level": self.level, "topic": self.topic, "text": self.text}
        if self.fix:
            out["fix"] = self.fix
        if self.code:
            out["exit"] = self.code
        if self.relay is not None:
            out["relay"] = self.relay
        return out

    def __repr__(self) -> str:
        return f"Finding({self.level!r}, {self.topic!r}, {self.text!r})"


class RelayProbe:
    """What one relay said, for ``--json`` and for the verdict."""

    __slots__ = (
        "auth",
        "certificate",
        "connected",
        "extensions",
        "greeting",
        "label",
        "name",
        "outcome",
        "recipients",
        "sender",
        "tls",
        "transcript",
    )

    def __init__(self, relay: RelayConfig) -> None:
        self.name = relay.name
        self.label = relay.describe()
        self.connected = False
        self.greeting = ""
        self.extensions: list[str] = []
        self.tls: dict[str, object] | None = None
        self.certificate: dict[str, object] | None = None
        self.auth: str | None = None
        self.sender: dict[str, object] | None = None
        self.recipients: list[dict[str, object]] = []
        # ok: takes mail; permanent: refuses it (a bounce); temporary: the next relay is tried
        self.outcome = "temporary"
        self.transcript: list[str] = []

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "target": self.label,
            "connected": self.connected,
            "greeting": self.greeting,
            "extensions": self.extensions,
            "tls": self.tls,
            "certificate": self.certificate,
            "authenticated_as": self.auth,
            "sender": self.sender,
            "recipients": self.recipients,
            "outcome": self.outcome,
            "transcript": self.transcript,
        }


class Report:
    """Every finding, in the order found, and the relays' answers."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.relays: list[RelayProbe] = []
        self.config_path: str | None = None

    def add(
        self,
        level: str,
        topic: str,
        text: str,
        fix: str = "",
        code: int = EX_OK,
        relay: str | None = None,
    ) -> Finding:
        finding = Finding(level, topic, text, fix, code, relay)
        self.findings.append(finding)
        return finding

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)

    @property
    def exit_code(self) -> int:
        """The first error's sysexits code; 0 when mail would flow (warnings allowed)."""
        for finding in self.findings:
            if finding.level == ERROR:
                return finding.code or EX_UNAVAILABLE
        return EX_OK

    @property
    def mail_flows(self) -> bool:
        return self.exit_code == EX_OK

    def as_dict(self) -> dict[str, object]:
        return {
            "mail_flows": self.mail_flows,
            "exit": self.exit_code,
            "config": self.config_path,
            "findings": [f.as_dict() for f in self.findings],
            "relays": [r.as_dict() for r in self.relays],
        }


# --- the whole check -------------------------------------------------------------------


def run(config_path: str | None, extra_rcpts: Sequence[str] = (), *, probe: bool = True) -> Report:
    """Check everything; never raises a ``MailshimError`` (each becomes a finding)."""
    from mailshim import config as config_mod

    report = Report()
    try:
        cfg = config_mod.load(config_path)
    except MailshimError as exc:
        report.add(
            ERROR,
            "config",
            exc.message,
            "fix the file and run mailshim check again",
            EX_CONFIG if isinstance(exc, ConfigError) else exc.code,
        )
        return report
    report.config_path = cfg.path
    check_config_file(cfg, report)
    addresses = check_addresses(cfg, report, extra_rcpts)
    runner = runner_uid(cfg)
    for relay in cfg.relays:
        check_relay_settings(relay, report, runner)
    check_spool(cfg, report)
    check_runner(cfg, report)
    if probe and addresses is not None:
        sender, rcpts = addresses
        probe_relays(cfg, sender, rcpts, report)
    return report


def check_config_file(cfg: Config, report: Report) -> None:
    if cfg.path is None:
        report.add(
            WARNING, "config",
            "no configuration file: using the built-in defaults (listener 127.0.0.1:10025,"
            " no TLS, bare names get this host's name)",
            f"create {paths.SYSTEM_CONFIG} (see mailshim.toml(5))",
        )  # fmt: skip
        return
    try:
        st = os.stat(cfg.path)
    except OSError as exc:
        report.add(ERROR, "config", f"{cfg.path}: {exc.strerror}", code=EX_CONFIG)
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        report.add(
            WARNING, "config",
            f"{cfg.path} is writable by others (mode {mode:04o}): they could send your mail"
            " anywhere",
            f"chmod go-w {cfg.path}",
        )  # fmt: skip
    elif cfg.path == paths.SYSTEM_CONFIG and st.st_uid != 0:
        report.add(
            WARNING, "config", f"{cfg.path} belongs to uid {st.st_uid}, not root",
            f"chown root {cfg.path}",
        )  # fmt: skip
    else:
        report.add(OK, "config", f"{cfg.path} (mode {mode:04o})")


def check_addresses(
    cfg: Config, report: Report, extra: Sequence[str]
) -> tuple[str, list[tuple[str, str]]] | None:
    """The default sender and the recipients to probe, as (address, why) pairs."""
    from mailshim import submit

    domain = cfg.domain
    if cfg.source("addresses.domain") == "default" and ("." not in domain or domain == "localhost"):
        report.add(
            WARNING, "domain",
            f"bare names such as root become root@{domain}: this host's name is not fully"
            " qualified",
            'set [addresses] domain = "example.org"',
        )  # fmt: skip
    try:
        sender = submit.envelope_sender(cfg, None, submit.current_user())
        wanted: list[tuple[str, str]] = []
        for final in submit.rewrite_recipient(cfg, "root"):
            wanted.append((final, "root"))
        for word in extra:
            for final in submit.rewrite_recipient(cfg, word):
                wanted.append((final, word))
    except MailshimError as exc:
        code = EX_CONFIG if isinstance(exc, (ConfigError, DataError)) else exc.code
        report.add(ERROR, "addresses", exc.message, "fix [addresses] or [aliases]", code)
        return None
    roots = [a for a, why in wanted if why == "root"]
    report.add(
        OK, "addresses",
        f"sender <{sender or ''}>, root's mail goes to {', '.join(f'<{a}>' for a in roots)}",
    )  # fmt: skip
    if roots == [f"root@{domain}"] and cfg.source("addresses.domain") == "default":
        report.add(
            WARNING, "aliases",
            f"root has no alias: its mail goes to <root@{domain}>, a mailbox that rarely exists",
            'add [aliases] root = "you@example.org"',
        )  # fmt: skip
    seen: set[str] = set()
    rcpts = []
    for addr, why in wanted:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            rcpts.append((addr, why))
    return sender, rcpts


def _is_loopback_host(relay: RelayConfig) -> bool:
    if relay.socket:
        return True
    import ipaddress

    host = (relay.host or "").strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret_owner(
    path: str, st: os.stat_result, report: Report, name: str, runner: int | None
) -> None:
    if runner is not None and runner != 0 and st.st_uid != runner:
        report.add(
            WARNING, "secret",
            f"[{name}] password_file {path} belongs to {_owner(st.st_uid)}, but the runner"
            f" runs as {_owner(runner)} and cannot read it: mail it retries stays deferred",
            f"chown {_owner(runner)} {path}", relay=name,
        )  # fmt: skip


def check_relay_settings(relay: RelayConfig, report: Report, runner: int | None = None) -> None:
    """The relay's files (secret, CA) as this user sees them, before connecting.

    ``runner``: the uid the system spool's runner runs as, when known: it must be able to
    read the secret too.
    """
    name = relay.name
    if relay.password_file:
        path = relay.password_file
        try:
            st = os.stat(path)
        except OSError as exc:
            report.add(
                ERROR,
                "secret",
                f"[{name}] password_file {path}: {exc.strerror}",
                "create it (mode 0600) or fix the path",
                EX_CONFIG,
                name,
            )
        else:
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                report.add(
                    ERROR, "secret",
                    f"[{name}] password_file {path} is readable by others (mode {mode:04o});"
                    " mailshim refuses to use it",
                    f"chmod 600 {path}", EX_NOPERM, name,
                )  # fmt: skip
            elif not os.access(path, os.R_OK):
                report.add(
                    ERROR, "secret",
                    f"[{name}] password_file {path} is not readable by uid {os.getuid()}"
                    f" (owner uid {st.st_uid})",
                    "run mailshim check as the user that delivers mail (root or mailshim)",
                    EX_NOPERM, name,
                )  # fmt: skip
            else:
                report.add(
                    OK, "secret", f"[{name}] password_file {path} (mode {mode:04o})", relay=name
                )
                _secret_owner(path, st, report, name, runner)
    if relay.ca_file and not os.access(relay.ca_file, os.R_OK):
        report.add(
            ERROR,
            "tls",
            f"[{name}] ca_file {relay.ca_file} cannot be read",
            "fix the path or its permissions",
            EX_CONFIG,
            name,
        )
    if relay.tls != "none" and not relay.verify:
        level = OK if _is_loopback_host(relay) else WARNING
        report.add(
            level, "tls",
            f"[{name}] verify = false: the listener's certificate is not checked"
            + (" (acceptable on loopback)" if level == OK else ", so anyone on the path"
               " could pose as it"),
            "" if level == OK else "set ca_file to the CA that signed it and drop verify = false",
            relay=name,
        )  # fmt: skip


# --- the spool ------------------------------------------------------------------------


def _mode_text(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _owner(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_spool(cfg: Config, report: Report) -> None:
    root = cfg.queue_dir or paths.SYSTEM_SPOOL
    try:
        st = os.stat(root)
    except FileNotFoundError:
        if os.geteuid() == 0:
            report.add(
                WARNING, "spool",
                f"{root} does not exist yet (it is created on the first submission as root)",
                "run mailshim setup-spool",
            )  # fmt: skip
        else:
            report.add(
                WARNING, "spool",
                f"{root} does not exist: mail from this user is queued in"
                f" {paths.user_spool_dir()}, which only this user's own delivery agent or"
                " mailshim flush delivers",
                "ask root to run mailshim setup-spool",
            )  # fmt: skip
        return
    except OSError as exc:
        report.add(ERROR, "spool", f"{root}: {exc.strerror}", "fix [queue] dir", EX_CONFIG)
        return
    if not stat.S_ISDIR(st.st_mode):
        report.add(ERROR, "spool", f"{root} is not a folder", "fix [queue] dir", EX_CONFIG)
        return
    if not os.access(root, os.R_OK | os.X_OK):
        report.add(
            OK, "spool",
            f"{root} (owner {_owner(st.st_uid)}, mode {_mode_text(st)}): not readable by this"
            " user, so its contents were not checked",
        )  # fmt: skip
        _check_writable(root, report)
        return
    problems = _spool_problems(root, st)
    for text, fix in problems:
        report.add(WARNING, "spool", text, fix)
    if not problems:
        report.add(OK, "spool", f"{root} (owner {_owner(st.st_uid)}, mode {_mode_text(st)})")
    _check_writable(root, report)
    _check_backlog(cfg, report)
    _check_dead(cfg, report)


def _spool_problems(root: str, st: os.stat_result) -> list[tuple[str, str]]:
    """Modes and owners that would let users read, change or remove each other's mail.

    The system spool (see spool.py): the root folder belongs to root (0755), the subfolders
    to the runner user (0700), ``incoming/`` is the drop folder (3733: setgid and sticky,
    others may create but not list). A per-user spool is all the user's own, 0700.
    """
    problems = []
    setup = "run mailshim setup-spool as root"
    if stat.S_IMODE(st.st_mode) & 0o022:
        problems.append((
            f"{root} is writable by others (mode {_mode_text(st)}): they could swap its"
            " folders",
            f"chmod go-w {root} ({setup})",
        ))  # fmt: skip
    try:
        owner = os.lstat(os.path.join(root, "queue")).st_uid
    except OSError:
        owner = st.st_uid
    for name in ("queue", "state", "tmp", "dead", "corrupt"):
        path = os.path.join(root, name)
        try:
            sub = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(sub.st_mode) or not stat.S_ISDIR(sub.st_mode):
            problems.append((f"{path} is not a plain folder", setup))
        elif sub.st_mode & 0o077:
            problems.append((
                f"{path} is open to other users (mode {_mode_text(sub)}): queued mail may be"
                " readable by them",
                f"chmod 700 {path} ({setup})",
            ))  # fmt: skip
        elif sub.st_uid != owner:
            problems.append((
                f"{path} belongs to {_owner(sub.st_uid)}, queue/ to {_owner(owner)}",
                setup,
            ))  # fmt: skip
    problems += _incoming_problems(os.path.join(root, "incoming"), setup)
    return problems


def _incoming_problems(incoming: str, setup: str) -> list[tuple[str, str]]:
    try:
        inc = os.lstat(incoming)
    except OSError:
        return []
    if not stat.S_ISDIR(inc.st_mode):
        return [(f"{incoming} is not a plain folder", setup)]
    problems = []
    mode = _mode_text(inc)
    if inc.st_mode & 0o044:
        problems.append((
            f"{incoming} is listable by other users (mode {mode}): they can see and read"
            " each other's submissions",
            setup,
        ))  # fmt: skip
    if inc.st_mode & 0o002 and not inc.st_mode & stat.S_ISVTX:
        problems.append((
            f"{incoming} lacks the sticky bit (mode {mode}): users can delete each other's"
            " submissions",
            setup,
        ))  # fmt: skip
    if inc.st_mode & 0o002 and not inc.st_mode & stat.S_ISGID:
        problems.append((
            f"{incoming} lacks the setgid bit (mode {mode}): the runner may not be able to"
            " read what users drop there",
            setup,
        ))  # fmt: skip
    return problems


def runner_uid(cfg: Config) -> int | None:
    """Who runs the system spool (the owner of its queue/), if this user may see it."""
    try:
        return os.lstat(os.path.join(cfg.queue_dir or paths.SYSTEM_SPOOL, "queue")).st_uid
    except OSError:
        return None


def _check_writable(root: str, report: Report) -> None:
    from mailshim import spool

    target = spool.Spool(root)
    if target.writable() or os.geteuid() == 0:
        return
    incoming = os.path.join(root, "incoming")
    if os.path.isdir(incoming) and os.access(incoming, os.W_OK | os.X_OK):
        return
    report.add(
        WARNING, "spool",
        f"this user cannot write {root}: its mail is queued in {paths.user_spool_dir()} and"
        " only its own delivery agent or mailshim flush delivers it",
        "run mailshim setup-spool as root",
    )  # fmt: skip


def _check_backlog(cfg: Config, report: Report) -> None:
    import time

    from mailshim import queueview

    try:
        items = queueview.collect(cfg)
    except MailshimError:
        return
    if not items:
        report.add(OK, "queue", "empty")
        return
    now = time.time()
    arrivals = [i.envelope.arrival for i in items if i.envelope is not None]
    oldest = queueview.age(now - min(arrivals)) if arrivals else "?"
    errors = [i.state.last_error for i in items if i.state is not None and i.state.last_error]
    text = f"{len(items)} message{'s' if len(items) != 1 else ''} waiting, oldest {oldest}"
    if errors:
        text += f"; last error: {errors[-1]}"
    stale = bool(arrivals) and now - min(arrivals) > 3600
    report.add(
        WARNING if stale else OK,
        "queue",
        text,
        "mailshim queue; then mailshim flush once the listener takes mail" if stale else "",
    )


def _check_dead(cfg: Config, report: Report) -> None:
    """Dead letters are failures someone should look at: warn for a week after each."""
    from mailshim import deadletters

    recent = deadletters.recent(cfg)
    if recent:
        report.add(
            WARNING, "dead letters",
            f"{recent} message{'s' if recent != 1 else ''} failed for good in the last 7 days"
            " (the senders got bounces)",
            "mailshim queue --dead shows why; mailshim queue requeue ID retries one",
        )  # fmt: skip


# --- the runner -----------------------------------------------------------------------


def systemd_running() -> bool:
    import shutil

    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def unit_states() -> dict[str, str]:
    """``systemctl is-enabled`` for each unit; empty when systemd is not running."""
    if not systemd_running():
        return {}
    import subprocess

    states = {}
    for unit in SYSTEMD_UNITS:
        try:
            proc = subprocess.run(
                ["systemctl", "is-enabled", unit],
                capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            states[unit] = (proc.stdout.strip() or proc.stderr.strip() or "unknown").split()[0]
        except (OSError, subprocess.SubprocessError):
            states[unit] = "unknown"
    return states


def _is_daemon_cmdline(argv: list[str]) -> bool:
    """``mailshim [options] daemon``, ``python .../mailshim daemon``, ``python -m mailshim...``."""
    for i, word in enumerate(argv):
        base = os.path.basename(word)
        program = base == "mailshim" or (
            i > 0 and argv[i - 1] == "-m" and (word == "mailshim" or word.startswith("mailshim."))
        )
        if program:
            return "daemon" in argv[i + 1 :]
    return False


def daemon_pids() -> list[int]:
    """Processes running ``mailshim daemon`` (found through /proc; none elsewhere)."""
    found = []
    me = os.getpid()
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read(65536)
        except OSError:
            continue
        argv = [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]
        if _is_daemon_cmdline(argv):
            found.append(int(name))
    return sorted(found)


_ENABLED = ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated")


def check_runner(cfg: Config, report: Report) -> None:
    """Per spool, what retries deferred mail: the units, the daemon, a lingering delivery
    agent, or nothing (and whether that matters)."""
    from mailshim import serving, spool

    states = unit_states()
    enabled = [u for u, s in states.items() if s in _ENABLED]
    pids = daemon_pids()
    units = [f"{u} ({states[u]})" for u in enabled if u in RETRYING_UNITS]
    system_root = cfg.queue_dir or paths.SYSTEM_SPOOL
    roots = [t.root for t in spool.known_spools(cfg)] or [system_root]
    uncovered: list[str] = []
    for root in roots:
        target = spool.Spool(root)
        try:
            now = serving.who_retries(target)
        except OSError:
            now = None
        who = list(units) if root == system_root else []
        if now is not None:
            who.append(now)
        elif pids and root == system_root:
            who += [f"mailshim daemon (pid {p})" for p in pids]
        if who:
            report.add(OK, "runner", f"{root}: deferred mail is retried by " + ", ".join(who))
            if root == system_root and states and "mailshim-flush.path" not in enabled and not pids:
                report.add(
                    OK, "runner",
                    "mailshim-flush.path is not enabled: mail other users drop in the spool"
                    " waits for the delivery agent or the next timer run",
                )  # fmt: skip
            continue
        uncovered.append(root)
    if not uncovered:
        return
    how = "systemctl enable --now mailshim-flush.timer mailshim-flush.path"
    if not states:
        how = (
            "run mailshim daemon (containers, hosts without systemd), or enable"
            " mailshim-flush.timer where systemd runs"
        )
    if cfg.delivery_mode == "queue":
        report.add(
            ERROR, "runner",
            'delivery mode is "queue" and nothing runs the queue: mail stays spooled',
            how, EX_UNAVAILABLE,
        )  # fmt: skip
        return
    why = ", ".join(f"{u} is {s}" for u, s in states.items()) or "systemd is not running"
    for root in uncovered:
        drop = os.path.isdir(os.path.join(root, "incoming"))
        if drop:
            report.add(
                WARNING, "runner",
                f"{root}: nothing runs it ({why}; no mailshim daemon running): mail"
                " that other users drop in it and could not be delivered at once waits"
                " until someone runs mailshim flush (root's own mail is retried by the"
                " delivery agent its sendmail starts, which lingers while mail is deferred)",
                how,
            )  # fmt: skip
        else:
            report.add(
                OK, "runner",
                f"{root}: no delivery agent is waiting now; the agent each sendmail starts"
                " lingers while mail is deferred and retries it on the [queue] retry schedule",
            )  # fmt: skip


# --- probing the listeners ------------------------------------------------------------


def probe_relays(cfg: Config, sender: str, rcpts: list[tuple[str, str]], report: Report) -> None:
    import asyncio

    probes: list[tuple[RelayProbe, list[Finding]]] = []

    async def all_relays() -> None:
        for relay in cfg.relays:
            probe = RelayProbe(relay)
            found: list[Finding] = []
            await _probe(cfg, relay, probe, found, sender, rcpts)
            probes.append((probe, found))

    asyncio.run(all_relays())
    _verdict(probes, report)


def _verdict(probes: list[tuple[RelayProbe, list[Finding]]], report: Report) -> None:
    """Failover semantics: the first relay that takes or refuses mail decides; a relay that
    is down (or defers) before it only costs time, so its errors become warnings."""
    deciding = next((i for i, (p, _) in enumerate(probes) if p.outcome != "temporary"), None)
    for index, (probe, found) in enumerate(probes):
        report.relays.append(probe)
        downgrade = (
            deciding is not None and index < deciding and probes[deciding][0].outcome == "ok"
        )
        for finding in found:
            if len(probes) > 1:
                finding.text = f"[{probe.name}] {finding.text}"
            if downgrade and finding.level == ERROR:
                finding.level = WARNING
                finding.code = EX_OK
                finding.text = f"{finding.text} (mail goes to the next relay)"
            report.findings.append(finding)
    if len(probes) > 1 and deciding is not None:
        probe = probes[deciding][0]
        if probe.outcome == "ok":
            report.add(OK, "relay", f"mail goes to {probe.label}")


async def _probe(
    cfg: Config,
    relay: RelayConfig,
    probe: RelayProbe,
    found: list[Finding],
    sender: str,
    rcpts: list[tuple[str, str]],
) -> None:
    from mailshim import relay as relay_mod

    name = relay.name

    def add(level: str, topic: str, text: str, fix: str = "", code: int = EX_OK) -> None:
        found.append(Finding(level, topic, text, fix, code, name))

    helo = cfg.helo_name
    if not _valid_helo(relay.helo or helo):
        add(
            ERROR,
            "helo",
            f"invalid HELO name {relay.helo or helo!r}",
            "set helo to this host's name (one word of printable ASCII)",
            EX_CONFIG,
        )
        return
    probe.transcript.append(f"*** probing {probe.label}")
    try:
        session = await relay_mod.Session.open(relay, helo=helo, say=probe.transcript.append)
    except relay_mod.RelayDown as down:
        text, fix, code = classify_failure(relay, down.reply.text, probe.transcript)
        add(ERROR, "listener", text, fix, code)
        return
    try:
        probe.connected = True
        probe.label = session.label
        _describe_session(cfg, relay, session, probe, add)
        if relay.username:
            probe.auth = relay.username
            add(OK, "auth", f"authenticated as {relay.username}")
        await _transaction(session, sender, rcpts, probe, add)
    finally:
        await session.quit()


def _valid_helo(name: str) -> bool:
    return bool(name) and name.isascii() and all(33 <= ord(ch) < 127 for ch in name)


def _describe_session(
    cfg: Config,
    relay: RelayConfig,
    session: Session,
    probe: RelayProbe,
    add: Callable[..., None],
) -> None:
    greeting = next((line[4:] for line in probe.transcript if line.startswith("<<< 2")), "")
    probe.greeting = greeting
    add(OK, "listener", f"{session.label} answers: {greeting}".rstrip(": "))
    offered = [f"{k.upper()} {v}".strip() for k, v in session.extensions.items()]
    probe.extensions = offered
    if offered:
        add(OK, "ehlo", "offers " + ", ".join(offered))
    else:
        add(
            WARNING,
            "ehlo",
            "the listener answered HELO only (no ESMTP extensions)",
            "check that it is an SMTP server",
        )
    if session.encrypted:
        _describe_tls(relay, session, probe, add)
    elif "starttls" in session.extensions:
        if _is_loopback_host(relay):
            add(
                OK,
                "tls",
                'STARTTLS offered but tls = "none": not used, which is fine on loopback'
                " (Stalwart: useTls false on this listener stops offering it)",
            )
        else:
            add(
                WARNING,
                "tls",
                f'STARTTLS offered but tls = "none": mail and any password go to'
                f" {relay.host} unencrypted",
                'set tls = "starttls" in [relay]',
            )
    elif not _is_loopback_host(relay):
        add(
            WARNING,
            "tls",
            f"no TLS: mail goes to {relay.host} unencrypted",
            'set tls = "starttls" (or "tls") if the listener supports it',
        )
    size = session.extensions.get("size", "")
    if size.isdigit() and 0 < int(size) < cfg.max_size:
        add(
            WARNING,
            "size",
            f"the listener takes at most {size} bytes, [submission] max_size allows"
            f" {cfg.max_size}: larger messages will bounce",
            f"set [submission] max_size = {size}",
        )


def _describe_tls(
    relay: RelayConfig, session: Session, probe: RelayProbe, add: Callable[..., None]
) -> None:
    ssl_object = session.ssl_object
    info: dict[str, object] = {"mode": relay.tls, "verified": relay.verify}
    cert: dict[str, object] | None = None
    if ssl_object is not None:
        info["version"] = ssl_object.version()
        cipher = ssl_object.cipher()
        info["cipher"] = cipher[0] if cipher else None
        der = ssl_object.getpeercert(binary_form=True)
        cert = parse_certificate(der) if der else None
    probe.tls = info
    probe.certificate = cert
    how = f"{info.get('version') or 'TLS'}"
    subject = "certificate could not be read"
    if cert is not None:
        subject = f"certificate {cert.get('subject') or '(no subject)'}"
        names = cert.get("names")
        if isinstance(names, list) and names:
            subject += f" for {', '.join(str(n) for n in names)}"
        if cert.get("issuer"):
            subject += f", issued by {cert['issuer']}"
    if relay.verify:
        against = f"ca_file {relay.ca_file}" if relay.ca_file else "the system's CAs"
        add(OK, "tls", f"{how}, {subject}, verified against {against}")
    else:
        add(
            OK if _is_loopback_host(relay) else WARNING,
            "tls",
            f"{how}, {subject}, NOT verified (verify = false)",
            "" if _is_loopback_host(relay) else "set ca_file and drop verify = false",
        )
    not_after = cert.get("not_after") if cert is not None else None
    if isinstance(not_after, int):
        import time

        left = not_after - time.time()
        if left < 0:
            add(
                WARNING, "tls", "the listener's certificate has expired", "renew it on the listener"
            )
        elif left < CERT_EXPIRY_WARNING:
            add(
                WARNING,
                "tls",
                f"the listener's certificate expires in {int(left // 86400)} days",
                "renew it on the listener",
            )


async def _command(session: Session, *args: bytes) -> Reply:
    # the transaction's own error handling: 421, timeouts, garbage become code-0 replies
    return await session.command(*args, ok=(250, 251))


def _wire(addr: str) -> bytes:
    return addr.encode("utf-8" if not addr.isascii() else "ascii")


async def _transaction(
    session: Session,
    sender: str,
    rcpts: list[tuple[str, str]],
    probe: RelayProbe,
    add: Callable[..., None],
) -> None:
    utf8 = not sender.isascii() or not all(a.isascii() for a, _ in rcpts)
    params = [b"SMTPUTF8"] if utf8 and "smtputf8" in session.extensions else []
    reply = await _command(session, b"MAIL", b"FROM:<" + _wire(sender) + b">", *params)
    probe.sender = {"address": sender, "reply": str(reply), "code": reply.code}
    if reply.code != 250:
        text, fix, code, outcome = classify_mail(reply, sender)
        add(ERROR, "mail", text, fix, code)
        probe.outcome = outcome
        return
    add(OK, "mail", f"sender <{sender}> accepted: {reply}")
    failures = 0
    outcome = "ok"
    for addr, why in rcpts:
        if failures >= MAX_RCPT_FAILURES:
            add(
                WARNING,
                "rcpt",
                f"<{addr}> not tried: {failures} recipients were already refused, and Stalwart"
                " bans an address after repeated failures",
            )
            continue
        reply = await _command(session, b"RCPT", b"TO:<" + _wire(addr) + b">")
        probe.recipients.append(
            {"address": addr, "for": why, "reply": str(reply), "code": reply.code}
        )
        if reply.code in (250, 251):
            note = f" (for {why})" if why != addr else ""
            add(OK, "rcpt", f"relaying allowed: <{addr}> accepted: {reply}{note}")
            continue
        failures += 1
        text, fix, code, kind = classify_rcpt(reply, addr, why)
        add(ERROR, "rcpt", text, fix, code)
        if kind == "permanent":
            outcome = "permanent"
        elif outcome == "ok":
            outcome = "temporary"
        if reply.code in (0, 421):
            break
    probe.outcome = outcome
    if session.alive:
        await _command(session, b"RSET")


# --- classification: a reply or failure in plain words -------------------------------------

_RELAY_FIX = (
    "let this listener relay without authentication (Stalwart: MtaStageRcpt.allowRelaying"
    f" true for listener == 'local', see {STALWART_DOC}), or set username and password_file"
)
_AUTH_FIX = (
    "let this listener take mail without AUTH (Stalwart: MtaStageAuth.require false for"
    f" listener == 'local', see {STALWART_DOC}), or set username and password_file in [relay]"
)


def _is_auth_reply(reply: Reply) -> bool:
    text = reply.text.lower()
    return (
        reply.code == 530
        or (reply.code == 503 and ("5.5.1" in text or "auth" in text))
        or "5.7.0" in text
        or "authentication required" in text
    )


def classify_mail(reply: Reply, sender: str) -> tuple[str, str, int, str]:
    """(text, fix, exit code, outcome) for a MAIL FROM that was not accepted."""
    if reply.code in (0, 421):
        return (
            f"the listener dropped the connection at MAIL FROM: {reply}",
            "check the listener's log",
            EX_UNAVAILABLE,
            "temporary",
        )
    if _is_auth_reply(reply):
        return f"authentication required: {reply}", _AUTH_FIX, EX_NOPERM, "temporary"
    if reply.temporary:
        return (
            f"sender <{sender}> deferred (temporary): {reply}",
            "try again later; the listener's log says why",
            EX_UNAVAILABLE,
            "temporary",
        )
    return (
        f"sender <{sender}> refused: {reply}",
        'set [addresses] sender = "an address the listener accepts"',
        EX_UNAVAILABLE,
        "permanent",
    )


def classify_rcpt(reply: Reply, addr: str, why: str) -> tuple[str, str, int, str]:
    """(text, fix, exit code, permanent|temporary) for a refused RCPT TO."""
    text, fix, code, kind = _classify_rcpt(reply, addr, why)
    if why != addr:
        text += f" (for {why})"
    return text, fix, code, kind


def _classify_rcpt(reply: Reply, addr: str, why: str) -> tuple[str, str, int, str]:
    text = reply.text.lower()
    who = f"<{addr}>"
    alias_fix = "fix [aliases] root" if why == "root" else "check the address"
    if reply.code in (0, 421):
        return (
            f"the listener dropped the connection at RCPT TO {who}: {reply}",
            "check the listener's log",
            EX_UNAVAILABLE,
            "temporary",
        )
    if _is_auth_reply(reply):
        return f"authentication required: {reply}", _AUTH_FIX, EX_NOPERM, "temporary"
    if "5.1.2" in text or "relay" in text:
        return (
            f"relaying denied for {who}: {reply}",
            _RELAY_FIX,
            EX_UNAVAILABLE,
            "permanent" if reply.permanent else "temporary",
        )
    if "4.4.5" in text or "rate" in text:
        return (
            f"rate limited at {who}: {reply}",
            f"wait, or exempt this listener from the throttles (see {STALWART_DOC})",
            EX_UNAVAILABLE,
            "temporary",
        )
    if "4.2.2" in text or "grey" in text or "gray" in text:
        return (
            f"greylisted: {reply}",
            "nothing to do: mailshim retries",
            EX_UNAVAILABLE,
            "temporary",
        )
    if reply.temporary:
        return (
            f"{who} deferred (temporary): {reply}",
            "try again later; the listener's log says why",
            EX_UNAVAILABLE,
            "temporary",
        )
    if "5.1.3" in text or reply.code == 501:
        return f"{who} refused as invalid: {reply}", alias_fix, EX_CONFIG, "permanent"
    return f"{who} refused: {reply}", alias_fix, EX_UNAVAILABLE, "permanent"


def classify_failure(relay: RelayConfig, text: str, transcript: list[str]) -> tuple[str, str, int]:
    """(text, fix, exit code) for a relay that could not be opened (connect to AUTH)."""
    low = text.lower()
    sent = [line[4:].split(" ", 1)[0].upper() for line in transcript if line.startswith(">>> ")]
    last = sent[-1] if sent else None
    if "certificate verification failed" in low:
        fix = "set ca_file to the CA that signed the listener's certificate"
        if _is_loopback_host(relay):
            fix += ", or verify = false (loopback only)"
        if "hostname" in low or "ip address mismatch" in low:
            fix = "connect by a name the certificate holds (host = ...), or fix the certificate"
        return f"TLS: {text}", fix, EX_CONFIG
    if "does not offer starttls" in low:
        return (
            f'tls = "starttls" but the listener does not offer STARTTLS: {text}',
            'set tls = "none" (fine on loopback) or enable TLS on the listener',
            EX_CONFIG,
        )
    if "refusing to send the password" in low:
        return text, 'set tls = "starttls" or "tls"', EX_CONFIG
    if "offers no auth" in low:
        return (
            text,
            "drop username and password_file, or enable AUTH PLAIN or LOGIN on the listener",
            EX_CONFIG,
        )
    if "password_file" in low or "cannot read the password" in low:
        return text, "see the secret finding above", EX_NOPERM
    if last == "AUTH":
        return (
            f"authentication failed for {relay.username}: {_tail(text)}",
            f"check the password in {relay.password_file}",
            EX_NOPERM,
        )
    if last == "STARTTLS":
        return f"STARTTLS failed: {_tail(text)}", "check the listener's TLS setup", EX_CONFIG
    if last in ("EHLO", "LHLO", "HELO"):
        return (
            f"the listener refused {last}: {_tail(text)}",
            "check the listener's log",
            EX_UNAVAILABLE,
        )
    return _connect_failure(relay, text, low)


def _connect_failure(relay: RelayConfig, text: str, low: str) -> tuple[str, str, int]:
    where = relay.describe()
    if "tls" in low and relay.tls == "tls":
        return (
            f"TLS handshake failed: {text}",
            'is the port right for tls = "tls" (implicit TLS, usually 465)? 587 and'
            ' 25 want tls = "starttls"',
            EX_CONFIG,
        )
    if "cannot resolve" in low:
        return f"listener unknown: {text}", "fix [relay] host", EX_CONFIG
    if relay.socket and ("no such file" in low or "not found" in low):
        return (
            f"listener down: no socket at {relay.socket}",
            "start the listener or fix [relay] socket",
            EX_UNAVAILABLE,
        )
    if "permission denied" in low:
        return (
            f"listener not reachable: permission denied ({where})",
            "run as a user that may use the socket, or fix its permissions",
            EX_NOPERM,
        )
    if "refused" in low:
        return (
            f"listener down: connection refused ({where})",
            f"start the listener, or fix [relay] host/port (Stalwart: a listener named"
            f" local on 127.0.0.1:10025, see {STALWART_DOC})",
            EX_UNAVAILABLE,
        )
    if "timed out" in low:
        return (
            f"listener not answering: timed out after {relay.timeout:g}s ({where})",
            "check that the listener runs and no firewall drops the connection",
            EX_UNAVAILABLE,
        )
    return f"listener unusable: {text}", "check the listener and [relay]", EX_UNAVAILABLE


def _tail(text: str) -> str:
    """The server's reply at the end of a relay failure text ("...: 535 5.7.8 ...")."""
    _head, sep, rest = text.rpartition(": ")
    return rest if sep and rest[:3].isdigit() else text


# --- a small DER reader for the listener's certificate ----------------------------------

_NAME_OIDS = {
    b"\x55\x04\x03": "CN",
    b"\x55\x04\x0a": "O",
    b"\x55\x04\x0b": "OU",
    b"\x55\x04\x06": "C",
    b"\x55\x04\x07": "L",
    b"\x55\x04\x08": "ST",
}
_SAN_OID = b"\x55\x1d\x11"
_STRING_CODECS = {
    0x0C: "utf-8",
    0x13: "ascii",
    0x16: "ascii",
    0x14: "latin-1",
    0x1E: "utf-16-be",
    0x1C: "utf-32-be",
}


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the element at ``pos``; ValueError if malformed."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("long tag")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("overrun")
    return tag, pos, pos + length


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, vstart, vend = _tlv(data, pos, end)
        out.append((tag, vstart, vend))
        pos = vend
        if len(out) > 1000:
            raise ValueError("too many elements")
    return out


def _name(data: bytes, start: int, end: int) -> str:
    parts = []
    for tag, s, e in _items(data, start, end):
        if tag != 0x31:
            raise ValueError("not a SET")
        for tag2, s2, e2 in _items(data, s, e):
            if tag2 != 0x30:
                raise ValueError("not a SEQUENCE")
            pair = _items(data, s2, e2)
            if len(pair) < 2 or pair[0][0] != 0x06:
                raise ValueError("bad attribute")
            key = _NAME_OIDS.get(data[pair[0][1] : pair[0][2]])
            codec = _STRING_CODECS.get(pair[1][0])
            if key is None or codec is None:
                continue
            value = data[pair[1][1] : pair[1][2]].decode(codec, "replace")
            parts.append(f"{key}={one_line(value)}")
    return ", ".join(parts)


def _time(data: bytes, tag: int, start: int, end: int) -> int:
    import calendar

    text = data[start:end].decode("ascii")
    if not text.endswith("Z"):
        raise ValueError("not UTC")
    digits = text[:-1]
    if tag == 0x17 and len(digits) == 12:
        year = int(digits[:2])
        year += 1900 if year >= 50 else 2000
        rest = digits[2:]
    elif tag == 0x18 and len(digits) == 14:
        year = int(digits[:4])
        rest = digits[4:]
    else:
        raise ValueError("bad time")
    if not rest.isdigit():
        raise ValueError("bad time")
    fields = [int(rest[i : i + 2]) for i in range(0, 10, 2)]
    return calendar.timegm((year, *fields, 0, 0, 0))


def _san(data: bytes, start: int, end: int) -> list[str]:
    import ipaddress

    tag, s, e = _tlv(data, start, end)
    if tag != 0x30:
        raise ValueError("bad SAN")
    names = []
    for tag2, s2, e2 in _items(data, s, e):
        if tag2 == 0x82:
            names.append(one_line(data[s2:e2].decode("ascii", "replace")))
        elif tag2 == 0x87 and e2 - s2 in (4, 16):
            names.append(str(ipaddress.ip_address(data[s2:e2])))
    return names


def parse_certificate(der: bytes) -> dict[str, object] | None:
    """Subject, issuer, subjectAltName names and expiry of an X.509 certificate, or None.

    Only what an administrator needs to recognise the certificate; anything malformed or
    unexpected gives None rather than an exception.
    """
    try:
        return _parse_certificate(der)
    except (ValueError, IndexError, UnicodeDecodeError, OverflowError):
        return None


def _parse_certificate(der: bytes) -> dict[str, object]:
    tag, s, e = _tlv(der, 0, len(der))
    if tag != 0x30:
        raise ValueError("not a certificate")
    tbs_tag, ts, te = _tlv(der, s, e)
    if tbs_tag != 0x30:
        raise ValueError("no tbsCertificate")
    fields = _items(der, ts, te)
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]  # version
    if len(fields) < 6:
        raise ValueError("short tbsCertificate")
    issuer, validity, subject = fields[2], fields[3], fields[4]
    out: dict[str, object] = {
        "subject": _name(der, subject[1], subject[2]),
        "issuer": _name(der, issuer[1], issuer[2]),
        "names": [],
    }
    times = _items(der, validity[1], validity[2])
    if len(times) == 2:
        out["not_before"] = _time(der, times[0][0], times[0][1], times[0][2])
        out["not_after"] = _time(der, times[1][0], times[1][1], times[1][2])
    for tag2, s2, e2 in fields[6:]:
        if tag2 != 0xA3:
            continue
        ext_tag, xs, xe = _tlv(der, s2, e2)
        if ext_tag != 0x30:
            raise ValueError("bad extensions")
        for tag3, s3, e3 in _items(der, xs, xe):
            parts = _items(der, s3, e3)
            if (
                tag3 == 0x30
                and len(parts) >= 2
                and parts[0][0] == 0x06
                and der[parts[0][1] : parts[0][2]] == _SAN_OID
                and parts[-1][0] == 0x04
            ):
                out["names"] = _san(der, parts[-1][1], parts[-1][2])
    return out


# --- printing ---------------------------------------------------------------------------


def format_report(report: Report, color: bool = False) -> str:
    """The plain-words report: one line per finding, its fix below it, the verdict last."""
    paint = _painter(color)
    lines = []
    width = max((len(f.topic) for f in report.findings), default=6)
    for finding in report.findings:
        level = paint(finding.level, f"{finding.level:<7}")
        lines.append(f"{level}  {finding.topic:<{width}}  {finding.text}")
        if finding.fix:
            lines.append(f"{'':<7}  {'':<{width}}  fix: {finding.fix}")
    errors, warnings = report.count(ERROR), report.count(WARNING)
    tail = []
    if errors:
        tail.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        tail.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    if report.mail_flows:
        verdict = paint(OK, "mail would flow")
        if tail:
            verdict += f" ({', '.join(tail)})"
    else:
        verdict = paint(ERROR, "mail would NOT flow") + f": {', '.join(tail)}"
        verdict += f" (exit {report.exit_code})"
    lines.append("")
    lines.append(verdict)
    return "\n".join(lines) + "\n"


_COLORS = {OK: "32", WARNING: "33", ERROR: "31;1"}


def _painter(color: bool) -> Callable[[str, str], str]:
    def paint(level: str, text: str) -> str:
        if not color:
            return text
        return f"\x1b[{_COLORS[level]}m{text}\x1b[0m"

    return paint


__all__ = [
    "ERROR",
    "OK",
    "WARNING",
    "Finding",
    "RelayProbe",
    "Report",
    "classify_failure",
    "classify_mail",
    "classify_rcpt",
    "daemon_pids",
    "format_report",
    "parse_certificate",
    "run",
]
