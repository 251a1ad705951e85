"""relay.py and smtpsession.py against real listeners: aiosmtpd SMTP/LMTP over TCP, IPv6 and
unix sockets, trustme TLS, raw misbehaving servers, and a 200 MB message in a separate process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailshim import smtpconnect, smtpsession, wire
from mailshim.errors import ConfigError, NoPermError
from mailshim.relay import RelayClient, SendResult
from mailshim.reply import MAX_TEXT, Reply, clean_text
from relayhelpers import (
    DROP,
    HANG,
    Certs,
    Listener,
    RawListener,
    SilentListener,
    StreamingSink,
    free_port,
    has_ipv6_loopback,
)

GUARD = 60  # no test may hang: a stuck client fails the test instead


class FakeRelay:
    """Stand-in for config.RelayConfig (same attributes, duck-typed)."""

    def __init__(
        self,
        port: int = 0,
        *,
        name: str = "relay",
        host: str | None = "127.0.0.1",
        socket: str | None = None,
        tls: str = "none",
        verify: bool = True,
        ca_file: str | None = None,
        username: str | None = None,
        secret: str | None = None,
        timeout: float = 10.0,
        helo: str | None = None,
        protocol: str = "smtp",
        retry_after_failure: float = 30.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.socket = socket
        self.tls = tls
        self.verify = verify
        self.client_cert: str | None = None
        self.client_key: str | None = None
        self.ca_file = ca_file
        self.username = username
        self.secret = secret
        self.timeout = timeout
        self.helo = helo
        self.protocol = protocol
        self.retry_after_failure = retry_after_failure

    def password(self) -> str | None:
        return self.secret


def relay_for(listener: Listener, **kwargs) -> FakeRelay:
    if listener.socket:
        return FakeRelay(host=None, socket=listener.socket, **kwargs)
    kwargs.setdefault("host", listener.host)
    return FakeRelay(listener.port, **kwargs)


MESSAGE = b"From: a@example.test\r\nSubject: test\r\n\r\nHello.\r\n"


def run(coro):
    async def guarded():
        return await asyncio.wait_for(coro, GUARD)

    return asyncio.run(guarded())


async def send_many(relays, messages, **client_kwargs):
    """Send each (sender, recipients, data, eightbit) over one client; results and transcript."""
    transcript: list[str] = []
    results = []
    async with RelayClient(
        relays, helo="client.test", transcript=transcript.append, **client_kwargs
    ) as client:
        for sender, recipients, data, eightbit in messages:
            results.append(
                await client.send(sender, recipients, io.BytesIO(data), len(data), eightbit)
            )
    return results, transcript


def send(
    relays,
    sender="a@example.test",
    recipients=("b@example.test",),
    data=MESSAGE,
    eightbit=False,
    **client_kwargs,
):
    results, transcript = run(
        send_many(relays, [(sender, list(recipients), data, eightbit)], **client_kwargs)
    )
    return results[0], transcript


@pytest.fixture(autouse=True)
def fresh_failure_memory():
    RelayClient.forget_failures()
    yield
    RelayClient.forget_failures()


@pytest.fixture
def listener():
    with Listener() as started:
        yield started


@pytest.fixture(scope="module")
def shared_listener():
    with Listener() as started:
        yield started


@pytest.fixture(scope="module")
def certs():
    return Certs("localhost", "127.0.0.1", "::1")


# -- the plain objects -----------------------------------------------------------------------


def test_reply_classification_and_text():
    assert Reply(451, "4.3.0 later").temporary and not Reply(451, "x").permanent
    assert Reply(0, "connect to relay[127.0.0.1]:25: Connection refused").temporary
    assert Reply(550, "5.1.2 Relay not allowed").permanent
    assert not Reply(250, "ok").temporary and not Reply(250, "ok").permanent
    assert str(Reply(550, "5.1.2 Relay not allowed")) == "550 5.1.2 Relay not allowed"
    assert str(Reply(0, "timed out")) == "timed out"


def test_send_result_sorts_recipients():
    result = SendResult(
        {
            "a": Reply(250, "ok"),
            "b": Reply(451, "later"),
            "c": Reply(550, "no"),
            "d": Reply(0, "x"),
        },
        "relay[127.0.0.1]:25",
    )
    assert result.sent() == ["a"]
    assert result.deferred() == ["b", "d"]
    assert result.bounced() == ["c"]


@given(st.text())
def test_clean_text_is_one_printable_line(text):
    line = clean_text(text)
    assert "\n" not in line and "\r" not in line
    assert all(ord(ch) >= 32 and not 127 <= ord(ch) < 160 for ch in line)
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in line)
    assert len(line) <= MAX_TEXT + 3
    line.encode("utf-8")  # printable to any UTF-8 terminal or syslog


def test_invalid_helo_is_a_config_error():
    with pytest.raises(ConfigError):
        RelayClient([FakeRelay(25)], helo="two words")
    with pytest.raises(ConfigError):
        RelayClient([FakeRelay(25, helo="bad\r\nname")], helo="ok.test")
    with pytest.raises(ConfigError):
        RelayClient([], helo="ok.test")


# -- the bytes on the wire -------------------------------------------------------------------

line_pieces = st.sampled_from(
    [b".", b"..", b"x", b" ", b"\t", b"From ", b"\x80", b"\xff", b"\xc3\xa9", b"\x00", b"a" * 70]
)
lines = st.lists(line_pieces, max_size=12).map(b"".join)
messages = st.lists(lines, max_size=20).map(lambda ls: b"".join(line + b"\r\n" for line in ls))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=messages, chunk=st.integers(min_value=1, max_value=40))
def test_received_bytes_equal_the_file_after_unstuffing(shared_listener, data, chunk):
    handler = shared_listener.handler
    saved = wire.CHUNK
    wire.CHUNK = chunk  # tiny chunks put dots and CRLFs on every possible boundary
    try:
        result, _ = send([relay_for(shared_listener)], data=data, eightbit=True)
    finally:
        wire.CHUNK = saved
    assert result.sent() == ["b@example.test"], result
    assert handler.messages[-1].data == data


@pytest.mark.parametrize(
    "data",
    [
        # a dot as the first byte of the second chunk
        b"x" * (wire.CHUNK - 2) + b"\r\n" + b".hidden\r\n",
        # CR ends the first chunk, LF + dot start the second
        b"x" * (wire.CHUNK - 1) + b"\r\n.after split CRLF\r\n",
        # a dot ends the first chunk, its line continues in the second
        b"x" * (wire.CHUNK - 3) + b"\r\n." + b".\r\n.\r\n",
        # lines that would end the message if not stuffed
        b".\r\n..\r\n...\r\n. \r\n",
        # one line much longer than a chunk, starting with a dot, 8-bit inside
        b"." + bytes(range(128, 256)) * 1600 + b"\r\n",
        b"",
    ],
    ids=["dot-at-chunk-start", "crlf-split", "dot-at-chunk-end", "dot-lines", "long-8bit", "empty"],
)
def test_chunk_boundaries_and_long_lines(listener, data):
    result, _ = send([relay_for(listener)], data=data, eightbit=True)
    assert result.sent() == ["b@example.test"], result
    assert listener.handler.messages[-1].data == data


def test_null_sender_is_exactly_mail_from_angle_brackets():
    with Listener(size_limit=None) as plain:  # no SIZE: nothing else on the line
        result, _ = send([relay_for(plain)], sender="")
        result2, _ = send([relay_for(plain)], sender="<>")
    assert result.sent() and result2.sent()
    assert plain.handler.commands("MAIL") == [b"MAIL FROM:<>", b"MAIL FROM:<>"]


def test_a_size_refusal_at_mail_from_is_the_messages(tmp_path):
    """Issue 16: a listener whose SIZE limit the message exceeds refuses it at MAIL FROM
    (aiosmtpd: 552); the reply says so in a field, for the exit code and the DSN status."""
    data = MESSAGE + b"x" * 200 + b"\r\n"
    with Listener(size_limit=100) as small:
        result, _ = send([relay_for(small)], data=data)
    reply = result.replies["b@example.test"]
    assert reply.permanent and reply.at_mail and reply.stage == "size"
    assert small.handler.messages == []
    temporary = Reply(452, "4.3.1 later")
    assert temporary.stage == "" and not temporary.at_mail


def test_size_and_8bitmime_parameters(listener):
    data = b"Subject: caf\xc3\xa9\r\n\r\n8-bit \xff body\r\n"
    send([relay_for(listener)], data=data, eightbit=True)
    send([relay_for(listener)], data=MESSAGE, eightbit=False)
    mail = listener.handler.commands("MAIL")
    assert mail[0] == f"MAIL FROM:<a@example.test> SIZE={len(data)} BODY=8BITMIME".encode()
    assert mail[1] == f"MAIL FROM:<a@example.test> SIZE={len(MESSAGE)}".encode()


def test_8bit_without_8bitmime_is_sent_anyway(listener):
    listener.handler.hidden_extensions = {"8BITMIME", "SIZE"}
    data = b"Subject: x\r\n\r\n\xe9t\xe9\r\n"
    result, _ = send([relay_for(listener)], data=data, eightbit=True)
    assert result.sent() == ["b@example.test"]
    assert listener.handler.commands("MAIL") == [b"MAIL FROM:<a@example.test>"]
    assert listener.handler.messages[0].data == data


def test_smtputf8_when_offered(listener):
    result, _ = send(
        [relay_for(listener)],
        sender="jörg@exämple.test",
        recipients=["zoë@example.test", "bob@example.test"],
    )
    assert result.sent() == ["zoë@example.test", "bob@example.test"]
    (mail,) = listener.handler.commands("MAIL")
    assert mail.startswith("MAIL FROM:<jörg@exämple.test>".encode()) and b"SMTPUTF8" in mail
    assert listener.handler.messages[0].rcpt_tos == ["zoë@example.test", "bob@example.test"]


def test_ascii_addresses_do_not_ask_for_smtputf8(listener):
    send([relay_for(listener)])
    assert b"SMTPUTF8" not in listener.handler.commands("MAIL")[0]


def test_smtputf8_not_offered_refuses_only_non_ascii_addresses():
    with Listener(smtputf8=False) as ascii_only:
        result, _ = send([relay_for(ascii_only)], recipients=["zoë@example.test", "bob@x.test"])
        assert result.replies["zoë@example.test"].code == 553
        assert "SMTPUTF8" in result.replies["zoë@example.test"].text
        assert result.sent() == ["bob@x.test"]
        assert ascii_only.handler.messages[0].rcpt_tos == ["bob@x.test"]

        result, _ = send([relay_for(ascii_only)], sender="jörg@example.test")
        assert result.bounced() == ["b@example.test"]
        assert result.replies["b@example.test"].code == 553
        assert len(ascii_only.handler.commands("MAIL")) == 1  # none for the second message


def test_control_characters_in_addresses_never_reach_the_wire(listener):
    result, _ = send([relay_for(listener)], recipients=["ok@x.test", "evil@x.test\r\nRSET"])
    assert result.replies["evil@x.test\r\nRSET"].code == 501
    assert result.sent() == ["ok@x.test"]
    assert all(b"evil" not in line for line in listener.handler.lines)


def test_duplicate_recipients_get_one_rcpt(listener):
    result, _ = send([relay_for(listener)], recipients=["b@x.test", "b@x.test", "c@x.test"])
    assert list(result.replies) == ["b@x.test", "c@x.test"]
    assert len(listener.handler.commands("RCPT")) == 2


def test_no_recipients_means_no_connection(listener):
    result, _ = send([relay_for(listener)], recipients=[])
    assert result.replies == {} and result.relay == "none"
    assert listener.handler.connections == 0


def test_transcript_shows_the_dialogue_but_not_the_body(listener):
    data = b"Subject: s\r\n\r\nSECRET-BODY-MARKER\r\n"
    result, transcript = send([relay_for(listener)], data=data)
    assert result.sent()
    assert f">>> MAIL FROM:<a@example.test> SIZE={len(data)}" in transcript
    assert ">>> RCPT TO:<b@example.test>" in transcript
    assert any(line.startswith("<<< 250") for line in transcript)
    assert any(line.startswith("<<< 220 ") for line in transcript)
    assert not any("SECRET-BODY-MARKER" in line for line in transcript)


# -- replies per recipient -------------------------------------------------------------------


def test_per_recipient_4xx_and_5xx_at_rcpt(listener):
    listener.handler.rcpt_replies = {
        "busy@x.test": "450 4.2.0 mailbox busy",
        "gone@x.test": "550 5.1.1 no such user",
    }
    result, _ = send([relay_for(listener)], recipients=["busy@x.test", "ok@x.test", "gone@x.test"])
    assert list(result.replies) == ["busy@x.test", "ok@x.test", "gone@x.test"]
    assert result.sent() == ["ok@x.test"]
    assert result.deferred() == ["busy@x.test"]
    assert result.bounced() == ["gone@x.test"]
    assert str(result.replies["gone@x.test"]) == "550 5.1.1 no such user"
    assert listener.handler.messages[0].rcpt_tos == ["ok@x.test"]


def test_all_recipients_refused_means_no_data_in_lock_step(listener):
    # pipelined, DATA goes out with the RCPTs: tests/test_pipelining.py
    listener.handler.hidden_extensions = {"PIPELINING"}
    listener.handler.rcpt_replies = {"b@x.test": "550 5.1.1 no", "c@x.test": "550 5.1.1 no"}
    result, _ = send([relay_for(listener)], recipients=["b@x.test", "c@x.test"])
    assert result.bounced() == ["b@x.test", "c@x.test"]
    assert listener.handler.commands("DATA") == []


def test_reply_after_data_applies_to_every_accepted_recipient(listener):
    listener.handler.script("DATA", "554 5.6.0 message refused")
    result, _ = send([relay_for(listener)], recipients=["b@x.test", "c@x.test"])
    assert result.bounced() == ["b@x.test", "c@x.test"]
    assert str(result.replies["c@x.test"]) == "554 5.6.0 message refused"


def test_multiline_reply_becomes_one_line(listener):
    listener.handler.script("DATA", "250-first line\r\n250 2.0.0 second line")
    result, transcript = send([relay_for(listener)])
    assert result.replies["b@example.test"] == Reply(250, "first line 2.0.0 second line")
    assert "<<< 250-first line" in transcript and "<<< 250 2.0.0 second line" in transcript


# -- connection reuse and back-pressure ------------------------------------------------------


def test_one_connection_for_ten_messages_without_rset_after_a_completed_one(listener):
    batch = [("a@x.test", [f"r{i}@x.test"], MESSAGE, False) for i in range(10)]
    results, _ = run(send_many([relay_for(listener)], batch))
    assert all(r.sent() for r in results)
    assert listener.handler.connections == 1
    verbs = [line.split(b" ")[0].upper() for line in listener.handler.lines]
    envelope = [v for v in verbs if v in (b"MAIL", b"RSET")]
    assert envelope == [b"MAIL"] * 10
    assert len(listener.handler.messages) == 10


def test_rate_limit_on_a_reused_connection_reconnects_once(listener):
    limit = "452 4.4.5 Rate limit exceeded"
    handler = listener.handler

    async def scenario():
        async with RelayClient([relay_for(listener)], helo="client.test") as client:
            first = await client.send("a@x.test", ["b@x.test"], io.BytesIO(MESSAGE), 10, False)
            handler.script("MAIL", limit)
            second = await client.send("a@x.test", ["b@x.test"], io.BytesIO(MESSAGE), 10, False)
            handler.script("MAIL", limit, limit)
            third = await client.send("a@x.test", ["b@x.test"], io.BytesIO(MESSAGE), 10, False)
            return first, second, third

    first, second, third = run(scenario())
    assert first.sent() and second.sent()
    assert third.deferred() == ["b@x.test"]
    assert third.replies["b@x.test"] == Reply(452, "4.4.5 Rate limit exceeded")
    assert handler.connections == 3  # one for 1+2's first try, one for 2's retry, one for 3
    assert len(handler.messages) == 2


def test_rate_limit_at_rcpt_on_a_reused_connection_reconnects_once(listener):
    handler = listener.handler

    async def scenario():
        async with RelayClient([relay_for(listener)], helo="client.test") as client:
            await client.send("a@x.test", ["b@x.test"], io.BytesIO(MESSAGE), 10, False)
            handler.script("RCPT", "452 4.4.5 Too many messages in this session")
            return await client.send("a@x.test", ["c@x.test"], io.BytesIO(MESSAGE), 10, False)

    result = run(scenario())
    assert result.sent() == ["c@x.test"]
    assert handler.connections == 2


def test_connection_closed_between_messages_is_reopened(listener):
    handler = listener.handler

    async def scenario():
        async with RelayClient([relay_for(listener)], helo="client.test") as client:
            await client.send("a@x.test", ["b@x.test"], io.BytesIO(MESSAGE), 10, False)
            handler.script("MAIL", DROP)
            return await client.send("a@x.test", ["c@x.test"], io.BytesIO(MESSAGE), 10, False)

    result = run(scenario())
    assert result.sent() == ["c@x.test"]
    assert handler.connections == 2


# -- failover --------------------------------------------------------------------------------


@pytest.fixture
def pair():
    with Listener() as first, Listener() as second:
        yield first, second


def two_relays(pair, **kwargs):
    first, second = pair
    return [relay_for(first, name="first", **kwargs), relay_for(second, name="second", **kwargs)]


def test_first_relay_down_second_used(listener):
    down = FakeRelay(free_port(), name="down")
    result, transcript = send([down, relay_for(listener, name="up")])
    assert result.sent() == ["b@example.test"]
    assert result.relay == f"up[127.0.0.1]:{listener.port}"
    assert any("down[127.0.0.1]" in line for line in transcript)


def test_421_fails_over(pair):
    first, second = pair
    first.handler.script("MAIL", "421 4.3.2 Service shutting down")
    result, _ = send(two_relays(pair))
    assert result.sent() == ["b@example.test"]
    assert result.relay == f"second[127.0.0.1]:{second.port}"
    assert first.handler.messages == [] and len(second.handler.messages) == 1


def test_421_at_rcpt_fails_over_every_recipient(pair):
    first, second = pair
    first.handler.script("RCPT", "250 2.1.5 OK", "421 4.3.2 closing")
    result, _ = send(two_relays(pair), recipients=["b@x.test", "c@x.test"])
    assert result.sent() == ["b@x.test", "c@x.test"]
    assert first.handler.messages == []  # a pipelined DATA went out; no body followed it
    assert second.handler.messages[0].rcpt_tos == ["b@x.test", "c@x.test"]


def test_451_at_mail_fails_over(pair):
    first, second = pair
    first.handler.script("MAIL", "451 4.3.0 try later")
    result, _ = send(two_relays(pair))
    assert result.sent() and len(second.handler.messages) == 1


@pytest.mark.parametrize("said", ["451 4.3.0 queue full", "421 4.3.2 Shutting down"])
def test_a_4xx_after_the_dot_does_not_fail_over(pair, said):
    # The listener may have stored the message before it said so (Dovecot's 421 on
    # shutdown): a second relay in front of the same store would deliver it twice.
    first, second = pair
    first.handler.script("DATA", said)
    result, _ = send(two_relays(pair))
    assert result.deferred() == ["b@example.test"]
    assert str(result.replies["b@example.test"]) == said
    assert second.handler.connections == 0
    assert result.relay_level == frozenset({"b@example.test"})  # the relay's, not bob's


def test_a_rate_limit_at_mail_neither_fails_over_nor_marks_the_relay_down(pair):
    first, second = pair
    first.handler.script("MAIL", "452 4.4.5 Rate limit exceeded, try again later")
    relays = two_relays(pair)
    result, _ = send(relays)
    assert result.deferred() == ["b@example.test"]
    assert second.handler.connections == 0
    assert result.relay_level == frozenset()  # back-pressure: the runner slows down
    again, _ = send(relays)  # another client of the process still goes to the first relay
    assert again.sent() and len(first.handler.messages) == 1
    assert second.handler.connections == 0


def test_a_4xx_at_rcpt_is_the_recipients_and_a_refused_relay_the_relays(pair):
    first, _ = pair
    first.handler.rcpt_replies = {"grey@example.test": "450 4.2.0 mailbox busy"}
    result, _ = send([relay_for(first)], recipients=["b@example.test", "grey@example.test"])
    assert result.deferred() == ["grey@example.test"]
    assert result.relay_level == frozenset()
    down = FakeRelay(free_port(), name="down")
    result, _ = send([down])
    assert result.relay_level == frozenset({"b@example.test"})


def test_550_is_final_no_failover(pair):
    first, second = pair
    first.handler.script("MAIL", "550 5.1.2 Relay not allowed.")
    result, _ = send(two_relays(pair))
    assert result.bounced() == ["b@example.test"]
    reply = result.replies["b@example.test"]
    assert (reply.code, reply.enhanced, reply.stage) == (550, "5.1.2", "mail")
    assert str(reply) == "550 5.1.2 Relay not allowed. (in reply to MAIL FROM)"
    assert result.relay == f"first[127.0.0.1]:{first.port}"
    assert second.handler.connections == 0


def test_last_temporary_reply_is_kept_when_every_relay_fails(pair):
    first, second = pair
    first.handler.script("MAIL", "451 4.3.0 first says later")
    second.handler.script("MAIL", "452 4.4.5 second says later")
    result, _ = send(two_relays(pair))
    assert result.replies["b@example.test"] == Reply(452, "4.4.5 second says later")


def test_a_failed_relay_is_skipped_for_a_while(pair):
    first, second = pair
    first.handler.script("MAIL", "451 4.3.0 try later")
    relays = two_relays(pair)
    send(relays)
    assert first.handler.connections == 1
    result, _ = send(relays)  # a new client: the memory is per process
    assert result.sent() and first.handler.connections == 1
    assert len(second.handler.messages) == 2


def test_a_failed_relay_is_tried_again_after_retry_after_failure(pair):
    first, _ = pair
    first.handler.script("MAIL", "451 4.3.0 try later")
    relays = two_relays(pair, retry_after_failure=0)
    send(relays)
    result, _ = send(relays)
    assert result.relay.startswith("first[")
    assert first.handler.connections == 2 and len(first.handler.messages) == 1


def test_all_relays_failed_recently_are_tried_anyway(pair):
    first, second = pair
    first.handler.script("MAIL", "451 4.3.0 later")
    second.handler.script("MAIL", "451 4.3.0 later")
    relays = two_relays(pair)
    failed, _ = send(relays)
    assert failed.deferred() == ["b@example.test"]
    result, _ = send(relays)
    assert result.sent() and result.relay.startswith("first[")


def test_connection_dropped_after_mail(pair):
    first, second = pair
    first.handler.script("MAIL", DROP)
    only_first, _ = send([relay_for(first)])
    reply = only_first.replies["b@example.test"]
    assert reply.code == 0 and reply.temporary and "lost connection" in reply.text
    RelayClient.forget_failures()
    first.handler.script("MAIL", DROP)
    both, _ = send(two_relays(pair))
    assert both.sent() and len(second.handler.messages) == 1


# -- hosts, addresses, sockets ---------------------------------------------------------------


needs_ipv6 = pytest.mark.skipif(
    not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1 cannot be bound)"
)


@needs_ipv6
@pytest.mark.parametrize("host", ["localhost", "::1", "[::1]"])
def test_ipv6_only_listener(host):
    with Listener(host="::1") as v6:
        result, _ = send([FakeRelay(v6.port, host=host)])
    assert result.sent() == ["b@example.test"]
    assert result.relay == f"relay[::1]:{v6.port}"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_ipv4_listener_by_name_and_address(host, listener):
    result, _ = send([FakeRelay(listener.port, host=host)])
    assert result.relay == f"relay[127.0.0.1]:{listener.port}"


def test_smtp_over_unix_socket(tmp_path):
    path = str(tmp_path / "smtp.sock")
    with Listener(unix=path) as unix:
        result, _ = send([relay_for(unix)])
    assert result.sent() == ["b@example.test"]
    assert result.relay == f"relay[{path}]"
    assert unix.handler.messages[0].data == MESSAGE


# -- LMTP ------------------------------------------------------------------------------------


def lmtp_mixed(listener):
    listener.handler.rcpt_replies = {"nouser@x.test": "550 5.1.1 unknown at RCPT"}
    listener.handler.data_replies = {
        "full@x.test": "452 4.2.2 mailbox full",
        "gone@x.test": "550 5.1.1 mailbox disabled",
    }
    return ["ok@x.test", "full@x.test", "nouser@x.test", "gone@x.test", "ok2@x.test"]


def check_lmtp(listener, result, transcript):
    assert result.sent() == ["ok@x.test", "ok2@x.test"]
    assert result.deferred() == ["full@x.test"]
    assert result.bounced() == ["nouser@x.test", "gone@x.test"]
    assert str(result.replies["gone@x.test"]) == "550 5.1.1 mailbox disabled"
    assert str(result.replies["ok2@x.test"]) == "250 2.0.0 <ok2@x.test> delivered"
    assert listener.handler.lines[0] == b"LHLO client.test"
    assert ">>> LHLO client.test" in transcript


def test_lmtp_over_tcp_with_mixed_replies():
    with Listener(lmtp=True) as lmtp:
        recipients = lmtp_mixed(lmtp)
        result, transcript = send([relay_for(lmtp, protocol="lmtp")], recipients=recipients)
        check_lmtp(lmtp, result, transcript)


def test_lmtp_over_unix_socket_with_mixed_replies(tmp_path):
    with Listener(lmtp=True, unix=str(tmp_path / "lmtp.sock")) as lmtp:
        recipients = lmtp_mixed(lmtp)
        batch = [("a@x.test", recipients, MESSAGE, False)] * 2  # the replies leave no residue
        results, transcript = run(send_many([relay_for(lmtp, protocol="lmtp")], batch))
        for result in results:
            check_lmtp(lmtp, result, transcript)
        assert lmtp.handler.connections == 1
        assert lmtp.handler.messages[0].data == MESSAGE


def test_lmtp_connection_lost_after_some_replies():
    with Listener(lmtp=True) as lmtp:
        lmtp.handler.script("DATA", "250 2.0.0 first stored")
        result, _ = send(
            [relay_for(lmtp, protocol="lmtp", timeout=2)], recipients=["a@x.test", "b@x.test"]
        )
    assert result.sent() == ["a@x.test"]
    assert result.replies["b@x.test"].code == 0
    assert "may have been delivered" in result.replies["b@x.test"].text


# -- TLS and AUTH ----------------------------------------------------------------------------


def test_starttls_verified_with_the_ca(certs, tmp_path):
    with Listener(tls="starttls", certs=certs) as tls:
        result, transcript = send(
            [relay_for(tls, host="localhost", tls="starttls", ca_file=certs.ca_file(tmp_path))]
        )
        assert result.sent() == ["b@example.test"], result
        assert tls.handler.messages[0].tls
        assert ">>> STARTTLS" in transcript
        ehlos = tls.handler.commands("EHLO")
        assert len(ehlos) == 2  # again after STARTTLS


def test_tls_contexts_of_relays_sharing_a_name_keep_their_own_ca(certs, tmp_path):
    """Issue 12 item 12: relay names need not be unique, so the TLS context cache is keyed
    by what defines a context. The first relay (down) makes a context for its CA; the second,
    of the same name and host, must verify its listener against its own ca_file."""
    other = Certs("localhost", "127.0.0.1")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Listener(tls="starttls", certs=other) as tls:
        first = FakeRelay(free_port(), tls="starttls", ca_file=certs.ca_file(tmp_path / "a"))
        second = relay_for(tls, tls="starttls", ca_file=other.ca_file(tmp_path / "b"))
        assert first.name == second.name and first.host == second.host
        result, transcript = send([first, second])
        assert result.sent() == ["b@example.test"], (result, transcript)
        assert tls.handler.messages[0].tls


def test_session_open_for_a_check(certs, tmp_path):
    """The connect/EHLO/TLS step on its own, as ``mailshim check`` uses it."""
    with Listener(tls="starttls", certs=certs) as tls:
        target = relay_for(tls, tls="starttls", ca_file=certs.ca_file(tmp_path))

        async def probe():
            session = await smtpsession.RelaySession.open(target, helo="check.test")
            try:
                reply = await session.command(b"NOOP")
                return session.greeting, session.encrypted, session.ssl_object, reply
            finally:
                await session.quit()

        greeting, encrypted, ssl_object, reply = run(probe())
        down = FakeRelay(free_port())
        with pytest.raises(smtpconnect.RelayDown) as failed:
            run(smtpsession.RelaySession.open(down, helo="check.test"))
    assert greeting.startswith("listener.test") and encrypted
    assert ssl_object is not None and ssl_object.version()
    assert reply.code == 250
    assert failed.value.reply.code == 0 and "Connection refused" in failed.value.reply.text
    assert failed.value.reply.kind == "refused"


def test_starttls_without_the_ca_is_a_temporary_failure(certs):
    with Listener(tls="starttls", certs=certs) as tls:
        result, _ = send([relay_for(tls, tls="starttls")])
        assert tls.handler.messages == []
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and reply.temporary
    assert "certificate verif" in reply.text and reply.kind == "tls-verify"
    assert result.relay == "none"


def test_starttls_without_verification(certs):
    with Listener(tls="starttls", certs=certs) as tls:
        result, _ = send([relay_for(tls, tls="starttls", verify=False)])
        assert result.sent() and tls.handler.messages[0].tls


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_certificate_is_checked_against_the_configured_name(tmp_path, mode):
    other = Certs("mail.example.test")
    with Listener(tls=mode, certs=other) as tls:
        result, _ = send([relay_for(tls, tls=mode, ca_file=other.ca_file(tmp_path))])
        assert result.deferred() and "certificate verif" in result.replies["b@example.test"].text
        assert result.replies["b@example.test"].kind == "tls-name"
    only_name = Certs("localhost")
    with Listener(tls=mode, certs=only_name) as tls:
        # dialled as 127.0.0.1, checked as "localhost"
        result, _ = send(
            [relay_for(tls, host="localhost", tls=mode, ca_file=only_name.ca_file(tmp_path))]
        )
        assert result.sent(), result
        assert result.relay == f"relay[127.0.0.1]:{tls.port}"


def test_starttls_required_but_not_offered(listener):
    result, _ = send([relay_for(listener, tls="starttls")])
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and "does not offer STARTTLS" in reply.text
    assert listener.handler.commands("MAIL") == []


def test_tls_none_never_upgrades(certs):
    with Listener(tls="starttls", certs=certs) as tls:
        result, _ = send([relay_for(tls, tls="none")])
        assert result.sent()
        assert tls.handler.commands("STARTTLS") == []
        assert not tls.handler.messages[0].tls


def test_implicit_tls(certs, tmp_path):
    with Listener(tls="tls", certs=certs) as tls:
        good, _ = send([relay_for(tls, tls="tls", ca_file=certs.ca_file(tmp_path))])
        bad, _ = send([relay_for(tls, tls="tls")])
        assert good.sent() and tls.handler.messages[0].tls
        assert len(tls.handler.messages) == 1
    assert bad.replies["b@example.test"].code == 0
    assert "certificate verif" in bad.replies["b@example.test"].text


def test_plain_client_against_implicit_tls_times_out(certs):
    with Listener(tls="tls", certs=certs) as tls:
        result, _ = send([relay_for(tls, tls="none", timeout=0.5)])
    assert result.replies["b@example.test"].code == 0


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_plain(tmp_path):
    with Listener(auth={"cron": "s3cr3t"}, auth_required=True) as authed:
        result, transcript = send([relay_for(authed, username="cron", secret="s3cr3t")])
        assert result.sent(), result
        assert authed.handler.messages[0].login == b"cron"
        assert any(line.startswith(">>> AUTH PLAIN") for line in transcript)
        encoded = base64.b64encode(b"\0cron\0s3cr3t").decode()
        assert not any("s3cr3t" in line or encoded in line for line in transcript)

        wrong, transcript = send([relay_for(authed, username="cron", secret="nope")])
        reply = wrong.replies["b@example.test"]
        assert reply.code == 0 and "authentication as cron" in reply.text and "535" in reply.text
        assert not any("nope" in line for line in transcript)
        assert len(authed.handler.messages) == 1


def test_unreadable_password_is_a_temporary_failure():
    class BadSecret(FakeRelay):
        def password(self):
            raise NoPermError("password_file /etc/secret is readable by others")

    with Listener(auth={"cron": "s3cr3t"}) as authed:
        result, _ = send([BadSecret(authed.port, username="cron")])
        assert authed.handler.commands("AUTH") == []
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and "readable by others" in reply.text


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_not_offered_but_configured(listener):
    result, _ = send([relay_for(listener, username="cron", secret="x")])
    assert result.deferred() and "AUTH" in result.replies["b@example.test"].text


# -- a misbehaving listener ------------------------------------------------------------------


def test_listener_that_never_answers_times_out():
    with SilentListener() as silent:
        result, _ = send([FakeRelay(silent.port, timeout=0.5)])
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and "timed out" in reply.text


def test_no_reply_after_the_final_dot(listener):
    listener.handler.script("DATA", HANG)
    result, _ = send([relay_for(listener, timeout=0.5)])
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and "may have been delivered" in reply.text


def test_connection_dropped_after_the_final_dot(listener):
    listener.handler.script("DATA", DROP)
    result, _ = send([relay_for(listener)])
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and "may have been delivered" in reply.text


def test_garbage_reply(listener):
    listener.handler.script("MAIL", "hello, this is not SMTP")
    result, _ = send([relay_for(listener)])
    assert result.replies["b@example.test"].code == 0


async def split_greeting(reader, writer):
    for piece in (b"22", b"0-one\r", b"\n220 two\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    await default_dialogue(reader, writer)


async def default_dialogue(reader, writer, on_data=None):
    while True:
        line = await reader.readuntil(b"\n")
        verb = line[:4].upper()
        if verb == b"DATA":
            writer.write(b"354 go\r\n")
            await writer.drain()
            if on_data is not None:
                await on_data(reader, writer)
                return
            while (await reader.readuntil(b"\r\n")) != b".\r\n":
                pass
            writer.write(b"250-split\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"250 2.0.0 reply\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()


def test_replies_split_across_packets():
    with RawListener(split_greeting) as raw:
        result, _ = send([FakeRelay(raw.port)])
    assert result.replies["b@example.test"] == Reply(250, "split 2.0.0 reply")


async def close_mid_data(reader, writer):
    writer.write(b"220 raw\r\n")

    async def read_some_then_close(reader, writer):
        await reader.readexactly(100_000)
        writer.close()

    await default_dialogue(reader, writer, read_some_then_close)


async def refuse_mid_data(reader, writer):
    writer.write(b"220 raw\r\n")

    async def refuse(reader, writer):
        await reader.readexactly(1000)
        writer.write(b"552 5.3.4 message too big for me\r\n")
        await writer.drain()
        # Read nothing more: the client is stuck on back-pressure when the reply comes.
        await asyncio.get_running_loop().create_future()

    await default_dialogue(reader, writer, refuse)


# Larger than what loopback socket buffers hold (about 4 MB here), so the client is still
# writing when the listener acts.
BIGGER_THAN_BUFFERS = (b"x" * 998 + b"\r\n") * 16_000


def test_connection_lost_in_the_middle_of_data():
    big = BIGGER_THAN_BUFFERS
    with RawListener(close_mid_data) as raw:
        result, transcript = send([FakeRelay(raw.port, timeout=5)], data=big)
    reply = result.replies["b@example.test"]
    assert reply.code == 0 and reply.temporary
    assert ">>> ." not in transcript  # no final dot after a failure: nothing truncated is sent


def test_reply_in_the_middle_of_data_is_taken():
    big = BIGGER_THAN_BUFFERS
    with RawListener(refuse_mid_data) as raw:
        result, transcript = send([FakeRelay(raw.port, timeout=5)], data=big)
    assert result.replies["b@example.test"] == Reply(552, "5.3.4 message too big for me")
    assert ">>> ." not in transcript


# -- memory: a 200 MB message ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, io, json, resource, sys
    from mailshim.relay import RelayClient

    class R:
        name, host, socket, tls, verify, ca_file = "sink", "127.0.0.1", None, "none", True, None
        username, timeout, helo, protocol, retry_after_failure = None, 60.0, None, "smtp", 30.0
        def __init__(self, port):
            self.port = port
        def password(self):
            return None

    def peak_kib():
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (pytest).
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def main(port, path, size):
        async with RelayClient([R(port)], helo="bench.test") as client:
            warm = b"Subject: warm-up\\r\\n\\r\\n.hi\\r\\n"
            await client.send("a@x.test", ["b@x.test"], io.BytesIO(warm), len(warm), False)
            before = peak_kib()
            with open(path, "rb") as message:
                result = await client.send("a@x.test", ["b@x.test"], message, size, True)
            after = peak_kib()
        print(json.dumps({"before_kib": before, "after_kib": after,
                          "reply": str(result.replies["b@x.test"])}))

    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.slow
def test_200_mb_message_is_streamed_in_flat_memory(tmp_path):
    block = b"".join(
        [
            b".leading dot line that must be stuffed\r\n",
            b"..two dots\r\n",
            b"8-bit: " + bytes(range(128, 256)) + b"\r\n",
            b"y" * 5000 + b"\r\n",
            b".\r\n",
        ]
    )
    block = block * (1024 * 1024 // len(block))
    repeats = 200
    path = tmp_path / "big.eml"
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(repeats):
            out.write(block)
            digest.update(block)
    size = len(block) * repeats
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with StreamingSink() as sink:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(sink.port), str(path), str(size)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        report = json.loads(child.stdout)
        assert sink.results[-1] == (digest.hexdigest(), size)
    growth_mib = (report["after_kib"] - report["before_kib"]) / 1024
    print(
        f"\n200 MB message: peak RSS growth {growth_mib:.1f} MiB "
        f"(peak {report['after_kib'] / 1024:.1f} MiB, reply {report['reply']})"
    )
    assert report["reply"].startswith("250")
    assert growth_mib < 40
