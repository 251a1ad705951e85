"""Take entries from the drop folder (``incoming/``) into the private queue: the hostile boundary.

Any local user's ``sendmail`` leaves an entry in ``incoming/`` (mode 3733: anyone may create,
nobody may list, only the owner may remove). The runner copies each complete entry into
``queue/`` under a fresh queue id of its own, with the file's owner as the submitter, the time
of pickup as the arrival, and the message's line ends made CRLF; the copy is made durable
before the original goes. Like Postfix's pickup(8), this module does nothing else: everything
a reviewer needs to judge what a local user can make the runner do is in this file.

Trust: runs as the runner (root or the ``mailshim`` user); every name and byte in
``incoming/`` is hostile, written by a user who may also race the runner.

- Names: only queue-id names are entries; temp names are left to their writer until stale;
  anything else (links, FIFOs, sockets, folders, stray names) is removed.
- Files: ``lstat`` decides before anything is opened; opened with O_NOFOLLOW|O_NONBLOCK,
  then ``fstat`` must be the same regular file with one link, unchanged since the ``lstat``;
  an entry whose writer still holds its lock is left alone.
- Size: bounded before reading; a sparse file (a hole anywhere, ``SEEK_HOLE``) is refused,
  so a user's few allocated blocks never become megabytes owned by the runner; an entry is
  not copied when the spool lacks the room for it (it waits).
- Budget: each submitting uid may hold at most ``[limits] user_spool_entries`` entries and
  ``user_spool_bytes`` bytes in ``queue/`` (dead letters do not count); more waits in the
  drop folder, on its owner's own disk quota; the refusal is logged (once per entry and
  process) and written to ``incoming/.held.<uid>``, which the user's next ``sendmail``
  reports (``Spool.held_notice``).
- Content: the envelope is decoded strictly (spoolfmt); addresses must be canonical and
  qualified; the ``uid``, ``id`` and ``arrival`` records are never believed: the submitter
  is the file's owner, the id is new (a user cannot aim an entry at another's ``dead/<id>``),
  and the arrival is now (a backdated entry cannot expire at its first deferral).
- Sender: a sender that is not the owner's own address under the runner's configuration
  (``login@domain``, or ``[addresses] sender``), from a user outside ``trusted_users``, gets
  an ``X-Authentication-Warning`` and a ``Received`` line naming the uid at the top of the
  message, so recipients and failure reports show who really sent it.
- Failure is per entry: a full disk, a quota or an unreadable file makes that entry wait (or
  go to ``corrupt/`` with its reason); nothing here stops the delivery of ``queue/``.

Raises: nothing for an entry; ``pickup`` returns one ``Pickup`` per name it looked at, and the
caller logs them (``log_pickups``).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from mailshim import ownview, spoolfmt
from mailshim.errors import DataError, MailshimError, printable
from mailshim.spool import HELD_NOTICE, Spool
from mailshim.spoolentry import COPY_CHUNK, EntryWriter, LockedEntry, move_no_replace, new_queue_id
from mailshim.spoolfmt import Envelope
from mailshim.spoolfs import _READ, _close, _fsync_dir, _remove_if_abandoned, _same, _unlink

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    from mailshim.config import Config
    from mailshim.reply import Reply

PICKUP_BATCH = 64
# At most this many entries of one owner are taken from the drop folder per pickup, so a
# user who floods it cannot make everyone else's mail wait behind theirs; the rest is taken
# by the next pickups (a flush picks up again after every sweep).
PICKUP_PER_USER = 256
STALE_TEMP = 24 * 3600.0  # a temp entry nobody holds, untouched this long, is removed
UNREADABLE_GRACE = 24 * 3600.0  # a drop entry the runner may not read is removed after this
ROOM_RESERVE = 1024 * 1024  # leave this much free when copying an entry in
# Why an entry still waits in incoming/, per name, as last logged by this process: a daemon
# looks every few seconds and must not log the same refusal each time.
_told: dict[str, str] = {}


class Pickup:
    """What became of one name in ``incoming/``.

    ``status``: picked (now in queue/ as ``queue_id``), busy (its writer holds it),
    waiting (left in incoming/ for now: no room, over its owner's budget, a write failed),
    gone, rejected (not an entry: removed) or corrupt (moved to corrupt/).
    """

    __slots__ = (
        "budget",
        "copy",
        "name",
        "queue_id",
        "quiet",
        "reason",
        "src",
        "src_fd",
        "status",
        "target",
        "uid",
        "warned",
    )

    def __init__(self, target: Spool, name: str) -> None:
        self.target = target
        self.name = name
        self.status = ""
        self.reason = ""
        self.queue_id = ""
        self.uid = -1
        self.warned = False  # the sender was not the owner's: the warning was added
        self.quiet = False  # waiting for a reason this process already logged
        self.budget = False  # waiting because its owner is over their spool budget
        self.src_fd = -1
        self.src: os.stat_result | None = None
        self.copy: LockedEntry | None = None

    def __repr__(self) -> str:
        return f"Pickup({self.name}, {self.status}, {self.queue_id}, {self.reason!r})"

    def set(self, status: str, reason: str = "") -> Pickup:
        self.status = status
        self.reason = reason
        return self

    def close(self) -> None:
        if self.src_fd >= 0:
            _close(self.src_fd)
            self.src_fd = -1

    def reject(self, st: os.stat_result, reason: str) -> Pickup:
        """Not an entry at all: the name goes (unlinking a link never touches its target)."""
        self.uid = st.st_uid
        path = os.path.join(self.target.incoming, self.name)
        try:
            if _same(os.lstat(path), st):
                os.unlink(path)
        except OSError:
            pass
        return self.set("rejected", reason)

    def corrupt(self, reason: str) -> Pickup:
        """A plain file that is not an entry we take: kept in corrupt/ for a human."""
        src = os.path.join(self.target.incoming, self.name)
        try:
            st = os.lstat(src)
            self.uid = st.st_uid
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                why = f"from incoming/ (uid {st.st_uid}): {reason}"
                move_no_replace(self.target, src, "corrupt", f"incoming.{self.name}", why)
            else:
                _unlink(src)
        except OSError:
            _unlink(src)
        self.close()
        return self.set("corrupt", reason)

    def finish(self) -> None:
        """The copy is durable: remove the original (if it is still the file we read)."""
        path = os.path.join(self.target.incoming, self.name)
        try:
            if self.src is not None and _same(os.lstat(path), self.src):
                os.unlink(path)
        except OSError:
            pass
        self.close()
        _told.pop(self.name, None)
        if self.copy is not None:
            self.copy.release()
            self.copy = None

    def abandon(self, reason: str) -> None:
        """The copy could not be made durable: drop it, keep the original for later."""
        if self.copy is not None:
            _unlink(os.path.join(self.target.queue, self.queue_id))
            _unlink(os.path.join(self.target.state_dir, self.queue_id))
            self.copy.release()
            self.copy = None
        self.close()
        self.queue_id = ""
        self.set("waiting", reason)


# --- housekeeping ---------------------------------------------------------------------------


def clean_incoming(target: Spool, now: float | None = None) -> int:
    """Remove what is not an entry from ``incoming/``: abandoned temp files, links, FIFOs,
    sockets, stray names and folders (with what a user put in them, as far as the runner
    may). Entries (queue-id names) are left to ``pickup``. Returns how many names went."""
    removed = 0
    cutoff = (time.time() if now is None else now) - STALE_TEMP
    for name in _listdir(target.incoming):
        if spoolfmt.valid_id(name):
            continue
        path = os.path.join(target.incoming, name)
        if name.startswith(HELD_NOTICE) and _runners(target, path):
            continue
        if spoolfmt.is_temp_name(name):
            if _remove_if_abandoned(path, cutoff, hostile=True):
                removed += 1
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            removed += _remove_folder(target, name, st)
        elif _unlink(path):
            removed += 1
    return removed


def _runners(target: Spool, path: str) -> bool:
    """A plain file of the drop folder's owner (the runner's own notice, also when root
    wrote it: see ``Spool.set_held_notice``; not a user's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == target.notice_owner()


def _remove_folder(target: Spool, name: str, st: os.stat_result) -> int:
    """A folder planted in incoming/ (named like an entry or not): removed with its content.

    ``shutil.rmtree`` works through descriptors (O_NOFOLLOW, ``dir_fd``) on Linux, so a link
    planted inside is unlinked, never followed. The runner user may lack the rights to empty
    a folder its owner made private; it then stays, on its owner's quota, and is logged once.
    """
    import shutil

    path = os.path.join(target.incoming, name)
    try:
        os.rmdir(path)
        return 1
    except OSError:
        pass
    if shutil.rmtree.avoids_symlink_attacks:
        shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return 1
    _tell(name, f"incoming/{name}: a folder of uid {st.st_uid} the runner may not empty")
    return 0


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# --- pickup -----------------------------------------------------------------------------------


class _Usage:
    """What each uid holds in ``queue/``: entries and bytes (read on first use). Dead letters
    do not count: they wait only for a human or for ``keep_dead``, and counting them locked a
    user whose mail had bounced out of sending for a month (issue 24, item 5)."""

    def __init__(self, target: Spool) -> None:
        self.target = target
        self._by_uid: dict[int, list[int]] | None = None

    def of(self, uid: int) -> list[int]:
        if self._by_uid is None:
            self._by_uid = {}
            for name in _listdir(self.target.queue):
                if spoolfmt.valid_id(name):
                    self._count(os.path.join(self.target.queue, name))
        return self._by_uid.setdefault(uid, [0, 0])

    def _count(self, path: str) -> None:
        assert self._by_uid is not None
        try:
            fd = os.open(path, _READ)
        except OSError:
            return
        try:
            with open(fd, "rb", closefd=False) as f:
                owner = spoolfmt.peek_uid(f)
            size = os.fstat(fd).st_size
        except (OSError, DataError):
            return
        finally:
            os.close(fd)
        used = self._by_uid.setdefault(owner, [0, 0])
        used[0] += 1
        used[1] += size


class _Rules:
    """What the runner's own configuration says about drop-folder entries."""

    def __init__(self, config: Config, per_user: int, max_size: int | None) -> None:
        self.config = config
        self.max_size = config.max_size if max_size is None else max_size
        self.max_recipients = config.max_recipients
        self.per_user = per_user
        self.entries = config.user_spool_entries
        self.bytes = config.user_spool_bytes
        # Root and the runner user write queue/ themselves; the budget is for everyone else.
        self.exempt = {0, os.geteuid()}
        self.logins: dict[int, str] = {}  # uid -> login, looked up once per pickup
        self.states = False  # a copy got a state (failed records): state/ needs an fsync
        self.views = False  # status/ is kept: each copy gets its submitter's view (ownview)

    def login(self, uid: int) -> str:
        login = self.logins.get(uid)
        if login is None:
            import pwd

            try:
                login = pwd.getpwuid(uid).pw_name
            except KeyError:
                login = f"uid{uid}"
            self.logins[uid] = login
        return login


def pickup(
    target: Spool, config: Config, per_user: int = PICKUP_PER_USER, max_size: int | None = None
) -> list[Pickup]:
    """Move complete, unlocked entries from ``incoming/`` into ``queue/``, at most
    ``per_user`` of each owner's (a fair share: see PICKUP_PER_USER), each at most
    ``max_size`` bytes (default ``config.max_size``; the runner passes what the listener
    announced when the configuration sets no limit).

    Each is validated and copied (never renamed: its owner could still write to it) into a
    new entry with a fresh id, the owner's uid and the pickup time; the copy is made durable
    before the original goes. Never raises for an entry: see the module's Trust note.
    """
    if not target.has_incoming():
        return []
    try:
        names = sorted(n for n in os.listdir(target.incoming) if spoolfmt.valid_id(n))
    except OSError as exc:
        failed = Pickup(target, "")
        return [failed.set("waiting", f"listing the drop folder: {os.strerror(exc.errno or 0)}")]
    for gone in {k for k in _told if spoolfmt.valid_id(k)} - set(names):
        del _told[gone]  # taken, or removed by its owner: a daemon's memory stays bounded
    rules = _Rules(config, per_user, max_size)
    rules.views = ownview.enabled(target)
    usage = _Usage(target)
    results: list[Pickup] = []
    names = _fair_share(target, names, per_user)
    for start in range(0, len(names), PICKUP_BATCH):
        batch = [_take(target, name, rules, usage) for name in names[start : start + PICKUP_BATCH]]
        taken = [p for p in batch if p.status == "picked"]
        if taken:
            try:
                _fsync_dir(target.queue)
                if rules.states:
                    _fsync_dir(target.state_dir)
                    rules.states = False
            except OSError as exc:
                for p in taken:
                    p.abandon(f"saving the copy: {os.strerror(exc.errno or 0)}")
                taken = []
            for p in taken:
                p.finish()
            try:
                _fsync_dir(target.incoming)
            except OSError:
                pass
        results += batch
    _mark_held(target, results)
    return results


def _mark_held(target: Spool, results: list[Pickup]) -> None:
    """Tell users over their budget why their mail waits (``incoming/.held.<uid>``); forget
    it for users whose mail got in."""
    held = {p.uid: p.reason for p in results if p.budget}
    for uid, reason in held.items():
        target.set_held_notice(uid, reason)
    for uid in {p.uid for p in results if p.status == "picked"} - set(held):
        target.set_held_notice(uid, "")


def _fair_share(target: Spool, names: list[str], per_user: int) -> list[str]:
    taken: dict[int, int] = {}
    out = []
    for name in names:
        try:
            owner = os.lstat(os.path.join(target.incoming, name)).st_uid
        except OSError:
            continue
        if taken.get(owner, 0) < per_user:
            taken[owner] = taken.get(owner, 0) + 1
            out.append(name)
    return out


def _take(target: Spool, name: str, rules: _Rules, usage: _Usage) -> Pickup:
    """One name: checked, then copied, or left with the reason. Never raises MailshimError."""
    pick = Pickup(target, name)
    try:
        return _take_checked(target, pick, rules, usage)
    except MailshimError as exc:
        # A full disk, a quota, an I/O error: this entry waits; the next one may fit.
        pick.close()
        return _wait(pick, exc.message)
    except OSError as exc:
        pick.close()
        return _wait(pick, os.strerror(exc.errno or 0))


def _wait(pick: Pickup, reason: str) -> Pickup:
    pick.set("waiting", reason)
    pick.quiet = _told.get(pick.name) == reason
    _told[pick.name] = reason
    return pick


def _tell(name: str, reason: str) -> None:
    if _told.get(name) != reason:
        _told[name] = reason
        from mailshim import maillog

        maillog.log(reason, error=True)


def _take_checked(target: Spool, pick: Pickup, rules: _Rules, usage: _Usage) -> Pickup:
    st = _open_checked(target, pick, rules)
    if st is None:
        return pick
    if _sparse(pick.src_fd, st):
        return pick.corrupt(
            f"a sparse file ({st.st_size} bytes, {st.st_blocks * 512} allocated): sendmail"
            " never writes one, and copying it would spend the runner's disk, not its owner's"
        )
    room = _room(target)
    if room is not None and room < st.st_size + ROOM_RESERVE:
        pick.close()
        return _wait(pick, f"{st.st_size} bytes do not fit in the spool ({room} bytes free)")
    exempt = st.st_uid in rules.exempt
    used = [0, 0] if exempt else usage.of(st.st_uid)
    if used[0] + 1 > rules.entries or used[1] + st.st_size > rules.bytes:
        pick.close()
        pick.budget = True
        return _wait(
            pick,
            f"uid {st.st_uid} already has {used[0]} entries, {used[1]} bytes in the queue"
            f" (limits: [limits] user_spool_entries = {rules.entries},"
            f" user_spool_bytes = {rules.bytes}); it waits until some are delivered",
        )
    try:
        _copy(target, pick, pick.src_fd, st, rules)
    except DataError as exc:
        return pick.corrupt(exc.message)
    used[0] += 1
    used[1] += st.st_size
    return pick


def _open_checked(target: Spool, pick: Pickup, rules: _Rules) -> os.stat_result | None:
    """Open and lock the entry, checking it is still the plain file ``lstat`` saw; None
    (with ``pick``'s status set) when it is not to be taken now."""
    path = os.path.join(target.incoming, pick.name)
    try:
        before = os.lstat(path)
    except OSError:
        pick.set("gone")
        return None
    pick.uid = before.st_uid
    if stat.S_ISDIR(before.st_mode):
        _remove_folder(target, pick.name, before)
        pick.set("rejected", "a folder")
        return None
    limit = rules.max_size + rules.max_recipients * spoolfmt.MAX_RECORD + 65536
    why = ""
    if not stat.S_ISREG(before.st_mode):
        why = "not a regular file"
    elif before.st_nlink != 1:
        why = "a file with more than one link"
    elif before.st_size > limit:
        why = f"{before.st_size} bytes is over the limit"
    if why:
        pick.reject(before, why)
        return None
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError:
        pick.set("gone")
        return None
    except PermissionError:
        if time.time() - before.st_ctime > UNREADABLE_GRACE:
            pick.reject(before, "unreadable by the runner for a day")
        else:
            pick.set("busy", "unreadable by the runner (mode or group changed?)")
        return None
    pick.src_fd = fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        again = os.lstat(path)
    except BlockingIOError:
        pick.close()
        pick.set("busy", "locked by its writer or its owner's agent")
        return None
    except OSError:
        pick.close()
        pick.set("gone")
        return None
    pick.src = st
    if not (_same(st, before) and _same(again, st)):
        pick.close()
        pick.set("busy", "replaced while being looked at")
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > limit:
        pick.close()
        pick.reject(st, "changed into something that is not an entry")
        return None
    return st


def _sparse(fd: int, st: os.stat_result) -> bool:
    """The file has a hole: fewer bytes are allocated than it claims to hold.

    ``SEEK_HOLE`` says exactly where the first hole is (the end, for a file without one);
    comparing ``st_blocks`` alone would also refuse files on compressing file systems."""
    if st.st_size == 0 or st.st_blocks * 512 >= st.st_size:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size
    except OSError:
        return True  # cannot tell, and fewer blocks than bytes: refuse
    finally:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            pass


def _room(target: Spool) -> int | None:
    try:
        vfs = os.statvfs(target.queue)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


def _copy(target: Spool, pick: Pickup, fd: int, st: os.stat_result, rules: _Rules) -> None:
    with open(os.dup(fd), "rb") as src:
        env, offset = spoolfmt.decode_envelope(src)
        if env.queue_id != pick.name:
            raise DataError(f"entry named {pick.name} claims to be {env.queue_id}")
        if len(env.recipients) > rules.max_recipients:
            raise DataError(f"{len(env.recipients)} recipients is over the limit")
        if st.st_size - offset != env.size:
            raise DataError(f"message is {st.st_size - offset} bytes, envelope says {env.size}")
        if env.size > rules.max_size:
            raise DataError(f"message of {env.size} bytes is over the limit")
        _check_addresses(env)
        now = int(time.time())
        qid = new_queue_id()
        writer = EntryWriter(target, Envelope(qid, env.sender, env.recipients, now, st.st_uid))
        try:
            head = _sender_warning(rules, env.sender, st.st_uid, src, now)
            src.seek(offset)
            pick.warned = bool(head)
            writer.write(head)
            eightbit = not head.isascii()
            ends = spoolfmt.LineEnds()
            copied = 0
            while copied <= env.size:
                chunk = src.read(min(COPY_CHUNK, env.size + 1 - copied))
                if not chunk:
                    break
                copied += len(chunk)
                out = ends.feed(chunk)
                eightbit = eightbit or not out.isascii()
                writer.write(out)
            if copied != env.size:
                raise DataError("the entry changed while it was being copied")
            writer.write(ends.end())
            state = None
            if env.failed or rules.views:
                state = spoolfmt.State()
                state.failed = _refusals(env.failed)
                if rules.views:
                    state.view = pick.name  # the submitter's secret name for her view
                target.save_state(qid, state, sync=False)
                rules.states = True
            copy = writer.commit(eightbit, keep_lock=True, sync_dir=False)
            if state is not None and state.view:
                # Before the original leaves incoming/: her mailq always finds one of them.
                ownview.publish(target, writer.envelope, state)
        except BaseException:
            writer.abort()
            _unlink(os.path.join(target.state_dir, qid))
            raise
    assert isinstance(copy, LockedEntry)
    pick.copy = copy
    pick.queue_id = qid
    pick.status = "picked"


def _sender_warning(rules: _Rules, sender: str, uid: int, src: BinaryIO, now: int) -> bytes:
    """Header lines to put on top when ``sender`` is not ``uid``'s own address (else b"")."""
    if uid == 0:
        return b""
    config = rules.config
    login = rules.login(uid)
    if login in config.trusted_users:
        return b""
    own = own_address(config, login)
    if sender.lower() == own.lower():
        return b""
    from mailshim import message, paths

    host = paths.fqdn()
    shown = sender or "<>"
    warning = f"X-Authentication-Warning: {host}: {login} set sender to {shown} using -f\r\n"
    trace = f"Received: by {host} (mailshim pickup, from userid {uid});\r\n\t"
    trace += message.format_date(now, 0) + "\r\n"
    head = warning.encode("utf-8", "surrogateescape")
    # sendmail under the user's own configuration may have written the same warning (or one
    # saying its configuration set the sender): once.
    same = head[: -len(b" -f\r\n")]
    start = src.read(len(same))
    return trace.encode() + (b"" if start == same else head)


def _refusals(failed: dict[str, str]) -> dict[str, Reply]:
    """The ``failed`` records of a drop entry as replies. Their text is the owner's to write:
    made one printable line, and only a permanent refusal (5xx) is taken."""
    from mailshim.reply import Reply, clean_text

    out = {}
    for rcpt, text in failed.items():
        reply = Reply.from_legacy(clean_text(text))
        if not 500 <= reply.code <= 599:
            raise DataError(f"failed record for {printable(rcpt, 80)!r} holds no 5xx reply")
        out[rcpt] = reply
    return out


def own_address(config: Config, login: str) -> str:
    """The sender a user's ``sendmail`` uses without ``-f``, under ``config``."""
    if config.sender:
        from mailshim import address

        return address.qualify(config.sender, config.domain)
    return f"{login}@{config.domain}"


def _check_addresses(env: Envelope) -> None:
    """Only what ``sendmail`` itself would spool passes: canonical, qualified addresses (the
    boundary checks again what the front end checked, STYLE.md)."""
    from mailshim import address  # pure; only runners pay for it here

    for what, addr in [("sender", env.sender), *(("recipient", r) for r in env.recipients)]:
        try:
            canon = address.check_envelope_address(addr)
        except DataError as exc:
            raise DataError(f"{what}: {exc.message}") from None
        if canon != addr or (addr and "@" not in addr) or (what == "recipient" and not addr):
            shown = addr.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            raise DataError(f"{what} {shown[:80]!r} is not a canonical, qualified address")


def log_pickups(results: list[Pickup], log: Callable[[str, bool], None]) -> None:
    """One log line per picked-up or refused drop-folder entry, and per new reason to wait."""
    for p in results:
        if p.status == "picked":
            note = " (sender is not the owner's: warning added)" if p.warned else ""
            log(f"{p.queue_id}: uid={p.uid} picked up from incoming/{p.name}{note}", False)
        elif p.status in ("rejected", "corrupt"):
            log(f"incoming/{p.name}: uid={p.uid} refused ({p.status}): {p.reason}", True)
        elif p.status == "waiting" and not p.quiet:
            log(f"incoming/{p.name}: uid={p.uid} waits: {p.reason}", True)
