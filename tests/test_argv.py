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


# --- what a bare command line leaves as it is (each default is a promise to the caller) -----


def test_defaults_of_a_plain_submission():
    inv = parse("root")
    assert inv.sender is None  # no -f: the sender is the caller's own address, not <>
    assert inv.sender != ""
    assert inv.verbose is False and inv.extract is False and inv.dot_ends is True
    assert inv.action == "submit" and inv.recipients == ["root"]
    assert (inv.full_name, inv.config_path, inv.delivery, inv.queue_filter) == (None,) * 4
    assert inv.ignored == []


# --- -O long options: IgnoreDots and DeliveryMode are obeyed, others ignored -----------------


@pytest.mark.parametrize(
    ("word", "dot_ends"),
    [
        ("-OIgnoreDots", False),
        ("-OIgnoreDots=True", False),
        ("-O IgnoreDots=t", False),
        ("-OIgnoreDots=y", False),
        ("-OIgnoreDots=yes", False),
        ("-Oignoredots=1", False),
        ("-OIgnoreDots=False", True),
        ("-OIgnoreDots=no", True),
        ("-OIgnoreDots=0", True),
    ],
)
def test_ignore_dots_long_option(word, dot_ends):
    """A lone "." cuts the message short unless dots are ignored: the long form is -oi."""
    inv = parse(f"{word} root")
    assert inv.dot_ends is dot_ends and inv.recipients == ["root"]
    assert inv.ignored == []


def test_ignore_dots_false_undoes_an_earlier_i():
    assert parse("-i -OIgnoreDots=false root").dot_ends is True
    assert parse("-OIgnoreDots=false -i root").dot_ends is False


@pytest.mark.parametrize(
    ("word", "delivery"),
    [
        ("-ODeliveryMode=i", "interactive"),
        ("-ODeliveryMode=interactive", "interactive"),
        ("-O DeliveryMode=b", "background"),
        ("-ODeliveryMode=Background", "background"),
        ("-Odeliverymode=q", "queue"),
        ("-ODeliveryMode=d", "queue"),
    ],
)
def test_delivery_mode_long_option(word, delivery):
    inv = parse(f"{word} root")
    assert inv.delivery == delivery and inv.ignored == []


@pytest.mark.parametrize("word", ["-ODeliveryMode=x", "-ODeliveryMode=", "-OFoo=bar", "-OMaxHops"])
def test_other_long_options_are_ignored_and_kept_as_written(word):
    inv = parse(f"{word} root")
    assert inv.delivery is None and inv.dot_ends is True
    assert inv.ignored == [word] and inv.recipients == ["root"]


def test_long_option_spaces_around_the_name_and_value_are_dropped():
    assert argv.parse(["-O", " IgnoreDots = true ", "root"]).dot_ends is False
    assert argv.parse(["-O", " DeliveryMode = i ", "root"]).delivery == "interactive"


def test_long_option_as_a_separate_word_is_kept_whole():
    inv = argv.parse(["-O", "DeliveryMode=b", "-O", "Timeout.queuereturn=5d", "root"])
    assert inv.delivery == "background"
    assert inv.ignored == ["-OTimeout.queuereturn=5d"]


# --- what is ignored is recorded as written (mailshim logs it) -------------------------------


def test_ignored_options_are_recorded_with_their_arguments():
    inv = parse("-G -B8BITMIME -oem -odx -N never -d0.1 -q30m root")
    assert inv.ignored == ["-G", "-B8BITMIME", "-oem", "-odx", "-Nnever", "-d0.1", "-q30m"]
    assert inv.delivery is None and inv.action == "nothing"


@pytest.mark.parametrize("letter", list("GUcmnx"))
def test_each_legacy_flag_is_recorded(letter):
    assert parse(f"-{letter} root").ignored == [f"-{letter}"]


def test_o_options_that_look_like_delivery_modes():
    assert parse("-od root").delivery is None and parse("-od root").ignored == ["-od"]
    assert parse("-odd root").delivery == "queue"
    assert parse("-odbackground root").delivery == "background"  # the first letter counts
    assert parse("-oi root").dot_ends is False and parse("-oi root").ignored == []
    assert parse("-oix root").dot_ends is True and parse("-oix root").ignored == ["-oix"]


# --- the sender, the queue filter, the lone dash ---------------------------------------------


def test_r_is_the_old_spelling_of_f():
    assert parse("-r me@x.org root").sender == "me@x.org"
    assert parse("-rme@x.org root").sender == "me@x.org"


def test_a_lone_dash_is_neither_an_option_nor_a_recipient():
    inv = argv.parse(["-", "root", "-"])
    assert inv.recipients == ["root"] and inv.ignored == []


@pytest.mark.parametrize(
    ("line", "action", "queue_filter"),
    [
        ("-qI", "flush", None),
        ("-qIABC", "flush", "ABC"),
        ("-qSexample.org", "flush", None),
        ("-qR", "flush", None),
        ("-q", "flush", None),
        ("-q1h", "nothing", None),
        ("-qXyz", "nothing", None),
    ],
)
def test_queue_runs(line, action, queue_filter):
    inv = parse(line)
    assert (inv.action, inv.queue_filter) == (action, queue_filter)


def test_q_takes_only_an_attached_argument():
    inv = parse("-q root")
    assert inv.action == "flush" and inv.recipients == ["root"]


def test_d_takes_only_an_attached_argument_and_ends_the_word():
    inv = parse("-d0.1t root")
    assert inv.ignored == ["-d0.1t"] and not inv.extract


# --- the messages a user reads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "a\rb"], "the sender (-f) contains a CR character: refused (header injection)"),
        (["-r", "a\nb"], "the sender (-r) contains a LF character"),
        (["-F", "a\x00b"], "the full name (-F) contains a NUL character"),
        (["-C", "/etc/x\n"], "the configuration file (-C) contains a LF character"),
        (["root\r"], "a recipient contains a CR character"),
        (["--", "a\x00"], "a recipient contains a NUL character"),
    ],
)
def test_injection_messages_name_the_field_and_the_character(args, message):
    with pytest.raises(UsageError) as info:
        argv.parse(args)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("-bd", "run `mailshim daemon`"),
        ("-bD", "run `mailshim daemon`"),
        ("-bt", "use -bv"),
        ("-ba", "use -bs"),
        ("-bh", "-bh"),
        ("-bH", "-bH"),
        ("-bP", "mailshim config"),
        ("-bz", "unknown mode -bz (known: -bm -bp -bi -bv -bs)"),
        ("-bsx", "unknown mode -bsx"),
        ("-bdx", "run `mailshim daemon`"),  # the mode is its first letter
    ],
)
def test_unsupported_modes_name_what_to_do_instead(mode, says):
    with pytest.raises(UsageError) as info:
        parse(mode)
    assert says in info.value.message


def test_unknown_letter_alone_is_named_without_its_word():
    with pytest.raises(UsageError) as info:
        parse("-W root")
    assert info.value.message.startswith("unknown option -W: ")
    assert " in " not in info.value.message.split(":")[0]


def test_missing_argument_names_the_letter():
    for line, letter in (("root -f", "f"), ("-F", "F"), ("-C", "C"), ("-tb", "b")):
        with pytest.raises(UsageError) as info:
            parse(line)
        assert info.value.message == f"option -{letter} needs an argument"


def test_long_words_in_messages_are_shortened_and_printable():
    long = "--" + "x" * 60
    with pytest.raises(UsageError) as info:
        argv.parse([long])
    assert long not in info.value.message and repr(long[:40]) in info.value.message
    with pytest.raises(UsageError) as info:
        argv.parse(["--a\x1bb"])
    assert "'--a\\x1bb'" in info.value.message and "\x1b" not in info.value.message
    over = "--" + "z" * 39  # 41 characters: shortened
    with pytest.raises(UsageError) as info:
        argv.parse([over])
    assert repr(over[:40]) in info.value.message
    exact = "--" + "y" * 38  # 40 characters: shown as written
    with pytest.raises(UsageError) as info:
        argv.parse([exact])
    assert f"unknown option {exact} (sendmail takes single-letter options)" in info.value.message


def test_help_and_version_with_a_value_are_still_recognised():
    with pytest.raises(UsageError) as info:
        argv.parse(["--version=1"])
    assert "`mailshim --version` prints the version" in info.value.message
    with pytest.raises(UsageError) as info:
        argv.parse(["--help=all"])
    assert info.value.message.startswith("--help=all is not a sendmail option: `man sendmail`")
