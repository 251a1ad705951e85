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

import errno
import os
import stat

from mailshim.spoolfs import open_folder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.spool import Spool
    from mailshim.spoolentry import LockedEntry
    from mailshim.spoolfmt import State

__all__ = ["Limiter", "Usage", "Verdict", "decide", "limiter_for"]

FOLDER = "limits"
_RECORD = 64  # bytes: "v1 START MESSAGES RECIPIENTS LOGGED", padded, newline-terminated
_MAGIC = b"v1"
_OPEN = os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
LOCK_WAIT = 5.0  # seconds a counter's flock is waited for before the message goes uncounted


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
        # Uids whose counter stayed locked past LOCK_WAIT: not waited for again by this
        # limiter (one pass), or the runner account holding one flock would stall the pass
        # (and every parallel session with it) LOCK_WAIT per message.
        self._stuck: set[int] = set()

    def applies(self, uid: int) -> bool:
        return uid not in self.exempt and bool(self.messages or self.recipients)

    def usage(self, uid: int) -> Usage:
        try:
            folder = self._folder(create=False)
        except OSError:
            return Usage()
        try:
            fd = self._counter(folder, uid, os.O_RDONLY)
        except OSError:
            return Usage()
        finally:
            os.close(folder)
        try:
            return Usage.decode(os.pread(fd, _RECORD, 0))
        except OSError:
            return Usage()
        finally:
            os.close(fd)

    def admit(self, uid: int, rcpts: int, now: float) -> Verdict:
        """Count one message of ``rcpts`` recipients for ``uid``, or say how long it waits.

        The counter is read and rewritten under its flock: runners working at the same time
        (the daemon and a flush) never lose a count."""
        if not self.applies(uid):
            return Verdict(True)
        from mailshim import maillog

        try:
            fd = self._open_for_update(uid)
        except OSError as exc:
            maillog.log(f"limits: {self._path(uid)}: {exc.strerror}; not counted", error=True)
            return Verdict(True)
        try:
            if not _lock(fd, 0.0 if uid in self._stuck else LOCK_WAIT):
                if uid not in self._stuck:
                    self._stuck.add(uid)
                    maillog.log(f"limits: {self._path(uid)} stays locked; not counted", error=True)
                return Verdict(True)
            self._stuck.discard(uid)
            before = Usage.decode(os.pread(fd, _RECORD, 0))
            verdict, after = decide(
                before, rcpts, int(now), self.messages, self.recipients, self.window
            )
            if after != before:
                os.pwrite(fd, after.encode(), 0)
            return verdict
        except OSError as exc:
            maillog.log(f"limits: {self._path(uid)}: {exc.strerror}; not counted", error=True)
            return Verdict(True)
        finally:
            os.close(fd)

    def at_limit(self, now: float) -> list[tuple[int, Usage]]:
        """Uids whose current window is used up (for ``mailshim check``)."""
        found = []
        try:
            folder = self._folder(create=False)
        except OSError:
            return []
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        finally:
            os.close(folder)
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

    def _owners(self) -> set[int]:
        return {0} if self.owner is None else {0, self.owner[0]}

    def _folder(self, create: bool) -> int:
        """``state/limits`` as a descriptor: ``state/`` and ``limits/`` each opened without
        following a link and owned by the spool's owner or root (the runner account owns
        them: as root, nothing it planted is followed; see docs/security.md)."""
        parent, name = os.path.split(self.folder)
        state = open_folder(parent, self._owners())
        try:
            return open_folder(
                name, self._owners(), dir_fd=state, create=0o700 if create else None,
                give=self.owner,
            )  # fmt: skip
        finally:
            os.close(state)

    def _counter(self, folder: int, uid: int, flags: int) -> int:
        """Open the counter of ``uid`` in ``folder`` (a descriptor): a plain file with one
        link, of the spool's owner or root; never a link, a FIFO or a device."""
        fd = os.open(str(uid), flags | _OPEN, dir_fd=folder)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(errno.EINVAL, "not a plain file with one link")
            if st.st_uid not in self._owners() | {os.geteuid()}:
                raise PermissionError(errno.EPERM, "a file another account owns")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_for_update(self, uid: int) -> int:
        """The counter of ``uid`` open for reading and writing, created (and, by root, given
        to the spool's owner) when missing. Only a file created here is ever chowned."""
        folder = self._folder(create=True)
        try:
            try:
                fd = os.open(str(uid), os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN, 0o600,
                             dir_fd=folder)  # fmt: skip
            except FileExistsError:
                return self._counter(folder, uid, os.O_RDWR)
            try:
                if self.owner is not None and os.geteuid() == 0:
                    os.fchown(fd, *self.owner)
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(folder)


def _lock(fd: int, wait: float) -> bool:
    """Take the counter's flock, waiting up to ``wait`` seconds (another runner holds it for
    a read and a write); False when it stays taken (the runner account would be blocking
    root's pass)."""
    import fcntl
    import time

    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


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


def gate(limiter: Limiter, locked: LockedEntry, now: float) -> bool:
    """Before an entry's first attempt, with its lock held: count it (True: go on), or hold
    it until its owner's next window (False), saying why in its state. Entries already tried
    were counted then and always go on.

    Counting only under the entry's lock, just before the attempt the lock is kept for, means
    an entry another runner holds is not counted, and none is counted twice: the next look
    at it finds its first attempt recorded."""
    from mailshim import maillog
    from mailshim.errors import MailshimError

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
            maillog.log(f"{env.queue_id}: {state.last_error}; more of its mail waits", error=True)
        return False
    except MailshimError:
        return True  # the attempt finds the same trouble and deals with it


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
