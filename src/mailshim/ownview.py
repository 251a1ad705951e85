"""A user's view of her own messages once the runner has taken them out of the drop folder.

A user submits to the system spool through ``incoming/``; pickup copies each entry into the
private ``queue/`` (mode 0700) under a fresh id, where she can no longer see it, so her
``mailq`` said nothing of a message deferred for hours (issue 23, item 4). The runner now
keeps a small view of each such entry in ``status/<drop id>``: its queue id, envelope and
state (attempts, next try, last error, each recipient's result), written at pickup and at
each deferral, removed once the entry leaves the queue (delivered, refused, bounced).
``status/`` belongs to the runner account, mode 0711: anyone may open a name in it, nobody
but the runner may list it. The name is the drop id the submitter's ``sendmail`` chose,
whose random part (62 bits, ``spoolentry.new_drop_id``) nobody else learns: her
``sendmail`` notes it in her own state folder (``view.<spool>.d/<id>``, an empty file), and
her ``mailq`` opens ``status/<id>`` for each note and forgets the note once neither the drop
folder nor ``status/`` holds the entry. Other users can neither list the folder nor guess a
name; what a status file tells is the submitter's own envelope and state.

A view is not durable (no fsync): a power cut can leave a stale or missing one, which only
makes a listing late; the queue itself is unaffected. ``state/<qid>`` carries the view's
name (``State.view``) so that whoever delivers the entry later finds it.

Trust: the writer runs as the runner (the spool's owner) or root. ``status/`` is reached
through an owner-checked descriptor (``spoolfs.open_folder``), never through a link; a view
is written with O_EXCL under a random temp name and renamed into place relative to that
descriptor, and root gives it to the spool's owner. The name comes from ``incoming/`` and is
used only when it is a queue id (20 characters of [0-9A-Z]). The reader runs as the user: it
reads only a plain file with one link, owned by root or the spool's owner, of bounded size,
whose envelope names her uid and her drop id; anything else is ignored. Her notes live in a
folder of hers that nobody else may write (as ``dropagent``'s).

Raises nothing: a view that cannot be written, removed or read is skipped (the message is
safe in the queue either way).
"""

from __future__ import annotations

import os
import stat

from mailshim import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.spool import Spool
    from mailshim.spoolentry import EntrySpool
    from mailshim.spoolfmt import Envelope, State

FOLDER = "status"
CONFIG_COPY = "config.toml"  # status/config.toml: the runner's copy of the last valid system file
MODE = 0o711  # enter, not list: a view is found only by its name
VIEW_MAGIC = "MAILSHIM-VIEW 1"
MAX_VIEW = 1024 * 1024
NOTES_KEPT = 90 * 86400.0  # a note whose entry cannot be found is forgotten after this
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NOCTTY", 0) | os.O_NONBLOCK


# --- the user's notes (the sendmail side: no imports beyond paths) ---------------------------


def _key(root: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else f"%{ord(c):02x}" for c in root)


def _notes(root: str, create: bool) -> str | None:
    """The user's notes folder for ``root``, when it is hers alone; else None."""
    folder = paths.user_state_dir()
    path = os.path.join(folder, f"view.{_key(root)}.d")
    try:
        if create:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        for name in (folder, path):
            st = os.lstat(name)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
    except OSError:
        return None
    return path


def note(root: str, drop_id: str) -> None:
    """Remember ``drop_id`` as this user's submission to ``root``'s drop folder (every
    delivery mode: background, queue, sealed), so that her ``mailq`` can find it later."""
    folder = _notes(root, create=True)
    if folder is None:
        return
    try:
        os.close(
            os.open(os.path.join(folder, drop_id), os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW, 0o600)
        )
    except OSError:
        pass


def noted(root: str) -> list[tuple[str, float]]:
    """(drop id, when noted) of this user's notes for ``root``."""
    folder = _notes(root, create=False)
    if folder is None:
        return []
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        try:
            out.append((name, os.lstat(os.path.join(folder, name)).st_mtime))
        except OSError:
            continue
    return sorted(out)


def forget(root: str, drop_id: str) -> None:
    folder = _notes(root, create=False)
    if folder is not None:
        try:
            os.unlink(os.path.join(folder, drop_id))
        except OSError:
            pass


# --- the runner's side -----------------------------------------------------------------------


def _owner(root: str) -> tuple[int, int] | None:
    """The spool's owner: that of its ``queue/`` (as ``Spool.owner``)."""
    try:
        st = os.lstat(os.path.join(root, "queue"))
    except OSError:
        return None
    return st.st_uid, st.st_gid


def _folder(root: str, create: bool) -> int | None:
    """``status/`` as a descriptor (owner-checked, never a link), or None when there is none
    and this process may not make it (the runner account under root's spool root: only
    ``setup-spool`` makes it there)."""
    from mailshim.spoolfs import open_folder

    path = os.path.join(root, FOLDER)
    if create and not os.path.lexists(path):
        try:
            os.mkdir(path, MODE)
        except OSError:
            return None
    own = _owner(root)
    try:
        fd = open_folder(path, {own[0]} if own else set())
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if own is not None and os.geteuid() == 0 and st.st_uid != own[0]:
            os.fchown(fd, own[0], own[1])  # made just now by root: the runner's
        if stat.S_IMODE(st.st_mode) != MODE and st.st_uid == os.geteuid():
            os.fchmod(fd, MODE)  # mkdir's mode went through the umask
    except OSError:
        pass
    return fd


def enabled(target: Spool) -> bool:
    """Views are kept for this spool: it has a drop folder, and ``status/`` exists or can be
    made by this process."""
    if not target.has_incoming():
        return False
    fd = _folder(target.root, create=True)
    if fd is None:
        return False
    os.close(fd)
    return True


def encode(env: Envelope, state: State, drop_id: str) -> bytes:
    import json

    from mailshim import spoolfmt

    head = {
        "format": VIEW_MAGIC,
        "id": env.queue_id,
        "drop": drop_id,
        "arrival": env.arrival,
        "uid": env.uid,
        "size": env.size,
        "sender": env.sender,
        "recipients": env.recipients,
    }
    line = json.dumps(head, ensure_ascii=True, sort_keys=True).encode() + b"\n"
    return line + spoolfmt.encode_state(state)


def publish(target: EntrySpool, env: Envelope, state: State) -> None:
    """Write (or replace) the view ``status/<state.view>`` of the locked entry ``env``."""
    from mailshim import spoolfmt

    name = state.view
    if not spoolfmt.valid_id(name):
        return
    fd = _folder(target.root, create=False)
    if fd is None:
        return
    try:
        _replace(fd, name, encode(env, state, name), target.root)
    finally:
        os.close(fd)


def publish_config(root: str, source: str) -> bool:
    """Copy the system configuration ``source``, which the caller has just loaded and
    validated, to ``status/config.toml`` when it differs, for users whose ``sendmail`` finds
    the file broken later and never read it while it was good (configload.load_or_fallback:
    their mail is then addressed as the last valid file said, not with the defaults). Only
    a file everyone may read is copied (the copy tells nobody more than the file does; relay
    secrets live in ``password_file``), and only bytes that validate again here."""
    from mailshim import configload
    from mailshim.errors import ConfigError

    try:
        fd = os.open(source, _READ)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IROTH:
                return False
            raw = os.read(fd, MAX_VIEW + 1)
        finally:
            os.close(fd)
    except OSError:
        return False
    if len(raw) > MAX_VIEW:
        return False
    try:
        configload.check_bytes(raw, source)
    except ConfigError:
        return False  # changed since it was loaded: the next run copies it once it is valid
    dir_fd = _folder(root, create=False)
    if dir_fd is None:
        return False
    try:
        try:
            old = os.open(CONFIG_COPY, _READ, dir_fd=dir_fd)
            try:
                if os.read(old, MAX_VIEW + 1) == raw:
                    return False
            finally:
                os.close(old)
        except OSError:
            pass
        return _replace(dir_fd, CONFIG_COPY, raw, root)
    finally:
        os.close(dir_fd)


def _replace(dir_fd: int, name: str, data: bytes, root: str) -> bool:
    """``name`` in the folder ``dir_fd`` holds ``data`` (mode 0644): written under a fresh
    temp name (O_EXCL) and renamed over it, never through a link; root's goes to the owner."""
    from mailshim.spoolfs import _tag

    for _ in range(8):
        tmp = f".{name}.{_tag()}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
            out = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
        except OSError:
            return False
    else:
        return False
    try:
        own = _owner(root)
        if own is not None and os.geteuid() == 0 and own[0] != 0:
            os.fchown(out, own[0], own[1])
        os.fchmod(out, 0o644)
        os.write(out, data)
    except OSError:
        os.close(out)
        _unlink(dir_fd, tmp)
        return False
    os.close(out)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        _unlink(dir_fd, tmp)
        return False
    return True


def withdraw(target: EntrySpool, state: State) -> None:
    """The entry has left the queue: remove its view."""
    from mailshim import spoolfmt

    if not spoolfmt.valid_id(state.view):
        return
    fd = _folder(target.root, create=False)
    if fd is not None:
        _unlink(fd, state.view)
        os.close(fd)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


# --- the user's reading ----------------------------------------------------------------------


def exists(root: str) -> bool:
    """``root`` keeps views (its runner writes them)."""
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(root, FOLDER)).st_mode)
    except OSError:
        return False


def read(root: str, drop_id: str) -> tuple[Envelope, State] | None:
    """This user's view ``status/<drop_id>``, or None (none, not hers, or unreadable)."""
    import json

    from mailshim import spoolfmt
    from mailshim.errors import DataError

    if not spoolfmt.valid_id(drop_id):
        return None
    try:
        owners = {0, os.lstat(os.path.join(root, "queue")).st_uid}
        fd = os.open(os.path.join(root, FOLDER, drop_id), _READ)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in owners:
            return None
        raw = os.read(fd, MAX_VIEW + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_VIEW:
        return None
    head, _, rest = raw.partition(b"\n")
    try:
        data = json.loads(head.decode("utf-8"))
        state = spoolfmt.decode_state(rest)
    except (UnicodeDecodeError, ValueError, RecursionError, DataError):
        return None
    if not isinstance(data, dict) or data.get("format") != VIEW_MAGIC:
        return None
    qid, rcpts, sender = data.get("id"), data.get("recipients"), data.get("sender")
    numbers = [data.get(k) for k in ("arrival", "uid", "size")]
    counts = [n for n in numbers if isinstance(n, int) and not isinstance(n, bool) and n >= 0]
    if (
        data.get("drop") != drop_id
        or not isinstance(qid, str)
        or not spoolfmt.valid_id(qid)
        or not isinstance(sender, str)
        or not isinstance(rcpts, list)
        or not all(isinstance(r, str) for r in rcpts)
        or len(counts) != len(numbers)
    ):
        return None
    arrival, uid, size = counts
    if uid != os.geteuid():
        return None  # not hers: a name she reused, or not meant for her
    env = spoolfmt.Envelope(qid, sender, rcpts, arrival, uid, size=size)
    return env, state
