"""One SMTP/LMTP reply, or one failure to get a reply, as data: code, enhanced status, text, kind.

A ``Reply`` is what the listener answered (``code`` 200-599, the RFC 3463 ``enhanced`` status
it gave, its ``text``) or, with ``code`` 0, why no answer came: ``kind`` names the failure
(``refused``, ``timeout``, ``tls-verify``, ``auth-failed``, ``unanswered``...) so that the
runner, ``check`` and the bounce switch on a value instead of reading English. A permanent
refusal at MAIL FROM carries its ``stage`` (``mail``, or ``size`` when the declared size was
over the listener's limit): it concerns the message, not a recipient (issue 16). It is split into
fields once, where it arrives, and stored as fields in the spool's state files (``as_fields`` /
``from_fields``); ``from_legacy`` reads the one-line form older state files hold.

Trust: pure; no I/O, and it imports only ``constants`` and ``errors`` (``printable``). Texts
come from the listener, which is hostile-or-broken: callers clean them to one printable line
(``clean_text``) before they make a ``Reply``, and ``from_fields`` checks every stored
field's type and range. Raises
``ValueError`` only from ``from_fields`` (the state reader turns it into ``DataError``: the
entry goes to corrupt/).
"""

from __future__ import annotations

from mailshim.constants import REPLY_FIELDS, REPLY_STAGES, STAGE_SIZE
from mailshim.errors import printable

__all__ = [
    "AUTH_CLEARTEXT",
    "AUTH_FAILED",
    "AUTH_SECRET",
    "AUTH_UNSUPPORTED",
    "CLOSED",
    "CONFIG",
    "DENIED",
    "DNS",
    "HELO_REFUSED",
    "KINDS",
    "LOCAL",
    "NETWORK",
    "NOT_TRIED",
    "NO_SOCKET",
    "PROTOCOL",
    "REFUSED",
    "TIMEOUT",
    "TLS_FAILED",
    "TLS_NAME",
    "TLS_REFUSED",
    "TLS_REQUIRED",
    "TLS_SETTINGS",
    "TLS_VERIFY",
    "UNANSWERED",
    "UNREACHABLE",
    "Reply",
    "clean_text",
    "enhanced_code",
]

# Why no reply came (``code`` 0). Connecting:
REFUSED = "refused"  # the address refused the connection
TIMEOUT = "timeout"  # connecting or a command timed out
DNS = "dns"  # the host name did not resolve
NO_SOCKET = "no-socket"  # the unix socket does not exist
DENIED = "denied"  # permission denied (a socket's mode)
UNREACHABLE = "unreachable"  # no route to the host or its network
NETWORK = "network"  # any other socket error
CLOSED = "closed"  # the listener closed or reset the connection
PROTOCOL = "protocol"  # garbage, an invalid or an unexpected reply
HELO_REFUSED = "helo-refused"  # EHLO/LHLO (and HELO) refused
# TLS:
TLS_REQUIRED = "tls-required"  # tls = "starttls" but STARTTLS is not offered
TLS_REFUSED = "tls-refused"  # the listener answered STARTTLS with an error
TLS_FAILED = "tls-failed"  # the handshake failed
TLS_VERIFY = "tls-verify"  # the certificate did not verify
TLS_NAME = "tls-name"  # the certificate does not name the host
TLS_SETTINGS = "tls-settings"  # ca_file unreadable or invalid
# AUTH:
AUTH_CLEARTEXT = "auth-cleartext"  # we refuse to send the password unencrypted
AUTH_UNSUPPORTED = "auth-unsupported"  # no mechanism we speak is offered
AUTH_FAILED = "auth-failed"  # the listener refused the credentials
AUTH_SECRET = "auth-secret"  # the password file cannot be read
# The message:
UNANSWERED = "unanswered"  # no reply after the final dot: the listener may have taken it
LOCAL = "local"  # reading the spooled message failed on our side
CONFIG = "config"  # a setting no connection can satisfy (implicit TLS on a socket...)
NOT_TRIED = "not-tried"  # no attempt reached the listener for this recipient

KINDS = frozenset(
    {
        REFUSED, TIMEOUT, DNS, NO_SOCKET, DENIED, UNREACHABLE, NETWORK, CLOSED, PROTOCOL,
        HELO_REFUSED,
        TLS_REQUIRED, TLS_REFUSED, TLS_FAILED, TLS_VERIFY, TLS_NAME, TLS_SETTINGS,
        AUTH_CLEARTEXT, AUTH_UNSUPPORTED, AUTH_FAILED, AUTH_SECRET,
        UNANSWERED, LOCAL, CONFIG, NOT_TRIED,
    }
)  # fmt: skip
MAX_TEXT = 1000
MAX_FIELD = 8192  # a stored text longer than this did not come from us


def clean_text(text: str) -> str:
    """One printable line from a listener's text: no controls, no surrogates, bounded.

    >>> clean_text("5.1.1 no\\nsuch\\x1b[31m user")
    '5.1.1 no such?[31m user'
    """
    if not text.isprintable():  # a line break of any kind among them: one line first
        text = " ".join(text.splitlines())
    return printable(text, MAX_TEXT)


def enhanced_code(word: str, code: int) -> bool:
    """Whether ``word`` is an RFC 3463 status code of the same class as reply ``code``.

    >>> enhanced_code("5.1.1", 550), enhanced_code("4.7.1", 550), enhanced_code("5.1", 550)
    (True, False, False)
    """
    parts = word.split(".")
    return (
        len(parts) == 3
        and 200 <= code <= 599
        and parts[0] == str(code // 100)
        and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts[1:])
    )


class Reply:
    """One reply for one recipient: the listener's, or code 0 and a ``kind`` when none came.

    ``Reply(550, "5.1.1 No such user")`` splits the enhanced status off the text when its
    class matches the code; ``str()`` joins them again.

    >>> r = Reply(550, "5.1.1 No such user")
    >>> r.enhanced, r.text, str(r), r.permanent
    ('5.1.1', 'No such user', '550 5.1.1 No such user', True)
    >>> str(Reply(0, "connect to relay: Connection refused", kind=REFUSED))
    'connect to relay: Connection refused'
    """

    __slots__ = ("code", "enhanced", "kind", "stage", "text")

    def __init__(
        self,
        code: int,
        text: str,
        *,
        enhanced: str | None = None,
        kind: str = "",
        stage: str = "",
    ) -> None:
        self.code = code
        self.kind = kind if code == 0 else ""
        self.stage = stage if code else ""
        if enhanced is None:
            word, _, rest = text.partition(" ")
            if enhanced_code(word, code):
                enhanced, text = word, rest.lstrip()
            else:
                enhanced = ""
        self.enhanced = enhanced
        self.text = text

    @property
    def temporary(self) -> bool:
        return self.code == 0 or 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def at_mail(self) -> bool:
        """The listener refused the message at MAIL FROM (not tied to a recipient)."""
        return bool(self.stage)

    def at(self, stage: str) -> Reply:
        """This reply, noted as the answer to ``stage`` (``constants.STAGE_*``)."""
        return Reply(self.code, self.text, enhanced=self.enhanced, kind=self.kind, stage=stage)

    @property
    def listener_down(self) -> bool:
        """No reply because the listener could not be reached or spoken to (not our side)."""
        return self.code == 0 and self.kind not in (LOCAL, NOT_TRIED)

    @property
    def detail(self) -> str:
        """The enhanced status and the text, without the code (``5.1.1 No such user``)."""
        return f"{self.enhanced} {self.text}".strip() if self.enhanced else self.text

    def __str__(self) -> str:
        if self.code == 0:
            return self.text
        said = f"{self.code} {self.detail}".rstrip()
        if self.stage == STAGE_SIZE:
            return f"{said} (in reply to MAIL FROM; SIZE over the listener's limit)"
        return f"{said} (in reply to MAIL FROM)" if self.stage else said

    def __repr__(self) -> str:
        extra = f", kind={self.kind!r}" if self.kind else ""
        extra += f", stage={self.stage!r}" if self.stage else ""
        return f"Reply({self.code!r}, {self.detail!r}{extra})"

    def _key(self) -> tuple[int, str, str, str, str]:
        return (self.code, self.enhanced, self.text, self.kind, self.stage)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # -- stored form ----------------------------------------------------------------------

    def as_fields(self) -> dict[str, object]:
        """The reply as the state file stores it (see docs/spool-format.md)."""
        out: dict[str, object] = {"code": self.code, "text": self.text}
        if self.enhanced:
            out["enhanced"] = self.enhanced
        if self.kind:
            out["kind"] = self.kind
        if self.stage:
            out["stage"] = self.stage
        return out

    @classmethod
    def from_fields(cls, data: object) -> Reply:
        """The reply ``as_fields`` stored; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict) or not set(data) <= set(REPLY_FIELDS):
            raise ValueError("a reply is a table of code, text, enhanced and kind")
        code, text = data.get("code"), data.get("text")
        enhanced, kind = data.get("enhanced", ""), data.get("kind", "")
        stage = data.get("stage", "")
        if (
            not isinstance(code, int)
            or isinstance(code, bool)
            or not (code == 0 or 200 <= code <= 599)
        ):
            raise ValueError("a reply's code is 0 or 200-599")
        if not isinstance(text, str) or len(text) > MAX_FIELD:
            raise ValueError("a reply's text is not text")
        if not isinstance(enhanced, str) or (enhanced and not enhanced_code(enhanced, code)):
            raise ValueError("a reply's enhanced status does not match its code")
        if not isinstance(kind, str) or (kind and (code != 0 or kind not in KINDS)):
            raise ValueError("a reply's kind is not one mailshim writes")
        if not isinstance(stage, str) or (stage and (code == 0 or stage not in REPLY_STAGES)):
            raise ValueError("a reply's stage is not one mailshim writes")
        return cls(code, text, enhanced=enhanced, kind=kind, stage=stage)

    @classmethod
    def from_legacy(cls, line: str) -> Reply:
        """A reply from a state file written before replies were stored as fields.

        Those held ``str(reply)``: ``"550 5.1.1 No such user"``, or the failure text alone
        (its kind is unknown, so it stays empty).

        >>> Reply.from_legacy("451 4.3.0 try later") == Reply(451, "4.3.0 try later")
        True
        >>> Reply.from_legacy("connect to relay: Connection refused").code
        0
        """
        head, sep = line[:3], line[3:4]
        if head.isascii() and head.isdigit() and sep in ("", " ", "-") and 200 <= int(head) <= 599:
            return cls(int(head), line[4:].strip())
        return cls(0, line)
