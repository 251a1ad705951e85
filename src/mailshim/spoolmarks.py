"""The spool-wide marks: the agent lock and its "listener unreachable" mark, the listener's
announced SIZE, and the notices of users held out of the queue.

``Spool`` (spool.py) inherits these as ``SpoolMarks``: each is one small file at the spool's
root or in ``incoming/`` that several processes read and one kind of process writes, and
none is ever the only record of a message. Layout and modes: spool.py's docstring.

Trust: runs as root, as the runner (the ``mailshim`` user) and as submitting users. A mark is
believed only when it is a plain file of the right owner (the spool's owner or root; for a
held notice, the drop folder's owner), and written only through ``O_NOFOLLOW`` opens of a
plain file of one link, so a link or FIFO planted at a mark's name is neither followed nor
blocks. A mark is best effort: a failure to read or write one is ignored (it only moves a
default or an optimisation), never raised.

Raises: ``try_agent_lock`` lets an ``OSError`` opening the lock through (the caller reports
it); nothing else raises.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from mailshim.spoolfs import _O_CLOEXEC, _O_NOFOLLOW, _READ, _unlink

LISTENER_SIZE = "listener-size"
HELD_NOTICE = ".held."  # incoming/.held.<uid>: why that user's mail waits there
MARK_RECHECK = 1.0  # seconds: how long a cleared "listener unreachable" mark is trusted

TYPE_CHECKING = False


class SpoolMarks:
    """The marks of one spool; mixed into ``spool.Spool``, which sets these attributes."""

    root: str
    incoming: str
    _listener_size: int | None
    _mark_clear_at: float

    if TYPE_CHECKING:

        def owner(self) -> tuple[int, int] | None: ...

        def give(self, fd: int) -> None: ...

    # --- the agent lock --------------------------------------------------------
    # It doubles as a "listener unreachable" mark: an agent that could reach no relay writes
    # a line into it (mtime = when), one that delivered empties it. Submissions in the next
    # few seconds then start no agent that would only fail the same way (measured: 234
    # agents for 1000 submissions while the listener was down).

    def relay_down_since(self) -> float | None:
        """When an agent last found every relay unreachable; None when it since got through."""
        try:
            st = os.stat(os.path.join(self.root, "agent.lock"))
        except OSError:
            return None
        return st.st_mtime if st.st_size > 0 else None

    def clear_relay_down(self) -> None:
        """Someone got through: forget the mark (one stat when there is none, and none at
        all within ``MARK_RECHECK`` of the last look: a runner calls this per delivery)."""
        now = time.monotonic()
        if now - self._mark_clear_at < MARK_RECHECK:
            return
        self._mark_clear_at = now
        path = os.path.join(self.root, "agent.lock")
        try:
            if os.stat(path).st_size == 0:
                return
            fd = os.open(path, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def mark_relay_down(self) -> None:
        """A pass found every relay unreachable: leave the mark the agent leaves (without
        holding the agent lock: a run, a flush, the daemon), so that listings show what
        waits for the listener and a burst of submissions pokes nobody. Only a plain file
        of one link is written; best effort."""
        self._mark_clear_at = -MARK_RECHECK
        path = os.path.join(self.root, "agent.lock")
        # Made here only by the spool's owner: one root made in the runner's spool would shut
        # the runner out of its lock (setup-spool makes the system spool's).
        own = self.owner()
        make = os.O_CREAT if own is not None and own[0] == os.geteuid() else 0
        try:
            fd = os.open(path, os.O_WRONLY | make | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.pwrite(fd, b"relay down\n", 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def mark_relay(self, lock_fd: int, reachable: bool) -> None:
        try:
            if reachable:
                if os.fstat(lock_fd).st_size:
                    os.ftruncate(lock_fd, 0)
            else:
                self._mark_clear_at = -MARK_RECHECK  # the next delivery clears it again
                os.pwrite(lock_fd, b"relay down\n", 0)
        except OSError:
            pass  # only an optimisation

    # --- the listener's own size limit ------------------------------------------
    # The delivery side records the EHLO SIZE it last saw; submissions then refuse early
    # (exit 65, nothing kept) exactly what the listener would refuse, and nothing less.

    def listener_size(self) -> int | None:
        """The SIZE the listener last announced, as recorded here; None when unknown.

        Only a file of the spool's owner (or root) counts: it sets how much others may send.
        """
        try:
            fd = os.open(os.path.join(self.root, LISTENER_SIZE), _READ)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            own = self.owner()
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, own[0] if own else 0):
                return None
            raw = os.read(fd, 32)
        except OSError:
            return None
        finally:
            os.close(fd)
        text = raw.strip()
        if raw.endswith(b"\n") and text.isdigit() and 0 < len(text) < 19:
            return int(text)
        return None

    def record_listener_size(self, size: int | None) -> None:
        """Remember ``size`` (the runner; best effort: a stale figure only moves a default)."""
        if size is None or size <= 0 or size == self._listener_size:
            return
        self._listener_size = size
        if self.listener_size() == size:
            return
        data = b"%d\n" % size
        try:
            # O_CREAT without O_TRUNC: the system spool's root is root's, where setup-spool
            # made this file for the runner; a per-user spool's owner may create it.
            fd = os.open(
                os.path.join(self.root, LISTENER_SIZE),
                os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK,
                0o644,
            )
        except OSError:
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
        except OSError:
            pass
        finally:
            os.close(fd)

    # --- a user held out of the queue ---------------------------------------------------
    # Pickup leaves a user's entries in incoming/ while they are over their spool budget;
    # it says why in ``incoming/.held.<uid>`` (the runner's, 0644: the user may open the
    # name, not list the folder), and the user's next ``sendmail`` tells them.

    def held_notice(self, uid: int) -> str:
        """Why ``uid``'s mail waits in the drop folder, as the runner last wrote; "" when
        it does not (a file of another owner than the drop folder's is not believed)."""
        path = os.path.join(self.incoming, f"{HELD_NOTICE}{uid}")
        try:
            fd = os.open(path, _READ)
        except OSError:
            return ""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.lstat(self.incoming).st_uid:
                return ""
            raw = os.read(fd, 1024)
        except OSError:
            return ""
        finally:
            os.close(fd)
        return raw.decode("utf-8", "replace").strip().splitlines()[0] if raw.strip() else ""

    def notice_owner(self) -> int | None:
        """Whose ``incoming/.held.<uid>`` notices are believed: the drop folder's owner."""
        try:
            return os.lstat(self.incoming).st_uid
        except OSError:
            return None

    def set_held_notice(self, uid: int, reason: str) -> None:
        """Record (``reason``) or clear ("") why ``uid``'s mail cannot enter the queue (the
        runner; best effort). A name a user planted there is removed first. Root's notice
        goes to the drop folder's owner (only what it creates here), since only a notice of
        that owner is believed (``held_notice``): a root pickup must tell the user too."""
        path = os.path.join(self.incoming, f"{HELD_NOTICE}{uid}")
        data = reason.encode("utf-8", "replace") + b"\n"
        owner = self.notice_owner()
        if owner is None:
            return
        try:
            st = os.lstat(path)
            if not reason or st.st_uid != owner or not stat.S_ISREG(st.st_mode):
                _unlink(path)
            elif self.held_notice(uid) == reason:
                return
        except OSError:
            pass
        if not reason:
            return
        flags = os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                made = True
            except FileExistsError:
                fd = os.open(path, flags)
                made = False
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if made and st.st_uid != owner and os.geteuid() == 0:
                os.fchown(fd, owner, -1)
                st = os.fstat(fd)
            if st.st_uid == owner and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.fchmod(fd, 0o644)
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
        except OSError:
            pass
        finally:
            os.close(fd)

    def try_agent_lock(self) -> int | None:
        """An fd holding the spool's agent lock, or None when an agent already runs."""
        path = os.path.join(self.root, "agent.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        except PermissionError:
            # The system spool's root belongs to root: the runner user opens the lock
            # setup-spool made for it.
            fd = os.open(path, _READ)
        try:
            self.give(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd
