"""Shared fixtures: a real SMTP listener (aiosmtpd), a config file, and the real `sendmail`.

Tests run the installed `sendmail` entry point as a subprocess with real stdin against this
listener, with a spool in the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The installed console script `name` from this interpreter's environment."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed in {BIN}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Received:
    def __init__(self, mail_from: str, rcpt_tos: list[str], data: bytes, options: list[str]):
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.data = data
        self.options = options

    @property
    def headers(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[0] + b"\r\n"

    @property
    def body(self) -> bytes:
        parts = self.data.split(b"\r\n\r\n", 1)
        return parts[1] if len(parts) > 1 else b""

    def header(self, name: str) -> list[str]:
        out = []
        lines = self.headers.decode("utf-8", "replace").split("\r\n")
        matched = False  # the field being continued is one of ``name``
        for line in lines:
            if line[:1] in (" ", "\t"):
                if matched:
                    out[-1] += line
                continue
            key, sep, value = line.partition(":")
            matched = bool(sep) and key.lower() == name.lower()
            if matched:
                out.append(value.strip())
        return out


class RecordingHandler:
    """Records every message; replies can be scripted per recipient or per command."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.sessions = 0
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.sessions += 1
        session.host_name = hostname
        # Real listeners offer PIPELINING (aiosmtpd does not, but reads pipelined commands
        # correctly): the end-to-end and fault tests run the pipelined dialogue.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        data = envelope.original_content
        with self.lock:
            self.messages.append(
                Received(
                    envelope.mail_from, list(envelope.rcpt_tos), data, list(envelope.mail_options)
                )
            )
        return "250 2.0.0 Message queued for delivery."


class LongLineSMTP(SMTP):
    # RFC 5321 caps lines at 1000 octets and aiosmtpd enforces it; mailshim passes long lines
    # through unchanged (a listener such as Stalwart takes them), so the test listener must too.
    line_length_limit = 1 << 24


class LongLineController(Controller):
    def factory(self):
        return LongLineSMTP(self.handler, **self.SMTP_kwargs)


class Listener:
    controller_class: type[Controller] = LongLineController

    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = RecordingHandler()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = self.controller_class(
            self.handler,
            hostname="127.0.0.1",
            port=self.port,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=0,
        )
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def wait(self, count: int = 1, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return self.messages
            time.sleep(0.02)
        raise AssertionError(f"expected {count} message(s), listener has {len(self.messages)}")


@pytest.fixture
def listener():
    lst = Listener(free_port())
    lst.start()
    yield lst
    lst.stop()


def write_config(
    path: Path, port: int, spool: Path, extra: str = "", mode: str = "background"
) -> Path:
    path.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {port}
timeout = 10
helo = "client.example.org"

[addresses]
domain = "example.org"

[aliases]
root = "admin@example.org"

[queue]
dir = "{spool}"

[delivery]
mode = "{mode}"
{extra}
"""
    )
    return path


class Env:
    """A test's private world: config, spool, environment for `sendmail`."""

    def __init__(self, tmp: Path, listener: Listener) -> None:
        self.tmp = tmp
        self.listener = listener
        self.spool = tmp / "spool"
        self.config = write_config(tmp / "config.toml", listener.port, self.spool)
        self.env = dict(os.environ)
        self.env.update(
            MAILSHIM_CONFIG=str(self.config),
            MAILSHIM_CACHE_DIR=str(tmp / "cache"),
            MAILSHIM_NO_SYSLOG="1",
            HOME=str(tmp / "home"),
        )
        self.env.pop("XDG_CONFIG_HOME", None)
        _ENVS.append(self)

    def reconfigure(
        self, extra: str = "", mode: str = "background", port: int | None = None
    ) -> None:
        write_config(self.config, port or self.listener.port, self.spool, extra, mode)

    def run(self, prog: str, args: list[str], input: bytes | None = b"", timeout: float = 60, **kw):
        return subprocess.run(
            [tool(prog), *args],
            input=input,
            capture_output=True,
            env=self.env,
            timeout=timeout,
            **kw,
        )

    def sendmail(self, *args: str, input: bytes | None = b"", **kw):
        return self.run("sendmail", list(args), input=input, **kw)

    def queued(self) -> list[str]:
        q = self.spool / "queue"
        return sorted(os.listdir(q)) if q.exists() else []

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.queued():
                return
            time.sleep(0.02)
        raise AssertionError(f"queue still holds {self.queued()}")


def stop_agents(spool_root: Path) -> None:
    """End the delivery agent this test's submissions left lingering on its spool (it would
    otherwise sleep until its next retry, long after the test)."""
    import signal

    pid_file = spool_root / "state" / "agent.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError, IndexError):
        return
    if b"mailshim.agent" in cmdline and str(spool_root).encode() in cmdline:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


_ENVS: list[Env] = []


@pytest.fixture(autouse=True)
def _stop_lingering_agents():
    """After each test, stop the agents its Envs' spools still have."""
    yield
    while _ENVS:
        stop_agents(_ENVS.pop().spool)


@pytest.fixture
def world(tmp_path, listener) -> Env:
    return Env(tmp_path, listener)


# --- listeners that misbehave on cue, and helpers for the spool/runner tests (issue 3) -----


class FaultHandler(RecordingHandler):
    """A RecordingHandler with the listener behaviours the spool must survive.

    - ``per_session``: > 0 answers ``452 4.4.5`` to MAIL after that many messages in one
      connection (Stalwart's limit is 10).
    - ``per_second``: > 0 answers ``452 4.4.5`` to MAIL beyond that many messages a second.
    - ``greylist``: seconds; the first RCPT of each (sender, recipient) pair gets
      ``452 4.2.2``, and so does every retry sooner than that.
    - ``drop_after_dot``: the next N messages are stored, then the connection is closed
      without a reply (the client cannot know it was taken).
    - ``drop_mid_data``: the next N DATA phases are cut after the first line.
    - ``data_delay``: seconds before the reply to the final dot (a slow listener).
    - ``reply_delay``: seconds between storing a message and acknowledging it (widens the
      window in which a client crash means the message is sent again).
    """

    def __init__(self) -> None:
        super().__init__()
        self.per_session = 0
        self.per_second = 0
        self.greylist = 0.0
        self.drop_after_dot = 0
        self.drop_mid_data = 0
        self.data_delay = 0.0  # seconds to wait before answering the final dot
        self.reply_delay = 0.0  # seconds between storing a message and saying so
        self.data_started = 0  # final dots received
        self.open_connections = 0  # connections the listener has not yet seen closed
        self.peak_connections = 0  # the most connections open at one time
        self.max_connections = 0  # > 0: connections beyond this many get 421 and are closed
        self.refused_connections = 0  # connections refused that way
        self.open_at_reply: list[int] = []
        # the last message stored on each connection that ended without QUIT: its sender
        # may have died before learning it was taken (the at-least-once window)
        self.cut_short: list[Received] = []
        self.throttled = 0  # 452 4.4.5 answers given
        self.greylisted = 0  # 452 4.2.2 answers given
        self._recent: list[float] = []
        self._grey: dict[tuple[str, str], float] = {}

    def take(self, name: str) -> bool:
        with self.lock:
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return True
            return False

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        count = getattr(session, "mailshim_count", 0)
        if self.per_session and count >= self.per_session:
            self.throttled += 1
            return "452 4.4.5 Maximum number of messages per session exceeded"
        if self.per_second:
            now = time.monotonic()
            with self.lock:
                self._recent = [t for t in self._recent if now - t < 1.0]
                if len(self._recent) >= self.per_second:
                    self.throttled += 1
                    return "452 4.4.5 Rate limit exceeded, try again later"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.greylist:
            key = (envelope.mail_from, address)
            now = time.monotonic()
            with self.lock:
                first = self._grey.setdefault(key, now)
            if now - first < self.greylist:
                self.greylisted += 1
                return "452 4.2.2 Greylisted, please try again later"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_QUIT(self, server, session, envelope):
        session.mailshim_quit = True
        return "221 Bye"

    async def handle_DATA(self, server, session, envelope):
        self.data_started += 1
        if self.data_delay:
            import asyncio

            await asyncio.sleep(self.data_delay)
        # connections open as each message is about to be acknowledged
        self.open_at_reply.append(self.open_connections)
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            session.mailshim_last = self.messages[-1]  # no await since it was stored
            session.mailshim_count = getattr(session, "mailshim_count", 0) + 1
            with self.lock:
                self._recent.append(time.monotonic())
        if reply.startswith("250") and self.reply_delay:
            import asyncio

            await asyncio.sleep(self.reply_delay)  # stored, not yet acknowledged
        if reply.startswith("250") and self.take("drop_after_dot"):
            server.transport.close()
            import asyncio

            await asyncio.get_running_loop().create_future()  # cancelled with the connection
        return reply


class FaultSMTP(LongLineSMTP):
    def connection_made(self, transport):
        handler = self.event_handler
        with handler.lock:
            full = 0 < handler.max_connections <= handler.open_connections
            if full:
                handler.refused_connections += 1
        if full:
            # What a listener at its connection limit does (Postfix's smtpd, Stalwart): 421
            # instead of the greeting, then it hangs up.
            self.mailshim_refused = True
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)
        with handler.lock:
            handler.open_connections += 1
            handler.peak_connections = max(handler.peak_connections, handler.open_connections)

    def connection_lost(self, exc):
        if getattr(self, "mailshim_refused", False):
            return
        session = getattr(self, "session", None)
        last = getattr(session, "mailshim_last", None)
        super().connection_lost(exc)
        with self.event_handler.lock:
            self.event_handler.open_connections -= 1
            if last is not None and not getattr(session, "mailshim_quit", False):
                self.event_handler.cut_short.append(last)

    async def smtp_DATA(self, arg):
        handler = self.event_handler
        if self.envelope is not None and self.envelope.rcpt_tos and handler.take("drop_mid_data"):
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readuntil(b"\r\n")
            self.transport.close()
            return
        await super().smtp_DATA(arg)


class FaultController(Controller):
    def factory(self):
        return FaultSMTP(self.handler, **self.SMTP_kwargs)


class FaultListener(Listener):
    """A Listener with a FaultHandler; stop()/start() may be called again and again."""

    controller_class = FaultController

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.handler = FaultHandler()

    @property
    def up(self) -> bool:
        return self.controller is not None

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until every connection is closed: all a dead client sent has been handled."""
        deadline = time.monotonic() + timeout
        while self.handler.open_connections > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.handler.open_connections} connections still open")
            time.sleep(0.01)


@pytest.fixture
def faulty():
    lst = FaultListener(free_port())
    lst.start()
    yield lst
    lst.stop()


def queue_config(
    env: Env,
    *,
    queue: str = 'retry = ["1s"]',
    mode: str = "background",
    extra: str = "",
    port: int | None = None,
    relay: str = "",
) -> None:
    """Rewrite ``env``'s config with more ``[queue]`` keys (retry, lifetime, warn_after), and
    more ``[relay]`` keys (protocol, socket, tls...) from ``relay``."""
    env.config.write_text(
        f"""
[relay]
host = "127.0.0.1"
port = {port or env.listener.port}
timeout = 5
helo = "client.example.org"
{relay}

[addresses]
domain = "example.org"

[aliases]
root = "admin@example.org"

[queue]
dir = "{env.spool}"
{queue}

[delivery]
mode = "{mode}"
{extra}
"""
    )


@pytest.fixture
def fworld(tmp_path, faulty) -> Env:
    """An Env whose listener is a FaultListener, with a one-second retry schedule."""
    env = Env(tmp_path, faulty)
    queue_config(env)
    return env


def queue_entries(
    world: Env, rcpts=("bob@example.org",), sender="alice@example.org", arrival=None, n=1
) -> list[str]:
    """Write ``n`` entries straight into ``world``'s spool (no sendmail); their queue ids."""
    from mailshim import spool

    target = spool.Spool(str(world.spool))
    target.ensure()
    ids = []
    for i in range(n):
        w = target.new_entry(sender, list(rcpts), os.getuid(), arrival=arrival)
        w.write(
            b"From: alice@example.org\r\nSubject: test %d\r\n"
            b"Message-ID: <%s@example.org>\r\n\r\nbody %d\r\n" % (i, w.queue_id.encode(), i)
        )
        w.commit(False)
        ids.append(w.queue_id)
    return ids


def message_queue_id(msg: Received) -> str:
    """The queue id a message was submitted under (sendmail makes Message-ID <QID@domain>)."""
    (mid,) = msg.header("Message-ID")
    return mid.strip("<>").split("@", 1)[0]


_others_can_run: bool | None = None


def others_can_run() -> bool:
    """Whether an unprivileged user can run this interpreter and its console scripts (a
    pyenv interpreter under /root, for instance, cannot). Needs root to find out."""
    global _others_can_run
    if _others_can_run is None:
        try:
            r = subprocess.run(
                [tool("sendmail"), "-bi"],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "MAILSHIM_NO_SYSLOG": "1"},
                timeout=60,
            )
            _others_can_run = r.returncode == 0
        except OSError:
            _others_can_run = False
    return _others_can_run
