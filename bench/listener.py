"""A counting SMTP listener for the benchmarks, run as its own process (aiosmtpd).

It keeps no message, only counts: connections (SMTP sessions), messages, bytes, and the
``time.monotonic()`` of the first and last arrival (CLOCK_MONOTONIC is shared by every process
on Linux, so the driver can compare it with its own clock). It runs in a separate process so
that its event loop does not compete with the measuring process for the GIL.

Control is a line protocol on stdin/stdout:
    ``stats``              -> one JSON line with the counters
    ``wait N SECONDS``     -> waits until N messages arrived (or the time is up), then ``stats``
    ``reset``              -> zero the counters, then ``stats``
    ``pipelining on|off``  -> offer PIPELINING in EHLO replies from now on (on at start), then
                              ``stats``: aiosmtpd reads pipelined commands but does not say so
    ``quit``               -> exit
It prints ``ready PORT`` once it accepts connections.

Trust: a benchmark tool bound to loopback only; it accepts anything sent to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class Counters:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reset()

    def reset(self) -> None:
        self.sessions = 0
        self.messages = 0
        self.recipients = 0
        self.bytes = 0
        self.largest = 0
        self.first: float | None = None
        self.last: float | None = None

    def snapshot(self) -> dict[str, object]:
        return {
            "sessions": self.sessions,
            "messages": self.messages,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "largest": self.largest,
            "first": self.first,
            "last": self.last,
            "cpu": time.process_time(),
        }


COUNTERS = Counters()


class Handler:
    pipelining = True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_DATA(self, server, session, envelope):
        size = len(envelope.original_content or b"")
        now = time.monotonic()
        with COUNTERS.cond:
            COUNTERS.messages += 1
            COUNTERS.recipients += len(envelope.rcpt_tos)
            COUNTERS.bytes += size
            COUNTERS.largest = max(COUNTERS.largest, size)
            if COUNTERS.first is None:
                COUNTERS.first = now
            COUNTERS.last = now
            COUNTERS.cond.notify_all()
        envelope.original_content = envelope.content = None
        return "250 2.0.0 Message queued for delivery."


class CountingSMTP(SMTP):
    line_length_limit = 1 << 24  # long lines pass, as they would at a real MTA

    def connection_made(self, transport):
        with COUNTERS.cond:
            COUNTERS.sessions += 1
        super().connection_made(transport)


class CountingController(Controller):
    def factory(self):
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


def _reply(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    if args.host not in ("127.0.0.1", "::1"):
        ap.error("loopback only")
    handler = Handler()
    controller = CountingController(
        handler,
        hostname=args.host,
        port=args.port,
        decode_data=False,
        data_size_limit=0,
        enable_SMTPUTF8=True,
    )
    controller.start()
    sys.stdout.write(f"ready {args.port}\n")
    sys.stdout.flush()
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "reset":
                with COUNTERS.cond:
                    COUNTERS.reset()
                    _reply(COUNTERS.snapshot())
            elif words[0] == "pipelining":
                handler.pipelining = words[1:] == ["on"]
                with COUNTERS.cond:
                    _reply(COUNTERS.snapshot())
            elif words[0] == "wait":
                want, limit = int(words[1]), float(words[2])
                deadline = time.monotonic() + limit
                with COUNTERS.cond:
                    while COUNTERS.messages < want:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        COUNTERS.cond.wait(min(left, 0.5))
                    _reply(COUNTERS.snapshot())
            else:
                with COUNTERS.cond:
                    _reply(COUNTERS.snapshot())
    finally:
        controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
