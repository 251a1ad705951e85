"""Tests for mailshim.address: header address lists, envelope checks, qualification, aliases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailshim.address import (
    check_envelope_address,
    dedupe_key,
    domain_problem,
    find_unqualified,
    is_8bit_address,
    parse_address_list,
    qualify,
    shown,
    split_address,
    unquote_local,
)
from mailshim.aliases import Aliases, parse_aliases_file
from mailshim.errors import EX_DATAERR, DataError

# --------------------------------------------------------------------------------------------
# parse_address_list: real-world header values
# --------------------------------------------------------------------------------------------

REAL_WORLD = [
    # plain and bare (cron MAILTO, at, mdadm)
    ("root", ["root"]),
    ("root, www-data", ["root", "www-data"]),
    ("admin@example.org", ["admin@example.org"]),
    # display names, quoted with commas and specials
    ('"Doe, John" <john@example.org>, jane@example.org', ["john@example.org", "jane@example.org"]),
    ('"Smith, J. <boss>" <j@x.example>', ["j@x.example"]),
    ("Cron Daemon <root@host.example>", ["root@host.example"]),
    ("John Q. Public <jqp@example.net>", ["jqp@example.net"]),
    ('"Joe \\"the\\" Q" <joe@example.net>', ["joe@example.net"]),
    # comments, nested, with look-alike addresses inside
    ("john@example.org (John Doe)", ["john@example.org"]),
    ("(comment) <a@b.example>", ["a@b.example"]),
    ("a@b.example (x (nested, <c@d.example>) z)", ["a@b.example"]),
    ("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>", ["pete@silly.test"]),
    # groups
    ("undisclosed-recipients:;", []),
    ("undisclosed-recipients: ;", []),
    ("team: a@x.example, b@x.example;", ["a@x.example", "b@x.example"]),
    ("team: a@x.example;, c@y.example", ["a@x.example", "c@y.example"]),
    (
        'A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;, "x" <y@z.test>',
        ["c@a.test", "joe@where.test", "jdoe@one.test", "y@z.test"],
    ),
    # quoted local parts: quoted only when they must be
    ('"john doe"@example.org', ['"john doe"@example.org']),
    ('"john"@example.org', ["john@example.org"]),
    ('"a\\"b"@example.org', ['"a\\"b"@example.org']),
    ('"a\\\\b"@example.org', ['"a\\\\b"@example.org']),
    ('<"john doe"@example.org>', ['"john doe"@example.org']),
    # RFC 2047 display names are display text
    ("=?UTF-8?Q?J=C3=B6rg?= <joerg@example.de>", ["joerg@example.de"]),
    ("=?iso-8859-1?q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>", ["PIRARD@vm1.ulg.ac.be"]),
    ("=?UTF-8?B?w6k=?= =?UTF-8?B?w6k=?= <e@example.org>", ["e@example.org"]),
    # UTF-8 (RFC 6532) and IDN
    ("Jörg <jörg@bücher.example>", ["jörg@bücher.example"]),
    ("用户@例子.广告", ["用户@例子.广告"]),
    ('"Zoë, la" <zoe@example.fr>', ["zoe@example.fr"]),
    # obsolete routes are dropped
    ("<@relay.example:user@example.org>", ["user@example.org"]),
    ("Joe <@a.example,@b.example:joe@c.example>", ["joe@c.example"]),
    # empty elements, separators, folding
    ("a@x.example,,b@y.example,", ["a@x.example", "b@y.example"]),
    (", ,", []),
    ("", []),
    ("a@x.example;b@y.example", ["a@x.example", "b@y.example"]),
    (
        "a@x.example,\r\n b@y.example,\r\n\tc@z.example",
        ["a@x.example", "b@y.example", "c@z.example"],
    ),
    ("<>", []),
    # domain literals, obsolete spacing, missing commas between angle addresses
    ("user@[192.0.2.1]", ["user@[192.0.2.1]"]),
    ("user@[IPv6:2001:db8::1]", ["user@[IPv6:2001:db8::1]"]),
    ("john . doe @ example . org", ["john.doe@example.org"]),
    ("<a@x.example> <b@y.example>", ["a@x.example", "b@y.example"]),
    ("<a@x.example> trailing words", ["a@x.example"]),
    # duplicates are kept (dedupe is the caller's)
    ("a@x.example, a@x.example", ["a@x.example", "a@x.example"]),
]


@pytest.mark.parametrize(("text", "expected"), REAL_WORLD)
def test_parse_real_world(text, expected):
    assert parse_address_list(text) == expected


BAD_LISTS = [
    ('"unterminated@example.org', "unterminated quoted string"),
    ("<a@example.org", "unterminated '<'"),
    ("a@example.org (open comment", "unterminated comment"),
    ("a@[1.2.3.4", "unterminated domain literal"),
    ("a@b@c.example", "two '@'"),
    ("John Doe", "words without"),
    ("a@x.example b@y.example", "two '@'"),
    ("a@example.org>", "unexpected '>'"),
    ("@example.org", "empty local part"),
    ("user@", "empty domain"),
    ("user@example.", "ends with '.'"),
    ("<<a@b.example>>", "inside '<>'"),
    ("a\x01b@example.org", "control character"),
    ("\udce9t\udce9@example.org", "invalid UTF-8"),
    ("x) a@b.example", "unexpected ')'"),
    ("<a@b.example>: c@d.example", "unexpected ':'"),
]


@pytest.mark.parametrize(("text", "why"), BAD_LISTS)
def test_parse_errors_name_the_text(text, why):
    with pytest.raises(DataError) as info:
        parse_address_list(text)
    assert why in info.value.message
    assert info.value.code == EX_DATAERR
    # The offending text is named (printable: surrogates shown as "?", controls as "?").
    assert text.replace("\udce9", "?").replace("\x01", "?")[:20] in info.value.message


def test_error_message_is_bounded_and_one_line():
    text = '"' + "x" * 10_000 + "\r\n"
    with pytest.raises(DataError) as info:
        parse_address_list(text)
    assert len(info.value.message) < 400
    assert "\n" not in info.value.message and "\r" not in info.value.message


def test_find_unqualified_points_after_bare_names():
    text = 'Cron <root>, a@b.example, "john doe" (c), bin'
    where = find_unqualified(text)
    rebuilt = text
    for at in reversed(where):
        rebuilt = rebuilt[:at] + "@d.example" + rebuilt[at:]
    assert rebuilt == 'Cron <root@d.example>, a@b.example, "john doe"@d.example (c), bin@d.example'


# --------------------------------------------------------------------------------------------
# check_envelope_address
# --------------------------------------------------------------------------------------------

ACCEPT = [
    ("a@b", "a@b"),
    ("<a@b>", "a@b"),
    ("  a@b  ", "a@b"),
    ("<>", ""),
    ("", ""),
    ("root", "root"),
    ("www-data", "www-data"),
    ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
    ('"quoted local"@example.org', '"quoted local"@example.org'),
    ('"john"@example.org', "john@example.org"),
    ('"a\\"b"@example.org', '"a\\"b"@example.org'),
    ('"a..b"@example.org', '"a..b"@example.org'),
    ('"john doe"', '"john doe"'),
    ("a@[127.0.0.1]", "a@[127.0.0.1]"),
    ("a@[IPv6:::1]", "a@[IPv6:::1]"),
    ("a@[IPv6:2001:db8:0:0:0:0:0:1]", "a@[IPv6:2001:db8:0:0:0:0:0:1]"),
    ("a@[IPv6:::ffff:192.0.2.1]", "a@[IPv6:::ffff:192.0.2.1]"),
    ("<@relay.example,@r2.example:user@example.org>", "user@example.org"),
    ("jörg@bücher.example", "jörg@bücher.example"),
    ("用户@例子.广告", "用户@例子.广告"),
    ("a@host_name.example", "a@host_name.example"),
    ("a@Example.ORG", "a@Example.ORG"),
    ("x" * 64 + "@example.org", "x" * 64 + "@example.org"),
    ("a@" + "b" * 63 + ".example", "a@" + "b" * 63 + ".example"),
]


@pytest.mark.parametrize(("addr", "canonical"), ACCEPT)
def test_envelope_accepts(addr, canonical):
    assert check_envelope_address(addr) == canonical
    # canonical forms are fixed points
    assert check_envelope_address(canonical) == canonical


REJECT = [
    ("a b@c.example", "space outside quotes"),
    ("a@b@c.example", "more than one '@'"),
    ("@b.example", "empty local part"),
    ('""@b.example', "empty local part"),
    ("a@", "empty domain"),
    ("a@b..example", "bad domain label"),
    ("a@.b.example", "bad domain label"),
    ("a@b.example.", "bad domain label"),
    ("a@-b.example", "bad domain label"),
    ("a@b-.example", "bad domain label"),
    ("a@b c.example", "bad domain label"),
    ("a@" + "b" * 64 + ".example", "bad domain label"),
    (".a@b.example", "bad local part"),
    ("a.@b.example", "bad local part"),
    ("a..b@b.example", "bad local part"),
    ("a(b)@c.example", "bad local part"),
    ("a,b@c.example", "bad local part"),
    ("<a@b.example", "unterminated '<'"),
    ("a@b.example>", "unmatched '>'"),
    ("<<a@b.example>>", "bad local part"),
    ('"unterminated@b.example', "unterminated quote"),
    ('"a"b@c.example', "text after the quoted local part"),
    ("a@b.example\r\nRCPT TO:<x@y>", "CR, LF or NUL"),
    ("a@b.example\n", "CR, LF or NUL"),
    ("a\x00@b.example", "CR, LF or NUL"),
    ('"a\x01"@b.example', "control character"),
    ("a\x7f@b.example", "bad local part"),
    ("\udcff@b.example", "bad local part"),
    ("x" * 65 + "@example.org", "local part longer than 64"),
    ("a@" + ("b" * 60 + ".") * 5 + "example", "longer than 254"),
    ("a@[1.2.3.256]", "bad address literal"),
    ("a@[1.2.3]", "bad address literal"),
    ("a@[IPv6:1::2::3]", "bad address literal"),
    ("a@[IPv6:12345::1]", "bad address literal"),
    ("a@[IPv6:1:2:3:4:5:6:7:8:9]", "bad address literal"),
    ("a@[junk]", "bad address literal"),
    ("<@relay.example user@example.org>", "source route without ':'"),
]


@pytest.mark.parametrize(("addr", "why"), REJECT)
def test_envelope_rejects(addr, why):
    with pytest.raises(DataError) as info:
        check_envelope_address(addr)
    message = info.value.message
    assert message.startswith("invalid address: ")
    assert why in message
    assert "\n" not in message and "\r" not in message


def test_envelope_rejects_name_the_address():
    with pytest.raises(DataError, match="bad address") as info:
        check_envelope_address("bad address@example.org")
    assert "bad address@example.org" in info.value.message


def test_general_address_literal():
    assert check_envelope_address("a@[x-tag:content]") == "a@[x-tag:content]"


def test_qualify():
    assert qualify("root", "example.org") == "root@example.org"
    assert qualify("a@b.example", "example.org") == "a@b.example"
    assert qualify("", "example.org") == ""
    assert qualify('"a@b"', "example.org") == '"a@b"@example.org'
    assert qualify('"a@b"@c.example', "example.org") == '"a@b"@c.example'


def test_is_8bit_address():
    assert not is_8bit_address("root@example.org")
    assert is_8bit_address("jörg@example.org")
    assert is_8bit_address("joerg@bücher.example")


# --------------------------------------------------------------------------------------------
# aliases(5)
# --------------------------------------------------------------------------------------------

ALIASES_FILE = """\
# /etc/aliases
mailer-daemon: postmaster
postmaster: root
Root: admin@example.org,
    "john doe"@example.org
  # an indented comment does not end the entry
\t, bob
abuse:  "Security Team" <sec@example.org>, root
procmail: |/usr/bin/procmail
archive: /var/mail/archive, keep@example.org
lists: :include:/etc/mail/lists
blackhole: :blackhole:
quotedpipe: "|/usr/bin/vacation joe"
"quoted name": qn@example.org
dup: first@example.org
dup: second@example.org
"""


def test_parse_aliases_file():
    table, skipped = parse_aliases_file(ALIASES_FILE)
    assert table == {
        "mailer-daemon": ("postmaster",),
        "postmaster": ("root",),
        "root": ("admin@example.org", '"john doe"@example.org', "bob"),
        "abuse": ("sec@example.org", "root"),
        "archive": ("keep@example.org",),
        "quoted name": ("qn@example.org",),
        "dup": ("second@example.org",),
    }
    assert skipped == [
        ("procmail", "|/usr/bin/procmail"),
        ("archive", "/var/mail/archive"),
        ("lists", ":include:/etc/mail/lists"),
        ("blackhole", ":blackhole:"),
        ("quotedpipe", '"|/usr/bin/vacation joe"'),
    ]


def test_parse_aliases_crlf_and_last_definition_wins_even_when_undeliverable():
    table, skipped = parse_aliases_file("root: a@x.example\r\nroot: |cmd\r\n")
    assert table == {}
    assert skipped == [("root", "|cmd")]


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("root: a@x.example\nno colon here\n", 2, "no ':'"),
        ('\n\nbad: "unterminated\n', 3, "unterminated quoted string"),
        (": a@x.example\n", 1, "empty name"),
        ("x: a@b@c.example\n", 1, "two '@'"),
    ],
)
def test_parse_aliases_errors_name_the_line(text, line, why):
    with pytest.raises(DataError) as info:
        parse_aliases_file(text)
    assert info.value.message.startswith(f"aliases line {line}:")
    assert why in info.value.message


def _aliases(**table):
    return Aliases({k: tuple(v) if isinstance(v, list) else (v,) for k, v in table.items()})


def test_expand_bare_and_default_domain_only():
    al = _aliases(root=["admin@example.org"])
    assert al.expand("root", "example.org") == ["admin@example.org"]
    assert al.expand("ROOT@Example.ORG", "example.org") == ["admin@example.org"]
    assert al.expand("root@other.example", "example.org") == ["root@other.example"]
    assert al.expand("nobody", "example.org") == ["nobody@example.org"]


def test_expand_recursive_and_qualified():
    al = Aliases(parse_aliases_file(ALIASES_FILE)[0])
    assert al.expand("mailer-daemon", "example.org") == [
        "admin@example.org",
        '"john doe"@example.org',
        "bob@example.org",
    ]
    assert al.expand("abuse", "example.org") == [
        "sec@example.org",
        "admin@example.org",
        '"john doe"@example.org',
        "bob@example.org",
    ]
    assert al.expand('"quoted name"', "example.org") == ["qn@example.org"]


def test_expand_self_reference_and_cycles():
    al = _aliases(root=["root", "admin@example.org"], a="b", b="c", c=["a", "d@x.example"])
    assert al.expand("root", "example.org") == ["root@example.org", "admin@example.org"]
    assert al.expand("a", "example.org") == ["a@example.org", "d@x.example"]
    assert al.expand("b", "example.org") == ["b@example.org", "d@x.example"]


def test_expand_dedupes_case_insensitively_on_domain_only():
    al = _aliases(
        team=["Bob@Example.COM", "Bob@example.com", "bob@example.com", "x", "x@EXAMPLE.org"]
    )
    assert al.expand("team", "example.org") == [
        "Bob@Example.COM",
        "bob@example.com",
        "x@example.org",
    ]


def test_expand_all_dedupes_across_the_list():
    al = _aliases(root="admin", postmaster="root")
    result = al.expand_all(["root", "postmaster", "admin@example.org", "other"], "example.org")
    assert result == ["admin@example.org", "other@example.org"]


def test_expand_depth_limit():
    table = {f"a{i}": (f"a{i + 1}",) for i in range(30)}
    al = Aliases(table)
    assert al.expand("a15", "example.org") == ["a30@example.org"]
    with pytest.raises(DataError, match="deeper than 20 at a"):
        al.expand("a0", "example.org")


def test_expand_wide_dag_terminates():
    # 25 levels, each name pointing twice at the next: 2**25 paths, 26 results.
    table = {f"n{i}": (f"n{i + 1}", f"m{i + 1}") for i in range(19)}
    table.update({f"m{i}": (f"n{i}",) for i in range(1, 20)})
    al = Aliases(table)
    result = al.expand("n0", "example.org")
    assert result == ["n19@example.org"]


def test_config_table_values_may_be_lists_as_text_and_wins_over_file():
    table, _ = parse_aliases_file("root: c@x.example\n")
    table.update({"root": ("a@x.example, Admin <b@x.example>",)})  # as submit.aliases_for
    al = Aliases(table)
    assert al.expand("root", "example.org") == ["a@x.example", "b@x.example"]


def test_config_table_undeliverable_targets_are_skipped_and_listed():
    al = Aliases({"root": ("|/bin/cmd", "/var/mail/x", "ok@x.example")})
    assert al.expand("root", "example.org") == ["ok@x.example"]
    assert al.skipped == [("root", "|/bin/cmd"), ("root", "/var/mail/x")]
    only_bad = Aliases({"root": ("|/bin/cmd",)})
    assert only_bad.expand("root", "example.org") == ["root@example.org"]


def test_invalid_alias_target_names_the_alias():
    al = Aliases({"root": ("a@-bad.example",)})
    with pytest.raises(DataError) as info:
        al.expand("root", "example.org")
    assert info.value.message.startswith("alias root: invalid address: a@-bad.example")
    assert al.expand("other", "example.org") == ["other@example.org"]


def test_expand_null_sender_gives_nothing():
    assert _aliases(root="a@x.example").expand("", "example.org") == []


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"

atoms = st.text(st.sampled_from(ATEXT + "éß用"), min_size=1, max_size=8)
dot_atom = st.lists(atoms, min_size=1, max_size=3).map(".".join)
quoted_content = st.text(
    st.sampled_from(ATEXT + ' "\\.,:;<>@()[]é'), min_size=1, max_size=10
).filter(lambda s: not _is_dot_atom(s))
label = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-ü"), min_size=1, max_size=10
).filter(lambda s: s[0] != "-" and s[-1] != "-")
domain = st.one_of(
    st.lists(label, min_size=1, max_size=4).map(".".join),
    st.sampled_from(["[127.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::ff00:42:8329]"]),
)


def _is_dot_atom(s):
    return (
        bool(s)
        and s[0] != "."
        and s[-1] != "."
        and ".." not in s
        and all(c == "." or c in ATEXT or ord(c) > 127 for c in s)
    )


def _quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _canonical(spec):
    """The form parse_address_list returns: a quoted local part only when needed."""
    if not spec.startswith('"'):
        return spec
    chars, j = [], 1
    while spec[j] != '"':
        if spec[j] == "\\":
            j += 1
        chars.append(spec[j])
        j += 1
    inner, dom = "".join(chars), spec[j + 2 :]
    return f"{inner if _is_dot_atom(inner) else _quote(inner)}@{dom}"


def _fits(spec):
    canon = _canonical(spec)
    local = canon.rpartition("@")[0]
    return len(canon.encode()) <= 254 and len(local.encode()) <= 64


local_part = st.one_of(dot_atom, quoted_content.map(_quote))
addr_spec = st.builds(lambda lp, d: f"{lp}@{d}", local_part, domain).filter(_fits)

phrase_word = st.one_of(
    atoms,
    st.text(st.sampled_from(ATEXT + ' ,.:;<>@()[]\\"é'), max_size=8).map(_quote),
    st.sampled_from(["=?UTF-8?B?w6k=?=", "=?iso-8859-1?q?Andr=E9?=", "Q.", "J."]),
)
comment = st.text(st.sampled_from(ATEXT + ' ,:;<>@[]"é'), max_size=10).map(lambda s: f"({s})")


@st.composite
def mailbox(draw):
    """(header text of one mailbox, its canonical addr-spec)."""
    spec = draw(addr_spec)
    style = draw(st.integers(0, 3))
    if style == 0:
        text = spec
    elif style == 1:
        text = f"<{spec}>"
    elif style == 2:
        words = draw(st.lists(phrase_word, min_size=1, max_size=3))
        text = " ".join(words) + f" <{spec}>"
    else:
        text = f"{spec} {draw(comment)}"
    if draw(st.booleans()):
        text = draw(comment) + " " + text
    return text, spec


@st.composite
def address_list(draw):
    items = draw(st.lists(mailbox(), max_size=6))
    out = []
    expected = []
    i = 0
    while i < len(items):
        if draw(st.booleans()) and i + 1 < len(items):
            group = items[i : i + 2]
            out.append("grp: " + ", ".join(t for t, _ in group) + ";")
            expected += [a for _, a in group]
            i += 2
        else:
            out.append(items[i][0])
            expected.append(items[i][1])
            i += 1
    sep = draw(st.sampled_from([", ", ",\r\n ", " ,,", ",\t"]))
    return sep.join(out), expected


@settings(max_examples=400)
@given(address_list())
def test_property_format_then_parse_round_trips(pair):
    text, expected = pair
    assert parse_address_list(text) == [_canonical(a) for a in expected]


@settings(max_examples=300)
@given(addr_spec)
def test_property_valid_addr_specs_pass_the_envelope_check(spec):
    canon = _canonical(spec)
    result = check_envelope_address(f"<{spec}>")
    assert result == canon
    assert check_envelope_address(result) == result


header_alphabet = st.sampled_from(
    [*'abc@.,;:<>()[]"\\ \t\r\n', "é", "\udce9", "\x00", "=?", "a@b", "x:"]
)


@settings(max_examples=1000)
@given(st.one_of(st.text(), st.lists(header_alphabet, max_size=40).map("".join)))
def test_property_parser_raises_only_data_error(text):
    try:
        result = parse_address_list(text)
    except DataError as exc:
        assert "\n" not in exc.message
        return
    for addr in result:
        assert addr and all(ord(c) >= 32 and ord(c) != 127 for c in addr)
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in addr)


@settings(max_examples=1000)
@given(st.one_of(st.text(), st.lists(header_alphabet, max_size=30).map("".join)))
def test_property_envelope_check_is_idempotent(text):
    try:
        result = check_envelope_address(text)
    except DataError as exc:
        assert exc.message.startswith("invalid address: ")
        return
    assert check_envelope_address(result) == result
    assert check_envelope_address(f"<{result}>") == result
    assert not any(c in result for c in "\r\n\x00")


@settings(max_examples=500)
@given(
    st.one_of(
        st.text(),
        st.lists(header_alphabet | st.sampled_from(["|", "/", "#"]), max_size=60).map("".join),
    )
)
def test_property_aliases_parser_raises_only_data_error(text):
    try:
        table, _skipped = parse_aliases_file(text)
    except DataError as exc:
        assert exc.message.startswith("aliases line ")
        return
    assert all(name == name.lower() and targets for name, targets in table.items())


names = st.sampled_from(["a", "b", "c", "d", "root"])
targets = st.one_of(
    names,
    names.map(str.upper),
    names.map(lambda n: n + "@Example.ORG"),
    st.just("x@y.example"),
)


@settings(max_examples=500)
@given(st.dictionaries(names, st.lists(targets, max_size=4)), names)
def test_property_expansion_terminates_qualified_and_unique(table, start):
    al = Aliases({k: tuple(v) for k, v in table.items()})
    result = al.expand(start, "example.org")
    assert all("@" in r for r in result)
    keys = [(r.partition("@")[0], r.partition("@")[2].lower()) for r in result]
    assert len(keys) == len(set(keys))
    # A result in the default domain is not an alias, or an alias that reaches itself.
    graph = {
        k: [t.partition("@")[0].lower() for t in v if not t.endswith("y.example")]
        for k, v in table.items()
    }
    for r in result:
        local, _, dom = r.partition("@")
        if dom.lower() == "example.org" and graph.get(local.lower()):
            assert _reaches(graph, local.lower(), local.lower())


def _reaches(graph, start, goal):
    seen, todo = set(), list(graph.get(start, []))
    while todo:
        n = todo.pop()
        if n == goal:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(graph.get(n, []))
    return False


# --------------------------------------------------------------------------------------------
# Examples pinned by mutation testing (issue 28): each tells two behaviours apart
# --------------------------------------------------------------------------------------------


def test_dedupe_key_keeps_domains_apart():
    """root@a.org and root@b.org are two recipients: dropping one loses mail."""
    assert dedupe_key("root@a.org") != dedupe_key("root@b.org")
    assert dedupe_key("root@A.org") == dedupe_key("root@a.ORG") == ("root", "a.org")
    assert dedupe_key("Root@a.org") != dedupe_key("root@a.org")
    assert dedupe_key("root") == ("root", "")
    assert dedupe_key('"a@b"@C.example') == ('"a@b"', "c.example")


@pytest.mark.parametrize(
    ("addr", "parts"),
    [
        ("a@b", ("a", "b")),
        ("a", ("a", None)),
        ("a@", ("a", "")),
        ('"a@b"@c', ('"a@b"', "c")),
        ('"a\\"@b"@c', ('"a\\"@b"', "c")),
        ('"a\\\\"@c', ('"a\\\\"', "c")),
        ('"a b"', ('"a b"', None)),
        ('"a"x', ('"a"x', None)),
    ],
)
def test_split_address(addr, parts):
    assert split_address(addr) == parts


@pytest.mark.parametrize(
    ("local", "plain"),
    [
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"john doe"', "john doe"),
        ('""', ""),
        ('"', '"'),
        ("abc", "abc"),
        ('"a\\"', "a\\"),  # a backslash just before the closing quote is kept
    ],
)
def test_unquote_local(local, plain):
    assert unquote_local(local) == plain


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ('"a\\x1f"@b.example', False),
        ('"a "@b.example', True),
        ('"a ~"@b.example', True),
        ('"a\\x7f"@b.example', False),
        ('"a\\x9f"@b.example', False),
        ('"a \\xa0"@b.example', True),
        ('"a \\u2027"@b.example', True),
        ('"a\\u2028"@b.example', False),
        ('"a\\u2029"@b.example', False),
        ('"a \\ud7ff"@b.example', True),
        ('"a\\ud800"@b.example', False),
        ('"a\\udfff"@b.example', False),
        ('"a \\ue000"@b.example', True),
        ("\\u00e9.b@c.example", True),
        ("a\\u0085@c.example", False),  # a C1 control (NEL) is not text
        ("a\\u2028@c.example", False),
    ],
)
def test_which_characters_an_address_may_hold(addr, ok):
    addr = addr.encode().decode("unicode_escape", "surrogatepass")
    if ok:
        assert check_envelope_address(addr) == addr
    else:
        with pytest.raises(DataError):
            check_envelope_address(addr)


@pytest.mark.parametrize(
    ("literal", "ok"),
    [
        ("0.0.0.0", True),
        ("255.255.255.255", True),
        ("256.1.1.1", False),
        ("1.2.3.04", False),
        ("1.2.3.0", True),
        ("1.2.3.4.5", False),
        ("1..3.4", False),
        ("1.2.3.1234", False),
        ("1.2.3.\\u0661", False),
        ("IPv6:1:2:3:4:5:6:7:8", True),
        ("IPv6:1:2:3:4:5:6:7", False),
        ("IPv6:1:2:3:4:5:6:7:8:9", False),
        ("ipv6:1::8", True),
        ("IPv6:1:2:3:4:5:6:7::", True),
        ("IPv6:1:2:3:4:5:6:7:8::", False),
        ("IPv6:::", True),
        ("IPv6:1:2:3:4:5:6:1.2.3.4", True),
        ("IPv6:1:2:3:4:5:6:7:1.2.3.4", False),
        ("IPv6:::ffff:1.2.3.256", False),
        ("IPv6:::ffff:1.2.3", False),
        ("IPv6:1:::2", False),
        ("IPv6:abcd::ABCD", True),
        ("IPv6:abcg::1", False),
        ("IPv6:12345::1", False),
        ("IPv6:1234::1", True),
        ("IPv6:1:2", False),
        ("x-tag:content", True),
        ("x:~!", True),
        ("tag-:content", False),
        (":content", False),
        ("tag:", False),
        ("t_g:content", False),
        ("tag:a b", False),
        ("tag:a]", False),
        ("tag:a[", False),
        ("tag:a\\\\", False),
        ("tag:a\\x7f", False),
        ("tag", False),
    ],
)
def test_address_literals(literal, ok):
    literal = literal.encode().decode("unicode_escape")
    problem = domain_problem(f"[{literal}]")
    assert (problem is None) is ok, problem
    if not ok:
        assert problem == "bad address literal"


@pytest.mark.parametrize(
    ("domain", "problem"),
    [
        ("", "empty domain"),
        ("[1.2.3.4", "bad address literal"),
        ("[]", "bad address literal"),
        ("a" * 63, None),
        ("a" * 64, "bad domain label"),
        ("\u00e9" * 31 + "a", None),  # 63 octets in UTF-8
        ("\u00e9" * 32, "bad domain label"),  # 64 octets
        ("a_b.example", None),
        ("-a.example", "bad domain label"),
        ("a-.example", "bad domain label"),
        ("a-b.example", None),
        ("a\u0085b.example", "bad domain label"),
        ("a..b", "bad domain label"),
        ("a!b.example", "bad domain label"),
    ],
)
def test_domain_problems(domain, problem):
    assert domain_problem(domain) == problem


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("a\tb@c.example", "invalid address: a b@c.example (space outside quotes)"),
        ("<a@b.example", "invalid address: <a@b.example (unterminated '<')"),
        ("a@b.example>", "invalid address: a@b.example> (unmatched '>')"),
        ("<@r.example>", "invalid address: <@r.example> (source route without ':')"),
        ('"a"@', 'invalid address: "a"@ (empty domain)'),
        ('"a', 'invalid address: "a (unterminated quote)'),
        ('"a\\', 'invalid address: "a\\ (unterminated quote)'),
        ("a@b@c", "invalid address: a@b@c (more than one '@')"),
        ("", None),
    ],
)
def test_envelope_messages_in_full(addr, message):
    if message is None:
        assert check_envelope_address(addr) == ""
        return
    with pytest.raises(DataError) as info:
        check_envelope_address(addr)
    assert info.value.message == message


def test_envelope_length_limits_count_octets():
    local64 = "\u00e9" * 32  # 64 octets
    assert check_envelope_address(f"{local64}@x.example") == f"{local64}@x.example"
    with pytest.raises(DataError, match="local part longer than 64 octets"):
        check_envelope_address(f"{local64}a@x.example")
    quoted = '"' + "a b" * 20 + '"'  # 62 octets with its quotes
    assert check_envelope_address(quoted + "@x.example") == quoted + "@x.example"
    with pytest.raises(DataError, match="local part longer than 64 octets"):
        check_envelope_address('"' + "a b" * 21 + '"@x.example')
    domain = ".".join(["b" * 63] * 3) + "." + "c" * 60  # 252 octets
    assert check_envelope_address("a@" + domain[1:]) == "a@" + domain[1:]  # 253: fits
    assert check_envelope_address("ab@" + domain[1:]) == "ab@" + domain[1:]  # 254: fits
    with pytest.raises(DataError, match="longer than 254 octets"):
        check_envelope_address("abc@" + domain[1:])  # 255


def test_envelope_quoted_local_forms():
    assert check_envelope_address('"john"') == "john"
    assert check_envelope_address('"a@b"') == '"a@b"'
    assert check_envelope_address('"a\\\\b"@x.example') == '"a\\\\b"@x.example'
    assert check_envelope_address("\t<a@b.example>\t") == "a@b.example"
    assert check_envelope_address("<@a.example:b@c.example>") == "b@c.example"


def test_qualify_quoted_and_bare():
    assert qualify('"a b"', "example.org") == '"a b"@example.org'
    assert qualify("a@", "example.org") == "a@"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@b.example (x\\) y), c@d.example", ["a@b.example", "c@d.example"]),
        ("a@b.example (x (y) z) (w)", ["a@b.example"]),
        ('"a\\"b" <c@d.example>', ["c@d.example"]),
        ('"a\r\n b"@x.example', ['"a b"@x.example']),
        ('"a\\\\"@x.example', ['"a\\\\"@x.example']),
        ("a@[x\\]y]", ["a@[x\\]y]"]),
        ('"a".b@x.example', ["a.b@x.example"]),
        ("a.b.c@x.example", ["a.b.c@x.example"]),
        ("<a@x.example> b@y.example", ["a@x.example", "b@y.example"]),
        ("<a@x.example> Bob", ["a@x.example"]),
        ("g: a@x.example; b@y.example", ["a@x.example", "b@y.example"]),
        ("g1: a@x.example;, g2: ;, c@z.example", ["a@x.example", "c@z.example"]),
        ("a@x.example;;b@y.example", ["a@x.example", "b@y.example"]),
        ("<>, a@x.example", ["a@x.example"]),
        ("\t a@x.example \t", ["a@x.example"]),
        ("a!#$%&'*+-/=?^_`{|}~@x.example", ["a!#$%&'*+-/=?^_`{|}~@x.example"]),
    ],
)
def test_parse_more_examples(text, expected):
    assert parse_address_list(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("a@[x[y]", "unterminated domain literal"),
        ("a@b..c", "unexpected '.' in a domain"),
        ("a@.b", "unexpected '.' in a domain"),
        ("a@b c", "unexpected 'c' in a domain"),
        ("a@b,c d", "words without '@' or '<>'"),
        ("a@[1.2.3.4].b", "unexpected '[1.2.3.4]' in a domain"),
        ("a@b.[1.2.3.4]", "unexpected '[1.2.3.4]' in a domain"),
        ('a@"b"', "unexpected 'b' in a domain"),
        (".@x.example", "empty local part"),
        ("a] b", "unexpected ']'"),
        ("a\\b", "unexpected '\\\\'"),
        ("<@a.example b@c.example>", "source route without ':'"),
        ("<@a.example", "source route without ':'"),
        ("<a,b@c.example>", "unexpected ',' inside '<>'"),
        ("<a;b@c.example>", "unexpected ';' inside '<>'"),
        ("<a:b@c.example>", "unexpected ':' inside '<>'"),
        ("a@b.example: c", "unexpected ':'"),
        ("a@b.example>", "unexpected '>'"),
        ('"a" <b@c.example> x: d', "unexpected ':'"),
        ('"a\\', "unterminated quoted string"),
    ],
)
def test_parse_error_messages_in_full(text, why):
    with pytest.raises(DataError) as info:
        parse_address_list(text)
    message = info.value.message
    assert (
        message.startswith("cannot parse address list (")
        or message.startswith("unterminated")
        or message.startswith("unexpected")
    )
    assert f"{why}" in message and message.endswith(text.replace("\r", "?").replace("\n", "?"))


def test_parse_errors_have_one_shape():
    with pytest.raises(DataError) as info:
        parse_address_list("a@b@c.example")
    assert info.value.message == "cannot parse address list (two '@' in one address): a@b@c.example"
    with pytest.raises(DataError) as info:
        parse_address_list('x "open')
    assert info.value.message == 'unterminated quoted string in address list: x "open'
    with pytest.raises(DataError) as info:
        parse_address_list("a (open")
    assert info.value.message == "unterminated comment in address list: a (open"
    with pytest.raises(DataError) as info:
        parse_address_list("a@[1.2")
    assert info.value.message == "unterminated domain literal in address list: a@[1.2"
    with pytest.raises(DataError) as info:
        parse_address_list("a ] b")
    assert info.value.message == "unexpected ']' in address list: a ] b"


def test_find_unqualified_points_at_the_end_of_each_bare_name():
    assert find_unqualified("root") == [4]
    assert find_unqualified("a.b, c@d") == [3]
    assert find_unqualified('"x y"') == [5]
    assert find_unqualified("<root>, bin") == [5, 11]
    assert find_unqualified("a@b") == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("<a@b.example", "unterminated '<'"),
        ("<@x.example a@b.example>", "source route without ':'"),
        ("a@", "empty domain"),
        ("a@b.", "domain ends with '.'"),
        ("@b.example", "empty local part"),
        ("a@b.example>", "unexpected '>'"),
        ("a@b.example:", "unexpected ':'"),
        ("foo bar", "words without '@' or '<>'"),
        ("a\x01@b.example", "control character or invalid UTF-8 in an address"),
    ],
)
def test_a_header_address_list_error_says_what_is_wrong(text, why):
    """The reason is what the sender reads to fix the header: each problem its own words."""
    with pytest.raises(DataError) as info:
        parse_address_list(text)
    assert info.value.message == f"cannot parse address list ({why}): {shown(text)}"


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("a\x01@b.example", "bad local part"),
        ('"a\x01"@b.example', "control character or invalid UTF-8"),
        ("@b.example", "empty local part"),
    ],
)
def test_an_envelope_address_error_says_what_is_wrong(addr, why):
    with pytest.raises(DataError) as info:
        check_envelope_address(addr)
    assert info.value.message == f"invalid address: {shown(addr)} ({why})"
