"""The spool's entries: write a new one (``EntryWriter``), hold one locked (``LockedEntry`` in
``queue/``, ``DropEntry`` in ``incoming/``), read, remove or bury it; and new queue ids.

Durability: an entry is written to ``tmp/<id>.<random>``, fsynced, linked into ``queue/``
(a link never replaces a name, as a rename would), and the folder is fsynced before anyone is
told it is safe. A drop-folder entry is written under a random temporary name in
``incoming/``, fsynced, linked, and fsynced again (its writer may not read the folder, so
cannot fsync it; on Linux file systems the second fsync commits the link). Exclusion: whoever
delivers or moves an entry holds an flock on its file until the move is done, so two agents
or runners never send one message twice.

Trust: runs as the submitting user (their own spool, or their entries in the drop folder of
the system spool), as root, and as the runner (root or the ``mailshim`` user). An entry's
file is read from the fd whose lock is held, never again by name; its envelope must name the
id it is filed under. Nothing in ``dead/`` or ``corrupt/`` is ever replaced (a taken name
makes a buried entry go under a fresh id); a user's own drop entry is the one rename over a
name here, by its owner. Root gives what it creates to the spool's owner.

Raises: ``CantCreateError`` (73) when a name that must be new is taken; ``DataError`` (65) for
an entry that cannot be read (the caller moves it to ``corrupt/``); other ``OSError``s as
their sysexits code (``errors.from_oserror``: 75 full or over quota, 73 read-only or missing,
77 denied, 74 otherwise).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import time

from mailshim import spoolfmt, spoolindex
from mailshim.errors import CantCreateError, DataError, MailshimError, from_oserror
from mailshim.spoolfmt import Envelope, State
from mailshim.spoolfs import (
    _B32,
    _CREATE,
    TEMP_TRIES,
    _close,
    _create_temp,
    _fsync_dir,
    _link_no_replace,
    _make_dirs,
    _same,
    _unlink,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Protocol

    class EntrySpool(Protocol):
        """What an entry, and whoever holds one, uses of its spool (``spool.Spool``).

        A protocol rather than an import: ``spool`` imports this module, and the layer rules
        (tests/test_layers.py) allow no circle, not even a type-only one."""

        root: str
        tmp: str
        queue: str
        state_dir: str
        dead: str
        corrupt: str
        incoming: str
        _dirty: bool

        def give(self, fd: int) -> None: ...
        def sync(self, force: bool = False) -> None: ...
        def exists(self, qid: str) -> bool: ...
        def stored_state(self, qid: str) -> State | None: ...
        def save_state(self, qid: str, state: State, sync: bool = True) -> None: ...
        def new_entry(
            self,
            sender: str,
            recipients: list[str],
            uid: int,
            *,
            queue_id: str | None = None,
            arrival: int | None = None,
        ) -> EntryWriter: ...
        def listener_size(self) -> int | None: ...
        def record_listener_size(self, size: int | None) -> None: ...
        def clear_relay_down(self) -> None: ...


ENTRY_MODE_DROP = 0o640  # the runner reads drop-folder entries through the group
COPY_CHUNK = 1024 * 1024
HEAD_READ = 64 * 1024  # bytes of an entry read at once when it is locked (see _Held)


def new_queue_id(now_ns: int | None = None) -> str:
    """13 hex digits of microseconds (sortable by arrival) + 7 random base32 characters."""
    usec = (now_ns if now_ns is not None else time.time_ns()) // 1000
    rand = int.from_bytes(os.urandom(5), "big")
    tail = "".join(_B32[(rand >> (5 * i)) & 31] for i in range(7))
    return f"{usec:013X}"[-13:] + tail


def new_drop_id(now: float | None = None) -> str:
    """A drop-folder entry's id: 8 hex digits of seconds (sortable by arrival) + 12 random
    base-36 characters (62 bits). Its submitter's view of it after pickup is found under
    this name (ownview.py), so it must be unguessable, more than a queue id's 35 bits."""
    secs = int(time.time() if now is None else now)
    rand = int.from_bytes(os.urandom(9), "big")
    tail = ""
    for _ in range(12):
        rand, digit = divmod(rand, 36)
        tail += "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[digit]
    return f"{secs:08X}"[-8:] + tail


def move_no_replace(target: EntrySpool, src: str, folder: str, name: str, reason: str) -> str:
    """Move ``src`` into ``dead/`` or ``corrupt/`` as ``name`` with a ``.reason`` file; when
    that name is taken by another file, under a fresh queue id instead. Returns the path.

    A look, then a rename: only the runner (and root) can create names in those folders
    (0700), and the one moving an entry holds its lock, so nothing can appear in between;
    a rename, unlike a link, also works on a drop-folder file another user owns
    (``fs.protected_hardlinks``) and is atomic if the process stops."""
    target_dir = target.dead if folder == "dead" else target.corrupt
    if not os.path.isdir(target_dir):
        _make_dirs(target_dir, 0o700)
    dst = os.path.join(target_dir, name)
    for _ in range(TEMP_TRIES):
        if not (os.path.lexists(dst) or os.path.lexists(dst + ".reason")):
            break
        dst = os.path.join(target_dir, new_queue_id())
    else:
        raise CantCreateError(f"no free name in {target_dir}")
    os.rename(src, dst)
    _write_reason(target, dst + ".reason", reason)
    return dst


def _write_reason(spool: EntrySpool, path: str, reason: str) -> None:
    _unlink(path)
    fd = os.open(path, os.O_WRONLY | _CREATE, 0o600)
    try:
        spool.give(fd)
        os.write(fd, reason.encode("utf-8", "replace") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


class EntryWriter:
    """A new entry being written; ``commit()`` makes it durable and visible.

    In the drop folder the temp file is ``incoming/.<id>.<random>.tmp`` (mode 0640, group of
    the folder: the runner reads it through the group); elsewhere it is ``tmp/<id>.<random>``.
    The random part is new for every create, so no file planted or left behind can make the
    create fail; the final name is linked, never renamed over (``_link_no_replace``).
    """

    def __init__(self, spool: EntrySpool, envelope: Envelope, drop: bool = False) -> None:
        self.spool = spool
        self.queue_id = envelope.queue_id
        self.envelope = envelope
        self.drop = drop
        self._enc = spoolfmt.encode_envelope(envelope)
        if drop:
            folder = spool.incoming
            self.final_path = os.path.join(spool.incoming, self.queue_id)
        else:
            folder = spool.tmp
            self.final_path = os.path.join(spool.queue, self.queue_id)
        self.replace = False  # DropEntry.rewrite: the owner replaces their own entry
        self.size = 0
        self.eightbit = False
        self._done = False
        self.fd = -1
        qid = self.queue_id
        self.tmp_path = ""
        try:
            if drop:
                self.tmp_path, self.fd = _create_temp(
                    lambda tag: os.path.join(folder, spoolfmt.temp_name(qid, tag)), 0o600
                )
            else:
                self.tmp_path, self.fd = _create_temp(
                    lambda tag: os.path.join(folder, f"{qid}.{tag}"), 0o600
                )
        except OSError as exc:
            raise from_oserror(exc, "creating the spool entry") from None
        try:
            if drop:
                os.fchmod(self.fd, ENTRY_MODE_DROP)
            else:
                spool.give(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._file = open(self.fd, "wb", buffering=256 * 1024, closefd=False)  # noqa: SIM115
            self._file.write(self._enc.data)
        except OSError as exc:
            self.abort()
            raise from_oserror(exc, "writing the spool entry") from None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise from_oserror(exc, "writing the spool entry") from None

    def commit(
        self, eightbit: bool, keep_lock: bool = False, sync_dir: bool = True
    ) -> LockedEntry | DropEntry | None:
        """fsync, rename into place, make the rename durable. Returns the still-locked entry
        when ``keep_lock`` (the caller delivers or hands it on), else closes it."""
        self.eightbit = eightbit
        self.envelope.eightbit = eightbit
        self.envelope.size = self.size
        try:
            self._file.flush()
            digits, body = spoolfmt.patch_size_and_body(self.size, eightbit)
            os.pwrite(self.fd, digits, self._enc.size_offset)
            os.pwrite(self.fd, body, spoolfmt.body_type_offset(self._enc.size_offset))
            os.fsync(self.fd)
            if self.replace:
                os.rename(self.tmp_path, self.final_path)
            else:
                _link_no_replace(self.tmp_path, self.final_path)
            self._done = True
            if self.drop:
                # The submitter cannot open incoming/ to fsync it; fsync of the renamed file
                # commits the rename with it on ext4, xfs and btrfs.
                os.fsync(self.fd)
            elif sync_dir:
                _fsync_dir(self.spool.queue)
            if not self.drop:
                # Due now: the schedule index learns of it before anyone is told it is safe.
                size = len(self._enc.data) + self.size
                spoolindex.note_added(self.spool, self.queue_id, self.envelope.uid, size)
        except OSError as exc:
            if not self._done:
                self.abort()
            if isinstance(exc, FileExistsError):
                raise CantCreateError(f"{self.final_path} already exists") from None
            raise from_oserror(exc, "committing the spool entry") from None
        except MailshimError:
            self.abort()
            raise
        self._file.close()
        if keep_lock:
            if self.drop:
                return DropEntry(self.spool, self.queue_id, self.fd)
            return LockedEntry(self.spool, self.queue_id, self.fd)
        os.close(self.fd)
        self.fd = -1
        return None

    def abort(self) -> None:
        """Remove the half-written entry: nothing is sent, nothing is kept."""
        if self._done:
            return
        self._done = True
        if self.tmp_path:
            _unlink(self.tmp_path)
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1


class _Held:
    """An entry file whose flock this process holds; the envelope is read from the fd.

    One ``pread`` of ``HEAD_READ`` bytes holds the envelope of nearly every entry, and the
    whole file of a small one: such a message is then sent from memory, with no second
    read (a flush of 1000 small entries saved ~10 syscalls each)."""

    def __init__(self, spool: EntrySpool, qid: str, fd: int) -> None:
        self.spool = spool
        self.queue_id = qid
        self.fd = fd
        self._envelope: Envelope | None = None
        self._offset = 0
        self._whole: bytes | None = None  # the entry's bytes, when one read held them all

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
            try:
                head = os.pread(self.fd, HEAD_READ, 0)
            except OSError as exc:
                raise from_oserror(exc, f"reading entry {self.queue_id}") from None
            if len(head) < HEAD_READ:
                self._whole = head  # a short read of a regular file: its end
            if self._whole is not None or b"\n\n" in head:
                env, self._offset = spoolfmt.decode_envelope(io.BytesIO(head))
            else:  # an envelope longer than the first read (thousands of recipients)
                with open(self.fd, "rb", closefd=False) as f:
                    f.seek(0)
                    env, self._offset = spoolfmt.decode_envelope(f)
            if env.queue_id != self.queue_id:
                raise DataError(f"entry {self.queue_id} claims to be {env.queue_id}")
            self._envelope = env
        return self._envelope

    def message(self) -> BinaryIO:
        """A new file object positioned at the first byte of the message."""
        env = self.envelope
        if self._whole is not None:
            total = len(self._whole) - self._offset
            if total == env.size:
                return io.BytesIO(self._whole[self._offset :])
        else:
            total = os.fstat(self.fd).st_size - self._offset
        if total != env.size:
            raise DataError(
                f"entry {self.queue_id}: message is {total} bytes, envelope says {env.size}"
            )
        f = open(os.dup(self.fd), "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self._offset)
        return f

    def headers(self, limit: int = 64 * 1024) -> bytes:
        """The message's header section (without the blank line), at most ``limit`` bytes."""
        with self.message() as f:
            head = f.read(limit)
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 2]
        if head.startswith(b"\r\n"):
            return b""
        cut = head.rfind(b"\r\n")
        return head[: cut + 2] if cut >= 0 else b""

    def release(self) -> None:
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1


class LockedEntry(_Held):
    """An entry in queue/ whose flock this process holds."""

    def quarantine(self, reason: str) -> str:
        """Unreadable: to corrupt/ for a human, the lock held until it is there."""
        return self.bury("corrupt", reason)

    _stateless = False  # state() found no state file: remove() need not unlink one

    def state(self) -> State:
        stored = self.spool.stored_state(self.queue_id)
        # Only the lock holder writes state/<id>, so none can appear while we hold it.
        self._stateless = stored is None
        return stored or State()

    def save_state(self, state: State) -> None:
        self._stateless = False
        self.spool.save_state(self.queue_id, state)

    def remove(self) -> None:
        """Delivered: forget it. The entry goes first, so a crash leaves at worst a stray
        state. The folder is fsynced in batches (``Spool.sync``): a power cut may bring back
        an entry delivered in the last ``SYNC_INTERVAL`` seconds (docs/spool.md)."""
        try:
            os.unlink(os.path.join(self.spool.queue, self.queue_id))
            self.spool._dirty = True
            self.spool.sync()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.release()
                raise from_oserror(exc, "removing a delivered entry") from None
        if not self._stateless:
            _unlink(os.path.join(self.spool.state_dir, self.queue_id))
        spoolindex.note_gone(self.spool, self.queue_id)
        self.release()

    def bury(self, folder: str, reason: str) -> str:
        """Move to dead/ (or corrupt/) with the reason and last state; returns the new path.

        The lock is held until the move is complete. Nothing there is replaced: a name that
        is taken (by a planted or older file) makes the entry go under a fresh id. The state
        gets its new name before the entry leaves queue/, so ``clean_tmp``, which removes a
        state whose entry is gone, can never take it in between."""
        target_dir = self.spool.dead if folder == "dead" else self.spool.corrupt
        src = os.path.join(self.spool.queue, self.queue_id)
        state_path = os.path.join(self.spool.state_dir, self.queue_id)
        try:
            if not os.path.isdir(target_dir):
                _make_dirs(target_dir, 0o700)
            name = self._free_name(target_dir, state_path)
            target = os.path.join(target_dir, name)
            has_state = os.path.lexists(state_path)
            if has_state:
                try:
                    os.link(state_path, target + ".state")
                except FileExistsError:
                    pass  # ours, from a bury a crash interrupted (_free_name checked)
            target = move_no_replace(self.spool, src, folder, name, reason)
            if has_state and not target.endswith(name):
                os.link(state_path, target + ".state")
            _fsync_dir(target_dir)
            _fsync_dir(self.spool.queue)
            # Only once the move is durable: a power cut could otherwise keep the state's
            # removal and lose the move, and the entry, back in queue/ without the state
            # naming its delivered recipients, would go to them again (issue 27).
            if has_state:
                _unlink(state_path)
            spoolindex.note_gone(self.spool, self.queue_id)
        except OSError as exc:
            raise from_oserror(exc, f"moving entry {self.queue_id} to {folder}/") from None
        finally:
            self.release()
        return target

    def _free_name(self, target_dir: str, state_path: str) -> str:
        """The entry's id, unless dead/<id> (or its .state) is another file: then a new id."""
        name = self.queue_id
        pairs = [(os.path.join(self.spool.queue, name), os.path.join(target_dir, name))]
        pairs.append((state_path, os.path.join(target_dir, name + ".state")))
        for mine, there in pairs:
            try:
                theirs = os.lstat(there)
            except FileNotFoundError:
                continue
            try:
                if _same(os.lstat(mine), theirs):
                    continue
            except FileNotFoundError:
                pass
            return new_queue_id()
        return name


class DropEntry(_Held):
    """An entry in incoming/ held by its submitter (their ``sendmail`` or agent).

    The submitter may deliver it and then remove it, or replace it with one listing only the
    recipients still to do; it cannot record state (it may not write state/), so whatever is
    left is the runner's to retry, bounce or expire.
    """

    @property
    def path(self) -> str:
        return os.path.join(self.spool.incoming, self.queue_id)

    def still_here(self) -> bool:
        """The name still refers to the file we hold (nobody replaced or took it)."""
        try:
            return self.fd >= 0 and _same(os.lstat(self.path), os.fstat(self.fd))
        except OSError:
            return False

    def remove(self) -> None:
        """Delivered: unlink it, then fsync the unlinked file, which commits the unlink."""
        if self.still_here():
            try:
                os.unlink(self.path)
                os.fsync(self.fd)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    self.release()
                    raise from_oserror(exc, "removing a delivered entry") from None
        self.release()

    def rewrite(self, recipients: list[str], failed: dict[str, str] | None = None) -> None:
        """Atomically replace the entry by one for ``recipients`` only (same id, same arrival).

        ``failed``: recipients (among ``recipients``) the listener refused while nobody could
        tell the caller, with the reply: the runner bounces them and never sends them again.
        The replacement is a rename over the owner's own entry (the sticky drop folder lets
        nobody else's name be replaced); a stop in between leaves the old or the new one."""
        env = self.envelope
        if not self.still_here():
            self.release()
            return
        new = Envelope(self.queue_id, env.sender, list(recipients), env.arrival, env.uid)
        new.failed = dict(failed or {})
        writer = EntryWriter(self.spool, new, drop=True)
        writer.replace = True
        try:
            with self.message() as body:
                while True:
                    chunk = body.read(COPY_CHUNK)
                    if not chunk:
                        break
                    writer.write(chunk)
            writer.commit(env.eightbit)
        except BaseException:
            writer.abort()
            raise
        finally:
            self.release()

    def poke(self) -> None:
        """Create and remove a name in incoming/ so that a runner watching it looks again."""
        folder = self.spool.incoming
        qid = self.queue_id
        try:
            path, fd = _create_temp(
                lambda tag: os.path.join(folder, spoolfmt.temp_name(qid, tag, "poke")), 0o600
            )
            os.close(fd)
            os.unlink(path)
        except OSError:
            pass


def open_drop_entry(spool: EntrySpool, qid: str, fd: int) -> DropEntry:
    """Adopt a locked drop-folder entry handed over as an open fd (the agent's side).

    ``qid`` "" reads the id from the entry itself, so that it need not be in the agent's
    argv, where every local user can read it in /proc (issue 12, item 5)."""
    if qid == "":
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            qid = spoolfmt.decode_envelope(f)[0].queue_id
    if not spoolfmt.valid_id(qid):
        raise DataError(f"not a queue id: {qid[:40]!r}")
    return DropEntry(spool, qid, fd)
