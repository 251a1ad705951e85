"""PIPELINING (RFC 2920) in smtpsession.py: MAIL, every RCPT and DATA in one write when the listener
offers it, the replies matched to their commands in order; lock-step when it does not.

The listeners are real: aiosmtpd (relayhelpers' Listener offers PIPELINING unless hidden, and
records which command lines arrived with more input already waiting, so pipelining is seen on
the server's side of the socket) and raw servers for what aiosmtpd would never do (a 354 after
no accepted recipient, more replies than commands, a 421 followed by a close). The Haraka test
is in tests/test_real_listeners.py.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from mailshim import reply as kinds
from mailshim.constants import STAGE_MAIL
from mailshim.relay import RelayClient
from mailshim.reply import Reply
from relayhelpers import HANG, Listener, RawListener
from test_relay import MESSAGE, FakeRelay, relay_for, run, send, send_many

OK, LATER, NO = "ok@x.test", "later@x.test", "nobody@x.test"


@pytest.fixture(autouse=True)
def fresh_failures():
    RelayClient.forget_failures()
    yield
    RelayClient.forget_failures()


@pytest.fixture
def aiosmtpd():
    with Listener() as started:
        yield started


def envelope_verbs(listener: Listener) -> list[bytes]:
    verbs = [line.split(b" ")[0].upper() for line in listener.handler.lines]
    return [v for v in verbs if v in (b"MAIL", b"RCPT", b"DATA", b"RSET")]


def exchanges(transcript: list[str]) -> list[str]:
    """The transcript from MAIL on, as '>' (a command) and '<' (a reply) marks."""
    start = next(i for i, line in enumerate(transcript) if line.startswith(">>> MAIL"))
    marks = []
    for line in transcript[start:]:
        if line.startswith(">>> ") and line != ">>> .":
            marks.append(">")
        elif line.startswith("<<< ") and line[7:8] == " ":  # a reply's last line
            marks.append("<")
    return marks


# -- a listener that offers PIPELINING ---------------------------------------------------------


def test_mail_every_rcpt_and_data_go_in_one_write_and_replies_match_their_commands(aiosmtpd):
    listener = aiosmtpd
    listener.handler.rcpt_replies = {LATER: "451 4.3.0 try later", NO: "550 5.1.1 no such user"}
    result, transcript = send([relay_for(listener)], recipients=[OK, LATER, NO, "ok2@x.test"])
    assert result.sent() == [OK, "ok2@x.test"]
    assert result.deferred() == [LATER]
    assert result.bounced() == [NO]
    assert result.replies[LATER] == Reply(451, "4.3.0 try later")
    assert result.replies[NO] == Reply(550, "5.1.1 no such user")
    # On the listener's side: every command line up to DATA came with the next one behind it.
    handler = listener.handler
    assert [line.split(b":")[0] for line in handler.pipelined] == [b"MAIL FROM"] + [b"RCPT TO"] * 4
    # On the client's side: six commands written, then six replies read, then the body's.
    assert exchanges(transcript)[:13] == [">"] * 6 + ["<"] * 6 + ["<"]
    (received,) = handler.messages
    assert received.rcpt_tos == [OK, "ok2@x.test"]


def test_no_rset_after_a_completed_transaction_and_one_after_a_refused_one(aiosmtpd):
    listener = aiosmtpd
    listener.handler.rcpt_replies = {NO: "550 5.1.1 no such user"}
    batch = [
        ("a@x.test", [OK], MESSAGE, False),
        ("a@x.test", [OK], MESSAGE, False),
        ("a@x.test", [NO], MESSAGE, False),  # MAIL taken, no recipient: the sender is held
        ("a@x.test", [OK], MESSAGE, False),
    ]
    results, _ = run(send_many([relay_for(listener)], batch))
    assert [r.sent() for r in results] == [[OK], [OK], [], [OK]]
    assert results[2].replies[NO] == Reply(550, "5.1.1 no such user")
    assert listener.handler.connections == 1
    one = [b"MAIL", b"RCPT", b"DATA"]
    assert envelope_verbs(listener) == one * 3 + [b"RSET"] + one
    assert len(listener.handler.messages) == 3


def test_refusal_at_mail_is_the_fate_not_the_503s_that_follow(aiosmtpd):
    listener = aiosmtpd
    """aiosmtpd answers the pipelined RCPTs and DATA after a refused MAIL with 503s."""
    listener.handler.script("MAIL", "550 5.7.1 sender not allowed")
    batch = [("bad@x.test", [OK, NO], MESSAGE, False), ("a@x.test", [OK], MESSAGE, False)]
    results, transcript = run(send_many([relay_for(listener)], batch))
    refused = Reply(550, "5.7.1 sender not allowed", stage=STAGE_MAIL)
    assert results[0].replies == {OK: refused, NO: refused}
    assert any(line.startswith("<<< 503") for line in transcript)  # they came, and were read
    assert results[1].sent() == [OK]
    assert listener.handler.connections == 1  # the connection stayed in step
    (received,) = listener.handler.messages
    assert received.mail_from == "a@x.test"


def test_temporary_refusal_at_mail_defers_every_recipient(aiosmtpd):
    listener = aiosmtpd
    listener.handler.script("MAIL", "451 4.3.0 busy")
    result, _ = send([relay_for(listener)], recipients=[OK, NO])
    assert result.replies == {OK: Reply(451, "4.3.0 busy"), NO: Reply(451, "4.3.0 busy")}
    assert listener.handler.messages == []


def test_data_refused_when_no_recipient_was_accepted_nothing_is_sent(aiosmtpd):
    listener = aiosmtpd
    listener.handler.rcpt_replies = {NO: "550 5.1.1 no such user", LATER: "452 4.2.2 full"}
    result, transcript = send([relay_for(listener)], recipients=[NO, LATER])
    assert result.replies == {
        NO: Reply(550, "5.1.1 no such user"),
        LATER: Reply(452, "4.2.2 full"),
    }
    assert "*** (message body not shown)" not in transcript
    assert listener.handler.messages == []


def test_421_mid_pipeline_defers_everyone_and_no_body_follows(aiosmtpd):
    listener = aiosmtpd
    # aiosmtpd keeps reading after a handler's 421: the DATA behind it gets a 354, which the
    # client must not take as an invitation.
    listener.handler.script("RCPT", "250 2.1.5 OK", "421 4.3.2 shutting down")
    batch = [("a@x.test", [OK, LATER, NO], MESSAGE, False), ("a@x.test", [OK], MESSAGE, False)]
    results, transcript = run(send_many([relay_for(listener)], batch))
    closing = Reply(421, "4.3.2 shutting down")
    assert results[0].replies == {OK: closing, LATER: closing, NO: closing}
    second = [i for i, line in enumerate(transcript) if line.startswith(">>> MAIL")][1]
    assert transcript.count("*** (message body not shown)") == 1
    assert transcript.index("*** (message body not shown)") > second
    assert results[1].sent() == [OK]
    assert listener.handler.connections == 2
    (received,) = listener.handler.messages
    assert received.rcpt_tos == [OK]


def test_no_reply_mid_pipeline_times_out_and_defers():
    with Listener() as listener:
        listener.handler.script("RCPT", "250 2.1.5 OK", HANG)
        result, _ = send([relay_for(listener, timeout=1.0)], recipients=[OK, LATER])
        assert all(r.code == 0 and r.kind == kinds.TIMEOUT for r in result.replies.values())
        assert result.deferred() == [OK, LATER]
        assert listener.handler.messages == []


def test_lmtp_pipelines_and_keeps_one_reply_per_recipient_after_data():
    with Listener(lmtp=True) as listener:
        listener.handler.data_replies = {LATER: "452 4.2.2 mailbox full"}
        result, _ = send([relay_for(listener, protocol="lmtp")], recipients=[OK, LATER])
        assert result.sent() == [OK]
        assert result.replies[LATER] == Reply(452, "4.2.2 mailbox full")
        assert [line[:4] for line in listener.handler.pipelined] == [b"MAIL", b"RCPT", b"RCPT"]


# -- a listener that does not offer it -----------------------------------------------------


def test_without_pipelining_the_dialogue_is_lock_step():
    with Listener() as listener:
        listener.handler.hidden_extensions = {"PIPELINING"}
        listener.handler.rcpt_replies = {NO: "550 5.1.1 no such user"}
        batch = [("a@x.test", [OK, NO], MESSAGE, False), ("a@x.test", [OK], MESSAGE, False)]
        results, transcript = run(send_many([relay_for(listener)], batch))
        assert [r.sent() for r in results] == [[OK], [OK]]
        assert results[0].bounced() == [NO]
        assert listener.handler.pipelined == []
        assert exchanges(transcript)[:8] == [">", "<"] * 4
        one = [b"MAIL", b"RCPT", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"]
        assert envelope_verbs(listener) == one


# -- raw servers: what aiosmtpd would not do ------------------------------------------------

EHLO = b"250-raw\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def raw_server(replies: list[bytes], seen: list[bytes]):
    """Greets, offers PIPELINING, reads MAIL, one RCPT and DATA before answering them all
    with ``replies`` in one write; then records whatever the client sends until it closes."""

    async def dialogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        await reader.readline()
        writer.write(EHLO)
        for _ in range(3):
            seen.append((await reader.readline()).rstrip(b"\r\n"))
        writer.write(b"".join(replies))
        after = b""
        while chunk := await reader.read(65536):
            after += chunk
        seen.append(after)

    return dialogue


def after_close(seen: list[bytes], timeout: float = 5.0) -> bytes:
    """What the client sent after the replies, once the server has seen the connection end
    (leaving the listener earlier would cancel its reading half-way)."""
    deadline = time.monotonic() + timeout
    while len(seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 4, f"the server never saw the connection end: {seen}"
    return seen[3]


def test_354_after_no_accepted_recipient_gets_no_body_not_even_a_dot():
    seen: list[bytes] = []
    replies = [b"250 ok\r\n", b"550 5.1.1 no such user\r\n", b"354 go ahead anyway\r\n"]
    with RawListener(raw_server(replies, seen)) as raw:
        result, transcript = send([FakeRelay(raw.port, timeout=5)], recipients=[NO])
        after = after_close(seen)
    assert result.replies[NO] == Reply(550, "5.1.1 no such user")
    assert [line.split(b":")[0] for line in seen[:3]] == [b"MAIL FROM", b"RCPT TO", b"DATA"]
    assert after == b""  # the connection dropped: no body, no lone dot, no QUIT
    assert ">>> ." not in transcript


def test_354_after_a_refused_mail_gets_no_body():
    seen: list[bytes] = []
    replies = [b"553 5.1.8 bad sender\r\n", b"250 ok\r\n", b"354 go ahead anyway\r\n"]
    with RawListener(raw_server(replies, seen)) as raw:
        result, _ = send([FakeRelay(raw.port, timeout=5)], recipients=[OK])
        after = after_close(seen)
    assert result.replies[OK] == Reply(553, "5.1.8 bad sender", stage=STAGE_MAIL)
    assert after == b""


def test_more_replies_than_commands_defers_and_sends_nothing():
    seen: list[bytes] = []
    with RawListener(raw_server([b"250 ok\r\n"] * 50, seen)) as raw:
        result, transcript = send([FakeRelay(raw.port, timeout=5)], recipients=[OK])
        after = after_close(seen)
    reply = result.replies[OK]
    assert reply.code == 0 and reply.kind == kinds.PROTOCOL and reply.temporary
    assert after == b""
    assert "*** (message body not shown)" not in transcript


def test_421_then_close_mid_pipeline_defers():
    seen: list[bytes] = []
    replies = [b"250 ok\r\n", b"421 4.4.2 idle too long\r\n"]
    with RawListener(raw_server(replies, seen)) as raw:

        async def scenario():
            async with RelayClient([FakeRelay(raw.port, timeout=5)], helo="client.test") as c:
                return await c.send("a@x.test", [OK], io.BytesIO(MESSAGE), len(MESSAGE), False)

        result = run(scenario())
        after = after_close(seen)
    assert result.replies[OK] == Reply(421, "4.4.2 idle too long")
    assert after == b""
