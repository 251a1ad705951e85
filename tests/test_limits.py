"""Resource limits, measured on the real `sendmail`: refused early, nothing kept, flat memory.

Input is generated on the fly and written into a pipe, so a "2 GB message" costs only what
`sendmail` actually reads; the writer counts what it managed to write before `sendmail` stopped
reading (EPIPE). Peak memory is the child's ``ru_maxrss`` from ``os.wait4``. Each test prints
its figures (``pytest -s tests/test_limits.py``); docs/security.md records them.

Limits: ``[submission] max_size`` (here 50M) ends a piped message with EX_DATAERR (65) as soon
as it is exceeded and removes the half-written spool file; a header block over 1 MiB
(``submit.HEADER_LIMIT``) is EX_DATAERR before anything is spooled; recipients over
``max_recipients`` are EX_DATAERR; a body line of any length streams through in chunks.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from conftest import tool, write_config
from mailshim import errors, spoolfmt
from test_hostile_listener import (
    MESSAGE,
    Conn,
    ScriptedServer,
    endless_line_after_dot,
    endless_multiline,
    greet,
)
from test_hostile_listener import write_config as hostile_config

MB = 1000 * 1000
MIB = 1024 * 1024
GUARD = 300  # seconds: a hang guard, not a speed test


class Measured:
    def __init__(self, code: int, stderr: bytes, maxrss_kb: int, written: int) -> None:
        self.code = code
        self.stderr = stderr
        self.maxrss_mb = maxrss_kb / 1024
        self.written = written

    def __repr__(self) -> str:
        return (
            f"exit {self.code}, peak RSS {self.maxrss_mb:.1f} MiB, "
            f"{self.written / MB:.1f} MB consumed, stderr {self.stderr[:200]!r}"
        )


# ru_maxrss survives exec: a child forked straight from pytest would report pytest's own size.
# So a small launcher (python -S, a few MiB) forks the measured program and reports its figure.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execve(sys.argv[2], sys.argv[2:], os.environ)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(world, args: list[str], feed: Iterable[bytes], stdout=None) -> Measured:
    """Run `sendmail ARGS` with ``feed`` written to its stdin; measure its peak RSS."""
    n = len(os.listdir(world.tmp))
    err_path = Path(world.tmp) / f"stderr-{n}"
    rss_path = Path(world.tmp) / f"maxrss-{n}"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER, str(rss_path), tool("sendmail"), *args],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=err,
            env=world.env,
            start_new_session=True,
        )
    written = 0

    def writer() -> None:
        nonlocal written
        fd = proc.stdin.fileno()
        try:
            for chunk in feed:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
        except (BrokenPipeError, ConnectionResetError):
            pass  # sendmail stopped reading: that is the point
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        code = proc.wait(GUARD)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"sendmail {args} still running after {GUARD} s") from None
    thread.join(GUARD)
    assert not thread.is_alive(), "the writer is stuck on a pipe nobody reads"
    return Measured(code, err_path.read_bytes(), int(rss_path.read_text()), written)


def configure(world, max_size: str = "50M", extra: str = "") -> None:
    write_config(
        world.config,
        world.listener.port,
        world.spool,
        f'[submission]\nmax_size = "{max_size}"\n{extra}',
        mode="queue",
    )


def spool_is_clean(world) -> None:
    for sub in ("tmp", "queue"):
        folder = world.spool / sub
        assert not folder.exists() or os.listdir(folder) == [], (sub, os.listdir(folder))


def report(name: str, m: Measured) -> None:
    print(f"\n[limits] {name}: {m!r}")


def test_baseline_memory(world):
    """For scale: a 1 KB message spooled (the figure the others compare with)."""
    configure(world)
    m = run_measured(world, ["-i", "a@example.net"], [b"Subject: small\n\n" + b"x" * 1000])
    report("baseline, 1 KB message spooled", m)
    assert m.code == 0 and m.maxrss_mb < 64, m


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def lines_of(
    total: int, line: bytes = b"x" * 76 + b"\n", chunk: int = 256 * 1024
) -> Iterator[bytes]:
    """``total`` bytes of ``line`` repeated, in chunks (never held whole)."""
    block = line * (chunk // len(line))
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        sent += len(piece)
        yield piece


def zeros(total: int, chunk: int = MIB) -> Iterator[bytes]:
    """/dev/zero-like: ``total`` NUL bytes, no line end at all."""
    block = bytes(chunk)
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        sent += len(piece)
        yield piece


# ---------------------------------------------------------------------------------------------
# max_size
# ---------------------------------------------------------------------------------------------

TWO_GB = 2 * 1000 * MB


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda: lines_of(TWO_GB), id="text-lines"),
        pytest.param(lambda: zeros(TWO_GB), id="dev-zero-one-line"),
    ],
)
def test_2gb_message_over_max_size_is_refused_early(world, body, request):
    configure(world, "50M")
    feed = _chain([b"Subject: huge\nTo: a@example.net\n\n"], body())
    m = run_measured(world, ["-i", "a@example.net"], feed)
    report(f"2 GB piped, max_size 50M ({request.node.callspec.id})", m)
    assert m.code == errors.EX_DATAERR, m
    assert b"max_size" in m.stderr and b"nothing was kept" in m.stderr, m
    assert m.stderr.count(b"\n") == 1, m  # one line, no traceback
    # It stopped reading just past the limit: 50 MB, plus the pipe and read buffers.
    # (LF becomes CRLF in the spool, so 50 MB spooled is a little less consumed)
    assert 45 * MB < m.written < 50 * MB + 4 * MIB, m
    assert m.maxrss_mb < 64, m  # flat: the message is streamed, never held
    spool_is_clean(world)


def test_2gb_message_declared_over_bs_is_refused_at_mail_from(world):
    configure(world, "50M")
    dialogue = b"EHLO client.example.org\r\nMAIL FROM:<a@example.org> SIZE=2000000000\r\nQUIT\r\n"
    r = world.sendmail("-bs", input=dialogue, timeout=GUARD)
    assert b"\r\n552 5.3.4 " in r.stdout, r.stdout
    assert r.returncode == 0, r.stdout  # the client was told; no message was lost
    spool_is_clean(world)


def test_oversized_message_over_bs_gets_552_after_the_dot(world):
    """Without SIZE=, the server must read to the final dot before it can answer: it drains
    the rest without keeping it (disk and memory stay flat), then says 552."""
    configure(world, "50M")
    head = (
        b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"DATA\r\nSubject: big\r\n\r\n"
    )
    feed = _chain([head], lines_of(120 * MB, b"y" * 78 + b"\r\n"), [b".\r\nQUIT\r\n"])
    out_path = Path(world.tmp) / "bs-out"
    with open(out_path, "wb") as out:
        m = run_measured(world, ["-bs"], feed, stdout=out)
    report("120 MB over -bs, max_size 50M", m)
    replies = out_path.read_bytes()
    assert b"\r\n552 5.3.4 " in replies, replies[-300:]
    assert b"\r\n221 " in replies, replies[-300:]  # the session went on to QUIT
    assert m.code == errors.EX_DATAERR, m
    assert m.maxrss_mb < 64, m
    spool_is_clean(world)


def test_plain_message_piped_into_bs_ends_early(world):
    """A program that pipes a 100 MB plain message into `sendmail -bs` by mistake and never
    reads the replies: the session ends after the error limit instead of reading it all or
    filling both pipes and hanging."""
    configure(world)
    feed = _chain([b"Subject: oops\n\n"], lines_of(100 * MB))
    r_fd, w_fd = os.pipe()  # stdout: a pipe nobody reads
    try:
        with os.fdopen(w_fd, "wb") as out:
            m = run_measured(world, ["-bs"], feed, stdout=out)
    finally:
        os.close(r_fd)
    report("100 MB plain text piped into -bs", m)
    assert m.code == errors.EX_DATAERR, m
    assert m.written < 4 * MIB, m
    spool_is_clean(world)


def _chain(*parts: Iterable[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield from part


# ---------------------------------------------------------------------------------------------
# The header block
# ---------------------------------------------------------------------------------------------


def _many_fields(total: int) -> Iterator[bytes]:
    n = 0
    sent = 0
    while sent < total:
        block = b"".join(b"X-Filler-%07d: %s\n" % (n + i, b"f" * 60) for i in range(1000))
        n += 1000
        sent += len(block)
        yield block


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(lambda: _many_fields(10 * MB), id="many-fields"),
        pytest.param(
            lambda: _chain([b"Subject: "], lines_of(10 * MB, b"s" * 1000)), id="one-10MB-field"
        ),
        pytest.param(
            lambda: _chain([b"Subject: start\n"], lines_of(10 * MB, b" folded continuation\n")),
            id="folded-10MB-field",
        ),
    ],
)
def test_10mb_header_block_is_refused(world, header, request):
    configure(world)
    feed = _chain(header(), [b"\n\nbody\n"])
    m = run_measured(world, ["-i", "a@example.net"], feed)
    report(f"10 MB header block ({request.node.callspec.id})", m)
    assert m.code == errors.EX_DATAERR, m
    assert b"header block larger than" in m.stderr and m.stderr.count(b"\n") == 1, m
    assert m.written < 4 * MIB, m  # stopped just past the 1 MiB header limit
    assert m.maxrss_mb < 64, m
    spool_is_clean(world)


# ---------------------------------------------------------------------------------------------
# Recipients
# ---------------------------------------------------------------------------------------------


def _to_header(count: int) -> Iterator[bytes]:
    yield b"Subject: many\nTo: "
    for start in range(0, count, 10000):
        yield b"".join(b"u%d@example.net, " % i for i in range(start, min(count, start + 10000)))
    yield b"last@example.net\n\nbody\n"


def test_a_million_recipients_in_to_with_t(world):
    """A million addresses make a To: field of ~20 MB: the header limit ends it early."""
    configure(world)
    m = run_measured(world, ["-t", "-i"], _to_header(1000 * 1000))
    report("1,000,000 recipients in To: (-t)", m)
    assert m.code == errors.EX_DATAERR, m
    assert b"header block larger than" in m.stderr, m
    assert m.written < 4 * MIB, m
    assert m.maxrss_mb < 64, m
    spool_is_clean(world)


def _short_names(count: int) -> Iterator[bytes]:
    """``count`` distinct bare local names: a letter and 3 base-36 digits, 5 bytes with the
    comma (up to 1,213,056 names)."""
    digits = b"0123456789abcdefghijklmnopqrstuvwxyz"
    yield b"Subject: many\nTo: "
    for start in range(0, count, 10000):
        names = []
        for n in range(start, min(count, start + 10000)):
            head = digits[10 + n // 36**3]
            names.append(
                bytes([head, digits[n // 1296 % 36], digits[n // 36 % 36], digits[n % 36]])
            )
        yield b",".join(names) + b","
    yield b"last\n\nbody\n"


def test_as_many_recipients_as_fit_in_the_header_limit(world):
    """200,000 distinct names in a To: just under 1 MiB (each gets the default domain): over
    max_recipients (10,000), refused with a clear error; memory is bounded by what one header
    block can hold."""
    configure(world)
    m = run_measured(world, ["-t", "-i"], _short_names(200000))
    report("200,000 recipients in To: (-t), max_recipients 10000", m)
    assert m.code == errors.EX_DATAERR, m
    assert b"max_recipients" in m.stderr and m.stderr.count(b"\n") == 1, m
    # Memory grows with the number of addresses parsed (about 400 bytes each) until the count
    # is checked; the 1 MiB header limit is what bounds it.
    assert m.maxrss_mb < 160, m
    spool_is_clean(world)


def test_recipients_on_the_command_line_over_max_recipients(world):
    configure(world, extra="max_recipients = 100")
    rcpts = [f"r{i}@example.net" for i in range(101)]
    r = world.sendmail("-i", *rcpts, input=b"Subject: x\n\nbody\n", timeout=GUARD)
    assert r.returncode == errors.EX_DATAERR, r.stderr
    assert b"max_recipients" in r.stderr
    spool_is_clean(world)


# ---------------------------------------------------------------------------------------------
# A 100 MB line passes through, in flat memory, spooled and relayed
# ---------------------------------------------------------------------------------------------


class CountingSink:
    """A listener that hashes the DATA section as it streams in (never holds it)."""

    def __init__(self) -> None:
        self.size = 0
        self.sha = hashlib.sha256()
        self.complete = False
        self.server = ScriptedServer(self._script)

    def _take(self, piece: bytes) -> None:
        self.sha.update(piece)
        self.size += len(piece)

    def _script(self, c: Conn) -> None:
        greet(c)
        for verb, answer in ((b"MAIL", b"250 2.1.0 ok"), (b"RCPT", b"250 2.1.5 ok")):
            c.expect(verb)
            c.send(answer + b"\r\n")
        c.expect(b"DATA")
        c.send(b"354 go ahead\r\n")
        buf, c.buf = c.buf, b""
        # Bytes not hashed yet: they may begin the terminator. The leading CRLF stands for
        # the line end before the first line (a dot-only first line also ends the data).
        window = b"\r\n"
        skip = 2
        while True:
            if not buf:
                buf = c.recv()
                if not buf:
                    return
            joined, buf = window + buf, b""
            end = joined.find(b"\r\n.\r\n")
            cut = end + 2 if end >= 0 else max(0, len(joined) - 4)
            self._take(joined[skip:cut] if cut > skip else b"")
            skip = max(0, skip - cut)
            window = joined[cut:]
            if end >= 0:
                break
        self.complete = True
        c.send(b"250 2.0.0 queued\r\n")
        c.line()


def spooled_message_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of the message part of a spool entry (what goes on the wire)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        spoolfmt.decode_envelope(f)
        while chunk := f.read(MIB):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def test_100mb_line_streams_through(world):
    configure(world, "200M")
    line_size = 100 * MB
    head = b"Subject: one long line\nTo: a@example.net\n\n"
    feed = _chain([head], lines_of(line_size, b"L" * 1000), [b"\n"])
    m = run_measured(world, ["-i", "a@example.net"], feed)
    report("100 MB line spooled (max_size 200M)", m)
    assert m.code == 0, m
    assert m.written == len(head) + line_size + 1
    assert m.maxrss_mb < 64, m  # the line is never held whole
    (qid,) = world.queued()
    digest, size = spooled_message_digest(world.spool / "queue" / qid)
    assert size > line_size

    sink = CountingSink()
    try:
        write_config(
            world.config,
            sink.server.port,
            world.spool,
            '[submission]\nmax_size = "200M"\n',
            mode="queue",
        )
        flush = run_measured(world, ["-q"], [])
        report("flush of the 100 MB line to a streaming listener", flush)
    finally:
        sink.server.stop()
    assert flush.code == 0 and flush.stderr == b"", flush
    assert not sink.server.errors, sink.server.errors
    assert world.queued() == []
    assert flush.maxrss_mb < 96, flush  # streamed from the file, not loaded
    # byte for byte what was spooled (no dot in it: stuffing changes nothing)
    assert sink.complete and (sink.sha.hexdigest(), sink.size) == (digest, size)


# ---------------------------------------------------------------------------------------------
# A listener that never stops talking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(endless_multiline, id="endless-multiline-ehlo-reply"),
        pytest.param(endless_line_after_dot, id="endless-line-after-dot"),
    ],
)
def test_endless_replies_keep_memory_flat(world, script):
    server = ScriptedServer(script)
    try:
        hostile_config(world, server.port)
        m = run_measured(world, ["-odi", "-i", "someone@example.net"], [MESSAGE])
        report(f"-odi against a listener sending {script.__name__}", m)
    finally:
        server.stop()
    assert (m.code, m.stderr) == (0, b""), m  # deferred, kept
    assert len(world.queued()) == 1
    assert m.maxrss_mb < 64, m
