"""The verdict of ``mailshim check`` as data: findings, what each relay said, and its printout.

A ``Report`` holds ``Finding`` objects (ok / warning / error, a topic, one line of text, what
to change, the exit code an error means) in the order found, and one ``RelayProbe`` per relay.
``as_dict`` gives the ``--json`` form; ``format_report`` the plain-words one.

Trust: pure data built by ``check`` and ``probe``; every text is made one printable line when a
finding is made, so a listener's reply cannot reach the terminal raw. Raises nothing; the exit
code is the first error's (``Report.exit_code``: 0, 67, 69, 77 or 78).
"""

from __future__ import annotations

from mailshim.errors import EX_OK, EX_UNAVAILABLE, one_line
from mailshim.paint import painter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import RelayConfig

__all__ = ["ERROR", "LEVELS", "OK", "WARNING", "Finding", "RelayProbe", "Report", "format_report"]

OK = "ok"
WARNING = "warning"
ERROR = "error"
LEVELS = (OK, WARNING, ERROR)
_COLORS = {OK: "32", WARNING: "33", ERROR: "31;1"}


class Finding:
    """One line of the verdict."""

    __slots__ = ("code", "fix", "level", "relay", "text", "topic")

    def __init__(
        self,
        level: str,
        topic: str,
        text: str,
        fix: str = "",
        code: int = EX_OK,
        relay: str | None = None,
    ) -> None:
        self.level = level
        self.topic = topic
        self.text = one_line(text)
        self.fix = one_line(fix)
        self.code = code if level == ERROR else EX_OK
        self.relay = relay

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"level": self.level, "topic": self.topic, "text": self.text}
        if self.fix:
            out["fix"] = self.fix
        if self.code:
            out["exit"] = self.code
        if self.relay is not None:
            out["relay"] = self.relay
        return out

    def __repr__(self) -> str:
        return f"Finding({self.level!r}, {self.topic!r}, {self.text!r})"


class RelayProbe:
    """What one relay said, for ``--json`` and for the verdict."""

    __slots__ = (
        "auth",
        "certificate",
        "connected",
        "extensions",
        "greeting",
        "label",
        "name",
        "outcome",
        "recipients",
        "sealed",
        "sender",
        "tls",
        "transcript",
    )

    def __init__(self, relay: RelayConfig) -> None:
        self.name = relay.name
        self.label = relay.describe()
        self.connected = False
        self.greeting = ""
        self.extensions: list[str] = []
        self.tls: dict[str, object] | None = None
        self.certificate: dict[str, object] | None = None
        self.auth: str | None = None
        self.sender: dict[str, object] | None = None
        self.recipients: list[dict[str, object]] = []
        # ok: takes mail; permanent: refuses it (a bounce); temporary: the next relay is tried
        self.outcome = "temporary"
        # True: refuses to relay without AUTH; False: relays for anyone on this host;
        # None: could not tell (down, or deferred before RCPT)
        self.sealed: bool | None = None
        self.transcript: list[str] = []

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "target": self.label,
            "connected": self.connected,
            "greeting": self.greeting,
            "extensions": self.extensions,
            "tls": self.tls,
            "certificate": self.certificate,
            "authenticated_as": self.auth,
            "sender": self.sender,
            "recipients": self.recipients,
            "outcome": self.outcome,
            "sealed": self.sealed,
            "transcript": self.transcript,
        }


class Report:
    """Every finding, in the order found, and the relays' answers."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.relays: list[RelayProbe] = []
        self.config_path: str | None = None

    def add(
        self,
        level: str,
        topic: str,
        text: str,
        fix: str = "",
        code: int = EX_OK,
        relay: str | None = None,
    ) -> Finding:
        finding = Finding(level, topic, text, fix, code, relay)
        self.findings.append(finding)
        return finding

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)

    @property
    def exit_code(self) -> int:
        """The first error's sysexits code; 0 when mail would flow (warnings allowed)."""
        for finding in self.findings:
            if finding.level == ERROR:
                return finding.code or EX_UNAVAILABLE
        return EX_OK

    @property
    def mail_flows(self) -> bool:
        return self.exit_code == EX_OK

    def as_dict(self) -> dict[str, object]:
        return {
            "mail_flows": self.mail_flows,
            "exit": self.exit_code,
            "config": self.config_path,
            "findings": [f.as_dict() for f in self.findings],
            "relays": [r.as_dict() for r in self.relays],
        }


def format_report(report: Report, color: bool = False) -> str:
    """The plain-words report: one line per finding, its fix below it, the verdict last."""
    paint = painter(color, _COLORS)
    lines = []
    width = max((len(f.topic) for f in report.findings), default=6)
    for finding in report.findings:
        level = paint(finding.level, f"{finding.level:<7}")
        lines.append(f"{level}  {finding.topic:<{width}}  {finding.text}")
        if finding.fix:
            lines.append(f"{'':<7}  {'':<{width}}  fix: {finding.fix}")
    errors, warnings = report.count(ERROR), report.count(WARNING)
    tail = []
    if errors:
        tail.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        tail.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    if report.mail_flows:
        verdict = paint(OK, "mail would flow")
        if tail:
            verdict += f" ({', '.join(tail)})"
    else:
        verdict = paint(ERROR, "mail would NOT flow") + f": {', '.join(tail)}"
        verdict += f" (exit {report.exit_code})"
    lines.append("")
    lines.append(verdict)
    return "\n".join(lines) + "\n"
