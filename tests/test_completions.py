"""Shell completions: each file is loaded in its real shell and asked what it completes.

bash: the completion function is called with COMP_WORDS/COMP_CWORD set, COMPREPLY printed.
zsh: an interactive ``zsh -f`` on a pseudo-terminal with compinit; ``compadd`` is wrapped to
record the matches it adds, and TAB is bound to a widget that marks the end of completion.
fish: ``complete -C``.

Queue ids come from a stub ``mailshim`` put first on PATH for these tests only, which records
how it was called. The flag lists are also checked against the real parser (``mailshim.argv``),
the admin command (when it exists) and sendmail(8).
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPLETIONS = ROOT / "completions"
MAN = ROOT / "man"

QUEUE_IDS = ["18F2C0A1B3D4E5F6G7H8", "18F2C0A1B3D4E5F6G7H9", "2A00000000000000ZZZZ"]

MODES = {"-bm", "-bp", "-bi", "-bv", "-bs"}
O_FLAGS = {"-oi", "-odb", "-odi", "-odq", "-oem", "-oee"}
# Every flag the completions offer for `sendmail -`, in all three shells.
FLAGS = MODES | O_FLAGS | {
    "-t", "-i", "-f", "-r", "-F", "-C", "-v", "-q", "-I", "-O",
    "-B", "-N", "-R", "-V", "-X", "-L", "-h", "--",
}  # fmt: skip
# Flags whose argument follows; the value used to check them against the parser.
FLAG_ARGS = {
    "-f": "alice@example.org",
    "-r": "alice@example.org",
    "-F": "Cron Daemon",
    "-C": "/etc/mailshim/config.toml",
    "-O": "IgnoreDots=true",
    "-B": "8BITMIME",
    "-N": "never",
    "-R": "hdrs",
    "-V": "envid",
    "-X": "/dev/null",
    "-L": "tag",
    "-h": "1",
}
COMMANDS = {
    "config", "check", "send-test", "flush", "run", "daemon", "queue", "log", "sink",
    "setup-spool", "metrics", "check-queue", "retrier",
}  # fmt: skip
RETRIER_ACTIONS = {"install", "remove"}
ACTIONS = {"list", "show", "delete", "hold", "release", "retry", "requeue", "shape"}


# --- the shells ------------------------------------------------------------------------


def _need(shell: str) -> str:
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} not installed (CI installs it)")
    return path


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A folder to complete file names in, and a stub `mailshim` on PATH."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "mailshim.toml").write_text("")
    (tmp_path / "files" / "other.conf").write_text("")
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    stub = stub_bin / "mailshim"
    ids = "\\n".join(QUEUE_IDS)
    stub.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> "{tmp_path}/stub-calls"\n'
        'if [ "$1" = queue ] && [ "$2" = --ids ]; then\n'
        f'  printf "{ids}\\n"\n'
        "  exit 0\n"
        "fi\n"
        "exit 64\n"
    )
    stub.chmod(0o755)
    return tmp_path


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASH_", "ZDOTDIR"))}
    env["PATH"] = f"{workdir / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(workdir)
    env["XDG_CONFIG_HOME"] = str(workdir / "config")
    env["XDG_DATA_HOME"] = str(workdir / "data")
    env["XDG_CACHE_HOME"] = str(workdir / "cache")
    env["TERM"] = "xterm"
    return env


def _words(line: str) -> list[str]:
    words = line.split()
    if line.endswith(" "):
        words.append("")
    return words


BASH_DRIVER = r"""
source "$1"; shift
spec=$(complete -p "$1") || exit 3
fn=${spec#*-F }; fn=${fn%% *}
COMP_WORDS=("$@")
COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$fn" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def bash_complete(workdir: Path, line: str) -> set[str]:
    bash = _need("bash")
    words = _words(line)
    script = COMPLETIONS / f"{words[0]}.bash"
    proc = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", str(script), *words],
        cwd=workdir / "files",
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return {w for w in proc.stdout.split("\n") if w}


def fish_complete(workdir: Path, line: str) -> set[str]:
    fish = _need("fish")
    command = _words(line)[0]
    proc = subprocess.run(
        [
            fish,
            "--no-config",
            "-c",
            "source $argv[1]; complete -C $argv[2]",
            str(COMPLETIONS / f"{command}.fish"),
            line,
        ],
        cwd=workdir / "files",
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return {w.split("\t", 1)[0] for w in proc.stdout.split("\n") if w}


# Sourced by an interactive `zsh -f`: compinit with our folder first in fpath; compadd
# records what it adds (calls that only ask, with -O/-A/-D, are passed through); TAB runs
# the completion and then writes a marker.
ZSH_SETUP = r"""
fpath=(%(completions)s $fpath)
autoload -Uz compinit
compinit -u -D
__cap_asks() {
  local a
  while (( $# )); do
    a=$1; shift
    case $a in
      --) return 1 ;;
      -[OAD]*) return 0 ;;
      -[PSpsiIWdJVXxrRMFE]) shift ;;
      -*) ;;
      *) return 1 ;;
    esac
  done
  return 1
}
compadd() {
  if __cap_asks "$@"; then
    builtin compadd "$@"
    return
  fi
  local -a __hits
  builtin compadd -O __hits "$@"
  (( $#__hits )) && print -rl -- "${__hits[@]}" >> %(capture)s
  builtin compadd "$@"
}
__cap_widget() {
  _main_complete
  print -r -- __DONE__ >> %(capture)s
}
zle -C __cap complete-word __cap_widget
bindkey '^I' __cap
print -r -- __READY__ >> %(capture)s
"""


def _wait_for(master: int, path: Path, marker: str, limit: float = 60.0) -> None:
    """Drain the terminal until ``marker`` appears in ``path``; a hang fails, not a timing."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            try:
                os.read(master, 65536)
            except OSError:
                pass
        if path.exists() and marker in path.read_text():
            return
    raise AssertionError(f"zsh never wrote {marker}; captured: {path.read_text()!r}")


def zsh_complete(workdir: Path, line: str) -> set[str]:
    zsh = _need("zsh")
    capture = workdir / "zsh-capture"
    capture.unlink(missing_ok=True)
    setup = workdir / "setup.zsh"
    setup.write_text(ZSH_SETUP % {"completions": COMPLETIONS, "capture": capture})
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [zsh, "-f", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=workdir / "files",
        env=_env(workdir),
        start_new_session=True,
    )
    os.close(slave)
    try:
        os.write(master, f"source {setup}\n".encode())
        _wait_for(master, capture, "__READY__")
        os.write(master, line.encode() + b"\t")
        _wait_for(master, capture, "__DONE__")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(master)
    lines = capture.read_text().split("\n")
    return {w for w in lines if w and not w.startswith("__")}


SHELLS = {"bash": bash_complete, "zsh": zsh_complete, "fish": fish_complete}


# --- what each shell completes ---------------------------------------------------------


def _plain(words: set[str]) -> set[str]:
    """Drop what one shell shows and another keeps: an attached -C, a comma list's head."""
    out = set()
    for w in words:
        w = w.rsplit(",", 1)[-1]
        if w.startswith("-C") and len(w) > 2:
            w = w[2:]
        out.add(w)
    return out


CASES = [
    # line, expected, exact?
    ("sendmail -b", MODES, True),
    ("sendmail -o", O_FLAGS, True),
    ("sendmail -od", {"-odb", "-odi", "-odq"}, True),
    ("sendmail -", FLAGS, True),
    ("sendmail -C mail", {"mailshim.toml"}, True),
    ("sendmail -Cmail", {"mailshim.toml"}, True),
    ("sendmail -t -i -C oth", {"other.conf"}, True),
    ("sendmail -B ", {"7BIT", "8BITMIME"}, True),
    ("sendmail ro", {"root"}, False),
    ("sendmail alice,ro", {"root"}, False),
    ("sendmail -f ro", {"root"}, False),
    ("sendmail -FCronDaemon -i -B8BITMIME -oem ro", {"root"}, False),
    ("mailshim ", COMMANDS, True),
    ("mailshim queue ", ACTIONS, True),
    ("mailshim queue show ", set(QUEUE_IDS), True),
    ("mailshim queue hold 18F", set(QUEUE_IDS[:2]), True),
    ("mailshim queue retry --a", {"--all"}, True),
    ("mailshim log ", set(QUEUE_IDS), True),
    ("mailshim check --", {"--rcpt", "--json"}, False),
    ("mailshim sink --", {"--host", "--port", "--dir"}, False),
    ("mailshim retrier ", RETRIER_ACTIONS, True),
    ("mailshim retrier install --", {"--systemd", "--cron"}, False),
]


@pytest.mark.parametrize("shell", sorted(SHELLS))
@pytest.mark.parametrize(("line", "expected", "exact"), CASES, ids=[c[0] for c in CASES])
def test_completes(shell: str, line: str, expected: set[str], exact: bool, workdir: Path) -> None:
    got = _plain(SHELLS[shell](workdir, line))
    if exact:
        assert got == expected
    else:
        assert expected <= got, f"missing {expected - got} in {sorted(got)}"


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_queue_ids_come_from_mailshim_queue_ids(shell: str, workdir: Path) -> None:
    SHELLS[shell](workdir, "mailshim queue delete ")
    calls = (workdir / "stub-calls").read_text().split("\n")
    assert "queue --ids" in calls


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_no_queue_ids_when_mailshim_fails(shell: str, workdir: Path) -> None:
    stub = workdir / "bin" / "mailshim"
    stub.write_text("#!/bin/sh\necho 'mailshim: spool unreadable' >&2\nexit 77\n")
    assert SHELLS[shell](workdir, "mailshim log ") == set()


# --- the lists against the programs they describe --------------------------------------


def _parse(args: list[str]) -> None:
    argv = pytest.importorskip("mailshim.argv")
    argv.parse(args)


@pytest.mark.parametrize("flag", sorted(FLAGS - {"--"}))
def test_offered_flag_is_accepted_by_the_parser(flag: str) -> None:
    args = [flag, FLAG_ARGS[flag]] if flag in FLAG_ARGS else [flag]
    _parse([*args, "root"])


def test_ignored_flags_do_not_eat_recipients() -> None:
    argv = pytest.importorskip("mailshim.argv")
    for flag, value in FLAG_ARGS.items():
        if flag in ("-f", "-r", "-F", "-C", "-O"):
            continue
        inv = argv.parse([flag, value, "root"])
        assert inv.recipients == ["root"], flag


def test_offered_flags_are_documented() -> None:
    page = (MAN / "sendmail.8").read_text()
    text = page.replace("\\-", "-")
    for flag in FLAGS - {"--"}:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w])", text), flag


def _admin_cli() -> Any:
    admin = pytest.importorskip("mailshim.cli.admin", reason="mailshim.cli.admin not written yet")
    import click

    group = admin.cli
    assert isinstance(group, click.Group)
    return group


def _visible(group: Any) -> set[str]:
    return {name for name, cmd in group.commands.items() if not cmd.hidden}


def _long_options(command: Any) -> set[str]:
    import click

    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return names


def test_commands_match_the_admin_cli() -> None:
    group = _admin_cli()
    assert _visible(group) == COMMANDS
    assert _visible(group.commands["queue"]) == ACTIONS
    assert _visible(group.commands["retrier"]) == RETRIER_ACTIONS


def test_options_match_the_admin_cli(workdir: Path) -> None:
    group = _admin_cli()
    import click

    paths: list[tuple[str, object]] = [("", group)]
    for name, command in group.commands.items():
        if command.hidden or name not in COMMANDS:
            continue
        paths.append((name, command))
        if isinstance(command, click.Group):
            for sub, subcommand in command.commands.items():
                if not subcommand.hidden and sub in ACTIONS | RETRIER_ACTIONS:
                    paths.append((f"{name} {sub}", subcommand))
    wrong = {}
    for path, command in paths:
        line = f"mailshim {path} --".replace("  ", " ")
        got = {w for w in bash_complete(workdir, line) if w.startswith("--")}
        want = _long_options(command)
        if path == "check-queue":  # click hands its words to its own parser (exit codes 0-3)
            from mailshim.cli import checkqueue

            want = {o for a in checkqueue.parser()._actions for o in a.option_strings}
            want = {o for o in want if o.startswith("--")}
        if got != want:
            wrong[path or "(global)"] = {"completed": sorted(got), "click": sorted(want)}
    assert not wrong


@pytest.mark.parametrize(
    "name", ["sendmail.bash", "mailshim.bash", "_sendmail", "_mailshim", "sendmail.fish",
             "mailshim.fish"],
)  # fmt: skip
def test_file_names_its_command(name: str) -> None:
    text = (COMPLETIONS / name).read_text()
    command = "sendmail" if "sendmail" in name else "mailshim"
    if name.startswith("_"):
        assert text.startswith(f"#compdef {command}")
    elif name.endswith(".bash"):
        assert re.search(rf"^complete -F \w+ {command}\b", text, re.M)
    else:
        assert f"complete -c {command}" in text
