"""``mailshim sink``: a debugging SMTP listener that prints (and optionally stores) what it gets.

It stands in for the real MTA while trying mailshim out (``make demo``) or debugging a
caller: every message is accepted, shown on stdout with its envelope, and, with ``--dir``,
written to ``DIR/<n>.eml`` with ``X-Sink-Mail-From``/``X-Sink-Rcpt-To`` lines on top.

Trust: run by hand by an administrator. It accepts mail from anyone who can reach the address
it binds to; bind it to loopback (the default). Needs the optional ``aiosmtpd`` extra.

Raises ``UnavailableError`` (exit 69) when ``aiosmtpd`` is missing or the address cannot be
bound.
"""

from __future__ import annotations

import os
import sys

from mailshim.errors import UnavailableError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Handler:
    def __init__(self, folder: str | None, quiet: bool) -> None:
        self.folder = folder
        self.quiet = quiet
        self.count = 0
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.count = len([n for n in os.listdir(folder) if n.endswith(".eml")])

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        data: bytes = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        head = (
            f"X-Sink-Mail-From: <{envelope.mail_from}>\r\n"
            + "".join(f"X-Sink-Rcpt-To: <{r}>\r\n" for r in envelope.rcpt_tos)
        ).encode("utf-8", "surrogateescape")
        if self.folder:
            path = os.path.join(self.folder, f"{self.count:06d}.eml")
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(head + data)
            os.rename(tmp, path)
        if not self.quiet:
            out = sys.stdout
            out.write(f"=== message {self.count} from <{envelope.mail_from}> ")
            out.write(f"to {', '.join('<' + r + '>' for r in envelope.rcpt_tos)}\n")
            out.write(data.decode("utf-8", "replace").replace("\r\n", "\n"))
            out.write("=== end\n")
            out.flush()
        return "250 2.0.0 Ok: stored by mailshim sink"


def serve(host: str, port: int, folder: str | None, quiet: bool = False) -> None:
    """Run until SIGINT/SIGTERM."""
    try:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP
    except ImportError:
        raise UnavailableError(
            "mailshim sink needs aiosmtpd: pip install 'mailshim[sink]'"
            " or apt install python3-aiosmtpd"
        ) from None
    import signal
    import threading

    class LongLineSMTP(SMTP):
        # show what callers really send, 2000-character lines included
        line_length_limit = 1 << 24

    class LongLineController(Controller):
        def factory(self) -> SMTP:
            return LongLineSMTP(self.handler, **self.SMTP_kwargs)

    handler = _Handler(folder, quiet)
    controller = LongLineController(
        handler,
        hostname=host,
        port=port,
        decode_data=False,
        data_size_limit=0,
        enable_SMTPUTF8=True,
    )
    try:
        controller.start()
    except (OSError, RuntimeError) as exc:
        raise UnavailableError(f"cannot listen on {host}:{port}: {exc}") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.stderr.write(f"mailshim sink listening on {host}:{port}\n")
    sys.stderr.flush()
    try:
        stop.wait()
    finally:
        controller.stop()
