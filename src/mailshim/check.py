"""Say whether mail would flow, and why not: the local checks behind ``mailshim check``.

``run()`` validates the configuration, the secrets' permissions, the spool's owners and modes
and whether anything will retry deferred mail, then hands the listeners to ``probe`` (which
connects and tries MAIL/RCPT without sending). The result is a ``checkreport.Report`` for the
CLI to print (``format_report``) or dump as JSON.

Trust: run by administrators and users, with their own privileges; it reads what that user
can read and changes nothing (no file is written, no message sent). Raises nothing: every
problem is a finding, and the report's exit code is the first error's (67, 69, 77 or 78).
"""

from __future__ import annotations

import os
import stat

from mailshim import paths
from mailshim.checkreport import ERROR, OK, WARNING, Report, format_report
from mailshim.errors import (
    EX_CONFIG,
    EX_NOPERM,
    EX_UNAVAILABLE,
    ConfigError,
    DataError,
    MailshimError,
)
from mailshim.hostnames import relay_is_local
from mailshim.probe import probe_relays
from mailshim.sealed import sealed_out, secret_holders

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from mailshim.config import Config, RelayConfig

__all__ = [
    "ERROR",
    "OK",
    "WARNING",
    "Report",
    "daemon_pids",
    "format_report",
    "run",
]

SYSTEMD_UNITS = ("mailshim-flush.timer", "mailshim-flush.path", "mailshim-daemon.service")
RETRYING_UNITS = ("mailshim-flush.timer", "mailshim-daemon.service")


# --- the whole check -------------------------------------------------------------------


def run(config_path: str | None, extra_rcpts: Sequence[str] = (), *, probe: bool = True) -> Report:
    """Check everything; never raises a ``MailshimError`` (each becomes a finding)."""
    from mailshim import configload

    report = Report()
    try:
        cfg = configload.load(config_path, use_cache=False)
    except MailshimError as exc:
        key = exc.key if isinstance(exc, ConfigError) else ""
        report.add(
            ERROR,
            "config",
            exc.message,
            f"fix {key} and run mailshim check again" if key else
            "fix the file and run mailshim check again",
            EX_CONFIG if isinstance(exc, ConfigError) else exc.code,
        )  # fmt: skip
        if not isinstance(exc, ConfigError):
            return report
        # What sendmail and the runner do meanwhile; the rest is checked with that.
        cfg = configload.load_or_fallback(config_path)
        report.add(
            WARNING, "config",
            f"until then: sendmail still spools; {configload.fallback_note(cfg)}"
            + ("" if configload.usable(cfg) else " (the runner delivers nothing)"),
        )  # fmt: skip
        # The defaults name no listener the administrator chose: probing them says nothing.
        probe = probe and configload.usable(cfg)
    report.config_path = cfg.path
    for warning in cfg.warnings:
        report.add(WARNING, "config", warning, "fix the spelling or remove the key")
    if cfg.broken is None:
        check_config_file(cfg, report)
    addresses = check_addresses(cfg, report, extra_rcpts)
    runner = runner_uid(cfg)
    for relay in cfg.relays:
        check_relay_settings(relay, report, runner)
    check_spool(cfg, report)
    check_limits(cfg, report)
    check_log(cfg, report)
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


def _secret_owner(
    path: str, st: os.stat_result, report: Report, name: str, runner: int | None, label: str
) -> None:
    if runner is not None and runner != 0 and st.st_uid != runner:
        report.add(
            WARNING, "secret",
            f"[{name}] {label} {path} belongs to {_owner(st.st_uid)}, but the runner"
            f" runs as {_owner(runner)} and cannot read it: mail it retries stays deferred",
            f"chown {_owner(runner)} {path}", relay=name,
        )  # fmt: skip


def _check_secret(report: Report, name: str, label: str, path: str, runner: int | None) -> None:
    """One secret file (``password_file``, ``client_key``) as this user sees it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        report.add(
            ERROR,
            "secret",
            f"[{name}] {label} {path}: {exc.strerror}",
            "create it (mode 0600) or fix the path",
            EX_CONFIG,
            name,
        )
    else:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            report.add(
                ERROR, "secret",
                f"[{name}] {label} {path} is readable by others (mode {mode:04o});"
                " mailshim refuses to use it",
                f"chmod 600 {path}", EX_NOPERM, name,
            )  # fmt: skip
        elif not os.access(path, os.R_OK):
            if runner is not None and st.st_uid == runner:
                report.add(
                    OK, "secret",
                    f"[{name}] {label} {path} is readable by {secret_holders(st)}"
                    " (sealed): this user cannot relay directly, the runner delivers"
                    " its mail",
                    relay=name,
                )  # fmt: skip
            else:
                report.add(
                    ERROR, "secret",
                    f"[{name}] {label} {path} is not readable by uid {os.getuid()}"
                    f" (owner uid {st.st_uid})",
                    "run mailshim check as the user that delivers mail (root or mailshim)",
                    EX_NOPERM, name,
                )  # fmt: skip
        else:
            report.add(
                OK, "secret",
                f"[{name}] {label} {path} (mode {mode:04o}), readable by"
                f" {secret_holders(st)}",
                relay=name,
            )  # fmt: skip
            _secret_owner(path, st, report, name, runner, label)


def check_relay_settings(relay: RelayConfig, report: Report, runner: int | None = None) -> None:
    """The relay's files (secret, CA) as this user sees them, before connecting.

    ``runner``: the uid the system spool's runner runs as, when known: it must be able to
    read the secret too.
    """
    name = relay.name
    if relay.password_file:
        _check_secret(report, name, "password_file", relay.password_file, runner)
    if relay.client_cert:
        key = "client_key" if relay.client_key else "client_cert"
        _check_secret(report, name, key, relay.client_key or relay.client_cert, runner)
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
        level = OK if relay_is_local(relay.host, relay.socket) else WARNING
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


def check_log(cfg: Config, report: Report) -> None:
    """Where the log lines go: a host with neither syslog nor ``[log] file`` keeps none, and
    ``mailshim log ID`` then has nothing to tell."""
    from mailshim import maillog

    target = cfg.log_file
    if target is None:
        if maillog.available():
            report.add(OK, "log", "to syslog (mail facility, tag mailshim)")
            return
        report.add(
            WARNING, "log",
            "no syslog socket (/dev/log): log lines go nowhere, so mailshim log finds"
            " nothing and failures leave no trace",
            'set [log] file = "/var/log/mailshim.log" (writable by the runner user), or run'
            " a syslog daemon; mailshim daemon also writes them to its stderr",
        )  # fmt: skip
        return
    if os.path.exists(target):
        usable = os.path.isfile(target) and os.access(target, os.W_OK)
    else:
        usable = os.access(os.path.dirname(target) or "/", os.W_OK | os.X_OK)
    if usable:
        also = " and syslog" if maillog.available() else ""
        report.add(OK, "log", f"to {target}{also}; mailshim log reads it")
    else:
        report.add(
            WARNING, "log",
            f"this user cannot append to {target}: its log lines are dropped",
            f"create it for the runner user and the administrators (chown mailshim {target};"
            " chmod 640)",
        )  # fmt: skip


def _check_backlog(cfg: Config, report: Report) -> None:
    import time

    from mailshim import queueview

    # One pass over the queue, holding only the figures (the queue may hold 100,000).
    count, oldest_at, last = 0, None, None
    try:
        for item in queueview.iter_items(cfg):
            count += 1
            if item.envelope is not None:
                arrival = item.envelope.arrival
                oldest_at = arrival if oldest_at is None else min(oldest_at, arrival)
            st = item.state
            if st is not None and st.last_error and (last is None or st.last_attempt > last[0]):
                last = (st.last_attempt, st.last_error, item.queue_id)
    except MailshimError:
        return
    if not count:
        report.add(OK, "queue", "empty")
        return
    now = time.time()
    oldest = queueview.age(now - oldest_at) if oldest_at is not None else "?"
    text = f"{count} message{'s' if count != 1 else ''} waiting, oldest {oldest}"
    # An entry that is still here after an attempt failed: the most recent such attempt.
    if last is not None:
        last_attempt, last_error, qid = last
        ago = queueview.age(now - last_attempt) if last_attempt else "?"
        report.add(
            WARNING,
            "queue",
            f"{text}; the last attempt ({ago} ago) failed: {last_error}",
            "make the listener take mail again (the listener lines of this check show"
            " whether it is reachable and what it refuses), then run mailshim flush;"
            f" mailshim queue show {qid} and mailshim log {qid} tell that message's story",
        )
        return
    stale = oldest_at is not None and now - oldest_at > 3600
    report.add(
        WARNING if stale else OK,
        "queue",
        text,
        "mailshim queue; then mailshim flush once the listener takes mail" if stale else "",
    )


# --- sending limits -------------------------------------------------------------------


def check_limits(cfg: Config, report: Report) -> None:
    """Who is at their sending limit right now (only root and the runner can see)."""
    import time

    from mailshim import sendlimits, spool

    target = spool.Spool(cfg.queue_dir or paths.SYSTEM_SPOOL)
    if not target.has_incoming() or not os.access(target.state_dir, os.R_OK | os.X_OK):
        return
    limiter = sendlimits.limiter_for(cfg, target)
    if limiter is None:
        report.add(OK, "limits", "no per-user sending limits ([limits] user_messages = 0)")
        return
    rule = limiter.rule()
    now = time.time()
    full = limiter.at_limit(now)
    for uid, usage in full:
        until = time.strftime("%H:%M", time.localtime(usage.start + limiter.window))
        report.add(
            WARNING, "limits",
            f"{sendlimits.login(uid)} is at its sending limit ({rule}): {usage.messages}"
            f" messages to {usage.recipients} recipients this window; the rest waits until"
            f" {until}",
            "see what it sends (mailshim queue); if it is legitimate, raise [limits]"
            " user_messages / user_recipients or add the user to trusted_users",
        )  # fmt: skip
    if not full:
        report.add(OK, "limits", f"{rule} per submitting user; nobody is at the limit")


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


def unit_states(verb: str = "is-enabled", units: Sequence[str] = SYSTEMD_UNITS) -> dict[str, str]:
    """``systemctl is-enabled`` (or ``verb``: ``is-active``) for each unit; empty when
    systemd is not running."""
    if not systemd_running():
        return {}
    import subprocess

    states = {}
    for unit in units:
        try:
            proc = subprocess.run(
                ["systemctl", verb, unit],
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


def _own_drop_agent(root: str, report: Report) -> None:
    """As a user submitting through the drop folder: is their own lingering agent running."""
    from mailshim import dropagent

    if os.geteuid() == 0:
        return
    pid = dropagent.running(root)
    if pid is not None:
        report.add(
            OK, "runner",
            f"{root}: your deferred mail in its drop folder is retried by your own delivery"
            f" agent (pid {pid}) on the [queue] retry schedule",
        )  # fmt: skip


_ENABLED = ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated")
# A unit retries only while it runs: an enabled timer that was stopped or failed does not
# until the next boot (issue 22, item 8). "activating": the daemon restarting.
_RUNNING = ("active", "reloading", "activating")


def _stopped_units(report: Report, states: dict[str, str], active: dict[str, str]) -> None:
    """Enabled units that do not run: a warning each, with the command that starts them."""
    for unit, state in active.items():
        if state in _RUNNING:
            continue
        start = f"systemctl start {unit}"
        if state == "failed":
            start = f"systemctl reset-failed {unit} && {start} (journalctl -u {unit} says why)"
        report.add(
            WARNING, "runner",
            f"{unit} is {states[unit]} but {state}: it retries nothing until it is started"
            " again (or the next boot)",
            start,
        )  # fmt: skip


def check_runner(cfg: Config, report: Report) -> None:
    """Per spool, what retries deferred mail: the units, the daemon, a lingering delivery
    agent, or nothing (and whether that matters)."""
    from mailshim import serving, spool, spoolchoice

    states = unit_states()
    active = unit_states("is-active", [u for u, s in states.items() if s in _ENABLED])
    _stopped_units(report, states, active)
    running = [u for u, s in active.items() if s in _RUNNING]
    pids = daemon_pids()
    units = [f"{u} ({states[u]}, {active[u]})" for u in running if u in RETRYING_UNITS]
    system_root = cfg.queue_dir or paths.SYSTEM_SPOOL
    roots = [t.root for t in spoolchoice.known_spools(cfg)] or [system_root]
    uncovered: list[str] = []
    mine: list[str | None] = []  # this user's own retrier, looked up once, when needed

    def own_retrier() -> str | None:
        if not mine:
            from mailshim import retrier

            mine.append(retrier.installed())
        return mine[0]

    for root in roots:
        if os.path.isdir(os.path.join(root, "incoming")):
            _own_drop_agent(root, report)
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
        if not who and target.writable():
            found = own_retrier()
            if found:
                who.append(f"{found} (mailshim retrier)")
        if who:
            report.add(OK, "runner", f"{root}: deferred mail is retried by " + ", ".join(who))
            if root == system_root and states and "mailshim-flush.path" not in running and not pids:
                report.add(
                    OK, "runner",
                    "mailshim-flush.path is not running: mail other users drop in the spool"
                    " waits for the delivery agent or the next timer run",
                )  # fmt: skip
            continue
        uncovered.append(root)
    if uncovered:
        _uncovered(cfg, report, uncovered, system_root, states, active)


def _uncovered(
    cfg: Config,
    report: Report,
    uncovered: list[str],
    system_root: str,
    states: dict[str, str],
    active: dict[str, str],
) -> None:
    """The spools nothing retries now: what that means for each, and the fix."""
    how = "systemctl enable --now mailshim-flush.timer mailshim-flush.path"
    if not states:
        how = (
            "run mailshim daemon (containers, hosts without systemd), or enable"
            " mailshim-flush.timer where systemd runs; for your own spool: mailshim"
            " retrier install"
        )
    if cfg.delivery_mode == "queue":
        report.add(
            ERROR, "runner",
            'delivery mode is "queue" and nothing runs the queue: mail stays spooled',
            how, EX_UNAVAILABLE,
        )  # fmt: skip
        return
    if sealed_out(cfg) and system_root in uncovered:
        report.add(
            ERROR, "runner",
            f"{system_root}: sealed: only the runner can deliver this user's mail, and"
            " nothing runs it: mail stays in the drop folder",
            how, EX_UNAVAILABLE,
        )  # fmt: skip
        return
    why = (
        ", ".join(
            f"{u} is {s}" + (f" but {active[u]}" if active.get(u, "active") not in _RUNNING else "")
            for u, s in states.items()
        )
        or "systemd is not running"
    )
    for root in uncovered:
        drop = os.path.isdir(os.path.join(root, "incoming"))
        if drop:
            report.add(
                WARNING, "runner",
                f"{root}: nothing runs it ({why}; no mailshim daemon running): mail a user"
                " drops in it and could not deliver at once is retried only by that user's"
                " own delivery agent, which lingers while their entries are deferred (root's"
                " mail by the spool's agent); nothing bounces or expires mail until a runner"
                " runs",
                how,
            )  # fmt: skip
        elif waiting := _waiting(root):
            report.add(
                WARNING, "runner",
                f"{root}: {waiting} deferred message(s) and nothing retries them (no"
                " delivery agent, daemon, timer or retrier: the agent died or the host"
                " restarted); they go out only with the next submission",
                "mailshim flush sends them now; mailshim retrier install retries them from"
                " now on, after a reboot too",
            )  # fmt: skip
        else:
            report.add(
                OK, "runner",
                f"{root}: no delivery agent is waiting now; the agent each sendmail starts"
                " lingers while mail is deferred and retries it on the [queue] retry schedule",
                "if that agent dies or the host restarts, nothing retries until the next"
                " submission: mailshim retrier install",
            )  # fmt: skip


def _waiting(root: str) -> int:
    """Entries in ``root``'s queue that a retrier would try (not held); 0 if unreadable."""
    from mailshim import spool

    target = spool.Spool(root)
    count = 0
    try:
        for qid in target.ids():
            try:
                count += not target.load_state(qid).held
            except (MailshimError, OSError):
                count += 1
    except (MailshimError, OSError):
        return 0
    return count
