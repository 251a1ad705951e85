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
        current = None
        for line in lines:
            if line[:1] in (" ", "\t") and current is not None:
                out[-1] += line
                continue
            key, sep, value = line.partition(":")
            current = key if sep else None
            if sep and key.lower() == name.lower():
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
        return responses

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
    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = RecordingHandler()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = LongLineController(
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


@pytest.fixture
def world(tmp_path, listener) -> Env:
    return Env(tmp_path, listener)
