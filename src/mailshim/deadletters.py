"""Dead letters: list the entries in ``dead/``, put one back in the queue, age them out.

An entry lands in ``dead/`` when every recipient is finished and at least one failed for
good (refused, or expired after ``[queue] lifetime``); beside it ``<id>.reason`` (why, one
line; its mtime is when it was buried) and ``<id>.state`` (its last state). The sender got a
bounce unless they were told at once (``-odi``, ``-bs``) or the sender was ``<>``.

``requeue`` puts an entry back with a fresh schedule (recipients already delivered stay
delivered; the lifetime counts from the requeue). ``expire`` removes dead letters older than
``[queue] keep_dead`` (30 days by default); the runners call it at the start of a run.

Trust: run by root, the ``mailshim`` user or a user on their own spool (``mailshim queue``,
the runners). ``dead/`` is 0700 and only the runner writes it, but an entry is still parsed
strictly (spoolfmt) and shown through ``one_line``. Moving an entry never replaces a file:
it is linked into ``queue/`` (EEXIST if the id is there) while its flock is held, so no
runner sees it half-moved. Raises ``MailshimError`` (``from_oserror``: 73/74/77) when the
spool cannot be written, ``UsageError`` (64) for an id that is not dead.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from mailshim import maillog, spool, spoolchoice, spoolfmt
from mailshim.errors import DataError, UsageError, from_oserror

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.spoolfmt import Envelope

RECENT = 7 * 86400  # `mailshim check` warns while dead/ holds entries younger than this


class DeadItem:
    """One dead letter as shown: who, to whom, why, and since when."""

    __slots__ = ("buried", "envelope", "queue_id", "reason", "spool")

    def __init__(
        self, target: spool.Spool, qid: str, env: Envelope | None, reason: str, buried: float
    ) -> None:
        self.spool = target
        self.queue_id = qid
        self.envelope = env
        self.reason = reason
        self.buried = buried

    def as_dict(self) -> dict[str, object]:
        env = self.envelope
        return {
            "id": self.queue_id,
            "spool": self.spool.root,
            "dead_since": int(self.buried),
            "arrival": env.arrival if env else None,
            "size": env.size if env else None,
            "sender": env.sender if env else None,
            "recipients": list(env.recipients) if env else [],
            "reason": self.reason,
        }


def ids(target: spool.Spool) -> list[str]:
    try:
        names = os.listdir(target.dead)
    except OSError:
        return []
    return sorted(n for n in names if spoolfmt.valid_id(n))


def _buried_at(target: spool.Spool, qid: str) -> float:
    for name in (f"{qid}.reason", qid):
        try:
            return os.lstat(os.path.join(target.dead, name)).st_mtime
        except OSError:
            continue
    return 0.0


def _reason(target: spool.Spool, qid: str) -> str:
    try:
        fd = os.open(
            os.path.join(target.dead, f"{qid}.reason"),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return ""
    try:
        return os.read(fd, 8192).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)


def _envelope(target: spool.Spool, qid: str) -> Envelope | None:
    try:
        fd = os.open(
            os.path.join(target.dead, qid),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return None
    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            env, _ = spoolfmt.decode_envelope(f)
    except (DataError, OSError):
        return None
    return env if env.queue_id == qid else None


def collect(config: Config) -> list[DeadItem]:
    """Dead letters of every spool this user can read, oldest burial first."""
    out = []
    for target in spoolchoice.known_spools(config):
        for qid in ids(target):
            out.append(
                DeadItem(
                    target, qid, _envelope(target, qid), _reason(target, qid),
                    _buried_at(target, qid),
                )
            )  # fmt: skip
    out.sort(key=lambda d: (d.buried, d.queue_id))
    return out


def count(config: Config) -> int:
    return sum(len(ids(t)) for t in spoolchoice.known_spools(config))


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def requeue(target: spool.Spool, qid: str, now: float | None = None) -> None:
    """Put ``dead/<qid>`` back into the queue, due now, with a fresh schedule.

    dead/ is the runner account's: the entry is opened without following a link or blocking
    on a FIFO, and its kept state is read the same way (``Spool.dead_state``). Order, for a
    power cut or a kill at any point (issue 27): the link into queue/ is made durable before
    anything leaves dead/, the state before the names in dead/ go, and the entry's own name
    there last; a runner that finds the entry under both names finishes the requeue
    (``Spool.lock``)."""
    now = time.time() if now is None else now
    path = os.path.join(target.dead, qid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{qid} is not in {target.dead}") from None
    except OSError as exc:
        raise from_oserror(exc, f"opening dead letter {qid}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a plain file: look at it, then remove it")
        # The queue entry will be this same inode: its flock keeps runners away until the
        # state is in place and the dead/ name is gone.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{qid} is being requeued by another process") from None
        state = spool.requeued_state(target.dead_state(qid), now)
        try:
            os.link(path, target.path(qid))
        except FileExistsError:
            raise UsageError(f"{qid} is in the queue already") from None
        _fsync_dir(target.queue)
        target.save_state(qid, state)
        _unlink(path + ".reason")
        _unlink(path + ".state")
        _unlink(path)
        _fsync_dir(target.dead)
    except OSError as exc:
        raise from_oserror(exc, f"requeueing {qid}") from None
    finally:
        os.close(fd)
    maillog.log(f"{qid}: requeued from dead/ by uid {os.getuid()} with a fresh schedule")


def expire(target: spool.Spool, keep: int, now: float | None = None) -> int:
    """Remove dead letters buried more than ``keep`` seconds ago; returns how many."""
    if keep <= 0:
        return 0
    now = time.time() if now is None else now
    removed = 0
    for qid in ids(target):
        buried = _buried_at(target, qid)
        if not buried or now - buried < keep:
            continue
        path = os.path.join(target.dead, qid)
        try:
            if _unlink(path):
                removed += 1
                maillog.log(f"{qid}: dead letter removed after [queue] keep_dead")
            _unlink(path + ".reason")
            _unlink(path + ".state")
        except OSError:
            continue  # not ours to remove (a read-only view): the runner will
    return removed


def recent(config: Config, now: float | None = None) -> int:
    """Dead letters younger than a week (``mailshim check`` warns about them)."""
    now = time.time() if now is None else now
    return sum(
        1
        for t in spoolchoice.known_spools(config)
        for q in ids(t)
        if now - _buried_at(t, q) < RECENT
    )
