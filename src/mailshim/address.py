"""Addresses: RFC 5322 address lists, envelope address checks, qualification.

Everything here is pure: strings in, strings out. ``parse_address_list`` reads recipient
header fields tolerantly (for ``sendmail -t``); ``check_envelope_address`` is the strict check
for one envelope address (argv, ``MAIL FROM``/``RCPT TO`` of ``-bs``) and returns the canonical
form; ``qualify`` gives bare local names the default domain; ``dedupe_key`` says when two
canonical addresses are the same mailbox. aliases(5) lives in ``aliases.py``.

Canonical form: ``local@domain`` or a bare ``local``, no angle brackets, no comments; the local
part is quoted (``"john doe"@x``, with ``\\`` before ``"`` and ``\\``) only when it is not a
dot-atom. Domains are kept as written (case included).

Trust: imported by ``sendmail`` (running as any local user, on the fast path: so no ``re``,
``typing`` or ``email`` at run time) and by the ``-bs`` server. Every input is hostile: header
text, argv words, SMTP arguments and the aliases file may hold anything, 8-bit included.
Nothing here may raise anything but ``DataError`` on bad input, and every error message names
the offending text on one line (shortened to 200 characters).

Raises: ``DataError`` only (the callers exit 65, EX_DATAERR, or answer 501/553 in ``-bs``).
"""

from __future__ import annotations

from mailshim.errors import DataError, printable

__all__ = [
    "check_envelope_address",
    "dedupe_key",
    "domain_problem",
    "find_unqualified",
    "is_8bit_address",
    "parse_address_list",
    "qualify",
    "read_quoted",
    "shown",
    "split_address",
    "unquote_local",
]

# RFC 5322 atext (ASCII part); every non-ASCII character that is not a control or a lone
# surrogate also counts as atext (RFC 6532).
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ATEXT = frozenset(_ALNUM + "!#$%&'*+-/=?^_`{|}~")
_ATEXT_DOT_BYTES = "".join(sorted(_ATEXT)).encode("ascii") + b"."
_WS = frozenset(" \t\r\n")
# Characters that end an atom in the tolerant tokenizer.
_STOP_TABLE = {ord(c): " " for c in '()<>[]:;@\\,." \t\r\n'}
_LDH = frozenset(_ALNUM + "-")
_HEX = frozenset("0123456789abcdefABCDEF")

MAX_ADDRESS = 254  # octets, RFC 5321 path limit minus the angle brackets
MAX_LOCAL = 64  # octets, RFC 5321 4.5.3.1.1
MAX_LABEL = 63
_SHOW = 200  # longest piece of hostile text quoted in an error message


def shown(text: str) -> str:
    """Make hostile text printable in a one-line message (no surrogates, bounded length)."""
    return printable(text, _SHOW)


def _is_text_char(c: str) -> bool:
    """A character allowed in an address at all: no controls, no lone surrogates."""
    o = ord(c)
    if o < 0x80:
        return 32 <= o < 127
    # C1 controls, lone surrogates (undecodable bytes) and Unicode line breaks are out.
    return o >= 0xA0 and not (0xD800 <= o <= 0xDFFF) and o not in (0x2028, 0x2029)


def _is_atext(c: str) -> bool:
    return c in _ATEXT or (ord(c) >= 0x80 and _is_text_char(c))


def _is_text(s: str) -> bool:
    """Every character of ``s`` may appear in an address (see ``_is_text_char``)."""
    if s.isascii():
        return s.isprintable()  # ASCII: exactly 32..126
    return all(_is_text_char(c) for c in s)


def _is_dot_atom(s: str) -> bool:
    if not s or s[0] == "." or s[-1] == "." or ".." in s:
        return False
    if s.isascii():
        return not s.encode("ascii").translate(None, _ATEXT_DOT_BYTES)
    return all(c == "." or _is_atext(c) for c in s)


def _quote_local(local: str) -> str:
    """The canonical spelling of a local part: bare when it is a dot-atom, else quoted."""
    if _is_dot_atom(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote_local(local: str) -> str:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        out = []
        i = 1
        while i < len(local) - 1:
            if local[i] == "\\" and i + 1 < len(local) - 1:
                i += 1
            out.append(local[i])
            i += 1
        return "".join(out)
    return local


def split_address(addr: str) -> tuple[str, str | None]:
    """Split a canonical address into (local part as written, domain or None)."""
    if addr.startswith('"'):
        i = 1
        while i < len(addr):
            if addr[i] == "\\":
                i += 2
                continue
            if addr[i] == '"':
                break
            i += 1
        rest = addr[i + 1 :]
        if rest.startswith("@"):
            return addr[: i + 1], rest[1:]
        return addr, None
    at = addr.find("@")
    if at < 0:
        return addr, None
    return addr[:at], addr[at + 1 :]


# ---------------------------------------------------------------------------------------------
# The tolerant RFC 5322 address-list parser (header fields)
# ---------------------------------------------------------------------------------------------

# A token: (kind, value, start, end). Kinds: "a" atom, "q" quoted string (value unescaped),
# "d" domain literal (value as written, brackets included), or one of the specials
# "<", ">", ":", ";", "@", ",", "." (value is the character).
_Token = tuple[str, str, int, int]


def _skip_comment(text: str, i: int) -> int:
    """Index just past the (possibly nested) comment starting at ``text[i] == "("``."""
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise DataError(f"unterminated comment in address list: {shown(text)}")


def read_quoted(text: str, i: int) -> tuple[str, int]:
    """Unescaped content and end index of the quoted string starting at ``text[i] == '"'``."""
    out = []
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        if c not in "\r\n":  # folding inside a quoted string: the CRLF is not content
            out.append(c)
        i += 1
    raise DataError(f"unterminated quoted string in address list: {shown(text)}")


def _domain_literal(text: str, i: int) -> int:
    n = len(text)
    j = i + 1
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "]":
            return j + 1
        if c == "[":
            break
        j += 1
    raise DataError(f"unterminated domain literal in address list: {shown(text)}")


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    stops = text.translate(_STOP_TABLE)  # every atom-ending character becomes " "
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
        elif c == "(":
            i = _skip_comment(text, i)
        elif c == '"':
            value, j = read_quoted(text, i)
            out.append(("q", value, i, j))
            i = j
        elif c == "[":
            j = _domain_literal(text, i)
            out.append(("d", text[i:j], i, j))
            i = j
        elif c in "<>:;@,.":
            out.append((c, c, i, i + 1))
            i += 1
        elif c in ")]\\":
            raise DataError(f"unexpected {c!r} in address list: {shown(text)}")
        else:
            j = stops.find(" ", i + 1)
            j = n if j < 0 else j
            out.append(("a", text[i:j], i, j))
            i = j
    return out


def _bad(text: str, why: str) -> DataError:
    return DataError(f"cannot parse address list ({why}): {shown(text)}")


def _local_from_tokens(toks: list[_Token], text: str) -> str:
    """Join an (obsolete-syntax tolerant) local part: words separated by dots."""
    parts = []
    last = ""
    words = 0
    for kind, value, _s, _e in toks:
        if kind in ("a", "q"):
            if last in ("a", "q"):
                raise _bad(text, "words without '@' or '<>'")
            words += 1
        elif kind != ".":
            raise _bad(text, f"unexpected {value!r} in a local part")
        parts.append(value)
        last = kind
    if not words:
        raise _bad(text, "empty local part")
    return "".join(parts)


def _domain_from_tokens(toks: list[_Token], text: str) -> str:
    if len(toks) == 1 and toks[0][0] == "d":
        return toks[0][1]
    parts = []
    last = "."
    for kind, value, _s, _e in toks:
        if (kind == "a" and last == ".") or (kind == "." and last == "a"):
            parts.append(value)
            last = kind
        else:
            raise _bad(text, f"unexpected {value!r} in a domain")
    if last != "a":
        raise _bad(text, "empty domain" if not parts else "domain ends with '.'")
    return "".join(parts)


def _addr_spec(toks: list[_Token], text: str) -> tuple[str, int]:
    """(canonical addr-spec, insertion point for "@domain" or -1 when it has a domain)."""
    ats = [k for k, tok in enumerate(toks) if tok[0] == "@"]
    if len(ats) > 1:
        raise _bad(text, "two '@' in one address")
    if ats:
        local = _local_from_tokens(toks[: ats[0]], text)
        addr = _quote_local(local) + "@" + _domain_from_tokens(toks[ats[0] + 1 :], text)
        where = -1
    else:
        addr = _quote_local(_local_from_tokens(toks, text))
        where = toks[-1][3]
    if not _is_text(addr):
        raise _bad(text, "control character or invalid UTF-8 in an address")
    return addr, where


def _angle(toks: list[_Token], i: int, text: str) -> tuple[tuple[str, int] | None, int]:
    """Parse ``<[route:]addr-spec>`` starting at ``toks[i]`` == "<"; returns (mailbox, next)."""
    j = i + 1
    n = len(toks)
    if j < n and toks[j][0] == "@":  # obsolete source route: dropped
        while j < n and toks[j][0] not in (":", ">"):
            j += 1
        if j >= n or toks[j][0] != ":":
            raise _bad(text, "source route without ':'")
        j += 1
    start = j
    while j < n and toks[j][0] != ">":
        if toks[j][0] in ("<", ":", ";", ","):
            raise _bad(text, f"unexpected {toks[j][1]!r} inside '<>'")
        j += 1
    if j >= n:
        raise _bad(text, "unterminated '<'")
    inner = toks[start:j]
    return (_addr_spec(inner, text) if inner else None), j + 1


def _finish(elem: list[_Token], after_angle: bool, text: str, out: list[tuple[str, int]]) -> None:
    if not elem:
        return
    # Words after "<addr>" are display text (or a forgotten comma before another addr-spec).
    if after_angle and not any(tok[0] == "@" for tok in elem):
        return
    out.append(_addr_spec(elem, text))


def _parse(text: str) -> list[tuple[str, int]]:
    """All mailboxes of an address list, with the insertion point of unqualified ones."""
    toks = _tokens(text)
    out: list[tuple[str, int]] = []
    elem: list[_Token] = []
    after_angle = False
    depth = 0
    i = 0
    while i < len(toks):
        kind = toks[i][0]
        if kind in (",", ";"):
            # ";" ends a group; outside a group it is taken as a separator (Outlook habit).
            if kind == ";" and depth:
                depth -= 1
            _finish(elem, after_angle, text, out)
            elem, after_angle = [], False
        elif kind == ":":
            if after_angle or any(tok[0] not in ("a", "q", ".") for tok in elem):
                raise _bad(text, "unexpected ':'")
            elem, depth = [], depth + 1  # a group: its display name is dropped
        elif kind == "<":
            mailbox, i = _angle(toks, i, text)
            if mailbox is not None:
                out.append(mailbox)
            elem, after_angle = [], True
            continue
        elif kind == ">":
            raise _bad(text, "unexpected '>'")
        else:
            elem.append(toks[i])
        i += 1
    _finish(elem, after_angle, text, out)
    return out


def parse_address_list(text: str) -> list[str]:
    """The addr-specs of an RFC 5322 address list, in order, duplicates kept.

    Tolerant: display names (RFC 2047 encoded words are display text), comments, groups,
    obsolete routes, empty elements, ``;`` as a separator, bare local names, UTF-8.

    >>> parse_address_list('"Doe, J." <j@x.org>, root (admin), team: a@x, <b@x>;, <@r:c@y>')
    ['j@x.org', 'root', 'a@x', 'b@x', 'c@y']
    >>> parse_address_list('undisclosed-recipients:;')
    []
    """
    return [addr for addr, _where in _parse(text)]


def find_unqualified(text: str) -> list[int]:
    """Indexes in ``text`` just after each address that has no domain (where "@d" goes).

    >>> find_unqualified("Cron <root>, a@b, bin (x)")
    [10, 21]
    """
    return [where for _addr, where in _parse(text) if where >= 0]


# ---------------------------------------------------------------------------------------------
# The strict envelope check
# ---------------------------------------------------------------------------------------------


def _valid_ipv4(s: str) -> bool:
    parts = s.split(".")
    if len(parts) != 4:
        return False
    for p in parts:
        if not p or len(p) > 3 or not p.isascii() or not p.isdigit() or int(p) > 255:
            return False
        if len(p) > 1 and p[0] == "0":
            return False
    return True


def _valid_ipv6(s: str) -> bool:
    if s.count("::") > 1:
        return False
    if "." in s:  # an IPv4 tail stands for the last two groups
        v4 = s.rpartition(":")[2]
        if not _valid_ipv4(v4):
            return False
        s = s[: len(s) - len(v4)] + "0:0"
    if "::" in s:
        left, right = s.split("::")
        parts = (left.split(":") if left else []) + (right.split(":") if right else [])
        if len(parts) > 7:
            return False
    else:
        parts = s.split(":")
        if len(parts) != 8:
            return False
    return all(1 <= len(p) <= 4 and all(c in _HEX for c in p) for p in parts)


def _valid_address_literal(inner: str) -> bool:
    if inner[:5].lower() == "ipv6:":
        return _valid_ipv6(inner[5:])
    if _valid_ipv4(inner):
        return True
    tag, sep, content = inner.partition(":")  # RFC 5321 General-address-literal
    return (
        bool(sep and tag and content)
        and all(c in _LDH for c in tag)
        and tag[-1] != "-"
        and all(33 <= ord(c) <= 126 and c not in "[]\\" for c in content)
    )


def _valid_label(label: str) -> bool:
    if not label or label[0] == "-" or label[-1] == "-":
        return False
    # Underscores are tolerated (as Postfix does): real internal host names have them.
    if not all(c in _LDH or c == "_" or (ord(c) >= 0x80 and _is_text_char(c)) for c in label):
        return False
    return len(label.encode("utf-8")) <= MAX_LABEL


def domain_problem(domain: str) -> str | None:
    if not domain:
        return "empty domain"
    if domain[0] == "[":
        if domain[-1] != "]" or not _valid_address_literal(domain[1:-1]):
            return "bad address literal"
        return None
    for label in domain.split("."):
        if not _valid_label(label):
            return "bad domain label"
    return None


def _split_envelope(s: str) -> tuple[str, str | None, str | None]:
    """(unquoted local part, domain or None, problem or None) of ``local[@domain]``."""
    if not s.startswith('"'):
        if s.count("@") > 1:
            return "", None, "more than one '@'"
        local, at, domain = s.partition("@")
        if " " in local or "\t" in local:
            return local, None, "space outside quotes"
        if not _is_dot_atom(local):
            return local, None, "bad local part" if local else "empty local part"
        return local, (domain if at else None), None
    out = []
    i = 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            break
        out.append(c)
        i += 1
    else:
        return "", None, "unterminated quote"
    local = "".join(out)
    rest = s[i + 1 :]
    if rest and rest[0] != "@":
        return local, None, "text after the quoted local part"
    if not local:
        return local, None, "empty local part"
    return local, (rest[1:] if rest else None), None


def _envelope_problem(s: str) -> tuple[str, str | None]:
    """(canonical address, problem or None) for ``s`` with brackets already removed."""
    local, domain, problem = _split_envelope(s)
    if problem:
        return "", problem
    if not _is_text(local):
        return "", "control character or invalid UTF-8"
    canon = _quote_local(local)
    if len(canon.encode("utf-8")) > MAX_LOCAL:
        return "", f"local part longer than {MAX_LOCAL} octets"
    if domain is None:
        return canon, None
    problem = domain_problem(domain)
    if problem:
        return "", problem
    canon = canon + "@" + domain
    if len(canon.encode("utf-8")) > MAX_ADDRESS:
        return "", f"longer than {MAX_ADDRESS} octets"
    return canon, None


def check_envelope_address(addr: str) -> str:
    """Validate one envelope address; return its canonical form ("" for the null sender).

    Accepts ``a@b``, ``<a@b>``, ``<>``/"" (null sender), a bare local name, a quoted local
    part, address literals, UTF-8 (SMTPUTF8), and ignores an obsolete source route inside
    ``<>``. Raises ``DataError("invalid address: ...")`` otherwise.

    >>> check_envelope_address('<"john"@Example.org>')
    'john@Example.org'
    >>> check_envelope_address("<>")
    ''
    """
    s = addr.strip(" \t")
    problem: str | None = None
    if any(c in addr for c in "\r\n\x00"):
        problem = "CR, LF or NUL"
    elif s.startswith("<"):
        if not s.endswith(">") or len(s) < 2:
            problem = "unterminated '<'"
        else:
            s = s[1:-1]
            if s.startswith("@"):  # RFC 5321 4.1.2: accept and ignore a source route
                _route, colon, s = s.partition(":")
                if not colon:
                    problem = "source route without ':'"
    elif s.endswith(">"):
        problem = "unmatched '>'"
    if problem is None:
        if s == "":
            return ""
        canon, problem = _envelope_problem(s)
        if problem is None:
            return canon
    raise DataError(f"invalid address: {shown(addr)} ({problem})")


def qualify(addr: str, domain: str) -> str:
    """Give a bare local name the default domain; anything else is returned unchanged.

    >>> qualify("root", "example.org"), qualify("a@b", "example.org"), qualify("", "x")
    ('root@example.org', 'a@b', '')
    """
    if not addr:
        return addr
    _local, dom = split_address(addr)
    return addr if dom is not None else f"{addr}@{domain}"


def is_8bit_address(addr: str) -> bool:
    """True when the address needs SMTPUTF8 (any non-ASCII character)."""
    return not addr.isascii()


def dedupe_key(addr: str) -> tuple[str, str]:
    """The identity of a canonical address: its local part as written, its domain lowercased.

    Local parts may be case-sensitive (RFC 5321 2.4) and domains are not, so ``A@X`` and
    ``A@x`` are one recipient while ``a@x`` is another.
    """
    local, domain = split_address(addr)
    return local, (domain or "").lower()
