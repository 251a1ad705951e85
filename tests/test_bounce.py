"""bounce: RFC 3464 reports, checked with the standard library's MIME parser."""

from __future__ import annotations

import ast
import email
import email.policy
import importlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailshim import bounce
from mailshim.reply import Reply
from mailshim.spoolfmt import Envelope

QID = "0645F1A2B3C4DK3J9QXA"
HEADERS = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"


def report(**kw) -> bytes:
    args = dict(
        kind=bounce.FAILED,
        envelope=Envelope(QID, "alice@example.org", ["bob@example.net"], 1_795_450_027, 1000),
        recipients={"bob@example.net": "550 5.1.1 <bob@example.net>: no such user"},
        original_headers=HEADERS,
        reporting_mta="mx.example.org",
        domain="example.org",
        now=1_795_460_000,
        utc_offset=3600,
        message_id="0645F1A2B3C4DZZZZZZZ",
    )
    args.update(kw)
    # Replies are written as the listener said them; the runner hands them over as fields.
    args["recipients"] = {r: Reply.from_legacy(v) for r, v in args["recipients"].items()}
    return bounce.build_report(**args)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def status_blocks(msg) -> list[dict[str, str]]:
    (part,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    raw = part.as_bytes().split(b"\n\n", 1)[1].decode().replace("\r\n", "\n")
    # message/delivery-status holds blocks of fields separated by blank lines
    blocks = []
    for chunk in raw.strip("\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in chunk.replace("\n ", " ").replace("\n\t", " ").split("\n"):
            if line.strip():
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        blocks.append(fields)
    return blocks


def test_failure_report_structure():
    data = report()
    msg = parse(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@example.org>"
    assert msg["To"] == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = next(msg.iter_parts()).get_content().replace("\r\n", "\n")
    assert "<bob@example.net>:\n    550 5.1.1 <bob@example.net>: no such user" in human
    per_message, per_rcpt = status_blocks(msg)
    assert per_message["reporting-mta"] == "dns; mx.example.org"
    assert per_message["arrival-date"] == "Mon, 23 Nov 2026 17:07:07 +0100"
    assert per_rcpt["final-recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["action"] == "failed"
    assert per_rcpt["status"] == "5.1.1"
    assert per_rcpt["diagnostic-code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    original = list(msg.iter_parts())[2]
    assert original.get_payload(decode=True) == HEADERS


def test_wire_form_is_crlf_only_and_lines_are_short():
    data = report(recipients={f"r{i}@example.net": "550 " + "x " * 400 for i in range(3)})
    assert data.count(b"\n") == data.count(b"\r\n") and b"\r\r" not in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.endswith(b"\r\n")


def test_long_and_non_ascii_addresses_and_replies_keep_lines_within_998_octets():
    rcpt = "\u00e9" * 400 + "@example.net"  # 2 octets a character
    data = report(
        envelope=Envelope(QID, "\U0001f600" * 300 + "@example.org", [rcpt], 1, 0),
        recipients={rcpt: "550 " + "\u4e2d" * 2000, "x@example.net": "550 " + "y" * 3000},
    )
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    parse(data)


def test_delay_warning_says_it_will_retry():
    msg = parse(
        report(
            kind=bounce.DELAYED,
            recipients={"bob@example.net": "451 4.3.0 try later"},
            retry_until=1_795_450_027 + 5 * 86400,
        )
    )
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert "THIS IS A WARNING ONLY" in next(msg.iter_parts()).get_content()
    _, rcpt = status_blocks(msg)
    assert rcpt["action"] == "delayed" and rcpt["status"] == "4.3.0"
    assert rcpt["will-retry-until"] == "Sat, 28 Nov 2026 17:07:07 +0100"


def test_expired_recipient_without_a_reply_code():
    msg = parse(
        report(
            recipients={"bob@example.net": "connect to relay[127.0.0.1]:10025: refused"},
            expired=["bob@example.net"],
        )
    )
    _, rcpt = status_blocks(msg)
    assert rcpt["status"] == "4.4.7" and rcpt["action"] == "failed"
    assert rcpt["diagnostic-code"].startswith("X-mailshim; connect to relay")
    assert "expired" in next(msg.iter_parts()).get_content()


def test_boundary_is_not_in_the_original_headers():
    first = parse(report()).get_boundary()
    hostile = HEADERS + f"X-Trap: --{first}\r\n--{first}--\r\n".encode()
    msg = parse(report(original_headers=hostile))
    assert msg.get_boundary() != first
    assert [p.get_content_type() for p in msg.iter_parts()][-1] == "text/rfc822-headers"
    assert list(msg.iter_parts())[2].get_payload(decode=True) == hostile


def test_eight_bit_headers_make_an_eight_bit_report():
    data = report(original_headers=b"Subject: caf\xc3\xa9\r\n")
    assert b"Content-Transfer-Encoding: 8bit" in data
    assert not data.isascii()
    plain = report()
    assert plain.isascii() and b"Content-Transfer-Encoding: 7bit" in plain


def test_huge_original_headers_are_cut_at_a_line_end():
    big = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(5000))
    data = report(original_headers=big)
    part = list(parse(data).iter_parts())[2].get_payload(decode=True)
    assert len(part) <= bounce.MAX_ORIGINAL_HEADERS and part.endswith(b"\r\n")
    assert big.startswith(part)


def test_control_characters_from_the_listener_stay_on_one_line():
    data = report(recipients={"bob@example.net": "550 5.1.1 evil\r\nBcc: x@example.org\x00"})
    assert b"\r\nBcc:" not in data and b"\x00" not in data


def test_status_codes():
    assert bounce.status_of(Reply(550, "5.7.1 relay denied")) == "5.7.1"
    assert bounce.status_of(Reply(550, "4.7.1 mismatched class")) == "5.0.0"
    assert bounce.status_of(Reply(452, "4.4.5 rate")) == "4.4.5"
    assert bounce.status_of(Reply(0, "garbage", kind="protocol")) == "4.4.1"


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(550, "Message too big!", stage="size"), "5.3.4"),
        (Reply(552, "Message size exceeds fixed maximum"), "5.3.4"),
        (Reply(552, "too big", stage="mail"), "5.3.4"),
        (Reply(553, "sender not allowed", stage="mail"), "5.1.7"),
        (Reply(553, "recipient not allowed"), "5.1.3"),
        (Reply(530, "Authentication required", stage="mail"), "5.7.0"),
        (Reply(535, "bad credentials"), "5.7.8"),
        (Reply(550, "no reason given", stage="mail"), "5.0.0"),
        (Reply(554, "5.7.1 the listener's own code wins", stage="size"), "5.7.1"),
        (Reply(552, "5.2.2 quota: the listener's own code wins"), "5.2.2"),
        (Reply(451, "try again later"), "4.0.0"),
    ],
)
def test_status_derived_from_stage_and_code_when_the_listener_gives_none(reply, status):
    # Issue 16 fix 2 (RFC 3463): a SIZE refusal without an enhanced code is 5.3.4, not 5.0.0.
    assert bounce.status_of(reply) == status


def test_the_module_is_pure():
    """No file, clock, socket or environment access: it imports only pure modules."""
    mod = importlib.import_module("mailshim.bounce")
    with open(mod.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Name):
            assert node.id not in ("open", "__import__", "eval", "exec"), node.id
    pure = {
        "__future__",
        "collections.abc",
        "mailshim.spoolfmt",
        "mailshim.message",
        "mailshim.reply",
        "mailshim.constants",
        "mailshim.errors",  # pure too: the one printable-text helper lives there
    }
    assert imported <= pure, imported


addresses = st.text(
    st.characters(blacklist_categories=("Cs",), min_codepoint=33, max_codepoint=0x2FF),
    min_size=1,
    max_size=30,
)


@given(
    st.dictionaries(addresses, st.text(max_size=200), min_size=1, max_size=4),
    st.binary(max_size=500),
    st.sampled_from([bounce.FAILED, bounce.DELAYED]),
)
def test_any_input_makes_a_well_formed_report(recipients, headers, kind):
    headers = headers.replace(b"\r", b"").replace(b"\n", b"\r\n")
    data = report(recipients=recipients, original_headers=headers, kind=kind, retry_until=0)
    assert data.count(b"\n") == data.count(b"\r\n")
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]  # fmt: skip
    blocks = status_blocks(msg)
    assert len(blocks) == 1 + len(recipients)
    assert all(b["action"] == kind for b in blocks[1:])


def test_unknown_kind_and_no_recipients_are_errors():
    with pytest.raises(ValueError):
        report(kind="maybe")
    with pytest.raises(ValueError):
        report(recipients={})
