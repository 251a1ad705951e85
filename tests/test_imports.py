"""The `sendmail` fast path imports only cheap modules (docs/design.md, "The sendmail fast path").

Each test runs the real `sendmail` in a subprocess under ``python -I -X importtime`` and reads
the import tree Python prints. A plain submission (queue or background mode, warm config
cache) must not import any module in FORBIDDEN; the failure names the module and the chain
of modules that imported it. `sendmail -q` and `-bs` talk SMTP and may import more.

The command is ``python -I -c "from mailshim.cli.sendmail import main; ...; main()"`` rather
than the console script: pip's wrapper (older pips) imports ``re`` itself, which would hide
whether mailshim does.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import Env

FORBIDDEN = frozenset(
    {
        "asyncio",
        "aiosmtplib",
        "click",
        "email",
        "typing",
        "dataclasses",
        "re",
        "tomllib",
        "tomli",
        "json",
        "subprocess",
        "socket",  # the config names a domain, so no FQDN lookup is needed
        "platformdirs",
        "enum",
    }
)
CONFIG_PARSERS = frozenset({"tomllib", "tomli"})  # allowed only when the cache is cold

SENDMAIL = "from mailshim.cli.sendmail import main; import sys; sys.argv[0] = 'sendmail'; main()"
CRON = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <root@host> run-parts /etc/cron.daily\n"
    b"\n"
    b"backup done\n"
)


class Row:
    """One ``-X importtime`` line: a module, its nesting depth and the time it took."""

    __slots__ = ("cumulative_us", "depth", "name", "self_us")

    def __init__(self, name: str, self_us: int, cumulative_us: int, depth: int) -> None:
        self.name = name
        self.self_us = self_us
        self.cumulative_us = cumulative_us
        self.depth = depth


def parse_importtime(stderr: bytes) -> list[Row]:
    rows = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative_us, raw = line[len("import time:") :].split("|", 2)
        name = raw.strip()
        depth = (len(raw) - len(raw.lstrip(" ")) - 1) // 2
        rows.append(Row(name, int(self_us), int(cumulative_us), depth))
    return rows


def importers(rows: list[Row], index: int) -> list[str]:
    """The modules whose import caused ``rows[index]``, innermost first.

    importtime prints a module after everything it imported, one level less indented; so the
    importer is the next row below with a smaller depth.
    """
    chain = []
    depth = rows[index].depth
    for row in rows[index + 1 :]:
        if row.depth < depth:
            chain.append(row.name)
            depth = row.depth
            if depth == 0:
                break
    return chain


def offenders(
    rows: list[Row], forbidden: frozenset[str], allowed_under: frozenset[str] = frozenset()
) -> list[str]:
    """Forbidden modules imported, each with who imported it (only the outermost one of a
    chain: ``re`` is reported, not the ``re._parser`` it brings along).

    Interpreter start-up (``site`` and what it pulls in, e.g. from .pth files) is not
    mailshim's doing and is left out, as is whatever a module in ``allowed_under`` imports.
    """
    found = []
    for i, row in enumerate(rows):
        if row.name.split(".")[0] not in forbidden:
            continue
        chain = importers(rows, i)
        tops = {name.split(".")[0] for name in chain}
        if (chain[-1] if chain else row.name) in ("site", "encodings"):
            continue
        if tops & allowed_under or tops & forbidden:
            continue
        if chain:
            found.append(f"{row.name} <- imported by {' <- '.join(chain)}")
        else:
            before = next((r.name for r in reversed(rows[:i]) if r.depth == 0), "start-up")
            found.append(f"{row.name} <- imported at run time (inside a function), after {before}")
    return found


def run_sendmail(world: Env, args: list[str], data: bytes, importtime: bool = True):
    flags = ["-I", "-X", "importtime"] if importtime else ["-I"]
    return subprocess.run(
        [sys.executable, *flags, "-c", SENDMAIL, *args],
        input=data,
        capture_output=True,
        env=world.env,
        timeout=60,
    )


def check_fast_path(
    world: Env, forbidden: frozenset[str], what: str, allowed_under: frozenset[str] = frozenset()
) -> list[Row]:
    result = run_sendmail(world, ["-i", "root"], CRON)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = parse_importtime(result.stderr)
    names = {r.name for r in rows}
    assert "mailshim.submit" in names, "no import tree on stderr: is -X importtime working?"
    bad = offenders(rows, forbidden, allowed_under)
    assert not bad, f"sendmail ({what}) imported forbidden module(s):\n  " + "\n  ".join(bad)
    return rows


def warm_cache(world: Env) -> None:
    result = run_sendmail(world, ["-i", "root"], CRON, importtime=False)
    assert result.returncode == 0, result.stderr


def wait_agent_gone(world: Env, timeout: float = 20.0) -> None:
    """Until no delivery agent holds the spool's agent lock (so the next run starts one)."""
    deadline = time.monotonic() + timeout
    path = world.spool / "agent.lock"
    while time.monotonic() < deadline:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        time.sleep(0.05)
    raise AssertionError("the delivery agent is still running")


def test_queue_mode_submission_imports_only_cheap_modules(world):
    world.reconfigure(mode="queue")
    warm_cache(world)
    check_fast_path(world, FORBIDDEN, "queue mode, warm config cache")
    assert len(world.queued()) == 2  # both runs spooled their message
    assert world.listener.messages == []


def test_background_mode_submission_imports_only_cheap_modules(world):
    world.reconfigure(mode="background")
    warm_cache(world)
    world.listener.wait(1)
    wait_agent_gone(world)  # so that the measured run starts the agent itself
    check_fast_path(world, FORBIDDEN, "background mode, warm config cache")
    msgs = world.listener.wait(2)  # the agent it started delivered the message
    assert all(m.rcpt_tos == ["admin@example.org"] for m in msgs)
    world.wait_queue_empty()


def test_cold_config_cache_adds_only_the_toml_parser(world):
    world.reconfigure(mode="queue")  # a new file: the cache does not know it yet
    # A cache miss parses TOML: tomllib and what it imports (re, typing, ...) are the price.
    check_fast_path(
        world, FORBIDDEN - CONFIG_PARSERS, "queue mode, cold config cache", CONFIG_PARSERS
    )
    # and the run filled the cache: the next one reads no TOML
    check_fast_path(world, FORBIDDEN, "queue mode, right after a cold run")


def test_flush_and_bs_may_import_more(world):
    # -q and -bs talk SMTP (asyncio, aiosmtplib): allowed. This also shows the checker is not
    # blind: on a real run that imports asyncio, it reports it and says who imported it.
    world.reconfigure(mode="queue")
    warm_cache(world)
    assert len(world.queued()) == 1
    flush = run_sendmail(world, ["-q"], b"")
    assert flush.returncode == 0, flush.stderr[-2000:]
    world.listener.wait(1)
    assert world.queued() == []
    reported = offenders(parse_importtime(flush.stderr), FORBIDDEN)
    assert any(line.startswith("asyncio <- ") for line in reported), reported

    world.reconfigure(mode="background")  # -bs then delivers before its final reply
    dialogue = (
        b"EHLO client.example.org\r\n"
        b"MAIL FROM:<app@example.org>\r\n"
        b"RCPT TO:<user@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: via -bs\r\n\r\nhello\r\n.\r\n"
        b"QUIT\r\n"
    )
    bs = run_sendmail(world, ["-bs"], dialogue)
    assert bs.returncode == 0, bs.stderr[-2000:]
    replies = [line[:3] for line in bs.stdout.decode().split("\r\n") if line[3:4] == " "]
    assert replies == ["220", "250", "250", "250", "354", "250", "221"], bs.stdout
    (_, msg) = world.listener.wait(2)
    assert msg.rcpt_tos == ["user@example.net"]


def test_importers_follow_the_indentation():
    # The shape importtime prints: children first, each one level deeper than its importer.
    text = (
        b"import time: self [us] | cumulative | imported package\n"
        b"import time:        10 |         10 |     _sre\n"
        b"import time:        20 |         30 |   re\n"
        b"import time:        30 |         60 | mailshim.address\n"
        b"import time:        40 |         40 | asyncio\n"
    )
    rows = parse_importtime(text)
    assert [(r.name, r.depth) for r in rows] == [
        ("_sre", 2),
        ("re", 1),
        ("mailshim.address", 0),
        ("asyncio", 0),
    ]
    assert offenders(rows, frozenset({"re", "_sre", "asyncio"})) == [
        "re <- imported by mailshim.address",
        "asyncio <- imported at run time (inside a function), after mailshim.address",
    ]


def test_pip_installed_sendmail_is_a_plain_script_that_imports_only_cheap_modules(world, tmp_path):
    """pip and pipx install ``sendmail`` from ``packaging/scripts`` (issue 14 item 4): pip
    points its ``#!python`` at the venv's interpreter and adds nothing, unlike the
    console-script wrapper of pip < 24, which imports ``re`` first. Built as a wheel and
    installed by the pip of a venv made with the system's python3 (pip 23 on bookworm)."""
    source = tmp_path / "source"  # a copy: building in the tree would leave build/ there
    skip = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", "tests")
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns(*skip))
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        capture_output=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("mailshim-*.whl")
    venv = tmp_path / "venv"
    system = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    subprocess.run([system, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)

    for name in ("sendmail", "mailq", "newaliases"):
        with open(venv / "bin" / name, "rb") as fh:
            assert fh.readline().rstrip() == b"#!" + str(venv / "bin" / "python").encode()
    world.reconfigure(mode="queue")
    env = dict(world.env, PYTHONPROFILEIMPORTTIME="1")
    runs = [
        subprocess.run(
            [str(venv / "bin" / "sendmail"), "-i", "root"],
            input=CRON,
            capture_output=True,
            env=env,
            timeout=60,
        )
        for _ in range(2)  # the first one fills the config cache
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    rows = parse_importtime(runs[-1].stderr)
    assert "mailshim.submit" in {r.name for r in rows}
    # re is the one pip's old wrapper brought; everything else, as for -I -c above
    assert not offenders(rows, FORBIDDEN), offenders(rows, FORBIDDEN)
    assert len(world.queued()) == 2


MAILSHIM = "from mailshim.cli.entry import main; import sys; sys.argv[0] = 'mailshim'; main()"


def test_mailshim_run_off_a_terminal_loads_no_click_and_says_the_same(world):
    # What the timer, the path unit and cron start: no click on that path (cli/entry.py);
    # with an option it goes through click, and both print the same summary line.
    warm_cache(world)
    wait_agent_gone(world)
    world.listener.stop()
    for _ in range(2):
        sent = run_sendmail(world, ["-odq", "-i", "root"], CRON, importtime=False)
        assert sent.returncode == 0, sent.stderr
    world.listener.start()
    plain = subprocess.run(
        [sys.executable, "-I", "-X", "importtime", "-c", MAILSHIM, "run"],
        capture_output=True, env=world.env, timeout=60,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    rows = parse_importtime(plain.stderr)
    names = {r.name for r in rows}
    assert "mailshim.runner" in names and "click" not in names
    assert plain.stdout.decode().splitlines()[-1] == "2 delivered."
    sent = run_sendmail(world, ["-odq", "-i", "root"], CRON, importtime=False)
    assert sent.returncode == 0, sent.stderr
    clicked = subprocess.run(
        [sys.executable, "-I", "-X", "importtime", "-c", MAILSHIM, "-C", str(world.config), "run"],
        capture_output=True, env=world.env, timeout=60,
    )  # fmt: skip
    assert clicked.returncode == 0, clicked.stderr[-2000:]
    assert "click" in {r.name for r in parse_importtime(clicked.stderr)}
    assert clicked.stdout.decode().splitlines()[-1] == "1 delivered."
