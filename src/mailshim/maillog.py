"""One syslog line per event, Postfix style, on the mail facility, tagged ``mailshim``.

``journalctl -t mailshim`` or ``grep QUEUEID /var/log/mail.log`` then tells a message's whole
story. Where there is no syslog socket (containers, CI) nothing is written and nothing fails.

Trust: any process. Text is reduced to one printable line before it is logged, so addresses
and replies from other users or the listener cannot forge extra log lines.
"""

from __future__ import annotations

import os

from mailshim.errors import one_line

_SOCKETS = ("/dev/log", "/var/run/syslog")
_opened = False
_available: bool | None = None


def available() -> bool:
    global _available
    if _available is None:
        _available = any(os.path.exists(p) for p in _SOCKETS)
    return _available


def log(text: str, *, error: bool = False) -> None:
    """Send ``text`` (already "QUEUEID: key=value, ..." shaped) to syslog, if there is one."""
    global _opened
    if os.environ.get("MAILSHIM_NO_SYSLOG") or not available():
        return
    import syslog

    if not _opened:
        syslog.openlog("mailshim", syslog.LOG_PID, syslog.LOG_MAIL)
        _opened = True
    syslog.syslog(syslog.LOG_WARNING if error else syslog.LOG_INFO, one_line(text))
