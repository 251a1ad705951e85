"""Set up (or remove) a retrier for an install with no runner: what runs ``mailshim run`` for
this user after their delivery agent died (OOM killer, SIGKILL) and after a reboot.

Where no runner serves the spool (pip, pipx, a venv, the per-user spool) the lingering agent
is the only retrier; once it is gone, deferred mail waits for the next background submission.
``mailshim retrier install`` gives such an install one that survives reboots: a systemd user
timer (``mailshim-retry.timer`` + ``.service`` in ``~/.config/systemd/user``) where the user's
systemd manager runs, else two lines in the user's crontab (``@reboot`` and every minute),
between marker comments so that ``remove`` (and a second ``install``) touch nothing else.
Both run ``mailshim run``, which tries only what is due: the ``[queue] retry`` schedule holds
however often it starts, and a run beside a lingering agent sends nothing twice (entry locks).
Containers have neither: there ``mailshim daemon`` runs beside the application (docs/spool.md).

Trust: runs as the invoking user on their own files (unit folder, crontab through
``crontab(1)``); nothing here is privileged and nothing it reads is another user's. The
commands written are built from this process's own interpreter and the configuration path
it was given, quoted for the shell (cron) or for systemd's ``ExecStart=``.

Raises ``UnavailableError`` (69) when neither a systemd user manager nor ``crontab`` is
there (or the one asked for is not), ``CantCreateError`` (73) when a unit file cannot be
written, ``TempFailError`` (75) when ``systemctl --user`` or ``crontab`` fails.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from mailshim import paths
from mailshim.errors import CantCreateError, TempFailError, UnavailableError

SERVICE = "mailshim-retry.service"
TIMER = "mailshim-retry.timer"
BEGIN = "# mailshim retrier: begin (mailshim retrier install; `mailshim retrier remove` undoes)"
END = "# mailshim retrier: end"
SYSTEMD = "systemd"
CRON = "cron"


def program(config_path: str | None) -> list[str]:
    """The argv of ``mailshim [-C FILE] run`` with this installation's own ``mailshim``."""
    beside = os.path.join(os.path.dirname(sys.executable), "mailshim")
    if os.access(beside, os.X_OK):
        argv = [beside]
    else:
        found = shutil.which("mailshim")
        argv = [os.path.abspath(found)] if found else [sys.executable, "-m", "mailshim.cli.entry"]
    if config_path:
        argv += ["-C", os.path.abspath(config_path)]
    return [*argv, "run"]


def _environment() -> dict[str, str]:
    """What ``mailshim run`` needs from this shell that cron and the user manager do not
    set: a non-default state folder (where the per-user spool lives)."""
    return {k: os.environ[k] for k in ("XDG_STATE_HOME",) if os.environ.get(k)}


def _unit_quote(word: str) -> str:
    """One word for ``ExecStart=`` (systemd's own quoting; ``%`` is a specifier there)."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def service_text(argv: list[str], env: dict[str, str]) -> str:
    lines = [
        "[Unit]",
        "Description=Retry this user's deferred mail (mailshim run; mailshim retrier install)",
        "Documentation=man:mailshim(8)",
        "",
        "[Service]",
        "Type=oneshot",
        *(f"Environment={_unit_quote(f'{k}={v}')}" for k, v in env.items()),
        "ExecStart=" + " ".join(_unit_quote(w) for w in argv),
        # systemd's own Starting/Finished lines (info) every minute would be the only
        # thing an idle queue logs; mailshim's lines are notice and above.
        "LogLevelMax=notice",
        "",
    ]
    return "\n".join(lines)


def timer_text() -> str:
    return "\n".join(
        [
            "[Unit]",
            "Description=Retry this user's deferred mail every minute (mailshim retrier)",
            "Documentation=man:mailshim(8)",
            "",
            "[Timer]",
            # Also right after boot (or login without lingering): deferred mail goes
            # out without waiting for a new submission.
            "OnStartupSec=30s",
            "OnUnitInactiveSec=1min",
            "AccuracySec=5s",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )


def cron_block(argv: list[str], env: dict[str, str]) -> str:
    """The crontab lines: at boot and every minute; output discarded (MAILTO would mail it
    through mailshim itself; ``mailshim run`` logs to syslog or ``[log] file``)."""
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    # In a crontab "%" ends the command: escaped, it is a literal percent sign.
    command = (prefix + shlex.join(argv)).replace("%", "\\%") + " >/dev/null 2>&1"
    return "\n".join([BEGIN, f"@reboot {command}", f"* * * * * {command}", END, ""])


def unit_dir() -> str:
    return os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"),
        "systemd",
        "user",
    )


def user_manager() -> bool:
    """Whether this user's systemd manager runs (its private socket exists)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return shutil.which("systemctl") is not None and os.path.exists(
        os.path.join(runtime, "systemd", "private")
    )


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise TempFailError(f"{argv[0]}: {exc}") from None


def _crontab() -> str:
    """The user's crontab now ("" when they have none)."""
    got = _run(["crontab", "-l"])
    if got.returncode != 0:
        if "no crontab" in got.stderr.lower():
            return ""
        raise TempFailError(f"crontab -l: {got.stderr.strip() or 'failed'}")
    return got.stdout


def _bare(line: str) -> str:
    """A crontab line without its line end."""
    return line.rstrip("\n")


def _ours(line: str) -> bool:
    """Whether a line is one of the two that ``cron_block`` writes."""
    text = _bare(line)
    return text.startswith(("@reboot ", "* * * * * ")) and text.endswith(" run >/dev/null 2>&1")


def _without_block(text: str) -> str:
    """``text`` without the retrier's block. Between a BEGIN and the next END everything is
    the block; a BEGIN with no END before the next BEGIN (the END deleted by hand, the user's
    own lines added below) takes only itself and the retrier's own lines right after it:
    the user's lines further down stay."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        if _bare(lines[i]) != BEGIN:
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and _bare(lines[j]) not in (BEGIN, END):
            j += 1
        if j < len(lines) and _bare(lines[j]) == END:
            i = j + 1
            continue
        i += 1
        while i < len(lines) and _ours(lines[i]):
            i += 1
    return "".join(out)


def _has_block(text: str) -> bool:
    return any(_bare(line) == BEGIN for line in text.splitlines(keepends=True))


def _write_crontab(text: str) -> None:
    got = _run(["crontab", "-"], stdin=text)
    if got.returncode != 0:
        raise TempFailError(f"crontab: {got.stderr.strip() or 'failed'}")


def choose(want: str | None) -> str:
    """The kind to install: ``want`` if it can be, else a user manager, else cron."""
    has_cron = shutil.which("crontab") is not None
    if want == SYSTEMD and not user_manager():
        raise UnavailableError(
            "no systemd user manager runs for this user: use --cron, or log in through"
            " systemd (loginctl enable-linger keeps it running)"
        )
    if want == CRON and not has_cron:
        raise UnavailableError("crontab is not installed: install cron, or use --systemd")
    if want:
        return want
    if user_manager():
        return SYSTEMD
    if has_cron:
        return CRON
    raise UnavailableError(
        "neither a systemd user manager nor crontab is here: run `mailshim daemon` beside the"
        ' application instead (containers: docs/spool.md, "Who retries")'
    )


def install(kind: str, config_path: str | None) -> list[str]:
    """Install the retrier of ``kind``; what was done, in lines for the user."""
    argv = program(config_path)
    env = _environment()
    if kind == CRON:
        _write_crontab(_without_block(_crontab()) + cron_block(argv, env))
        return [
            "retrier: your crontab runs `mailshim run` at boot and every minute"
            " (crontab -l shows it)"
        ]
    folder = unit_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        paths.replace_file(os.path.join(folder, SERVICE), service_text(argv, env).encode(), 0o644)
        paths.replace_file(os.path.join(folder, TIMER), timer_text().encode(), 0o644)
    except OSError as exc:
        raise CantCreateError(f"{folder}: {exc.strerror}") from None
    for step in (["daemon-reload"], ["enable", "--now", TIMER]):
        got = _run(["systemctl", "--user", *step])
        if got.returncode != 0:
            raise TempFailError(f"systemctl --user {' '.join(step)}: {got.stderr.strip()}")
    said = [f"retrier: {TIMER} runs `mailshim run` every minute ({folder})"]
    login = _login()
    if login and not os.path.exists(f"/var/lib/systemd/linger/{login}"):
        said.append(
            "retrier: your user manager runs only while you are logged in; to retry after a"
            f" reboot without a login: loginctl enable-linger {login}"
        )
    return said


def remove() -> list[str]:
    """Remove whichever retrier this user has; what was done."""
    said = []
    folder = unit_dir()
    if os.path.exists(os.path.join(folder, TIMER)):
        if user_manager():
            _run(["systemctl", "--user", "disable", "--now", TIMER])
        for name in (TIMER, SERVICE):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CantCreateError(f"{folder}/{name}: {exc.strerror}") from None
        if user_manager():
            _run(["systemctl", "--user", "daemon-reload"])
        said.append(f"retrier: {TIMER} removed")
    if shutil.which("crontab") is not None:
        now = _crontab()
        if _has_block(now):
            _write_crontab(_without_block(now))
            said.append("retrier: the mailshim lines removed from your crontab")
    return said or ["retrier: none was installed"]


def installed() -> str | None:
    """For ``mailshim check``: this user's retrier, in words, or None. Reads only (no
    crontab is read where crontab is missing)."""
    if os.path.exists(os.path.join(unit_dir(), TIMER)):
        if not user_manager():
            return None  # installed, but nothing runs it now (no login, no lingering)
        state = _run(["systemctl", "--user", "is-active", TIMER]).stdout.strip() or "unknown"
        return f"{TIMER} ({state})" if state == "active" else None
    if shutil.which("crontab") is None:
        return None
    try:
        if _has_block(_crontab()):
            return "your crontab (mailshim retrier)"
    except TempFailError:
        return None
    return None


def _login() -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None
