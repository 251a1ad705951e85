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
