"""A listener that misbehaves, driven through the real `sendmail -odi` and `sendmail -q`.

Each scenario is a hand-written server on 127.0.0.1 that plays a normal SMTP dialogue up to a
point and then misbehaves: replies split into one-byte packets, multi-line replies, garbage
instead of a reply, a reply that never comes (or comes one byte at a time, for ever), TLS that
fails half-way, a connection closed or reset after MAIL FROM, after DATA's 354, after the final
dot. The relay timeout is 2 s. Every case must end, well within the subprocess guard, in either
a delivery or a clear deferral: exit 0 (the message is durably spooled), nothing on stderr (no
traceback), the entry kept in the spool with its last error, and the same message delivered
intact by a later `sendmail -q` once a sane listener is back.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from mailshim import spoolfmt

RELAY_TIMEOUT = 2
# The guard against a hang: generous next to the 2 s relay timeout (a scenario waits on it at
# most once or twice), far below "for ever".
GUARD = 30

BODY = b"line one\n.leading dot\n..two dots\n\xc3\xa9t\xc3\xa9 8bit\nlast line\n"
MESSAGE = b"Subject: hostile listener test\nTo: someone@example.net\n\n" + BODY


# ---------------------------------------------------------------------------------------------
# A scripted server: one thread per connection, the script drives the socket line by line
# ---------------------------------------------------------------------------------------------


class Conn:
    """One accepted connection, as seen by a script."""

    def __init__(self, sock: socket.socket, server: ScriptedServer) -> None:
        self.sock = sock
        self.server = server
        self.buf = b""
        self.commands: list[bytes] = []
        self.data = b""
        self.accepted = False  # the script said 250 after a complete DATA section
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_split(self, data: bytes, delay: float = 0.01) -> None:
        """One byte per packet (TCP_NODELAY and a pause between them)."""
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            time.sleep(delay)

    def line(self) -> bytes:
        """The next line from the client; b"" when it closed."""
        while b"\n" not in self.buf:
            chunk = self.recv()
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        self.commands.append(line.rstrip(b"\r"))
        return line.rstrip(b"\r")

    def recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def expect(self, verb: bytes) -> bytes:
        line = self.line()
        assert line.upper().startswith(verb), (verb, line)
        return line

    def read_data(self) -> bytes:
        """The DATA section up to and including the final dot."""
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            chunk = self.recv()
            if not chunk:
                break
            self.buf += chunk
        data, sep, self.buf = (b"\r\n" + self.buf).partition(b"\r\n.\r\n")
        self.data = data[2:] + (b"\r\n" if sep else b"")
        return self.data

    def hang(self) -> None:
        """Say nothing more; return when the client gives up (or the test ends)."""
        self.sock.settimeout(0.2)
        while not self.server.stopping.is_set():
            try:
                if not self.sock.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Script = Callable[[Conn], None]


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[Conn] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            conn = Conn(sock, self)
            self.conns.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: Conn) -> None:
        try:
            self.script(conn)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


# Dialogue pieces ------------------------------------------------------------------------------

EHLO_REPLY = b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"


def greet(c: Conn, ehlo: bytes = EHLO_REPLY) -> None:
    c.send(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    c.send(ehlo)


def up_to_mail(c: Conn) -> None:
    greet(c)
    c.expect(b"MAIL FROM:")


def up_to_354(c: Conn) -> None:
    up_to_mail(c)
    c.send(b"250 2.1.0 ok\r\n")
    c.expect(b"RCPT TO:")
    c.send(b"250 2.1.5 ok\r\n")
    c.expect(b"DATA")
    c.send(b"354 go ahead\r\n")


def up_to_dot(c: Conn) -> None:
    up_to_354(c)
    c.read_data()


# Scenarios that must deliver ------------------------------------------------------------------


def split_replies(c: Conn) -> None:
    c.send_split(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    c.send_split(EHLO_REPLY, 0.002)
    c.expect(b"MAIL")
    c.send_split(b"250 2.1.0 ok\r\n")
    c.expect(b"RCPT")
    c.send_split(b"250 2.1.5 ok\r\n")
    c.expect(b"DATA")
    c.send_split(b"354 go ahead\r\n")
    c.read_data()
    c.accepted = True
    c.send_split(b"250 2.0.0 queued\r\n")
    c.expect(b"QUIT")
    c.send(b"221 bye\r\n")


def multiline_replies(c: Conn) -> None:
    c.send(b"220-mx.example.org ESMTP\r\n220-second line\r\n220 third\r\n")
    c.expect(b"EHLO")
    c.send(b"250-mx\r\n" + b"".join(b"250-X-EXT%d\r\n" % i for i in range(40)) + b"250 HELP\r\n")
    c.expect(b"MAIL")
    c.send(b"250-2.1.0 sender\r\n250 2.1.0 ok\r\n")
    c.expect(b"RCPT")
    c.send(b"250-2.1.5 one\r\n250-2.1.5 two\r\n250 2.1.5 ok\r\n")
    c.expect(b"DATA")
    c.send(b"354-first\r\n354 go ahead\r\n")
    c.read_data()
    c.accepted = True
    c.send(b"250-2.0.0 queued\r\n250 2.0.0 as 12345\r\n")
    c.expect(b"QUIT")
    c.send(b"221 bye\r\n")


def odd_ehlo_extensions(c: Conn) -> None:
    c.send(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    c.send(
        b"250-mx.example.org\r\n250-SIZE not-a-number\r\n250-AUTH \xff\xfe\r\n250-\r\n"
        b"250-X-" + b"E" * 900 + b"\r\n250 8BITMIME\r\n"
    )
    c.expect(b"MAIL")
    c.send(b"250 2.1.0 ok\r\n")
    c.expect(b"RCPT")
    c.send(b"250 2.1.5 ok\r\n")
    c.expect(b"DATA")
    c.send(b"354 go ahead\r\n")
    c.read_data()
    c.accepted = True
    c.send(b"250 2.0.0 queued\r\n")
    c.expect(b"QUIT")
    c.send(b"221 bye\r\n")


# Scenarios where delivering and deferring are both right; losing the message is not ---------


def bare_lf_replies(c: Conn) -> None:
    c.send(b"220 mx.example.org ESMTP\n")
    c.expect(b"EHLO")
    c.send(EHLO_REPLY.replace(b"\r\n", b"\n"))
    c.expect(b"MAIL")
    c.send(b"250 2.1.0 ok\n")
    c.expect(b"RCPT")
    c.send(b"250 2.1.5 ok\n")
    c.expect(b"DATA")
    c.send(b"354 go ahead\n")
    c.read_data()
    c.accepted = True
    c.send(b"250 2.0.0 queued\n")
    c.line()


def unsolicited_reply(c: Conn) -> None:
    # an extra reply right after the greeting: every later reply is one behind
    c.send(b"220 mx.example.org ESMTP\r\n250 2.0.0 early\r\n")
    c.expect(b"EHLO")
    c.send(EHLO_REPLY)
    for verb, answer in ((b"MAIL", b"250 2.1.0 ok"), (b"RCPT", b"250 2.1.5 ok")):
        if not c.line().upper().startswith(verb):
            return
        c.send(answer + b"\r\n")
    if not c.line().upper().startswith(b"DATA"):
        return
    c.send(b"354 go ahead\r\n")
    if c.read_data():
        c.accepted = True
        c.send(b"250 2.0.0 queued\r\n")
    c.line()


def reply_before_dot(c: Conn) -> None:
    # a final reply while the message is still coming in (used with a message far larger
    # than the socket buffers: with a small one the client may have sent the dot already,
    # and then nobody can tell the 250 from a real acceptance)
    up_to_354(c)
    c.accepted = c.recv().endswith(b"\r\n.\r\n")
    c.send(b"250 2.0.0 thanks, that will do\r\n")
    c.hang()


# Scenarios that must defer --------------------------------------------------------------------


def garbage_greeting(c: Conn) -> None:
    c.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    c.hang()


def binary_greeting(c: Conn) -> None:
    c.send(bytes(range(256)) * 4)
    c.hang()


def garbage_after_rcpt(c: Conn) -> None:
    up_to_mail(c)
    c.send(b"250 2.1.0 ok\r\n")
    c.expect(b"RCPT")
    c.send(b"\x00\xff garbage, not a reply\r\n")
    c.hang()


def garbage_after_dot(c: Conn) -> None:
    up_to_dot(c)
    c.send(b"OK THANKS\r\n")
    c.hang()


def invalid_code_after_dot(c: Conn) -> None:
    up_to_dot(c)
    c.send(b"999 what\r\n")
    c.hang()


def no_greeting(c: Conn) -> None:
    c.hang()


def silent_after_ehlo(c: Conn) -> None:
    c.send(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    c.hang()


def silent_after_dot(c: Conn) -> None:
    up_to_dot(c)
    c.hang()


def drip_greeting(c: Conn) -> None:
    # one byte every 0.3 s, never a whole line: each byte arrives well within the timeout
    c.sock.settimeout(0.3)
    for byte in b"220-" + b"x" * 10000:
        if c.server.stopping.is_set():
            return
        try:
            c.send(bytes([byte]))
            if not c.sock.recv(1, socket.MSG_PEEK):
                return
        except TimeoutError:
            continue
        except OSError:
            return


def endless_multiline(c: Conn) -> None:
    c.send(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    try:
        while not c.server.stopping.is_set():
            c.send(b"250-PIPELINING and more and more and more\r\n" * 100)
    except OSError:
        return


def endless_line_after_dot(c: Conn) -> None:
    up_to_dot(c)
    try:
        c.send(b"250 ")
        while not c.server.stopping.is_set():
            c.send(b"y" * 65536)
    except OSError:
        return


def closes_at_once(c: Conn) -> None:
    c.sock.close()


def greeting_421(c: Conn) -> None:
    c.send(b"421 4.3.2 shutting down\r\n")


def closes_after_mail(c: Conn) -> None:
    up_to_mail(c)
    c.sock.close()


def resets_after_mail(c: Conn) -> None:
    up_to_mail(c)
    c.reset()


def closes_after_354(c: Conn) -> None:
    up_to_354(c)
    c.sock.close()


def resets_mid_data(c: Conn) -> None:
    up_to_354(c)
    c.recv()
    c.reset()


def closes_after_dot(c: Conn) -> None:
    up_to_dot(c)
    c.sock.close()


def stops_reading_in_data(c: Conn) -> None:
    # takes the 354 and then never reads: the client's writes block on a full socket buffer
    up_to_354(c)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    while not c.server.stopping.is_set():
        time.sleep(0.1)


def data_250_instead_of_354(c: Conn) -> None:
    up_to_mail(c)
    c.send(b"250 2.1.0 ok\r\n")
    c.expect(b"RCPT")
    c.send(b"250 2.1.5 ok\r\n")
    c.expect(b"DATA")
    c.send(b"250 2.0.0 sure\r\n")
    c.hang()


def bad_code_letters(c: Conn) -> None:
    c.send(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    c.send(b"25O-mx.example.org\r\n25O 8BITMIME\r\n")
    c.hang()


def half_multiline_then_close(c: Conn) -> None:
    up_to_mail(c)
    c.send(b"250-2.1.0 first line of two\r\n")
    c.sock.close()


def temporary_at_rcpt(c: Conn) -> None:
    up_to_mail(c)
    c.send(b"250 2.1.0 ok\r\n")
    c.expect(b"RCPT")
    c.send(b"452 4.4.5 Rate limit exceeded\r\n")
    # PIPELINING is offered: DATA came with the RCPT. Refused as Postfix does; the client
    # must keep the RCPT's 452 as the message's fate, not this 554.
    c.expect(b"DATA")
    c.send(b"554 5.5.1 Error: no valid recipients\r\n")
    c.expect(b"QUIT")
    c.send(b"221 bye\r\n")


def _pipelined_batch(c: Conn) -> None:
    """MAIL, RCPT and DATA, all read before any reply: the client pipelined (EHLO offers it;
    a lock-step client sends no RCPT here, and the script fails when it gives up)."""
    up_to_mail(c)
    c.expect(b"RCPT")
    c.expect(b"DATA")


def _nothing_more(c: Conn) -> None:
    rest = c.buf
    while chunk := c.recv():
        rest += chunk
    # no body, no lone dot, and no QUIT either: in DATA mode it would be taken as body text
    assert rest == b"", rest


def pipelined_354_without_recipient(c: Conn) -> None:
    # a broken listener: 354 to the DATA behind the only RCPT, which it refused
    _pipelined_batch(c)
    c.send(b"250 2.1.0 ok\r\n452 4.2.2 mailbox busy\r\n354 go ahead\r\n")
    _nothing_more(c)


def pipelined_354_after_refused_mail(c: Conn) -> None:
    _pipelined_batch(c)
    c.send(b"451 4.3.0 try later\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    _nothing_more(c)


def closes_mid_pipeline(c: Conn) -> None:
    _pipelined_batch(c)
    c.send(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")


STARTTLS_EHLO = b"250-mx.example.org\r\n250-STARTTLS\r\n250 8BITMIME\r\n"


def starttls_then_garbage(c: Conn) -> None:
    greet(c, STARTTLS_EHLO)
    c.expect(b"STARTTLS")
    c.send(b"220 2.0.0 ready\r\n")
    c.send(b"this is not a TLS record\r\n" * 10)
    c.hang()


def starttls_then_close(c: Conn) -> None:
    greet(c, STARTTLS_EHLO)
    c.expect(b"STARTTLS")
    c.send(b"220 2.0.0 ready\r\n")
    c.sock.close()


def starttls_then_silence(c: Conn) -> None:
    greet(c, STARTTLS_EHLO)
    c.expect(b"STARTTLS")
    c.send(b"220 2.0.0 ready\r\n")
    c.hang()


def starttls_refused(c: Conn) -> None:
    greet(c, STARTTLS_EHLO)
    c.expect(b"STARTTLS")
    c.send(b"454 4.7.0 TLS not available\r\n")
    c.hang()


def starttls_not_offered(c: Conn) -> None:
    greet(c)
    c.hang()


class _TLS:
    """A trustme CA and a server context for 127.0.0.1 (shared: CA creation is slow)."""

    _ca: trustme.CA | None = None

    @classmethod
    def ca(cls) -> trustme.CA:
        if cls._ca is None:
            cls._ca = trustme.CA()
        return cls._ca

    @classmethod
    def server_context(cls) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cls.ca().issue_cert("127.0.0.1", "localhost").configure_cert(context)
        return context


def _handshake(c: Conn) -> ssl.SSLSocket:
    greet(c, STARTTLS_EHLO)
    c.expect(b"STARTTLS")
    c.send(b"220 2.0.0 ready\r\n")
    tls = _TLS.server_context().wrap_socket(c.sock, server_side=True)
    c.sock = tls
    return tls


def tls_then_close(c: Conn) -> None:
    _handshake(c)
    c.expect(b"EHLO")
    c.sock.close()


def tls_then_garbage(c: Conn) -> None:
    _handshake(c)
    c.expect(b"EHLO")
    c.send(b"\x00\x01garbage inside TLS\r\n")
    c.hang()


def tls_then_raw_bytes(c: Conn) -> None:
    # the TLS session is up, then plain bytes appear on the wire: a broken record
    tls = _handshake(c)
    c.expect(b"EHLO")
    # an application-data record header followed by bytes that decrypt to nothing
    os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + b"\xee" * 32)
    c.hang()


DELIVER: dict[str, Script] = {
    "split_replies": split_replies,
    "multiline_replies": multiline_replies,
    "odd_ehlo_extensions": odd_ehlo_extensions,
}

EITHER: dict[str, Script] = {
    "bare_lf_replies": bare_lf_replies,
    "unsolicited_reply": unsolicited_reply,
}

DEFER: dict[str, Script] = {
    "garbage_greeting": garbage_greeting,
    "binary_greeting": binary_greeting,
    "garbage_after_rcpt": garbage_after_rcpt,
    "garbage_after_dot": garbage_after_dot,
    "invalid_code_after_dot": invalid_code_after_dot,
    "no_greeting": no_greeting,
    "silent_after_ehlo": silent_after_ehlo,
    "silent_after_dot": silent_after_dot,
    "drip_greeting": drip_greeting,
    "endless_multiline": endless_multiline,
    "endless_line_after_dot": endless_line_after_dot,
    "closes_at_once": closes_at_once,
    "greeting_421": greeting_421,
    "closes_after_mail": closes_after_mail,
    "resets_after_mail": resets_after_mail,
    "closes_after_354": closes_after_354,
    "resets_mid_data": resets_mid_data,
    "closes_after_dot": closes_after_dot,
    "stops_reading_in_data": stops_reading_in_data,
    "temporary_at_rcpt": temporary_at_rcpt,
    "data_250_instead_of_354": data_250_instead_of_354,
    "bad_code_letters": bad_code_letters,
    "half_multiline_then_close": half_multiline_then_close,
    "pipelined_354_without_recipient": pipelined_354_without_recipient,
    "pipelined_354_after_refused_mail": pipelined_354_after_refused_mail,
    "closes_mid_pipeline": closes_mid_pipeline,
}

DEFER_TLS: dict[str, Script] = {
    "starttls_then_garbage": starttls_then_garbage,
    "starttls_then_close": starttls_then_close,
    "starttls_then_silence": starttls_then_silence,
    "starttls_refused": starttls_refused,
    "starttls_not_offered": starttls_not_offered,
    "tls_then_close": tls_then_close,
    "tls_then_garbage": tls_then_garbage,
    "tls_then_raw_bytes": tls_then_raw_bytes,
}


# ---------------------------------------------------------------------------------------------
# The harness around the real sendmail
# ---------------------------------------------------------------------------------------------


def write_config(world, port: int, relay_extra: str = "", mode: str = "interactive") -> None:
    Path(world.config).write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {port}
timeout = {RELAY_TIMEOUT}
helo = "client.example.org"
{relay_extra}

[addresses]
domain = "example.org"

[queue]
dir = "{world.spool}"

[delivery]
mode = "{mode}"
"""
    )


def tls_extra(world) -> str:
    ca = Path(world.tmp) / "ca.pem"
    _TLS.ca().cert_pem.write_to_path(str(ca))
    return f'tls = "starttls"\nca_file = "{ca}"'


@pytest.fixture
def hostile():
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def no_traceback(stderr: bytes) -> None:
    assert b"Traceback" not in stderr, stderr.decode("utf-8", "replace")
    assert b"internal error" not in stderr, stderr.decode("utf-8", "replace")


def check_deferred(world, result: subprocess.CompletedProcess[bytes]) -> str:
    """Exit 0, silent, one entry in the spool with its last error; returns the queue id."""
    no_traceback(result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"", result.stderr
    (qid,) = world.queued()
    state = spoolfmt.decode_state((world.spool / "state" / qid).read_bytes())
    # the reason is kept (a 452 rate limit is back-pressure: it does not count as an attempt)
    assert list(state.pending) == ["someone@example.net"], spoolfmt.encode_state(state)
    assert state.pending["someone@example.net"], spoolfmt.encode_state(state)
    assert not state.done and not state.failed
    assert not os.listdir(world.spool / "tmp")
    return qid


def deliver_later(world) -> None:
    """A sane listener is back: `sendmail -q` delivers the kept message, intact, once."""
    write_config(world, world.listener.port)
    r = world.sendmail("-q", timeout=GUARD)
    no_traceback(r.stderr)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.rcpt_tos == ["someone@example.net"]
    assert msg.body == BODY.replace(b"\n", b"\r\n")
    assert msg.header("Subject") == ["hostile listener test"]
    assert world.queued() == []


@pytest.mark.parametrize("name", sorted(DELIVER))
def test_odd_but_valid_replies_deliver(world, hostile, name):
    server = hostile(DELIVER[name])
    write_config(world, server.port)
    r = world.sendmail("-odi", "-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    no_traceback(r.stderr)
    assert (r.returncode, r.stderr) == (0, b"")
    assert world.queued() == []
    assert not server.errors, server.errors
    (conn,) = server.conns
    assert conn.data.split(b"\r\n\r\n", 1)[1] == BODY.replace(b"\n", b"\r\n").replace(
        b"\r\n.", b"\r\n.."
    )


@pytest.mark.parametrize("name", sorted(EITHER))
def test_doubtful_replies_never_lose_the_message(world, hostile, name):
    server = hostile(EITHER[name])
    write_config(world, server.port)
    r = world.sendmail("-odi", "-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    no_traceback(r.stderr)
    assert (r.returncode, r.stderr) == (0, b"")
    server.stop()
    assert not server.errors, server.errors
    if world.queued():
        check_deferred(world, r)
        deliver_later(world)
    else:  # gone from the spool: only because the listener took it
        assert any(conn.accepted for conn in server.conns)


@pytest.mark.parametrize("name", sorted(DEFER))
def test_odi_defers_and_keeps_the_message(world, hostile, name):
    server = hostile(DEFER[name])
    write_config(world, server.port)
    r = world.sendmail("-odi", "-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    check_deferred(world, r)
    server.stop()
    assert not server.errors, server.errors
    deliver_later(world)


@pytest.mark.parametrize("name", sorted(DEFER_TLS))
def test_tls_failing_half_way_defers(world, hostile, name):
    server = hostile(DEFER_TLS[name])
    write_config(world, server.port, tls_extra(world))
    r = world.sendmail("-odi", "-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    check_deferred(world, r)
    server.stop()
    assert not server.errors, server.errors
    deliver_later(world)


@pytest.mark.parametrize("name", sorted(DEFER))
def test_flush_defers_and_keeps_the_message(world, hostile, name):
    server = hostile(DEFER[name])
    write_config(world, server.port, mode="queue")
    r = world.sendmail("-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    assert (r.returncode, r.stderr) == (0, b"")
    (qid,) = world.queued()
    r = world.sendmail("-q", timeout=GUARD)
    assert world.queued() == [qid]
    check_deferred(world, r)
    server.stop()
    deliver_later(world)


def test_flush_over_many_entries_stops_at_a_dead_listener(world, hostile):
    """Five entries, a listener that never greets: the flush gives up after the first
    timeout (the rest is left for later) instead of waiting 2 s per entry."""
    server = hostile(no_greeting)
    write_config(world, server.port, mode="queue")
    for _ in range(5):
        assert world.sendmail("-i", "someone@example.net", input=MESSAGE).returncode == 0
    r = world.sendmail("-q", timeout=GUARD)
    no_traceback(r.stderr)
    assert r.returncode == 0 and len(world.queued()) == 5
    assert len(server.conns) == 1


def test_verbose_transcript_names_the_failure(world, hostile):
    """With -v the dialogue goes to stderr: the deferral is explained, still no traceback."""
    server = hostile(closes_after_354)
    write_config(world, server.port)
    r = world.sendmail("-v", "-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    no_traceback(r.stderr)
    assert r.returncode == 0
    assert b"354" in r.stderr and b"deferred" in r.stderr
    assert len(world.queued()) == 1


def test_listener_that_stops_reading_a_big_message(world, hostile):
    """20 MB after the 354 to a listener that reads nothing: the writes stall on the full
    socket buffers and the relay timeout ends it; the entry is kept."""
    server = hostile(stops_reading_in_data)
    write_config(world, server.port)
    big = b"Subject: big\nTo: someone@example.net\n\n" + b"z" * 998 + b"\n"
    big = big + b"y" * 998 * 20000
    r = world.sendmail("-odi", "-i", "someone@example.net", input=big, timeout=GUARD)
    no_traceback(r.stderr)
    assert (r.returncode, r.stderr) == (0, b"")
    (qid,) = world.queued()
    state = spoolfmt.decode_state((world.spool / "state" / qid).read_bytes())
    assert "timed out" in state.last_error, state.last_error


def test_early_250_during_a_big_message_is_not_a_delivery(world, hostile):
    """A 250 that arrives before the final dot accepts nothing: the message is kept."""
    server = hostile(reply_before_dot)
    write_config(world, server.port)
    big = b"Subject: big\nTo: someone@example.net\n\n" + (b"y" * 998 + b"\n") * 20000
    r = world.sendmail("-odi", "-i", "someone@example.net", input=big, timeout=GUARD)
    no_traceback(r.stderr)
    assert (r.returncode, r.stderr) == (0, b"")
    assert not server.conns[0].accepted
    assert len(world.queued()) == 1


def plaintext_on_implicit_tls(c: Conn) -> None:
    c.send(b"220 mx.example.org ESMTP (no TLS here)\r\n")
    c.hang()


def implicit_tls_then_silence(c: Conn) -> None:
    c.sock = _TLS.server_context().wrap_socket(c.sock, server_side=True)
    c.hang()


def implicit_tls_then_close(c: Conn) -> None:
    c.sock = _TLS.server_context().wrap_socket(c.sock, server_side=True)
    c.send(b"220 mx.example.org ESMTP\r\n")
    c.expect(b"EHLO")
    c.sock.close()


IMPLICIT_TLS: dict[str, Script] = {
    "plaintext_on_implicit_tls": plaintext_on_implicit_tls,
    "implicit_tls_then_silence": implicit_tls_then_silence,
    "implicit_tls_then_close": implicit_tls_then_close,
}


@pytest.mark.parametrize("name", sorted(IMPLICIT_TLS))
def test_implicit_tls_failing_defers(world, hostile, name):
    server = hostile(IMPLICIT_TLS[name])
    write_config(world, server.port, tls_extra(world).replace('"starttls"', '"tls"'))
    r = world.sendmail("-odi", "-i", "someone@example.net", input=MESSAGE, timeout=GUARD)
    check_deferred(world, r)
    server.stop()
    assert not server.errors, server.errors
    deliver_later(world)


def lmtp_one_reply_then_close(c: Conn) -> None:
    c.send(b"220 mx.example.org LMTP\r\n")
    c.expect(b"LHLO")
    c.send(b"250-mx.example.org\r\n250 8BITMIME\r\n")
    c.expect(b"MAIL")
    c.send(b"250 2.1.0 ok\r\n")
    for _ in range(2):
        c.expect(b"RCPT")
        c.send(b"250 2.1.5 ok\r\n")
    c.expect(b"DATA")
    c.send(b"354 go ahead\r\n")
    c.read_data()
    c.accepted = True
    c.send(b"250 2.0.0 <one@example.net> delivered\r\n")  # one of the two replies owed
    c.sock.close()


def test_lmtp_listener_that_owes_a_reply_defers_only_that_recipient(world, hostile):
    """LMTP owes one reply per recipient after the dot: the recipient that got its 250 is
    done (never sent again), the one whose reply never came stays pending."""
    server = hostile(lmtp_one_reply_then_close)
    write_config(world, server.port, 'protocol = "lmtp"')
    r = world.sendmail(
        "-odi", "-i", "one@example.net", "two@example.net", input=MESSAGE, timeout=GUARD
    )
    no_traceback(r.stderr)
    assert (r.returncode, r.stderr) == (0, b"")
    (qid,) = world.queued()
    state = spoolfmt.decode_state((world.spool / "state" / qid).read_bytes())
    assert list(state.done) == ["one@example.net"], spoolfmt.encode_state(state)
    assert list(state.pending) == ["two@example.net"], spoolfmt.encode_state(state)
    server.stop()
    assert not server.errors, server.errors
