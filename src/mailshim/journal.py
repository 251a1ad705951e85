"""journald's native protocol: one datagram of ``KEY=value`` fields per log line, and reading
those lines back from ``journalctl -o json``.

Each line goes to ``/run/systemd/journal/socket`` with ``MESSAGE`` (the Postfix-style line
``maillog`` writes everywhere else), ``PRIORITY``, ``SYSLOG_FACILITY=2`` (mail),
``SYSLOG_IDENTIFIER=mailshim`` and, for a delivery agent's line, a second
``SYSLOG_IDENTIFIER=mailshim/smtp`` (journald shows and forwards the last one, so syslog and
``journalctl -o short`` read ``mailshim/smtp[PID]:`` as pflogsumm wants, while
``journalctl -t mailshim`` still finds every line), plus ``MAILSHIM_QUEUE_ID``,
``MAILSHIM_STATUS``, ``MAILSHIM_RELAY``, ``MAILSHIM_RECIPIENT`` and ``MAILSHIM_DELAY`` where the
line has them, so that ``journalctl MAILSHIM_QUEUE_ID=ID`` tells one message's story.
``MAILSHIM_JOURNAL_SOCKET`` names another socket (tests, containers); an empty value turns the
journal off.

Trust: any process, logging for itself. Field values are other users' text (addresses) and
the listener's (replies): the caller has already made them one printable line, and a value
holding a newline anyway is sent in the protocol's length-prefixed form, so no value can add
a field. Names are fixed here. ``parse_json_line`` reads journalctl's output, which holds
other programs' text: only the fields named are used, each reduced to one line.

Raises nothing: a journal that cannot be reached makes ``send`` return False (the caller falls
back to syslog); ``parse_json_line`` returns None for what it cannot read.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "mailshim"
MAX_VALUE = 16 * 1024  # a log line longer than this is cut (journald takes far more)
_sock: _socket.socket | None = None
_checked: tuple[str, bool] | None = None


def socket_path() -> str | None:
    """The journal's socket, or None when it is off (``MAILSHIM_JOURNAL_SOCKET=""``)."""
    path = os.environ.get("MAILSHIM_JOURNAL_SOCKET")
    if path is None:
        return SOCKET
    return path or None


def available() -> bool:
    """Whether the journal's socket is there (looked at once per process and path)."""
    global _checked
    path = socket_path()
    if path is None:
        return False
    if _checked is None or _checked[0] != path:
        try:
            ok = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            ok = False
        _checked = (path, ok)
    return _checked[1]


def encode(fields: list[tuple[str, str]]) -> bytes:
    """The datagram for ``fields`` (name, value), in order; a name may repeat.

    >>> encode([("MESSAGE", "hi"), ("X", "a\\nb")])
    b'MESSAGE=hi\\nX\\n\\x03\\x00\\x00\\x00\\x00\\x00\\x00\\x00a\\nb\\n'
    """
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if len(data) > MAX_VALUE:
            # on a character: a value cut inside one is no longer UTF-8, and journald keeps
            # it as a blob that journalctl shows as "[blob data]"
            data = data[:MAX_VALUE].decode("utf-8", "ignore").encode()
        if b"\n" in data:
            out += name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def send(fields: list[tuple[str, str]]) -> bool:
    """Send one entry; False when the journal did not take it (no socket, refused, full)."""
    global _sock
    path = socket_path()
    if path is None:
        return False
    # The C module, not ``socket``: that one imports enum and selectors, too dear for the
    # sendmail fast path (tests/test_imports.py), which logs each submission.
    import _socket

    try:
        if _sock is None:
            _sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        _sock.sendto(encode(fields), path)
    except OSError:
        return False
    return True


def line_fields(
    line: str, *, error: bool, program: str | None, extra: dict[str, str] | None
) -> list[tuple[str, str]]:
    """The fields for one log line: ``line`` is already one printable line.

    The queue id is the line's first word when it is one ("ID: ..."); ``extra`` adds
    ``MAILSHIM_<NAME>`` fields (status, relay, recipient, delay) given by the caller.
    """
    fields = [
        ("MESSAGE", line),
        ("PRIORITY", "4" if error else "5"),
        ("SYSLOG_FACILITY", "2"),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
    ]
    if program:
        fields.append(("SYSLOG_IDENTIFIER", f"{IDENTIFIER}/{program}"))
    head, sep, _ = line.partition(": ")
    if sep and 10 <= len(head) <= 20 and head.isalnum() and head.isupper():
        fields.append(("MAILSHIM_QUEUE_ID", head))
    for name, value in (extra or {}).items():
        fields.append(("MAILSHIM_" + name.upper(), value))
    return fields


# --- reading it back -------------------------------------------------------------------


def _text(value: object) -> str | None:
    """A journal field's value: a string, a list of byte values (binary), or a list of them
    (a field given more than once: the last one, as journald shows it)."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        value = value[-1]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and 0 <= v < 256 for v in value):
        return bytes(value).decode("utf-8", "replace")
    return None


def parse_json_line(raw: bytes) -> str | None:
    """One ``journalctl -o json`` entry as a syslog-style line
    ("2026-12-07T10:00:01+00:00 host mailshim/smtp[42]: MESSAGE"); None when unreadable."""
    import json
    import time

    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    message = _text(entry.get("MESSAGE"))
    if message is None:
        return None
    try:
        usec = int(str(entry.get("__REALTIME_TIMESTAMP", "0")))
    except ValueError:
        usec = 0
    ident = _text(entry.get("SYSLOG_IDENTIFIER")) or "?"
    pid = _text(entry.get("SYSLOG_PID")) or _text(entry.get("_PID")) or ""
    host = _text(entry.get("_HOSTNAME")) or "-"
    stamp = rfc3339(usec / 1e6, time.localtime(usec / 1e6).tm_gmtoff)
    from mailshim.errors import one_line

    tag = f"{ident}[{pid}]" if pid else ident
    return one_line(f"{stamp} {host} {tag}: {message}")


def rfc3339(t: float, utc_offset: int) -> str:
    """``t`` as RFC 3339 local time with a ``+HH:MM`` offset (what pflogsumm reads).

    >>> rfc3339(0, 3600)
    '1970-01-01T01:00:00+01:00'
    """
    import time

    sign = "+" if utc_offset >= 0 else "-"
    hours, minutes = divmod(abs(utc_offset) // 60, 60)
    body = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t + utc_offset))
    return f"{body}{sign}{hours:02d}:{minutes:02d}"
