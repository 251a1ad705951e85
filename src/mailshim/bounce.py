"""Build an RFC 3464 delivery status notification for an entry that failed or is delayed.

The report is a ``multipart/report; report-type=delivery-status`` message: a text part for a
person, a ``message/delivery-status`` part (Reporting-MTA, Arrival-Date, then per recipient
Final-Recipient, Action, Status, Diagnostic-Code), and the original message's header section
as ``text/rfc822-headers``. It is From ``MAILER-DAEMON@<domain>``, marked
``Auto-Submitted: auto-replied`` (RFC 3834), and the caller spools it with the null envelope
sender, so a report about a report is never made (the runner makes none for sender ``<>``).

Pure: no file, socket, clock or environment access. Times, host and domain names and the
original headers are passed in; the result is the message bytes, CRLF line ends, ready to
spool.

Trust: called by the runner (root, the ``mailshim`` user, or a user on their own spool). The
recipients, the replies and the original headers come from users and from the listener: they
are reduced to printable one-line text before going into header fields, and the original
headers are copied as data inside their own MIME part under a boundary they do not contain.
The replies arrive as ``Reply`` fields (code, enhanced status, text): nothing is parsed back
out of text. Raises ``ValueError`` only for an unknown report kind or no recipient (a
programming error, exit 70 through the caller).
"""

from __future__ import annotations

from mailshim.constants import REPORT_DELAYED, REPORT_FAILED, STAGE_SIZE
from mailshim.errors import printable
from mailshim.message import fold_field, format_date
from mailshim.reply import Reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

    from mailshim.spoolfmt import Envelope

__all__ = ["DELAYED", "FAILED", "build_report", "format_date", "status_of"]

FAILED = REPORT_FAILED
DELAYED = REPORT_DELAYED
MAX_ORIGINAL_HEADERS = 64 * 1024


def _printable(text: str, limit: int = 900) -> str:
    """One line of printable characters (no controls); other non-ASCII kept, cut at ``limit``.

    >>> _printable("a\\r\\nb\\x00c\\udcff")
    'a b?c?'
    """
    return printable(" ".join(text.split()), limit)


def _octets(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` octets of UTF-8, at a character boundary.

    >>> _octets("caf\u00e9", 4)
    'caf'
    """
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def _wrap(text: str, width: int = 76) -> list[str]:
    """Lines of at most ``width`` characters (so at most 4 * width octets), broken at spaces
    where possible.

    >>> _wrap("aaa bbb ccc", 7)
    ['aaa bbb', 'ccc']
    >>> _wrap("x" * 10, 4)
    ['xxxx', 'xxxx', 'xx']
    """
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        while len(word) > width:
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:width])
            word = word[width:]
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line or not lines:
        lines.append(line)
    return lines


def _ascii(text: str, limit: int = 900) -> str:
    return "".join(ch if ord(ch) < 128 else "?" for ch in _printable(text, limit))


def status_of(reply: Reply, expired: bool = False) -> str:
    """The Status field for a recipient whose last reply was ``reply``.

    >>> status_of(Reply(550, "5.1.1 No such user"))
    '5.1.1'
    >>> status_of(Reply(554, "transaction failed"))
    '5.0.0'
    >>> status_of(Reply(552, "too much mail"))
    '5.3.4'
    >>> status_of(Reply(0, "connect to relay[127.0.0.1]:25: Connection refused"))
    '4.4.1'
    >>> status_of(Reply(451, "4.3.0 try later"), expired=True)
    '4.3.0'
    >>> status_of(Reply(0, "connection refused"), expired=True)
    '4.4.7'
    """
    if reply.code:
        return reply.enhanced or _derived(reply)
    return "4.4.7" if expired else "4.4.1"


def _derived(reply: Reply) -> str:
    """RFC 3463 status for a reply that carries none, from its code and the command it
    answered (RFC 5321 4.2.2 reply meanings; RFC 1870 for SIZE; RFC 4954 for AUTH).

    >>> _derived(Reply(550, "Message too big!", stage="size"))
    '5.3.4'
    >>> _derived(Reply(553, "sender not allowed", stage="mail")), _derived(Reply(553, "no"))
    ('5.1.7', '5.1.3')
    """
    klass = reply.code // 100
    if reply.stage == STAGE_SIZE or reply.code == 552:
        return f"{klass}.3.4"  # message too big for system / exceeded storage allocation
    if reply.code == 553:
        return "5.1.7" if reply.at_mail else "5.1.3"  # bad sender / recipient mailbox syntax
    if reply.code == 530:
        return "5.7.0"  # authentication required
    if reply.code == 535:
        return "5.7.8"  # authentication credentials invalid
    return f"{klass}.0.0"


def _diagnostic(reply: Reply) -> str:
    if reply.code:
        return f"smtp; {reply.code} {_ascii(reply.detail)}".rstrip()
    return f"X-mailshim; {_ascii(reply.text)}"


def _address_type(addr: str) -> str:
    return f"rfc822; {addr}" if addr.isascii() else f"utf-8; {addr}"


def _boundary(token: str, parts: Collection[bytes]) -> str:
    clean = "".join(ch for ch in token if ch.isascii() and (ch.isalnum() or ch in "._-"))
    n = 0
    while True:
        candidate = f"=_mailshim_{clean}_{n}"
        marker = b"--" + candidate.encode()
        if not any(marker in part for part in parts):
            return candidate
        n += 1


def _original_headers(data: bytes) -> bytes:
    """The header section, cut at a line end within the size cap, ending with CRLF."""
    if len(data) > MAX_ORIGINAL_HEADERS:
        cut = data.rfind(b"\r\n", 0, MAX_ORIGINAL_HEADERS)
        data = data[: cut + 2] if cut >= 0 else b""
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _human_text(
    kind: str,
    recipients: Mapping[str, Reply],
    expired: Collection[str],
    reporting_mta: str,
    retry_until: str | None,
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if kind == FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "The mail system",
        ]
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet. The mail system will keep",
            f"trying until {retry_until or 'it expires'}.",
            "",
            "The mail system",
        ]
    lines.append("")
    for rcpt, reply in recipients.items():
        why = _printable(str(reply))
        if rcpt in expired:
            why = f"message expired in the queue; last error: {why}"
        # RFC 5322 caps a line at 998 octets: the address alone, the reason wrapped below it.
        lines.append(f"<{_octets(_printable(rcpt), 900)}>:")
        lines += ["    " + part for part in _wrap(why)]
    return "\r\n".join(lines) + "\r\n"


def build_report(
    *,
    kind: str,
    envelope: Envelope,
    recipients: Mapping[str, Reply],
    original_headers: bytes,
    reporting_mta: str,
    domain: str,
    now: float,
    utc_offset: int,
    message_id: str,
    expired: Collection[str] = (),
    retry_until: float | None = None,
    last_attempt: float | None = None,
) -> bytes:
    """The DSN message for ``envelope`` and ``recipients`` (recipient → last reply or reason).

    ``kind`` is ``FAILED`` (Action: failed; the entry goes to dead/) or ``DELAYED`` (Action:
    delayed, with Will-Retry-Until). ``message_id`` is a unique token for the report (its
    queue id): it names the report's Message-ID and its MIME boundary.
    """
    if kind not in (FAILED, DELAYED):
        raise ValueError(f"unknown report kind {kind!r}")
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    mta = _ascii(reporting_mta, 255) or "localhost"
    dom = _ascii(domain, 255) or mta
    until = format_date(retry_until, utc_offset) if retry_until is not None else None
    human = _human_text(kind, recipients, expired, mta, until).encode("utf-8")

    status = [
        f"Reporting-MTA: dns; {mta}\r\n",
        f"X-Mailshim-Queue-ID: {_ascii(envelope.queue_id, 40)}\r\n",
        f"Arrival-Date: {format_date(envelope.arrival, utc_offset)}\r\n",
    ]
    for rcpt, reply in recipients.items():
        status.append("\r\n")
        status.append(f"Final-Recipient: {_address_type(_octets(_printable(rcpt), 900))}\r\n")
        status.append(f"Action: {kind}\r\n")
        status.append(f"Status: {status_of(reply, expired=rcpt in expired)}\r\n")
        status.append(fold_field("Diagnostic-Code", _diagnostic(reply)) + "\r\n")
        if last_attempt is not None:
            status.append(f"Last-Attempt-Date: {format_date(last_attempt, utc_offset)}\r\n")
        if kind == DELAYED and until is not None:
            status.append(f"Will-Retry-Until: {until}\r\n")
    report = "".join(status).encode("utf-8")
    original = _original_headers(original_headers)

    boundary = _boundary(message_id, (human, report, original))
    eightbit = not (human.isascii() and report.isascii() and original.isascii())
    cte = "8bit" if eightbit else "7bit"
    subject = (
        "Undelivered Mail Returned to Sender"
        if kind == FAILED
        else "Delayed Mail (still being retried)"
    )
    sender = _octets(_printable(envelope.sender), 900)
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{dom}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {format_date(now, utc_offset)}\r\n"
        f"Message-ID: <{_ascii(message_id, 200)}.report@{dom}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n"
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
    ).encode()
    charset = "us-ascii" if human.isascii() else "utf-8"
    mark = f"--{boundary}\r\n".encode()
    parts = [
        head,
        mark,
        b"Content-Description: Notification\r\n",
        f"Content-Type: text/plain; charset={charset}\r\n".encode(),
        f"Content-Transfer-Encoding: {'7bit' if human.isascii() else '8bit'}\r\n\r\n".encode(),
        human,
        b"\r\n",
        mark,
        b"Content-Description: Delivery report\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n",
        report,
        b"\r\n",
        mark,
        b"Content-Description: Undelivered Message Headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n",
        f"Content-Transfer-Encoding: {'7bit' if original.isascii() else '8bit'}\r\n\r\n".encode(),
        original,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
