"""Per-user sending limits: messages and recipients per window per submitting uid.

``[limits] user_messages`` (default 100) and ``user_recipients`` (default 500) per
``user_window`` (default 1h) bound what one submitting uid gets delivered; root, the runner
user and ``trusted_users`` are exempt, and 0 turns a limit off. A message is counted once,
before its first attempt; mail over the limit is not refused but held: its state gets the
start of the uid's next window as its next attempt and the reason as its last error, so
``mailq`` says why it waits, and the schedule delivers it then. The first refusal in a
window is flagged so the runner logs one line per user per window.

Counters live in ``<spool>/state/limits/<uid>``, one fixed-size record per uid rewritten in
place with a single ``pwrite`` (O(1) per message whatever the number of users or entries):
a crash leaves the old record or the new one, never a torn one. They are not fsynced per
message; a power cut may forget the last seconds of counting, never more than one window.
A message alone over the recipient limit goes out at the start of a fresh window (or it
could never go out).

Trust: runs as the runner (or root) only; ``state/`` is the runner's private folder, so the
counters cannot be read or changed by the users they count. The uid comes from the entry's
``uid`` record, which pickup sets from the drop-folder file's owner. Raises nothing: a
counter that cannot be read counts from zero, one that cannot be written is logged and the
message goes on (a limit must never lose or strand mail).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.spool import Spool
    from mailshim.spoolfmt import State

__all__ = ["Limiter", "Usage", "Verdict", "decide", "limiter_for"]

FOLDER = "limits"
_RECORD = 64  # bytes: "v1 START MESSAGES RECIPIENTS LOGGED", padded, newline-terminated
_MAGIC = b"v1"


class Usage:
    """What one uid sent in its current window (``start`` 0: no window yet)."""

    __slots__ = ("logged", "messages", "recipients", "start")

    def __init__(
        self, start: int = 0, messages: int = 0, recipients: int = 0, logged: bool = False
    ):
        self.start = start
        self.messages = messages
        self.recipients = recipients
        self.logged = logged

    def encode(self) -> bytes:
        text = b"%s %d %d %d %d" % (
            _MAGIC, self.start, self.messages, self.recipients, int(self.logged),
        )  # fmt: skip
        return text.ljust(_RECORD - 1) + b"\n"

    @classmethod
    def decode(cls, raw: bytes) -> Usage:
        words = raw.split()
        if len(words) != 5 or words[0] != _MAGIC or not all(w.isdigit() for w in words[1:]):
            return cls()
        start, messages, recipients, logged = (int(w) for w in words[1:])
        return cls(start, messages, recipients, logged == 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Usage) and self.encode() == other.encode()

    def __repr__(self) -> str:
        return f"Usage({self.start}, {self.messages}, {self.recipients}, {self.logged})"


class Verdict:
    """The answer for one message: go (``ok``), or wait until ``until``. ``first``: the
    first refusal of this uid's window (log it)."""

    __slots__ = ("first", "ok", "until")

    def __init__(self, ok: bool, until: int = 0, first: bool = False) -> None:
        self.ok = ok
        self.until = until
        self.first = first

    def __repr__(self) -> str:
        return f"Verdict(ok={self.ok}, until={self.until}, first={self.first})"


def decide(
    usage: Usage, rcpts: int, now: int, messages: int, recipients: int, window: int
) -> tuple[Verdict, Usage]:
    """The verdict for one more message of ``rcpts`` recipients, and the usage after it.

    Pure: the table tests in tests/test_sendlimits.py pin every case.

    >>> v, u = decide(Usage(), 3, 1000, 100, 500, 3600)
    >>> v.ok, u.start, u.messages, u.recipients
    (True, 1000, 1, 3)
    """
    if usage.start == 0 or now >= usage.start + window or now < usage.start:
        # A fresh window (a clock set back also starts one: never hold mail for hours).
        usage = Usage(now)
    over = (messages and usage.messages + 1 > messages) or (
        recipients and usage.recipients + rcpts > recipients and usage.recipients > 0
    )
    if over:
        first = not usage.logged
        after = Usage(usage.start, usage.messages, usage.recipients, True)
        return Verdict(False, usage.start + window, first), after
    after = Usage(usage.start, usage.messages + 1, usage.recipients + rcpts, usage.logged)
    return Verdict(True), after


class Limiter:
    """The limits of one spool, with their durable counters."""

    def __init__(
        self,
        folder: str,
        messages: int,
        recipients: int,
        window: int,
        exempt: frozenset[int],
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.folder = folder
        self.messages = messages
        self.recipients = recipients
        self.window = window
        self.exempt = exempt
        self.owner = owner  # files root creates are given to the runner user

    def applies(self, uid: int) -> bool:
        return uid not in self.exempt and bool(self.messages or self.recipients)

    def usage(self, uid: int) -> Usage:
        try:
            fd = os.open(self._path(uid), os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError:
            return Usage()
        try:
            return Usage.decode(os.pread(fd, _RECORD, 0))
        except OSError:
            return Usage()
        finally:
            os.close(fd)

    def admit(self, uid: int, rcpts: int, now: float) -> Verdict:
        """Count one message of ``rcpts`` recipients for ``uid``, or say how long it waits."""
        if not self.applies(uid):
            return Verdict(True)
        before = self.usage(uid)
        verdict, after = decide(
            before, rcpts, int(now), self.messages, self.recipients, self.window
        )
        if after != before:
            self._write(uid, after)
        return verdict

    def at_limit(self, now: float) -> list[tuple[int, Usage]]:
        """Uids whose current window is used up (for ``mailshim check``)."""
        found = []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        for name in names:
            if not name.isdigit():
                continue
            uid = int(name)
            usage = self.usage(uid)
            if not usage.start or now >= usage.start + self.window or not self.applies(uid):
                continue
            if usage.logged or (self.messages and usage.messages >= self.messages):
                found.append((uid, usage))
        return sorted(found, key=lambda item: item[0])

    def rule(self) -> str:
        """The limits in words: "100 messages / 500 recipients per 1h"."""
        limit = []
        if self.messages:
            limit.append(f"{self.messages} messages")
        if self.recipients:
            limit.append(f"{self.recipients} recipients")
        return f"{' / '.join(limit)} per {_span(self.window)}"

    def why(self, uid: int, usage: Usage, until: float) -> str:
        """The reason an entry waits, in words (its state's last error, shown by mailq)."""
        import time

        return (
            f"held: {login(uid)} reached its sending limit ({self.rule()}; sent"
            f" {usage.messages} messages to {usage.recipients} recipients); goes on at"
            f" {time.strftime('%H:%M:%S', time.localtime(until))}"
        )

    def _path(self, uid: int) -> str:
        return os.path.join(self.folder, str(uid))

    def _write(self, uid: int, usage: Usage) -> None:
        from mailshim import maillog

        try:
            self._ensure_folder()
            fd = os.open(
                self._path(uid), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY, 0o600
            )
        except OSError as exc:
            maillog.log(f"limits: {self._path(uid)}: {exc.strerror}; not counted", error=True)
            return
        try:
            if self.owner is not None and os.geteuid() == 0:
                os.fchown(fd, *self.owner)
            os.pwrite(fd, usage.encode(), 0)
        except OSError as exc:
            maillog.log(f"limits: {self._path(uid)}: {exc.strerror}; not counted", error=True)
        finally:
            os.close(fd)

    def _ensure_folder(self) -> None:
        try:
            os.mkdir(self.folder, 0o700)
        except FileExistsError:
            return
        if self.owner is not None and os.geteuid() == 0:
            os.chown(self.folder, *self.owner)


def limiter_for(config: Config, target: Spool) -> Limiter | None:
    """The limits for ``target`` under ``config``; None when every limit is off."""
    import pwd

    if not (config.user_messages or config.user_recipients):
        return None
    exempt = {0, os.geteuid()}
    owner = target.owner()
    if owner is not None:
        exempt.add(owner[0])
    for name in config.trusted_users:
        try:
            exempt.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return Limiter(
        os.path.join(target.state_dir, FOLDER),
        config.user_messages,
        config.user_recipients,
        config.user_window,
        frozenset(exempt),
        owner,
    )


def gate(limiter: Limiter, target: Spool, qid: str, now: float) -> bool:
    """Before an entry's first attempt: count it (True: go on), or hold it until its
    owner's next window (False), saying why in its state. Entries already tried were
    counted then and always go on."""
    from mailshim import maillog
    from mailshim.errors import MailshimError

    try:
        locked = target.lock(qid)
    except MailshimError:
        return True  # the attempt quarantines it
    if locked is None:
        return True  # busy: the attempt skips it too
    try:
        env = locked.envelope
        state: State = locked.state()
        if state.first_attempt or not limiter.applies(env.uid):
            return True
        verdict = limiter.admit(env.uid, len(state.open_recipients(env)), now)
        if verdict.ok:
            return True
        usage = limiter.usage(env.uid)
        state.next_attempt = verdict.until
        state.last_error = limiter.why(env.uid, usage, verdict.until)
        locked.save_state(state)
        if verdict.first:
            maillog.log(f"{qid}: {state.last_error}; more of its mail waits", error=True)
        return False
    except MailshimError:
        return True
    finally:
        locked.release()


def login(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _span(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
