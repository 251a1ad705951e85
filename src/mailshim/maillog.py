"""One log line per event, Postfix style: to the journal (native protocol, with fields) where
journald runs, else to syslog (mail facility, tag ``mailshim``), to the ``[log] file`` when one
is configured, and to stderr for ``mailshim daemon`` when none of these is there (containers,
minimal hosts).

A delivery attempt's line is tagged ``mailshim/smtp`` (as Postfix's ``postfix/smtp``), so
that pflogsumm's parser (``pflogsumm --syslog-name=mailshim``) counts its ``status=sent``,
``deferred`` and ``bounced``; every other line is tagged ``mailshim``. The file's lines carry
an RFC 3339 time with a ``+HH:MM`` offset, which pflogsumm reads too. In the journal each line
also carries ``MAILSHIM_QUEUE_ID`` and, for a delivery attempt, ``MAILSHIM_STATUS``,
``MAILSHIM_RELAY``, ``MAILSHIM_RECIPIENT`` and ``MAILSHIM_DELAY`` (journal.py).

``journalctl MAILSHIM_QUEUE_ID=ID``, ``grep QUEUEID /var/log/mail.log`` or the ``[log] file``
then tell a message's whole story; ``story()`` reads it back for ``mailshim log ID``. A line
that cannot be written (no journal or syslog socket, a log file this user may not append to)
is dropped: logging never makes a submission or a delivery fail.

Trust: any process. Text is reduced to one printable line before it is logged, so addresses
and replies from other users or the listener cannot forge extra log lines or journal fields.
The log file is opened append-only without following a link, and only a regular file is
written. ``story()`` runs as the administrator and only reads what that user may read. Raises
nothing; ``story`` raises OSError for an unreadable file named with ``--file``.
"""

from __future__ import annotations

import os
import sys

from mailshim import journal
from mailshim.errors import one_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

_SOCKETS = ("/dev/log", "/var/run/syslog")
_opened: str | None = None  # the tag syslog was opened with
_available: bool | None = None
_file: str | None = None  # [log] file
_stderr = False  # mailshim daemon: log to stderr when there is no syslog and no file


def use_file(path: str | None) -> None:
    """Also append each line to ``path`` (``[log] file``); None: syslog only."""
    global _file
    _file = path


def use_stderr(on: bool) -> None:
    """Write lines to stderr when neither syslog nor a log file takes them (the daemon)."""
    global _stderr
    _stderr = on


def _append(path: str, line: str, tag: str) -> bool:
    import time

    now = time.time()
    stamp = journal.rfc3339(now, time.localtime(now).tm_gmtoff)
    data = f"{stamp} {os.uname().nodename} {tag}[{os.getpid()}]: {line}\n"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o640)
    except OSError:
        return False
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        # One write with O_APPEND: lines of concurrent processes never interleave.
        os.write(fd, data.encode("utf-8", "replace"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def available() -> bool:
    global _available
    if _available is None:
        _available = any(os.path.exists(p) for p in _SOCKETS)
    return _available


def log(
    text: str,
    *,
    error: bool = False,
    program: str | None = None,
    fields: dict[str, str] | None = None,
) -> None:
    """Log ``text`` (already "QUEUEID: key=value, ..." shaped): the journal or syslog, the log
    file, or the daemon's stderr (see the module docstring).

    ``program`` ("smtp" for a delivery attempt) makes the tag ``mailshim/PROGRAM``;
    ``fields`` (status, relay, recipient, delay) become ``MAILSHIM_*`` journal fields.
    """
    global _opened
    line = one_line(text)
    tag = f"mailshim/{program}" if program else "mailshim"
    if _file is not None:
        _append(_file, line, tag)
    quiet = bool(os.environ.get("MAILSHIM_NO_SYSLOG"))
    if not quiet and journal.available():
        clean = {k: one_line(v) for k, v in fields.items()} if fields else None
        if journal.send(journal.line_fields(line, error=error, program=program, extra=clean)):
            return
    if quiet or not available():
        if _stderr and _file is None:
            try:
                sys.stderr.write(f"mailshim: {line}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        return
    import syslog

    if _opened != tag:
        syslog.openlog(tag, syslog.LOG_PID, syslog.LOG_MAIL)
        _opened = tag
    # notice, not info: the units drop systemd's own per-run lines (info) with
    # LogLevelMax=notice, which would drop info lines of ours with them.
    syslog.syslog(syslog.LOG_WARNING if error else syslog.LOG_NOTICE, line)


# --- reading the story back (``mailshim log ID``) -----------------------------------------

LOG_FILES = ("/var/log/mail.log", "/var/log/maillog")
# --all: without it, -o json gives a field over 4096 bytes as null (the line would vanish)
JOURNAL = (
    "journalctl", "-t", "mailshim", "-t", "mailshim/smtp", "--no-pager", "-o", "json", "--all",
)  # fmt: skip
_ID_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def looks_like_id(word: str) -> bool:
    """A queue id, or a prefix of one long enough not to match everything."""
    return 6 <= len(word) <= 20 and all(ch in _ID_CHARS for ch in word)


def _ids_in(line: str) -> list[str]:
    """Queue ids named in a line (a bounce's own id, for instance)."""
    out = []
    for word in line.replace(":", " ").replace(",", " ").replace("=", " ").split():
        word = word.strip("<>()[]")
        if len(word) == 20 and looks_like_id(word):
            out.append(word)
    return out


def follow(lines: Iterable[str], queue_id: str) -> Iterator[str]:
    """The lines that mention ``queue_id``, or an id first named in one of those lines."""
    wanted = {queue_id.upper()}
    for line in lines:
        if any(w in line for w in wanted):
            wanted.update(_ids_in(line))
            yield line.rstrip("\r\n")


def journal_story(queue_id: str) -> list[str] | None:
    """The journal's lines for ``queue_id`` (``journalctl -o json``, streamed, each entry
    shown as a syslog line); None when journalctl does not work."""
    import shutil
    import subprocess

    if shutil.which(JOURNAL[0]) is None:
        return None
    try:
        proc = subprocess.Popen(
            JOURNAL, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError:
        return None
    assert proc.stdout is not None
    try:
        lines = (line for line in map(journal.parse_json_line, proc.stdout) if line is not None)
        found = list(follow(lines, queue_id))
    finally:
        proc.stdout.close()
        code = proc.wait()
    if code != 0 and not found:
        return None
    return found


def file_lines(path: str) -> Iterator[str]:
    """The lines of a log file (raises OSError)."""
    with open(path, "rb") as f:
        for raw in f:
            yield raw.decode("utf-8", "replace")


def default_files() -> list[str]:
    """The mail log files present, each rotated copy (``.1``) before it."""
    out = []
    for path in LOG_FILES:
        for candidate in (path + ".1", path):
            if os.path.isfile(candidate):
                out.append(candidate)
    return out


def story(
    queue_id: str, path: str | None = None, log_file: str | None = None
) -> tuple[list[str], list[str]]:
    """A message's log lines and where they were looked for.

    With ``path``, only that file. Otherwise the journal (``journalctl -t mailshim``) when it
    works and knows the id, else ``log_file`` (``[log] file``), else the mail log files.
    Raises OSError for an unreadable ``path``.
    """
    if path is not None:
        return list(follow(file_lines(path), queue_id)), [path]
    searched = []
    found = journal_story(queue_id)
    if found is not None:
        searched.append("the journal (" + " ".join(JOURNAL) + ")")
        if found:
            return found, searched
    if log_file is not None:
        searched.append(log_file)
        try:
            found = list(follow(file_lines(log_file), queue_id))
        except OSError as exc:
            searched[-1] += f" ({exc.strerror})"
            found = []
        if found:
            return found, searched
    files = default_files()
    if not files:
        searched.append(f"{' or '.join(LOG_FILES)} (no such file)")
    for name in files:
        searched.append(name)
        try:
            found = list(follow(file_lines(name), queue_id))
        except OSError:
            continue
        if found:
            return found, searched
    return [], searched
