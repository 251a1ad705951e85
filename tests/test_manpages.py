"""Man pages: mandoc finds nothing to say, and they document what the programs accept.

The flag, key and exit-code lists are checked against the programs themselves where they
exist (``mailshim.argv``, ``mailshim.config``, ``mailshim.errors``), so a flag or key added
to the code without a line in the man page fails here.
"""

from __future__ import annotations

import re
import shutil
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = sorted(p for p in MAN.iterdir() if re.fullmatch(r".+\.[1-8]", p.name))

SENDMAIL_FLAGS = [
    "-t", "-i", "-oi", "-f", "-r", "-F", "-bm", "-bp", "-bi", "-bv", "-bs", "-q", "-qR", "-qS",
    "-qI", "-v", "-C", "-odi", "-odb", "-odq", "-d", "-B", "-N", "-R", "-V", "-X", "-L", "-h",
    "-O", "-G", "-U", "-n", "-m", "-x", "-oem", "-oee", "-I", "--",
]  # fmt: skip
CONFIG_KEYS = {
    "relay": [
        "host", "port", "socket", "tls", "verify", "ca_file", "username", "password_file",
        "timeout", "helo", "protocol", "name", "retry_after_failure",
    ],
    "addresses": ["domain", "sender", "aliases_file", "from_header", "qualify_headers"],
    "queue": ["dir", "retry", "lifetime", "warn_after", "keep_dead"],
    "delivery": ["mode"],
    "submission": ["max_size", "max_recipients", "trusted_users", "helo"],
    "limits": ["user_spool_entries", "user_spool_bytes", "user_round_bytes"],
    "log": ["file"],
    "monitoring": ["textfile_dir"],
}  # fmt: skip
EXIT_CODES = [0, 64, 65, 66, 67, 69, 70, 71, 73, 74, 75, 77, 78]
REQUIRED_SECTIONS = [
    "NAME", "SYNOPSIS", "DESCRIPTION", "SECURITY", "EXIT STATUS", "ENVIRONMENT", "FILES",
    "SEE ALSO",
]  # fmt: skip
ADMIN_COMMANDS = [
    "config", "check", "send-test", "flush", "daemon", "queue", "log", "sink", "setup-spool",
    "metrics", "check-queue",
]  # fmt: skip
QUEUE_ACTIONS = ["list", "show", "delete", "hold", "release", "retry"]


def _text(name: str) -> str:
    """The page's source with roff's escaped hyphens made plain."""
    return (MAN / name).read_text().replace("\\-", "-")


def _sections(name: str) -> dict[str, str]:
    parts = re.split(r"^\.SH (.+)$", (MAN / name).read_text(), flags=re.M)
    return {title.strip('"'): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_pages_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"sendmail.8", "mailshim.8", "mailshim.toml.5", "mailq.1", "newaliases.1"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_mandoc_lint_is_silent(page: Path) -> None:
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        pytest.skip("mandoc not installed (CI installs it: apt-get install mandoc)")
    proc = subprocess.run(
        [mandoc, "-Tlint", "-W", "all", page.name],
        cwd=MAN,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout + proc.stderr == ""
    assert proc.returncode == 0


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_title_matches_file_name(page: Path) -> None:
    name, section = page.name.rsplit(".", 1)
    first = re.search(r"^\.TH (\S+) (\S+)", page.read_text(), re.M)
    assert first is not None
    assert first.group(1) == name.upper()
    assert first.group(2) == section


@pytest.mark.parametrize("name", ["sendmail.8", "mailshim.8", "mailshim.toml.5"])
def test_required_sections(name: str) -> None:
    assert [s for s in REQUIRED_SECTIONS if s not in _sections(name)] == []


@pytest.mark.parametrize("flag", SENDMAIL_FLAGS)
def test_sendmail_flag_documented(flag: str) -> None:
    assert _mentions(_text("sendmail.8"), flag) or re.search(
        rf"\.BI? {re.escape(flag)}", _text("sendmail.8")
    ), flag


def test_every_letter_the_parser_knows_is_documented() -> None:
    argv = pytest.importorskip("mailshim.argv")
    errors = pytest.importorskip("mailshim.errors")
    text = _text("sendmail.8")
    known = []
    for letter in string.ascii_letters:
        try:
            argv.parse([f"-{letter}x", "root"])
        except errors.UsageError as exc:
            if f"unknown option -{letter}" in exc.message:
                continue
        known.append(letter)
    assert len(known) > 20
    undocumented = [f"-{c}" for c in known if not re.search(rf"-{c}(?![\w-])|-{c}\w", text)]
    assert undocumented == []


def test_unknown_letters_are_not_documented_as_accepted() -> None:
    argv = pytest.importorskip("mailshim.argv")
    errors = pytest.importorskip("mailshim.errors")
    options = _sections("sendmail.8")["OPTIONS"].replace("\\-", "-")
    for tag in re.findall(r"^\.(?:TP|TQ)\n\.BI? -(\w)", options, re.M):
        try:
            argv.parse([f"-{tag}x", "root"])
        except errors.UsageError as exc:
            assert f"unknown option -{tag}" not in exc.message


@pytest.mark.parametrize("code", EXIT_CODES)
def test_exit_code_documented(code: int) -> None:
    assert re.search(rf"^\.B {code}$", _sections("sendmail.8")["EXIT STATUS"], re.M)


def test_every_sysexits_code_of_the_program_is_documented() -> None:
    errors = pytest.importorskip("mailshim.errors")
    codes = {v for k, v in vars(errors).items() if k.startswith("EX_") and isinstance(v, int)}
    status = _sections("sendmail.8")["EXIT STATUS"]
    assert sorted(c for c in codes if not re.search(rf"^\.B {c}$", status, re.M)) == []


def _key_documented(text: str, section: str, key: str) -> bool:
    """The key is a .TP tag inside the page's section for its table."""
    parts = text.split(f".SH THE [{section}] TABLE", 1)
    if len(parts) != 2:
        return False
    body = parts[1].split("\n.SH ", 1)[0]
    return re.search(rf"^\.TP\n\.B {re.escape(key)}$", body, re.M) is not None


@pytest.mark.parametrize(
    ("section", "key"), [(s, k) for s, keys in CONFIG_KEYS.items() for k in keys]
)
def test_config_key_documented(section: str, key: str) -> None:
    assert _key_documented((MAN / "mailshim.toml.5").read_text(), section, key)


def _known_keys(config: Any, tmp_path: Path, section: str) -> list[str]:
    """The keys the parser accepts, from its own "unknown key" warning."""
    path = tmp_path / f"{section}.toml"
    path.write_text(f"[{section}]\nzz_not_a_key = 1\n")
    warnings = config.load(str(path), use_cache=False).warnings
    assert len(warnings) == 1, warnings
    found = re.search(r"unknown key 'zz_not_a_key' ignored \(known: ([^)]*)\)", warnings[0])
    assert found is not None, warnings[0]
    return [k.strip() for k in found.group(1).split(",")]


def test_every_key_the_parser_knows_is_documented(tmp_path: Path) -> None:
    config = pytest.importorskip("mailshim.configload")
    page = (MAN / "mailshim.toml.5").read_text()
    missing = []
    for section in CONFIG_KEYS:
        for key in _known_keys(config, tmp_path, section):
            if not _key_documented(page, section, key):
                missing.append(f"{section}.{key}")
    assert missing == []
    assert "[aliases]" in page


def test_stalwart_local_listener_examples() -> None:
    for name in ("mailshim.toml.5", "mailshim.8"):
        text = _text(name)
        for needle in ("127.0.0.1:10025", "useTls", "false", "allowRelaying", "MtaStageAuth"):
            assert needle in text, (name, needle)
        assert "listener == \\(aqlocal\\(aq" in text, name
    toml = _text("mailshim.toml.5")
    for needle in ("[server.listener.local]", "[session.auth]", "[session.rcpt]", "0.15", "0.16"):
        assert needle in toml, needle


def test_admin_commands_documented() -> None:
    commands = _sections("mailshim.8")["COMMANDS"].replace("\\-", "-")
    for command in ADMIN_COMMANDS:
        assert re.search(rf"^\.B {re.escape(command)}\b", commands, re.M), command
    for action in QUEUE_ACTIONS:
        assert re.search(rf"(queue |\\fB|\.B ){action}\b", commands), action


def test_shipped_config_is_valid_and_documented(tmp_path: Path) -> None:
    shipped = ROOT / "packaging" / "config.toml"
    text = shipped.read_text()
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    tomllib.loads(text)
    # Every key the file mentions (commented out or not) is a documented key.
    uncommented = "\n".join(re.sub(r"^#\s?", "", line) for line in text.splitlines())
    section = None
    page = (MAN / "mailshim.toml.5").read_text()
    seen = set()
    for line in uncommented.splitlines():
        head = re.match(r"^\[\[?(\w+)\]\]?\s*$", line)
        if head:
            section = head.group(1)
            continue
        key = re.match(r"^(\w+)\s*=", line)
        if key and section and section != "aliases":
            seen.add((section, key.group(1)))
            assert _key_documented(page, section, key.group(1)), (section, key.group(1))
    assert {(s, k) for s, keys in CONFIG_KEYS.items() for k in keys} <= seen
    config = pytest.importorskip("mailshim.configload")
    config.load(str(shipped), use_cache=False)
