"""Parse a sendmail command line the way real callers write it (Postfix sendmail(1) semantics).

Callers write ``-FCronDaemon -i -B8BITMIME -oem root``, ``-oi -fX -t -t``, ``-f sender rcpt``,
``-ti``, ``-- rcpt`` and options after recipients. getopt rules apply to each word: letters may
be grouped, and a letter that takes an argument takes the rest of the word or the next word.
Legacy flags are accepted and ignored, and an ignored flag's argument never becomes a
recipient. Only a letter sendmail never had is a usage error.

Trust: runs as any user with the caller's argv. ``-f``, ``-F`` and recipients end up in
headers and SMTP commands, so CR, LF and NUL in them are refused here (header injection);
their syntax is checked later by ``address``.

Raises ``UsageError`` (exit 64) for an unknown option, a missing option argument, an unsupported
``-b`` mode or a CR, LF or NUL in a word that would reach a header.
"""

from __future__ import annotations

from mailshim.errors import UsageError

# Letters taking an argument (attached or the next word). q and d take only an attached one.
_WITH_ARG = set("ABCFLNORVXbefhopr")
_FLAGS = set("GIUcimntvx")
# -b modes
MODES = {
    "m": "submit",
    "p": "list",
    "i": "aliases",
    "v": "verify",
    "s": "smtp",
}
_UNSUPPORTED_MODES = {
    "d": "daemon mode is not part of sendmail here: run `mailshim daemon`",
    "D": "daemon mode is not part of sendmail here: run `mailshim daemon`",
    "t": "address test mode (-bt) is not supported: use -bv to see how recipients are rewritten",
    "a": "ARPANET mode (-ba) is not supported: use -bs",
    "h": "host status (-bh) is not kept by mailshim",
    "H": "host status (-bH) is not kept by mailshim",
    "P": "-bP is not supported: run `mailshim config`",
}
_DELIVERY = {"i": "interactive", "b": "background", "q": "queue", "d": "queue"}


class Invocation:
    """What the command line asks for."""

    __slots__ = (
        "action",
        "config_path",
        "delivery",
        "dot_ends",
        "extract",
        "full_name",
        "ignored",
        "queue_filter",
        "recipients",
        "sender",
        "verbose",
    )

    def __init__(self) -> None:
        self.action = "submit"  # submit | list | aliases | verify | smtp | flush | nothing
        self.extract = False
        self.dot_ends = True
        self.sender: str | None = None
        self.full_name: str | None = None
        self.recipients: list[str] = []
        self.config_path: str | None = None
        self.delivery: str | None = None
        self.verbose = False
        self.queue_filter: str | None = None
        self.ignored: list[str] = []


def _safe(text: str, what: str) -> str:
    for ch in ("\r", "\n", "\x00"):
        if ch in text:
            name = {"\r": "CR", "\n": "LF", "\x00": "NUL"}[ch]
            raise UsageError(f"{what} contains a {name} character: refused (header injection)")
    return text


def parse(args: list[str], prog: str = "sendmail") -> Invocation:
    """Turn ``sys.argv[1:]`` into an ``Invocation``. Raises ``UsageError`` (exit 64)."""
    inv = Invocation()
    base = prog.rsplit("/", 1)[-1]
    if base == "mailq":
        inv.action = "list"
    elif base == "newaliases":
        inv.action = "aliases"
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            inv.recipients.extend(_safe(w, "a recipient") for w in args[i:])
            break
        if word.startswith("--"):
            raise UsageError(_long_word(word))
        if not word.startswith("-") or word == "-":
            if word != "-":
                inv.recipients.append(_safe(word, "a recipient"))
            continue
        j = 1
        while j < len(word):
            letter = word[j]
            j += 1
            if letter in _WITH_ARG:
                if j < len(word):
                    value = word[j:]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    raise UsageError(f"option -{letter} needs an argument")
                _option(inv, letter, value)
                break
            if letter in ("q", "d"):
                _option(inv, letter, word[j:])
                break
            if letter in _FLAGS:
                _flag(inv, letter)
                continue
            where = "" if word == "-" + letter else f" in {word!r}"
            raise UsageError(f"unknown option -{letter}{where}: {_SEE}")
    return inv


_SEE = "`man sendmail` lists the options; `mailshim --help` the administration commands"


def _long_word(word: str) -> str:
    """The message for a GNU-style long option: sendmail has none, but people try them."""
    shown = word if len(word) <= 40 and word.isprintable() else repr(word[:40])
    name = word.partition("=")[0]
    if name == "--version":
        return f"{shown} is not a sendmail option: `mailshim --version` prints the version"
    if name == "--help":
        return f"{shown} is not a sendmail option: {_SEE}"
    return f"unknown option {shown} (sendmail takes single-letter options): {_SEE}"


def _flag(inv: Invocation, letter: str) -> None:
    if letter == "t":
        inv.extract = True
    elif letter == "i":
        inv.dot_ends = False
    elif letter == "v":
        inv.verbose = True
    elif letter == "I":
        inv.action = "aliases"
    else:  # -G -U -c -m -n -x: legacy, meaningless for a null client
        inv.ignored.append("-" + letter)


def _option(inv: Invocation, letter: str, value: str) -> None:
    if letter in ("f", "r"):
        inv.sender = _safe(value, "the sender (-" + letter + ")")
    elif letter == "F":
        inv.full_name = _safe(value, "the full name (-F)")
    elif letter == "C":
        inv.config_path = _safe(value, "the configuration file (-C)")
    elif letter == "b":
        _mode(inv, value)
    elif letter == "o":
        _o_option(inv, value)
    elif letter == "O":
        _long_option(inv, value)
    elif letter == "q":
        _queue_option(inv, value)
    else:  # -A -B -L -N -R -V -X -e -h -p -d: accepted for compatibility, no effect
        inv.ignored.append(f"-{letter}{value}")


def _mode(inv: Invocation, value: str) -> None:
    if value in MODES:
        inv.action = MODES[value]
    elif value[:1] in _UNSUPPORTED_MODES:
        raise UsageError(_UNSUPPORTED_MODES[value[:1]])
    else:
        raise UsageError(f"unknown mode -b{value} (known: -bm -bp -bi -bv -bs)")


def _o_option(inv: Invocation, value: str) -> None:
    if value == "i":
        inv.dot_ends = False
    elif value.startswith("d"):
        mode = _DELIVERY.get(value[1:2])
        if mode is not None:
            inv.delivery = mode
        else:
            inv.ignored.append("-o" + value)
    else:  # -oem, -oee, -om, -oA..., -oQ...: meaningless here
        inv.ignored.append("-o" + value)


def _long_option(inv: Invocation, value: str) -> None:
    name, _, setting = value.partition("=")
    name = name.strip().lower()
    setting = setting.strip().lower()
    if name == "ignoredots":
        inv.dot_ends = setting not in ("", "t", "true", "y", "yes", "1")
    elif name == "deliverymode" and setting[:1] in _DELIVERY:
        inv.delivery = _DELIVERY[setting[:1]]
    else:
        inv.ignored.append("-O" + value)


def _queue_option(inv: Invocation, value: str) -> None:
    if value == "":
        inv.action = "flush"
    elif value[0] in "RS":
        inv.action = "flush"  # one listener: every site is the same site
    elif value[0] == "I":
        inv.action = "flush"
        inv.queue_filter = value[1:] or None
    else:  # -q15m: a sendmail daemon's interval; the runner's schedule is its own
        inv.action = "nothing"
        inv.ignored.append("-q" + value)
