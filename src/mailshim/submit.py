"""Turn one submission (envelope wishes + a byte stream) into a durable spool entry, then
hand it on: start the delivery agent, deliver it now, or leave it queued.

Order matters: recipients and sender are resolved and checked, the header block is read and
edited, the entry is streamed to tmp/, fsynced and renamed into queue/; only then does anything
talk to the listener. Any failure or signal before the rename removes the temp file, so an
interrupted ``sendmail`` sends and keeps nothing.

In a sealed set-up (the relay's secret readable only by the runner user; ``sealed.py``) a
user's submission is left in the drop folder for the runner, whatever the delivery mode: the
user could not authenticate to the listener.

Trust: runs as the submitting user, on their stdin and argv (untrusted for syntax, trusted as
that user's wishes). The resulting entry is what the runner will later treat as hostile.

Raises ``MailshimError``: ``UsageError`` (64) with no recipients, ``DataError`` (65) for a bad
address or a message too large, ``ConfigError`` (78) for an unreadable aliases file or a login
that makes no sender, and the spool's ``CantCreateError`` (73), ``SpoolIOError`` (74),
``TempFailError`` (75) or ``NoPermError`` (77); after the rename, delivery problems are
outcomes, not exceptions.
"""

from __future__ import annotations

import os
import pwd
import time

from mailshim import address, aliases, maillog, message, paths, spool, spoolchoice, spoolentry
from mailshim.constants import BACKGROUND, INTERACTIVE, QUEUE, QUEUED, REJECTED, SENT
from mailshim.errors import DataError, MailshimError, UsageError, printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from mailshim.config import Config
    from mailshim.reply import Reply

HEADER_LIMIT = 1024 * 1024


class Submission:
    """What the caller asks for: from argv, or from one `-bs` transaction."""

    __slots__ = (
        "discard_rejected",
        "dot_ends",
        "extract",
        "full_name",
        "mode",
        "recipients",
        "sender",
        "verbose",
    )

    def __init__(
        self,
        sender: str | None = None,
        recipients: list[str] | None = None,
        extract: bool = False,
        dot_ends: bool = False,
        full_name: str | None = None,
        mode: str | None = None,
        verbose: bool = False,
        discard_rejected: bool = False,
    ) -> None:
        self.sender = sender
        self.recipients = list(recipients or [])
        self.extract = extract
        self.dot_ends = dot_ends
        self.full_name = full_name
        self.mode = mode
        self.verbose = verbose
        # -bs: the client hears the listener's refusal, so a wholly refused message is not kept
        self.discard_rejected = discard_rejected


class Outcome:
    """What became of a submission."""

    __slots__ = ("queue_id", "replies", "spool", "status")

    def __init__(self, queue_id: str, status: str, spool_: spool.Spool) -> None:
        self.queue_id = queue_id
        self.status = status  # queued | sent | deferred | rejected
        self.replies: dict[str, Reply] = {}
        self.spool = spool_


# --- who --------------------------------------------------------------------------


class User:
    __slots__ = ("full_name", "login", "uid")

    def __init__(self, uid: int, login: str, full_name: str) -> None:
        self.uid = uid
        self.login = login
        self.full_name = full_name


def current_user() -> User:
    """The real user (not $USER: the environment is the caller's to fake)."""
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return User(uid, f"uid{uid}", "")
    gecos = pw.pw_gecos.split(",", 1)[0].strip()
    gecos = gecos.replace("&", pw.pw_name[:1].upper() + pw.pw_name[1:])
    return User(uid, pw.pw_name, gecos)


# --- addresses ---------------------------------------------------------------------

_aliases_cache: dict[int, aliases.Aliases] = {}


def aliases_for(config: Config) -> aliases.Aliases:
    """The config's ``[aliases]`` over the aliases(5) file; config entries win."""
    key = id(config)
    cached = _aliases_cache.get(key)
    if cached is not None:
        return cached
    table: dict[str, tuple[str, ...]] = {}
    if config.aliases_file:
        from mailshim.errors import ConfigError

        try:
            with open(config.aliases_file, "rb") as f:
                text = f.read(16 * 1024 * 1024).decode("utf-8", "surrogateescape")
        except OSError as exc:
            raise ConfigError(
                f"{config.path}: [addresses] aliases_file {config.aliases_file}: {exc.strerror}"
            ) from None
        table, _skipped = aliases.parse_aliases_file(text)
    table.update(config.aliases)
    result = aliases.Aliases(table)
    _aliases_cache[key] = result
    return result


def rewrite_recipient(config: Config, addr: str) -> list[str]:
    """One checked recipient → the addresses the listener will see (qualified, aliased)."""
    checked = address.check_envelope_address(addr)
    if not checked:
        raise DataError("invalid recipient <>: the null address cannot receive mail")
    return aliases_for(config).expand(checked, config.domain)


def resolve_recipients(config: Config, words: list[str]) -> list[str]:
    """Argv words or header values → unique final recipients, in order."""
    found: list[str] = []
    for word in words:
        found.extend(address.parse_address_list(word))
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for addr in found:
        for final in rewrite_recipient(config, addr):
            key = address.dedupe_key(final)
            if key not in seen:
                seen.add(key)
                out.append(final)
    if len(out) > config.max_recipients:
        raise DataError(
            f"{len(out)} recipients is more than [submission] max_recipients "
            f"({config.max_recipients})"
        )
    return out


def envelope_sender(config: Config, requested: str | None, user: User) -> str:
    """``-f``/``-r`` (may be ``<>``), else ``addresses.sender``, else login@domain."""
    if requested is not None:
        checked = address.check_envelope_address(requested)
        return address.qualify(checked, config.domain) if checked else ""
    if config.sender:
        return address.qualify(address.check_envelope_address(config.sender), config.domain)
    return default_sender(config, user.login)


def default_sender(config: Config, login: str) -> str:
    """``login@domain``; a login that makes no address (SSSD's ``jdoe@ad.example.com`` or
    ``DOM\\jdoe``) is a configuration problem: ``[addresses] sender`` must be set."""
    own = f"{login}@{config.domain}"
    try:
        if address.check_envelope_address(own) == own:
            return own
        problem = "it would need quoting"
    except DataError as exc:
        problem = exc.message
    from mailshim.errors import ConfigError

    raise ConfigError(
        f"{config.path or 'the built-in configuration'}: [addresses] sender is not set, and"
        f" the default sender {printable(own, 200)} is not an address ({problem}); set"
        " [addresses] sender, or pass -f",
        "[addresses] sender",
    )


# --- the submission ------------------------------------------------------------------


def submit(config: Config, sub: Submission, read: Callable[[int], bytes]) -> Outcome:
    """Prepare, spool, then deliver according to the mode. Raises ``MailshimError``."""
    user = current_user()
    sender = envelope_sender(config, sub.sender, user)
    argv_rcpts = resolve_recipients(config, sub.recipients) if sub.recipients else []
    reader = message.Reader(read, sub.dot_ends)
    block = reader.header_block(HEADER_LIMIT)
    recipients = argv_rcpts
    if sub.extract:
        from_headers = message.header_recipients(block.fields)
        recipients = resolve_recipients(config, sub.recipients + from_headers)
    if not recipients:
        raise UsageError(
            "no recipients: name them on the command line, or use -t to take them from To/Cc/Bcc"
        )
    mode = sub.mode or config.delivery_mode
    if sub.verbose and mode == BACKGROUND:
        mode = INTERACTIVE
    target = spoolchoice.choose(config)
    if target.drop:
        from mailshim import sealed  # only a drop-folder submission asks

        if sealed.sealed_out(config):
            # Sealed: only the runner can read the listener's secret, so this user's own
            # agent (or an interactive attempt) could only fail. The drop folder wakes the
            # runner.
            mode = QUEUE
    if mode == BACKGROUND:
        from mailshim import serving

        if serving.served(target):
            # The units or the daemon serve this spool: they deliver it (the path unit or
            # the daemon sees it arrive) and retry it; an agent beside them would only be a
            # second retrier, in the user's session (issue 23, item 5).
            mode = QUEUE
    writer = target.new_entry(sender, recipients, user.uid)
    # In the drop folder the submitter's agent needs the entry's lock from the start: the
    # runner skips locked entries, so the two never send it both.
    keep = mode == INTERACTIVE or (mode == BACKGROUND and target.drop)
    try:
        _write_message(config, sub, user, sender, reader, block, writer)
    except BaseException:
        writer.abort()
        raise
    # From the rename on, the entry is durable: a signal must not turn that into "nothing
    # was kept" (the caller would send it again), so signals are ignored before it, not after.
    previous = _finish_even_if_signalled()
    try:
        locked = writer.commit(reader.eightbit, keep_lock=keep)
    except BaseException:
        writer.abort()
        _restore_signals(previous)
        raise
    if target.drop:
        _tell_if_held(target, user.uid)
        from mailshim import ownview

        # Every mode (background, -odq, sealed): her mailq finds it after pickup by this.
        ownview.note(target.root, writer.queue_id)
    try:
        return _hand_on(config, sub, user, sender, recipients, target, writer, mode, locked)
    finally:
        _restore_signals(previous)


def _tell_if_held(target: spool.Spool, uid: int) -> None:
    """The runner marks a user whose mail cannot enter its queue (``Spool.held_notice``):
    say so on stderr, after the entry is safe in the drop folder (exit status 0 stands)."""
    why = target.held_notice(uid)
    if why:
        import sys

        sys.stderr.write(f"sendmail: note: your mail waits in the drop folder: {why}\n")
        sys.stderr.flush()


def _hand_on(
    config: Config,
    sub: Submission,
    user: User,
    sender: str,
    recipients: list[str],
    target: spool.Spool,
    writer: spoolentry.EntryWriter,
    mode: str,
    locked: spoolentry.LockedEntry | spoolentry.DropEntry | None,
) -> Outcome:
    """The entry is durable: log it, then deliver now, start the agent, or leave it."""
    qid = writer.queue_id
    maillog.log(
        f"{qid}: uid={user.uid} from=<{sender}> size={writer.size} nrcpt={len(recipients)}"
        f" (queued in {target.root})"
    )
    outcome = Outcome(qid, QUEUED, target)
    if mode == INTERACTIVE and locked is not None:
        from mailshim import delivery

        outcome.status, outcome.replies = delivery.deliver_now(
            config, locked, verbose=sub.verbose, discard_rejected=sub.discard_rejected
        )
        if outcome.status not in (SENT, REJECTED) and config.delivery_mode != QUEUE:
            _retry_later(config, target, qid)
    elif mode == BACKGROUND:
        _to_agent(config, target, locked if isinstance(locked, spoolentry.DropEntry) else None)
    elif locked is not None:
        locked.release()
    return outcome


def _retry_later(config: Config, target: spool.Spool, qid: str) -> None:
    """After ``-odi``, ``-v`` or ``-bs -odi`` left something of the entry to retry: hand it
    to a retrier as a background submission would (the spool's agent, started or woken; for
    a drop-folder entry the user's own drop agent, told that it was tried just now), so
    that it goes out on the schedule and not only at the next background submission."""
    folder = target.incoming if target.drop else target.queue
    if not os.path.exists(os.path.join(folder, qid)):
        return  # delivered or refused after all, or already taken by a runner
    from mailshim import serving

    if serving.served(target):
        return  # the units or the daemon retry it
    if not target.drop:
        _to_agent(config, target, None)
        return
    from mailshim import dropagent

    slot = dropagent.hand_over(target.root, qid)
    if slot is not None:
        from mailshim import agent

        agent.start(target, config, slot_fd=slot)


def _to_agent(config: Config, target: spool.Spool, entry: spoolentry.DropEntry | None) -> None:
    """Start the delivery agent, or leave the entry to the one serving the spool.

    The agent's module (and what it imports) is loaded only to start one: while an agent
    serves the spool, as through a burst of submissions while the listener is down, a poke
    or nothing is all a submission does, and it costs no more than queue mode."""
    if entry is not None:
        from mailshim import dropagent

        slot = dropagent.claim(target.root, entry)
        if slot is not None:
            from mailshim import agent

            agent.start(target, config, entry=entry, slot_fd=slot)
        return
    from mailshim import serving

    try:
        fd = serving.claim_or_poke(target, config)
    except OSError:
        return  # the runner's schedule will pick the entry up; it is safe in the spool
    if fd is not None:
        from mailshim import agent

        agent.start(target, config, lock_fd=fd)


def _finish_even_if_signalled() -> dict[int, Any]:
    """From just before the rename into the spool until this submission is handed on, a
    signal must not turn exit 0 into "nothing was kept" (the caller would send it again).
    What follows is bounded by timeouts. Returns the handlers to restore (``-bs`` goes on
    afterwards)."""
    # _signal, not signal (which imports enum); it has no type stubs, hence __import__.
    _signal: Any = __import__("_signal")
    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        num = getattr(_signal, name, None)
        if num is not None:
            previous[num] = _signal.signal(num, _signal.SIG_IGN)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    _signal: Any = __import__("_signal")
    for num, handler in previous.items():
        if handler is not None:
            _signal.signal(num, handler)


def _write_message(
    config: Config,
    sub: Submission,
    user: User,
    sender: str,
    reader: message.Reader,
    block: message.HeaderBlock,
    writer: spoolentry.EntryWriter,
) -> None:
    own = f"{user.login}@{config.domain}"
    from_addr = sender or own
    display = sub.full_name
    if display is None and from_addr == own and user.full_name:
        display = user.full_name
    now = time.time()
    edits = message.HeaderEdits(
        date=message.format_date(now, time.localtime(now).tm_gmtoff),
        message_id=message.make_message_id(writer.queue_id, config.domain),
        from_addr=from_addr,
        from_display=display,
        from_mode=config.from_header,
        domain=config.domain,
        strip_bcc=True,
        qualify_domain=config.domain if config.qualify_headers else "",
        resent_message_id=message.make_message_id(writer.queue_id + ".resent", config.domain),
    )
    limit = config.max_size_for(writer.spool.listener_size())
    writer.write(_forgery_warning(config, sub, user, sender))
    writer.write(message.edit_headers(block.fields, edits))
    if block.body_prefix:
        writer.write(block.body_prefix)
    for chunk in reader.body():
        writer.write(chunk)
        if writer.size > limit:
            raise DataError(_too_large(config, limit))
    if writer.size > limit:
        raise DataError(_too_large(config, limit))


def _too_large(config: Config, limit: int) -> str:
    where = (
        "[submission] max_size"
        if "submission.max_size" in config.sources or limit == config.max_size
        else "the listener's own limit (its EHLO SIZE)"
    )
    return f"message larger than {where} ({limit} bytes): nothing was kept"


def _forgery_warning(config: Config, sub: Submission, user: User, sender: str) -> bytes:
    """``X-Authentication-Warning`` when a user outside ``trusted_users`` chose the sender.

    Anyone may pass ``-f`` (cron, PHP and fail2ban do), or name their own configuration
    with another ``domain``; recipients then see who really sent it, as classic sendmail
    shows. The user's own address (under root's configuration) needs no warning.
    """
    if user.login in config.trusted_users:
        return b""
    if sub.sender is None and config.own_domain == config.domain:
        return b""
    # Compared with the address root's configuration gives this user: a configuration file
    # the user chose (its own ``domain``) must not make another address theirs.
    if config.sender:
        own = address.qualify(address.check_envelope_address(config.sender), config.own_domain)
    else:
        own = f"{user.login}@{config.own_domain}"
    if sender.lower() == own.lower():
        return b""
    from mailshim import paths

    shown = sender or "<>"
    how = "-f" if sub.sender is not None else "its own configuration"
    text = f"X-Authentication-Warning: {paths.fqdn()}: {user.login} set sender to {shown}"
    text += f" using {how}"
    return text.encode("utf-8", "surrogateescape") + b"\r\n"


def verify(config: Config, words: list[str]) -> list[tuple[str, list[str]]]:
    """For ``-bv``: each recipient as given and what it becomes."""
    out = []
    for word in words:
        for addr in address.parse_address_list(word):
            out.append((addr, rewrite_recipient(config, addr)))
    return out


__all__ = [
    "MailshimError",
    "Outcome",
    "Submission",
    "paths",
    "resolve_recipients",
    "rewrite_recipient",
    "submit",
    "verify",
]
