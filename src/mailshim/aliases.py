"""aliases(5) for a null client: read the aliases file, expand names recursively without loops.

Pure: strings in, strings out. ``parse_aliases_file`` turns the file's text into a table;
``Aliases`` merges that table with the config's ``[aliases]`` and expands a recipient into its
final addresses (recursive, loop-safe, de-duplicated); ``settings_problem`` checks the
configured domain, sender and alias table when the configuration is read. A null client has
no local delivery agent, so pipes, files, ``:include:`` and exim's ``:blackhole:``/``:fail:``
are skipped and listed, never run.

Trust: imported by ``sendmail`` (running as any local user, on the fast path: so no ``re``,
``typing`` or ``email`` at run time). The aliases file is written by root, but the addresses
being expanded come from the caller's argv and headers and may hold anything; every target is
checked with ``address.check_envelope_address`` before it is used.

Raises: ``DataError`` only, naming the line or alias (the callers exit 65, EX_DATAERR); a
missing or unreadable file is the caller's ``ConfigError`` (exit 78), never read here.
"""

from __future__ import annotations

from mailshim.address import (
    check_envelope_address,
    dedupe_key,
    domain_problem,
    parse_address_list,
    qualify,
    read_quoted,
    shown,
    split_address,
    unquote_local,
)
from mailshim.errors import DataError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["MAX_ALIAS_DEPTH", "Aliases", "parse_aliases_file", "settings_problem"]

MAX_ALIAS_DEPTH = 20


def _split_commas(value: str) -> list[str]:
    """Split at commas outside quoted strings, comments and angle brackets."""
    out = []
    start = 0
    quote = False
    depth = 0
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\":
            i += 2
            continue
        if quote:
            quote = c != '"'
        elif c == '"':
            quote = True
        elif c in "(<":
            depth += 1
        elif c in ")>":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            out.append(value[start:i])
            start = i + 1
        i += 1
    out.append(value[start:])
    return [part.strip() for part in out if part.strip()]


def _undeliverable(target: str) -> bool:
    """Pipes, files, :include: and exim's :blackhole:/:fail: need a local delivery agent."""
    if target[:1] in ("|", "/", ":"):
        return True
    if target.startswith('"'):
        try:
            content, end = read_quoted(target, 0)
        except DataError:
            return False
        return content[:1] in ("|", "/") and not target[end:].strip()
    return False


def _split_targets(value: str) -> tuple[list[str], list[str]]:
    """(addresses, undeliverable targets) of one alias value; raises DataError if unparsable."""
    addrs: list[str] = []
    skipped: list[str] = []
    for target in _split_commas(value):
        if _undeliverable(target):
            skipped.append(target)
        else:
            addrs.extend(parse_address_list(target))
    return addrs, skipped


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t" and lines:
            lines[-1] = (lines[-1][0], lines[-1][1] + " " + stripped)
        else:
            lines.append((number, line.strip()))
    return lines


def _alias_name(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"'):
        name, end = read_quoted(raw, 0)
        if raw[end:].strip():
            raise DataError("text after the quoted name")
        return name.lower()
    return raw.lower()


def parse_aliases_file(
    text: str,
) -> tuple[dict[str, tuple[str, ...]], list[tuple[str, str]]]:
    """Parse aliases(5) text into ({name: targets}, [(name, skipped target), ...]).

    Names are lowercased; the last definition of a name wins. Targets a null client cannot
    deliver (``|command``, ``/file``, ``:include:``, ``:blackhole:``) are skipped and
    listed; a name left with no target is not an alias at all (its mail goes to
    ``name@domain``). Raises ``DataError`` naming the line when a line cannot be parsed.
    """
    table: dict[str, tuple[str, ...]] = {}
    skipped: list[tuple[str, str]] = []
    for number, line in _logical_lines(text):
        name_part, colon, value = _partition_unquoted(line)
        try:
            if not colon:
                raise DataError("no ':' after the name")
            name = _alias_name(name_part)
            if not name:
                raise DataError("empty name")
            addrs, bad = _split_targets(value)
        except DataError as exc:
            raise DataError(f"aliases line {number}: {exc.message}") from None
        skipped.extend((name, target) for target in bad)
        if addrs:
            table[name] = tuple(addrs)
        else:
            table.pop(name, None)
    return table, skipped


def _partition_unquoted(line: str) -> tuple[str, str, str]:
    """Split at the first ':' outside a leading quoted name."""
    if line.startswith('"'):
        try:
            _name, end = read_quoted(line, 0)
        except DataError:
            return line, "", ""
        head, colon, tail = line[end:].partition(":")
        return line[:end] + head, colon, tail
    return line.partition(":")


class Aliases:
    """Recursive, loop-safe alias expansion for bare names and the default domain.

    ``table`` maps names (any case) to targets: addresses, or address lists as text (a
    config value such as ``"a@x, b@x"``). Undeliverable targets (pipes, files, includes) are
    dropped and listed in ``skipped``; targets are checked when first used.
    """

    __slots__ = ("_cache", "_raw", "skipped")

    def __init__(self, table: dict[str, tuple[str, ...]]) -> None:
        merged: dict[str, tuple[str, ...]] = {}
        self.skipped: list[tuple[str, str]] = []
        for name, targets in table.items():
            merged[name.lower()] = tuple(targets)  # the config table wins over the file
        self._raw = merged
        self._cache: dict[str, tuple[str, ...]] = {}

    def _targets(self, key: str) -> tuple[str, ...] | None:
        if key in self._cache:
            return self._cache[key]
        raw = self._raw.get(key)
        if raw is None:
            return None
        out: list[str] = []
        for item in raw:
            try:
                addrs, bad = _split_targets(item)
                out.extend(check_envelope_address(a) for a in addrs)
            except DataError as exc:
                raise DataError(f"alias {shown(key)}: {exc.message}") from None
            self.skipped.extend((key, b) for b in bad)
        result = tuple(a for a in out if a)
        self._cache[key] = result
        return result

    def _walk(self, addr: str, domain: str, chain: tuple[str, ...], state: _Expansion) -> None:
        local, dom = split_address(addr)
        if dom is None or dom.lower() == domain.lower():
            key = unquote_local(local).lower()
            targets = self._targets(key) if key not in chain else None
            if targets:
                if key in state.done:
                    return  # already expanded in this run: its results are in already
                if len(chain) >= MAX_ALIAS_DEPTH:
                    raise DataError(
                        f"alias expansion deeper than {MAX_ALIAS_DEPTH} at {shown(key)}"
                    )
                for target in targets:
                    self._walk(target, domain, (*chain, key), state)
                state.done.add(key)
                return
        state.add(qualify(addr, domain))

    def expand(self, addr: str, domain: str) -> list[str]:
        """The final recipients of ``addr``: every one has ``@``; duplicates removed.

        A name that reaches itself (directly or through a cycle) is delivered as
        ``name@domain``. Raises ``DataError`` on an expansion deeper than 20 levels or an
        invalid target.
        """
        return self.expand_all([addr], domain)

    def expand_all(self, addrs: Iterable[str], domain: str) -> list[str]:
        """``expand`` over a list, de-duplicating across the whole result (order kept)."""
        state = _Expansion()
        for addr in addrs:
            if addr:
                self._walk(addr, domain, (), state)
        return state.out


class _Expansion:
    __slots__ = ("done", "out", "seen")

    def __init__(self) -> None:
        self.out: list[str] = []
        self.seen: set[tuple[str, str]] = set()
        self.done: set[str] = set()

    def add(self, addr: str) -> None:
        key = dedupe_key(addr)
        if key not in self.seen:
            self.seen.add(key)
            self.out.append(addr)


def settings_problem(
    domain: str | None, sender: str | None, aliases: dict[str, tuple[str, ...]]
) -> tuple[str, str] | None:
    """The first configured address setting that is not usable, as (key, problem); None
    when all are. Checked when the configuration is read, so that a bad ``domain`` cannot
    make ``root@@example.org`` or send users' mail silently to ``corrupt/`` at pickup.

    >>> settings_problem("example.org.", None, {})
    ('[addresses] domain', 'example.org. is not a domain name (bad domain label)')
    >>> settings_problem("example.org", "noreply", {"root": ("ops@example.org",)}) is None
    True
    """
    if domain is not None:
        problem = domain_problem(domain) if domain[:1] != "[" else "an address literal"
        if problem:
            return "[addresses] domain", f"{shown(domain)} is not a domain name ({problem})"
    qualify_with = domain or "example.invalid"
    if sender is not None:
        try:
            canon = check_envelope_address(sender)
            if not canon:
                return "[addresses] sender", "the null sender <> cannot be everyone's sender"
            check_envelope_address(qualify(canon, qualify_with))
        except DataError as exc:
            return "[addresses] sender", exc.message
    table = Aliases(aliases)
    for name in aliases:
        try:
            table.expand(name, qualify_with)
        except DataError as exc:
            return f"[aliases] {shown(name)}", exc.message
    return None
