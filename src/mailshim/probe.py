"""Probe each listener the way delivery would reach it, and say in plain words what it answered.

``probe_relays`` opens each relay with ``smtpconnect.Link.open`` (TCP or socket, TLS, EHLO,
AUTH), then tries ``MAIL FROM`` with the default sender and ``RCPT TO`` for root's alias and
any extra recipients, then ``RSET`` and ``QUIT``: no message is sent. A relay with AUTH is
probed a second time without it (MAIL and one RCPT) to say whether it is sealed: whether a
local process without the secret could relay through it. Each answer becomes
``Finding`` objects in the ``Report``; the first relay that takes or refuses mail decides, as
failover does. Probes are kept few on purpose: one connection per relay, one MAIL, one RCPT per
distinct recipient and at most ``MAX_RCPT_FAILURES`` refused ones, because Stalwart bans an
address (loopback included) after repeated recipient failures.

Trust: run by administrators and users with their own privileges; sends no message and writes
no file. The listener is hostile-or-broken: its replies reach findings only as cleaned
``Reply`` values, the certificate goes through ``x509``'s bounds-checked reader, and every wait
has the relay's timeout. Raises nothing: failures are findings (exit codes 67, 69, 77, 78).
"""

from __future__ import annotations

import os

from mailshim import reply as kinds
from mailshim.checkreport import ERROR, OK, WARNING, Finding, RelayProbe, Report
from mailshim.errors import EX_CONFIG, EX_NOPERM, EX_OK, EX_UNAVAILABLE
from mailshim.hostnames import relay_is_local, valid_helo
from mailshim.sealed import relay_sealed_out, secret_files
from mailshim.x509 import parse_certificate

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from mailshim.config import Config, RelayConfig
    from mailshim.reply import Reply
    from mailshim.smtpconnect import Link, RelayDown

__all__ = ["classify_failure", "classify_mail", "classify_rcpt", "probe_relays"]

MAX_RCPT_FAILURES = 3
CERT_EXPIRY_WARNING = 14 * 86400


def _stalwart_doc() -> str:
    """Where the Stalwart set-up is to be read on this host: the Debian package installs
    docs/*.md compressed under /usr/share/doc/mailshim, the rpm uncompressed."""
    for installed in (
        "/usr/share/doc/mailshim/stalwart.md.gz",
        "/usr/share/doc/mailshim/stalwart.md",
        "/usr/share/doc/mailshim/docs/stalwart.md",
    ):
        if os.path.exists(installed):
            return installed
    return "docs/stalwart.md"


STALWART_DOC = _stalwart_doc()


def _local(relay: RelayConfig) -> bool:
    return relay_is_local(relay.host, relay.socket)


def probe_relays(cfg: Config, sender: str, rcpts: list[tuple[str, str]], report: Report) -> None:
    import asyncio

    probes: list[tuple[RelayProbe, list[Finding]]] = []

    async def all_relays() -> None:
        for relay in cfg.relays:
            probe = RelayProbe(relay)
            found: list[Finding] = []
            await _probe(cfg, relay, probe, found, sender, rcpts)
            probes.append((probe, found))

    asyncio.run(all_relays())
    _verdict(probes, report)


def _verdict(probes: list[tuple[RelayProbe, list[Finding]]], report: Report) -> None:
    """Failover semantics: the first relay that takes or refuses mail decides; a relay that
    is down (or defers) before it only costs time, so its errors become warnings."""
    deciding = next((i for i, (p, _) in enumerate(probes) if p.outcome != "temporary"), None)
    for index, (probe, found) in enumerate(probes):
        report.relays.append(probe)
        downgrade = (
            deciding is not None and index < deciding and probes[deciding][0].outcome == "ok"
        )
        for finding in found:
            if len(probes) > 1:
                finding.text = f"[{probe.name}] {finding.text}"
            if downgrade and finding.level == ERROR:
                finding.level = WARNING
                finding.code = EX_OK
                finding.text = f"{finding.text} (mail goes to the next relay)"
            report.findings.append(finding)
    if len(probes) > 1 and deciding is not None:
        probe = probes[deciding][0]
        if probe.outcome == "ok":
            report.add(OK, "relay", f"mail goes to {probe.label}")


async def _probe(
    cfg: Config,
    relay: RelayConfig,
    probe: RelayProbe,
    found: list[Finding],
    sender: str,
    rcpts: list[tuple[str, str]],
) -> None:
    from mailshim import smtpconnect

    name = relay.name

    def add(level: str, topic: str, text: str, fix: str = "", code: int = EX_OK) -> None:
        found.append(Finding(level, topic, text, fix, code, name))

    helo = cfg.helo_name
    if not valid_helo(relay.helo or helo):
        add(
            ERROR,
            "helo",
            f"invalid HELO name {relay.helo or helo!r}",
            "set helo to this host's name (one word of printable ASCII)",
            EX_CONFIG,
        )
        return
    if relay_sealed_out(relay):
        # Sealed, seen from a user: only the runner can authenticate, so only the
        # unauthenticated side is probed here (root's check probes both).
        add(
            OK,
            "auth",
            "this user cannot read the relay's secret: its mail is delivered by the runner"
            " (run mailshim check as root to probe with the secret)",
        )
        await _probe_sealed(relay, helo, probe, sender, rcpts, add, alone=True)
        return
    probe.transcript.append(f"*** probing {probe.label}")
    try:
        session = await smtpconnect.Link.open(relay, helo=helo, say=probe.transcript.append)
    except smtpconnect.RelayDown as down:
        text, fix, code = classify_failure(relay, down)
        add(ERROR, "listener", text, fix, code)
        return
    try:
        probe.connected = True
        probe.label = session.label
        _describe_session(cfg, relay, session, probe, add)
        if relay.username:
            probe.auth = relay.username
            add(OK, "auth", f"authenticated as {relay.username}")
        await _transaction(session, sender, rcpts, probe, add)
    finally:
        await session.quit()
    if secret_files(relay):
        await _probe_sealed(relay, helo, probe, sender, rcpts, add, alone=False)
    elif probe.outcome == "ok":
        probe.sealed = False
        add(WARNING, "sealed", _OPEN_TEXT, _SEAL_FIX)


# --- sealed or open: does the listener relay for a process that holds no secret? ----------

_OPEN_TEXT = (
    "the listener relays without authentication from this host: any local process can send"
    " mail as anyone through this listener, bypassing mailshim's sender checks and limits"
)
_SEAL_FIX = (
    "seal it: a dedicated account, AUTH required on this listener, and username and"
    f" password_file (owner mailshim, mode 0600) in [relay] (see {STALWART_DOC}, Sealed)"
)


_CERT_REFUSALS = (kinds.TLS_FAILED, kinds.TLS_REFUSED, kinds.CLOSED, kinds.NETWORK, kinds.PROTOCOL)


def _without_secret(relay: RelayConfig) -> RelayConfig:
    from mailshim.config import RelayConfig

    bare = RelayConfig(relay.name)
    for attr in RelayConfig.__slots__:
        setattr(bare, attr, getattr(relay, attr))
    bare.username = None
    bare.password_file = None
    bare.client_cert = None
    bare.client_key = None
    return bare


async def _probe_sealed(
    relay: RelayConfig,
    helo: str,
    probe: RelayProbe,
    sender: str,
    rcpts: list[tuple[str, str]],
    add: Callable[..., None],
    *,
    alone: bool,
) -> None:
    """Try MAIL and one RCPT without AUTH (then RSET: nothing is sent) and say whether the
    listener refused. One refused RCPT at most, so Stalwart's auto-ban is not approached."""
    from mailshim import smtpconnect

    say = probe.transcript.append
    say(f"*** probing {probe.label} without authentication")
    bare = _without_secret(relay)
    try:
        session = await smtpconnect.Link.open(bare, helo=helo, say=say)
    except smtpconnect.RelayDown as down:
        text, fix, code = classify_failure(bare, down)
        # Without its certificate the client fails in the handshake, or (TLS 1.3, where the
        # server checks it after the client's side is done) on the first read.
        if relay.client_cert and down.reply.kind in _CERT_REFUSALS:
            why = f"without a client certificate the listener refuses the TLS handshake ({text}):"
            _sealed(probe, add, alone, why + " only holders of the key")
            return
        if alone:
            add(ERROR, "listener", text, fix, code)
        else:
            add(WARNING, "sealed", f"could not tell whether it is sealed: {text}")
        return
    try:
        if alone:
            probe.connected = True
            probe.label = session.label
        reply = await _command(session, b"MAIL", b"FROM:<" + _wire(sender) + b">")
        if reply.code == 250 and rcpts:
            reply = await _command(session, b"RCPT", b"TO:<" + _wire(rcpts[0][0]) + b">")
        if session.alive:
            await _command(session, b"RSET")
    finally:
        await session.quit()
    if reply.code in (250, 251):
        probe.sealed = False
        text = _OPEN_TEXT
        if not alone:
            text = "AUTH is set up, but " + text
        add(WARNING, "sealed", text, _SEAL_FIX)
    elif reply.code in (0, 421) or (reply.temporary and not _is_auth_reply(reply)):
        add(WARNING, "sealed", f"could not tell whether it is sealed: {reply}")
    else:
        _sealed(
            probe,
            add,
            alone,
            f"without authentication the listener refuses ({reply}): only holders of the secret",
        )


def _sealed(probe: RelayProbe, add: Callable[..., None], alone: bool, why: str) -> None:
    probe.sealed = True
    if alone:
        probe.outcome = "ok"  # the user's mail flows, through the runner
    add(OK, "sealed", f"{why} can relay through it")


def _describe_session(
    cfg: Config,
    relay: RelayConfig,
    session: Link,
    probe: RelayProbe,
    add: Callable[..., None],
) -> None:
    greeting = next((line[4:] for line in probe.transcript if line.startswith("<<< 2")), "")
    probe.greeting = greeting
    add(OK, "listener", f"{session.label} answers: {greeting}".rstrip(": "))
    offered = [f"{k.upper()} {v}".strip() for k, v in session.extensions.items()]
    probe.extensions = offered
    if offered:
        add(OK, "ehlo", "offers " + ", ".join(offered))
    else:
        add(
            WARNING,
            "ehlo",
            "the listener answered HELO only (no ESMTP extensions)",
            "check that it is an SMTP server",
        )
    if session.encrypted:
        _describe_tls(relay, session, probe, add)
    elif "starttls" in session.extensions:
        if _local(relay):
            add(
                OK,
                "tls",
                'STARTTLS offered but tls = "none": not used, which is fine on loopback'
                " (Stalwart: useTls false on this listener stops offering it)",
            )
        else:
            add(
                WARNING,
                "tls",
                f'STARTTLS offered but tls = "none": mail and any password go to'
                f" {relay.host} unencrypted",
                'set tls = "starttls" in [relay]',
            )
    elif not _local(relay):
        add(
            WARNING,
            "tls",
            f"no TLS: mail goes to {relay.host} unencrypted",
            'set tls = "starttls" (or "tls") if the listener supports it',
        )
    size = session.extensions.get("size", "")
    # Without [submission] max_size the limit follows this very SIZE (Spool.listener_size).
    explicit = "submission.max_size" in cfg.sources
    if explicit and size.isdigit() and 0 < int(size) < cfg.max_size:
        add(
            WARNING,
            "size",
            f"the listener takes at most {size} bytes, [submission] max_size allows"
            f" {cfg.max_size}: larger messages will bounce",
            f"set [submission] max_size = {size}",
        )


def _describe_tls(
    relay: RelayConfig, session: Link, probe: RelayProbe, add: Callable[..., None]
) -> None:
    ssl_object = session.ssl_object
    info: dict[str, object] = {"mode": relay.tls, "verified": relay.verify}
    cert: dict[str, object] | None = None
    if ssl_object is not None:
        info["version"] = ssl_object.version()
        cipher = ssl_object.cipher()
        info["cipher"] = cipher[0] if cipher else None
        der = ssl_object.getpeercert(binary_form=True)
        cert = parse_certificate(der) if der else None
    probe.tls = info
    probe.certificate = cert
    how = f"{info.get('version') or 'TLS'}"
    subject = "certificate could not be read"
    if cert is not None:
        subject = f"certificate {cert.get('subject') or '(no subject)'}"
        names = cert.get("names")
        if isinstance(names, list) and names:
            subject += f" for {', '.join(str(n) for n in names)}"
        if cert.get("issuer"):
            subject += f", issued by {cert['issuer']}"
    if relay.verify:
        against = f"ca_file {relay.ca_file}" if relay.ca_file else "the system's CAs"
        add(OK, "tls", f"{how}, {subject}, verified against {against}")
    else:
        add(
            OK if _local(relay) else WARNING,
            "tls",
            f"{how}, {subject}, NOT verified (verify = false)",
            "" if _local(relay) else "set ca_file and drop verify = false",
        )
    not_after = cert.get("not_after") if cert is not None else None
    if isinstance(not_after, int):
        import time

        left = not_after - time.time()
        if left < 0:
            add(
                WARNING, "tls", "the listener's certificate has expired", "renew it on the listener"
            )
        elif left < CERT_EXPIRY_WARNING:
            add(
                WARNING,
                "tls",
                f"the listener's certificate expires in {int(left // 86400)} days",
                "renew it on the listener",
            )


async def _command(session: Link, *args: bytes) -> Reply:
    # the transaction's own error handling: 421, timeouts, garbage become code-0 replies
    return await session.command(*args, ok=(250, 251))


def _wire(addr: str) -> bytes:
    return addr.encode("utf-8" if not addr.isascii() else "ascii")


async def _transaction(
    session: Link,
    sender: str,
    rcpts: list[tuple[str, str]],
    probe: RelayProbe,
    add: Callable[..., None],
) -> None:
    utf8 = not sender.isascii() or not all(a.isascii() for a, _ in rcpts)
    params = [b"SMTPUTF8"] if utf8 and "smtputf8" in session.extensions else []
    reply = await _command(session, b"MAIL", b"FROM:<" + _wire(sender) + b">", *params)
    probe.sender = {"address": sender, "reply": str(reply), "code": reply.code}
    if reply.code != 250:
        text, fix, code, outcome = classify_mail(reply, sender)
        add(ERROR, "mail", text, fix, code)
        probe.outcome = outcome
        return
    add(OK, "mail", f"sender <{sender}> accepted: {reply}")
    failures = 0
    outcome = "ok"
    for addr, why in rcpts:
        if failures >= MAX_RCPT_FAILURES:
            add(
                WARNING,
                "rcpt",
                f"<{addr}> not tried: {failures} recipients were already refused, and Stalwart"
                " bans an address after repeated failures",
            )
            continue
        reply = await _command(session, b"RCPT", b"TO:<" + _wire(addr) + b">")
        probe.recipients.append(
            {"address": addr, "for": why, "reply": str(reply), "code": reply.code}
        )
        if reply.code in (250, 251):
            note = f" (for {why})" if why != addr else ""
            add(OK, "rcpt", f"relaying allowed: <{addr}> accepted: {reply}{note}")
            continue
        failures += 1
        text, fix, code, kind = classify_rcpt(reply, addr, why)
        add(ERROR, "rcpt", text, fix, code)
        if kind == "permanent":
            outcome = "permanent"
        elif outcome == "ok":
            outcome = "temporary"
        if reply.code in (0, 421):
            break
    probe.outcome = outcome
    if session.alive:
        await _command(session, b"RSET")


# --- classification: a reply or failure in plain words -------------------------------------

_RELAY_FIX = (
    "let this listener relay without authentication (Stalwart: MtaStageRcpt.allowRelaying"
    f" true for listener == 'local', see {STALWART_DOC}), or set username and password_file"
)
_AUTH_FIX = (
    "let this listener take mail without AUTH (Stalwart: MtaStageAuth.require false for"
    f" listener == 'local', see {STALWART_DOC}), or set username and password_file in [relay]"
)


def _is_auth_reply(reply: Reply) -> bool:
    text = reply.text.lower()
    return (
        reply.code == 530
        or (reply.code == 503 and (reply.enhanced == "5.5.1" or "auth" in text))
        or reply.enhanced == "5.7.0"
        or "authentication required" in text
    )


def classify_mail(reply: Reply, sender: str) -> tuple[str, str, int, str]:
    """(text, fix, exit code, outcome) for a MAIL FROM that was not accepted."""
    if reply.code in (0, 421):
        return (
            f"the listener dropped the connection at MAIL FROM: {reply}",
            "check the listener's log",
            EX_UNAVAILABLE,
            "temporary",
        )
    if _is_auth_reply(reply):
        return f"authentication required: {reply}", _AUTH_FIX, EX_NOPERM, "temporary"
    if reply.temporary:
        return (
            f"sender <{sender}> deferred (temporary): {reply}",
            "try again later; the listener's log says why",
            EX_UNAVAILABLE,
            "temporary",
        )
    return (
        f"sender <{sender}> refused: {reply}",
        'set [addresses] sender = "an address the listener accepts"',
        EX_UNAVAILABLE,
        "permanent",
    )


def classify_rcpt(reply: Reply, addr: str, why: str) -> tuple[str, str, int, str]:
    """(text, fix, exit code, permanent|temporary) for a refused RCPT TO."""
    text, fix, code, kind = _classify_rcpt(reply, addr, why)
    if why != addr:
        text += f" (for {why})"
    return text, fix, code, kind


# A refused RCPT by its enhanced status; the words are the fallback for a listener that
# gives no enhanced status (or a generic one). Each class: (finding, fix, exit code, outcome);
# outcome None means "permanent if the reply is, else temporary".
_RCPT_STATUS = {"5.1.2": "relay", "4.4.5": "rate", "4.2.2": "grey", "5.1.3": "invalid"}
_RCPT_WORDS = (("relay", "relay"), ("rate", "rate"), ("grey", "grey"), ("gray", "grey"))
_RCPT_CLASSES: dict[str, tuple[str, str, int, str | None]] = {
    "relay": ("relaying denied for {who}: {reply}", _RELAY_FIX, EX_UNAVAILABLE, None),
    "rate": (
        "rate limited at {who}: {reply}",
        f"wait, or exempt this listener from the throttles (see {STALWART_DOC})",
        EX_UNAVAILABLE,
        "temporary",
    ),
    "grey": ("greylisted: {reply}", "nothing to do: mailshim retries", EX_UNAVAILABLE, "temporary"),
}


def _rcpt_class(reply: Reply) -> str | None:
    found = _RCPT_STATUS.get(reply.enhanced)
    if found is not None:
        return found
    text = reply.text.lower()
    return next((cls for word, cls in _RCPT_WORDS if word in text), None)


def _classify_rcpt(reply: Reply, addr: str, why: str) -> tuple[str, str, int, str]:
    who = f"<{addr}>"
    alias_fix = "fix [aliases] root" if why == "root" else "check the address"
    if reply.code in (0, 421):
        return (
            f"the listener dropped the connection at RCPT TO {who}: {reply}",
            "check the listener's log",
            EX_UNAVAILABLE,
            "temporary",
        )
    if _is_auth_reply(reply):
        return f"authentication required: {reply}", _AUTH_FIX, EX_NOPERM, "temporary"
    cls = _rcpt_class(reply)
    if cls in _RCPT_CLASSES:
        text, fix, code, outcome = _RCPT_CLASSES[cls]
        if outcome is None:
            outcome = "permanent" if reply.permanent else "temporary"
        return text.format(who=who, reply=reply), fix, code, outcome
    if reply.temporary:
        return (
            f"{who} deferred (temporary): {reply}",
            "try again later; the listener's log says why",
            EX_UNAVAILABLE,
            "temporary",
        )
    if cls == "invalid" or reply.code == 501:
        return f"{who} refused as invalid: {reply}", alias_fix, EX_CONFIG, "permanent"
    return f"{who} refused: {reply}", alias_fix, EX_UNAVAILABLE, "permanent"


# Why a relay could not be opened, by failure kind: (finding, fix, exit code). A key
# "kind/tls" refines it for one ``tls`` setting. Placeholders: {text} the failure,
# {server} the listener's reply (or the failure), {where} the relay, {socket}, {timeout},
# {username} and {password_file} from the configuration.
_FAILURES: dict[str, tuple[str, str, int]] = {
    kinds.TLS_VERIFY: (
        "TLS: {text}",
        "set ca_file to the CA that signed the listener's certificate",
        EX_CONFIG,
    ),
    kinds.TLS_NAME: (
        "TLS: {text}",
        "connect by a name the certificate holds (host = ...), or fix the certificate",
        EX_CONFIG,
    ),
    kinds.TLS_REQUIRED: (
        'tls = "starttls" but the listener does not offer STARTTLS: {text}',
        'set tls = "none" (fine on loopback) or enable TLS on the listener',
        EX_CONFIG,
    ),
    kinds.TLS_REFUSED: ("STARTTLS failed: {server}", "check the listener's TLS setup", EX_CONFIG),
    kinds.TLS_FAILED: ("STARTTLS failed: {server}", "check the listener's TLS setup", EX_CONFIG),
    f"{kinds.TLS_FAILED}/tls": (
        "TLS handshake failed: {text}",
        'is the port right for tls = "tls" (implicit TLS, usually 465)? 587 and'
        ' 25 want tls = "starttls"',
        EX_CONFIG,
    ),
    kinds.TLS_SETTINGS: ("TLS settings: {text}", "fix ca_file in [relay]", EX_CONFIG),
    kinds.AUTH_CLEARTEXT: ("{text}", 'set tls = "starttls" or "tls"', EX_CONFIG),
    kinds.AUTH_UNSUPPORTED: (
        "{text}",
        "drop username and password_file, or enable AUTH PLAIN or LOGIN on the listener",
        EX_CONFIG,
    ),
    kinds.AUTH_SECRET: ("{text}", "see the secret finding above", EX_NOPERM),
    kinds.AUTH_FAILED: (
        "authentication failed for {username}: {server}",
        "check the password in {password_file}",
        EX_NOPERM,
    ),
    kinds.HELO_REFUSED: ("{text}", "check the listener's log", EX_UNAVAILABLE),
    kinds.DNS: ("listener unknown: {text}", "fix [relay] host", EX_CONFIG),
    kinds.NO_SOCKET: (
        "listener down: no socket at {socket}",
        "start the listener or fix [relay] socket",
        EX_UNAVAILABLE,
    ),
    kinds.DENIED: (
        "listener not reachable: permission denied ({where})",
        "run as a user that may use the socket, or fix its permissions",
        EX_NOPERM,
    ),
    kinds.REFUSED: (
        "listener down: connection refused ({where})",
        "start the listener, or fix [relay] host/port (Stalwart: a listener named"
        f" local on 127.0.0.1:10025, see {STALWART_DOC})",
        EX_UNAVAILABLE,
    ),
    kinds.TIMEOUT: (
        "listener not answering: timed out after {timeout:g}s ({where})",
        "check that the listener runs and no firewall drops the connection",
        EX_UNAVAILABLE,
    ),
}
_UNUSABLE = ("listener unusable: {text}", "check the listener and [relay]", EX_UNAVAILABLE)


def classify_failure(relay: RelayConfig, down: RelayDown) -> tuple[str, str, int]:
    """(text, fix, exit code) for a relay that could not be opened (connect to AUTH)."""
    kind = down.reply.kind
    text_form, fix_form, code = (
        _FAILURES.get(f"{kind}/{relay.tls}") or _FAILURES.get(kind) or _UNUSABLE
    )
    fields = {
        "text": down.reply.text,
        "server": str(down.server) if down.server is not None else down.reply.text,
        "where": relay.describe(),
        "socket": relay.socket,
        "timeout": relay.timeout,
        "username": relay.username,
        "password_file": relay.password_file,
    }
    fix = fix_form.format(**fields)
    if kind == kinds.TLS_VERIFY and _local(relay):
        fix += ", or verify = false (loopback only)"
    return text_form.format(**fields), fix, code
