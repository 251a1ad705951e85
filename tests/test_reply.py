"""reply.py: a reply's fields, its stored form, and the one reader of the old text form."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailshim import reply as reply_mod
from mailshim.reply import KINDS, Reply


def test_docstring_examples():
    assert doctest.testmod(reply_mod).failed == 0


@pytest.mark.parametrize(
    ("code", "text", "enhanced", "rest"),
    [
        (550, "5.1.1 No such user", "5.1.1", "No such user"),
        (452, "4.4.5 Rate limit exceeded", "4.4.5", "Rate limit exceeded"),
        (250, "2.0.0", "2.0.0", ""),
        (550, "4.7.1 wrong class", "", "4.7.1 wrong class"),  # RFC 3463: class must match
        (550, "5.1 too short", "", "5.1 too short"),
        (550, "5.1.1234 too long", "", "5.1.1234 too long"),
        (250, "first line 2.0.0 second line", "", "first line 2.0.0 second line"),
        (0, "5.1.1 not a reply", "", "5.1.1 not a reply"),
    ],
)
def test_the_enhanced_status_is_split_off_once(code, text, enhanced, rest):
    got = Reply(code, text)
    assert (got.enhanced, got.text) == (enhanced, rest)
    assert str(got) == (f"{code} {text}".rstrip() if code else text)


def test_a_refusal_at_mail_from_says_so():
    reply = Reply(550, "Message too big!").at("mail")
    assert reply.at_mail and reply.stage == "mail" and reply.text == "Message too big!"
    assert str(reply) == "550 Message too big! (in reply to MAIL FROM)"
    assert reply != Reply(550, "Message too big!")
    assert "SIZE" in str(Reply(552, "5.3.4 too big", stage="size"))
    assert not Reply(0, "timed out", stage="mail").at_mail


def test_kind_belongs_to_failures_only():
    assert Reply(0, "timed out", kind="timeout").kind == "timeout"
    assert Reply(451, "later", kind="timeout").kind == ""
    assert Reply(0, "x", kind="refused").listener_down
    assert not Reply(0, "x", kind="local").listener_down
    assert not Reply(451, "later").listener_down


@given(
    st.sampled_from([0, 250, 451, 452, 550, 554]),
    st.text(max_size=60),
    st.sampled_from(["", *sorted(KINDS)]),
    st.sampled_from(["", "mail", "size"]),
)
def test_fields_round_trip(code, text, kind, stage):
    original = Reply(code, text, kind=kind, stage=stage)
    assert Reply.from_fields(original.as_fields()) == original


@pytest.mark.parametrize(
    "fields",
    [
        "550 no",
        {"code": 550},
        {"code": True, "text": ""},
        {"code": 600, "text": ""},
        {"code": 550, "text": 5},
        {"code": 550, "text": "", "enhanced": "4.1.1"},
        {"code": 550, "text": "", "kind": "refused"},
        {"code": 0, "text": "", "kind": "not-a-kind"},
        {"code": 0, "text": "", "extra": 1},
        {"code": 550, "text": "", "stage": "rcpt"},
        {"code": 0, "text": "", "stage": "mail"},
        {"code": 0, "text": "x" * 10000},
    ],
)
def test_damaged_fields_are_refused(fields):
    with pytest.raises(ValueError):
        Reply.from_fields(fields)


@given(st.text(max_size=80))
def test_any_old_text_reads_as_some_reply(line):
    got = Reply.from_legacy(line)
    assert got.code == 0 or 200 <= got.code <= 599
    assert Reply.from_fields(got.as_fields()) == got


@pytest.mark.parametrize("code", ["550", "0", 550.0, None, [550]])
def test_a_stored_code_that_is_not_an_integer_is_a_value_error(code):
    """The state reader turns ValueError (only) into DataError: the entry goes to corrupt/.
    A TypeError from comparing a string with a number would crash the runner instead."""
    with pytest.raises(ValueError) as info:
        Reply.from_fields({"code": code, "text": "x"})
    assert str(info.value) == "a reply's code is 0 or 200-599"


@pytest.mark.parametrize(
    ("code", "ok"), [(0, True), (1, False), (199, False), (200, True), (599, True), (600, False)]
)
def test_stored_code_range(code, ok):
    fields = {"code": code, "text": "x"}
    if ok:
        assert Reply.from_fields(fields).code == code
    else:
        with pytest.raises(ValueError, match="code is 0 or 200-599"):
            Reply.from_fields(fields)


def test_stored_text_length_limit():
    assert Reply.from_fields({"code": 0, "text": "x" * reply_mod.MAX_FIELD}).text.startswith("x")
    with pytest.raises(ValueError) as info:
        Reply.from_fields({"code": 0, "text": "x" * (reply_mod.MAX_FIELD + 1)})
    assert str(info.value) == "a reply's text is not text"


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"code": 550, "text": "", "enhanced": 5}, "enhanced status does not match its code"),
        ({"code": 550, "text": "", "enhanced": "5.1"}, "enhanced status does not match its code"),
        ({"code": 0, "text": "", "kind": 1}, "kind is not one mailshim writes"),
        ({"code": 0, "text": "", "stage": 1}, "stage is not one mailshim writes"),
        ({"code": 550, "text": "", "stage": "rcpt"}, "stage is not one mailshim writes"),
        (["code", "text"], None),
        ({"code": 550, "text": "", "why": "x"}, None),
    ],
)
def test_damaged_fields_say_which(fields, why):
    with pytest.raises(ValueError) as info:
        Reply.from_fields(fields)
    if why is None:
        assert str(info.value) == "a reply is a table of code, text, enhanced and kind"
    else:
        assert str(info.value) == f"a reply's {why}"


def test_every_stored_field_at_once_is_read():
    fields = {"code": 550, "text": "no", "enhanced": "5.1.1", "kind": "", "stage": "mail"}
    assert Reply.from_fields(fields) == Reply(550, "5.1.1 no", stage="mail")


def test_stored_fields_read_back_every_value():
    got = Reply.from_fields({"code": 552, "text": "too big", "enhanced": "5.3.4", "stage": "size"})
    assert (got.code, got.enhanced, got.text, got.kind, got.stage) == (
        552, "5.3.4", "too big", "", "size",
    )  # fmt: skip
    got = Reply.from_fields({"code": 0, "text": "timed out", "kind": "timeout"})
    assert (got.code, got.enhanced, got.text, got.kind, got.stage) == (
        0, "", "timed out", "timeout", "",
    )  # fmt: skip
    # an empty enhanced status is not split again from the text
    assert Reply.from_fields({"code": 550, "text": "5.1.1 x"}).text == "5.1.1 x"


def test_as_fields_writes_only_what_is_set():
    assert Reply(250, "ok").as_fields() == {"code": 250, "text": "ok"}
    assert Reply(0, "t", kind="timeout").as_fields() == {"code": 0, "text": "t", "kind": "timeout"}
    assert Reply(550, "5.1.1 no", stage="mail").as_fields() == {
        "code": 550, "text": "no", "enhanced": "5.1.1", "stage": "mail",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("code", "temporary", "permanent", "accepted"),
    [
        (0, True, False, False),
        (199, False, False, False),
        (200, False, False, True),
        (299, False, False, True),
        (300, False, False, False),
        (399, False, False, False),
        (400, True, False, False),
        (499, True, False, False),
        (500, False, True, False),
        (599, False, True, False),
        (600, False, False, False),
    ],
)
def test_reply_classes_at_their_boundaries(code, temporary, permanent, accepted):
    got = Reply(code, "x")
    assert (got.temporary, got.permanent, got.accepted) == (temporary, permanent, accepted)


@pytest.mark.parametrize(
    ("word", "code", "ok"),
    [
        ("2.0.0", 200, True),
        ("5.9.999", 599, True),
        ("5.1.1", 600, False),
        ("6.0.0", 600, False),
        ("1.1.1", 199, False),
        ("4.1.1", 550, False),
        ("5.1.1.1", 550, False),
        ("5..1", 550, False),
        ("5.1.a", 550, False),
        ("5.1.\u0661", 550, False),  # an Arabic-Indic digit is a digit, but not ASCII
        ("5.1000.1", 550, False),
        ("5.100.100", 550, True),
    ],
)
def test_enhanced_code(word, code, ok):
    assert reply_mod.enhanced_code(word, code) is ok


def test_text_after_the_enhanced_status_loses_its_leading_spaces_only():
    got = Reply(550, "5.1.1    no such user  ")
    assert got.text == "no such user  " and got.detail == "5.1.1 no such user"


def test_detail_and_str_without_an_enhanced_status():
    got = Reply(550, "no such user")
    assert got.detail == "no such user" and str(got) == "550 no such user"
    assert str(Reply(250, "")) == "250"
    assert Reply(250, "2.0.0").detail == "2.0.0"


def test_repr_shows_kind_and_stage_only_when_set():
    assert repr(Reply(550, "5.1.1 no")) == "Reply(550, '5.1.1 no')"
    assert repr(Reply(0, "t", kind="timeout")) == "Reply(0, 't', kind='timeout')"
    assert repr(Reply(552, "big", stage="size")) == "Reply(552, 'big', stage='size')"


def test_equal_replies_hash_alike_and_differ_in_any_field():
    base = Reply(550, "5.1.1 no", stage="mail")
    assert base == Reply(550, "5.1.1 no", stage="mail") and len({base, base.at("mail")}) == 1
    for other in (
        Reply(551, "5.1.1 no", stage="mail"),
        Reply(550, "5.1.2 no", stage="mail"),
        Reply(550, "5.1.1 yes", stage="mail"),
        Reply(550, "5.1.1 no"),
        Reply(550, "5.1.1 no", stage="size"),
    ):
        assert base != other
    assert Reply(0, "x", kind="timeout") != Reply(0, "x", kind="refused")
    assert base != "550 5.1.1 no" and base.__eq__("550") is NotImplemented


def test_at_keeps_the_kind_of_a_failure():
    assert Reply(0, "timed out", kind="timeout").at("mail").kind == "timeout"


def test_at_keeps_every_field_but_the_stage():
    got = Reply(552, "5.3.4 too big").at("size")
    assert (got.code, got.enhanced, got.text, got.stage) == (552, "5.3.4", "too big", "size")
    assert str(got) == "552 5.3.4 too big (in reply to MAIL FROM; SIZE over the listener's limit)"


def test_not_tried_is_not_the_listener_being_down():
    assert not Reply(0, "x", kind="not-tried").listener_down
    assert Reply(0, "x", kind="timeout").listener_down and Reply(0, "x").listener_down


@pytest.mark.parametrize(
    ("line", "code", "text"),
    [
        ("550 5.1.1 no", 550, "5.1.1 no"),
        ("250-first", 250, "first"),
        ("250", 250, ""),
        ("599 x", 599, "x"),
        ("200 x", 200, "x"),
        ("199 x", 0, "199 x"),
        ("600 x", 0, "600 x"),
        ("550x y", 0, "550x y"),
        ("55", 0, "55"),
        ("\u0665\u0665\u0660 x", 0, "\u0665\u0665\u0660 x"),
    ],
)
def test_legacy_lines(line, code, text):
    got = Reply.from_legacy(line)
    assert (got.code, str(got) if code == 0 else got.code) == (code, text if code == 0 else code)
    if code:
        assert f"{got.enhanced} {got.text}".strip() == text


def test_clean_text_makes_one_bounded_line():
    assert reply_mod.clean_text("a\r\nb\nc") == "a b c"
    # every line break Python knows is one, not a "?" (VT, FF, NEL, the Unicode separators)
    for sep in ("\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"):
        assert reply_mod.clean_text(f"a{sep}b") == "a b"
    assert reply_mod.clean_text("plain text") == "plain text"
    assert reply_mod.clean_text("x" * 5000) == "x" * reply_mod.MAX_TEXT + "..."
    assert reply_mod.clean_text("x" * reply_mod.MAX_TEXT) == "x" * reply_mod.MAX_TEXT
