"""The sendmail command line, as real callers write it."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailshim import argv
from mailshim.errors import UsageError


def parse(line: str, prog: str = "sendmail") -> argv.Invocation:
    return argv.parse(line.split(), prog)


def test_debian_cron():
    inv = parse("-FCronDaemon -i -B8BITMIME -oem root")
    assert inv.full_name == "CronDaemon"
    assert inv.dot_ends is False
    assert inv.recipients == ["root"]
    assert inv.action == "submit" and not inv.extract


def test_cronie():
    inv = parse("-FCronDaemon -i -odi -oem -oi -t -f root")
    assert inv.extract and inv.delivery == "interactive" and inv.sender == "root"
    assert inv.recipients == []


def test_phpmailer_duplicate_t_and_attached_f():
    inv = parse("-oi -fwebmaster@example.org -t -t")
    assert inv.sender == "webmaster@example.org" and inv.extract and not inv.dot_ends


def test_mutt_double_dash():
    inv = argv.parse(["-oem", "-oi", "--", "a@x.org", "-weird@x.org"])
    assert inv.recipients == ["a@x.org", "-weird@x.org"]


def test_fail2ban_separate_f_without_i():
    inv = argv.parse(["-f", "fail2ban@host", "admin@example.org"])
    assert inv.sender == "fail2ban@host" and inv.recipients == ["admin@example.org"]
    assert inv.dot_ends is True


def test_separate_arguments_never_become_recipients():
    inv = parse("-B 8BITMIME -N never -R hdrs -V envid -X /tmp/log -L tag -h 17 -O Foo=bar root")
    assert inv.recipients == ["root"]


def test_grouped_flags_and_options_after_recipients():
    inv = parse("root -ti -f sender@x.org")
    assert inv.extract and not inv.dot_ends and inv.sender == "sender@x.org"
    assert inv.recipients == ["root"]


def test_grouped_flag_then_argument_letter():
    inv = argv.parse(["-tf", "me@x.org"])
    assert inv.extract and inv.sender == "me@x.org"


def test_null_sender():
    assert parse("-f <> root").sender == "<>"


def test_comma_list_stays_one_word():
    assert parse("a@x.org,b@y.org").recipients == ["a@x.org,b@y.org"]


@pytest.mark.parametrize(
    ("line", "action"),
    [
        ("-bm root", "submit"),
        ("-bp", "list"),
        ("-bi", "aliases"),
        ("-I", "aliases"),
        ("-bv root", "verify"),
        ("-bs", "smtp"),
        ("-q", "flush"),
        ("-qRexample.org", "flush"),
        ("-q30m", "nothing"),
    ],
)
def test_modes(line, action):
    assert parse(line).action == action


def test_q_with_id_filters():
    inv = parse("-qI0123456789ABCDEFGHIJ")
    assert inv.action == "flush" and inv.queue_filter == "0123456789ABCDEFGHIJ"


def test_program_name_selects_mode():
    assert argv.parse([], "/usr/bin/mailq").action == "list"
    assert argv.parse([], "newaliases").action == "aliases"


@pytest.mark.parametrize(
    ("flag", "mode"), [("-odi", "interactive"), ("-odb", "background"), ("-odq", "queue")]
)
def test_delivery_modes(flag, mode):
    assert parse(f"{flag} root").delivery == mode


def test_verbose_and_config():
    inv = parse("-v -C /etc/other.toml root")
    assert inv.verbose and inv.config_path == "/etc/other.toml"


@pytest.mark.parametrize(
    "flag", ["-G", "-U", "-n", "-m", "-x", "-c", "-oem", "-oee", "-om", "-d0.1"]
)
def test_legacy_flags_are_ignored(flag):
    inv = parse(f"{flag} root")
    assert inv.recipients == ["root"] and inv.action == "submit"


def test_unknown_flag_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="-W"):
        parse("-W root")


def test_unknown_letter_names_the_word_and_where_to_look():
    with pytest.raises(UsageError) as info:
        parse("-tZ root")
    assert "-Z in '-tZ'" in info.value.message
    assert "man sendmail" in info.value.message and "mailshim --help" in info.value.message


@pytest.mark.parametrize(
    ("word", "pointer"),
    [
        ("--help", "man sendmail"),
        ("--version", "mailshim --version"),
        ("--verbose", "man sendmail"),
        ("--from=alice", "man sendmail"),
    ],
)
def test_long_options_name_the_word(word, pointer):
    with pytest.raises(UsageError) as info:
        argv.parse([word, "root"])
    assert word in info.value.message and pointer in info.value.message
    assert "unknown option --:" not in info.value.message


def test_long_options_after_double_dash_are_recipients():
    assert argv.parse(["--", "--help"]).recipients == ["--help"]


@pytest.mark.parametrize("word", ["--help", "--version"])
def test_real_sendmail_help_and_version(tmp_path, word):
    from conftest import tool

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MAILSHIM_NO_SYSLOG": "1"}
    env["MAILSHIM_CONFIG"] = str(tmp_path / "none.toml")
    proc = subprocess.run(
        [tool("sendmail"), word], input=b"", capture_output=True, env=env, timeout=30
    )
    assert proc.returncode == 64
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sendmail: {word} ")
    assert "mailshim --" in lines[0] and "Traceback" not in proc.stderr.decode()


def test_missing_argument():
    with pytest.raises(UsageError, match="-f needs an argument"):
        parse("root -f")


@pytest.mark.parametrize("mode", ["-bd", "-bt", "-bz"])
def test_unsupported_modes_say_why(mode):
    with pytest.raises(UsageError):
        parse(mode)


@pytest.mark.parametrize(
    "args",
    [["-f", "a@b\r\nBcc: victim@x"], ["-F", "Name\nX-Evil: 1"], ["root\nBcc: x"], ["--", "a\x00b"]],
)
def test_injection_is_refused(args):
    with pytest.raises(UsageError, match="refused"):
        argv.parse(args)


@given(st.lists(st.text(max_size=12), max_size=8))
def test_never_crashes(words):
    try:
        inv = argv.parse(words)
    except UsageError:
        return
    assert inv.action in {"submit", "list", "aliases", "verify", "smtp", "flush", "nothing"}
    assert all("\n" not in r and "\r" not in r for r in inv.recipients)
