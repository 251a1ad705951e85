"""Crash states from real traces (issue 27): record, model, enumerate, materialize.

The workloads (tests/test_crash_states.py) run the real ``sendmail`` and ``mailshim`` under
``strace -f -y``; this module turns the trace into a list of file-system operations on the
workload's folder (inodes, names, bytes, fsyncs), then builds the states a power cut could
leave after every prefix of that list, under two models, and writes each as a real folder tree.

Why strace and not an in-process recorder over ``os``: the entries are written through
Python file objects (``open(fd, "wb")``), whose writes go from C straight to ``write(2)`` and
never through ``os.write``; an ``os`` wrapper would miss every byte of every message. strace
sees every system call of every process the command starts (the detached agent included),
with the path behind each descriptor (``-y``) and a timestamp, at the cost of slower runs.

Models (docs/spool.md, "What a power cut can do"):

- ``conservative``: an operation is durable only once an fsync covers it: the file's own
  fsync for its bytes, size and modes; its folder's fsync for a name made, removed or
  renamed in it (a rename is atomic and durable once either folder is fsynced). Operations
  on one file, and the name operations of one folder, stay in order; anything else may be
  lost independently. One documented allowance (docs/spool.md section 2): a process that may
  not read the folder (a user in the drop folder) commits its names there by fsyncing the
  file, which ext4, xfs and btrfs do.
- ``ext4``: ``data=ordered`` with delayed allocation: every metadata operation (names,
  sizes by truncation, modes, owners) reaches the disk in program order, as a prefix, and
  any fsync commits all metadata before it; file bytes are lost independently unless the
  file was fsynced (a rename over an existing file flushes the renamed file's bytes first:
  ``auto_da_alloc``).

Bounds: for each cut point (after every operation), when the number of combinations of the
objects' persisted prefixes exceeds ``limit``, the states tried are: all persisted (what
``kill -9`` leaves), only the durable, each object alone at each of its prefixes with the
others all persisted and with the others all lost, then seeded random combinations up to
``limit``. States with the same tree and the same facts at the cut are checked once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import shutil
import stat
from dataclasses import dataclass, field

STRACE_CALLS = (
    "openat,open,creat,close,write,pwrite64,writev,pwritev,pwritev2,lseek,ftruncate,truncate,"
    "fsync,fdatasync,sync,syncfs,link,linkat,rename,renameat,renameat2,unlink,unlinkat,"
    "mkdir,mkdirat,rmdir,symlink,symlinkat,fchmod,fchmodat,chmod,fchown,fchownat,chown,"
    "lchown,dup,dup2,dup3,fcntl,clone,clone3,fork,vfork,setuid,setgid,setresuid,setresgid,"
    "setreuid,setregid,setfsuid,setfsgid,umask,copy_file_range,sendfile,fallocate,mknod,mknodat"
)


def strace_argv(out: str) -> list[str]:
    return [
        "strace", "-f", "-q", "-y", "-ttt", "-s", "33554432", "-x", "-e", "signal=none",
        "-o", out, "-e", f"trace={STRACE_CALLS}", "--",
    ]  # fmt: skip


# --- the operations -------------------------------------------------------------------------

META = {
    "create",
    "mkdir",
    "symlink",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "trunc",
    "chmod",
    "chown",
}
NAMES = {"create", "mkdir", "symlink", "link", "unlink", "rmdir", "rename"}


class Unmodelled(Exception):
    """A workload made a call the crash model does not cover (a copy_file_range, a
    fallocate, a mknod inside its folder): the trace cannot be turned into crash states, and
    the test fails naming the call rather than check states that miss what it did."""


@dataclass
class Op:
    kind: str  # create mkdir symlink link unlink rmdir rename write trunc chmod chown fsync
    ino: int
    pid: int
    ts: float
    dir: int = -1
    name: str = ""
    dir2: int = -1  # rename: the destination folder
    name2: str = ""
    replaced: int = -1  # rename or link over an existing name: the inode it replaced
    data: bytes = b""
    offset: int = 0
    size: int = 0
    mode: int = 0
    uid: int = -1
    gid: int = -1
    target: str = ""  # symlink
    forced: bool = False  # fsync of a file that also commits its names (drop-folder writer)

    def objects(self) -> list[tuple[str, int]]:
        """What this operation belongs to: ('d', folder) for names, ('f', inode) otherwise."""
        if self.kind == "rename":
            return (
                [("d", self.dir)] if self.dir == self.dir2 else [("d", self.dir), ("d", self.dir2)]
            )
        if self.kind in NAMES:
            return [("d", self.dir)]
        if self.kind == "fsync":
            return []
        return [("f", self.ino)]


@dataclass
class Node:
    kind: str  # f d l
    mode: int
    uid: int
    gid: int
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, int] = field(default_factory=dict)
    target: str = ""

    def copy(self) -> Node:
        return Node(self.kind, self.mode, self.uid, self.gid, bytearray(self.data),
                    dict(self.entries), self.target)  # fmt: skip


class Tree:
    """Inodes by number; inode 0 is the workload's root folder."""

    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes

    def copy(self) -> Tree:
        return Tree({k: v.copy() for k, v in self.nodes.items()})

    def lookup(self, rel: str) -> int | None:
        ino = 0
        for part in [p for p in rel.split("/") if p and p != "."]:
            node = self.nodes.get(ino)
            if node is None or node.kind != "d" or part not in node.entries:
                return None
            ino = node.entries[part]
        return ino

    def apply(self, op: Op, inits: dict[int, Node]) -> None:  # noqa: C901 - one branch per kind
        n = self.nodes

        def node(ino: int) -> Node:
            if ino not in n:
                n[ino] = inits[ino].copy() if ino in inits else Node("f", 0o600, 0, 0)
            return n[ino]

        k = op.kind
        if k in ("create", "mkdir", "symlink", "link"):
            node(op.dir).entries[op.name] = op.ino
            node(op.ino)
        elif k in ("unlink", "rmdir"):
            d = node(op.dir)
            if d.entries.get(op.name) == op.ino:
                del d.entries[op.name]
        elif k == "rename":
            src = node(op.dir)
            if src.entries.get(op.name) == op.ino:
                del src.entries[op.name]
            node(op.dir2).entries[op.name2] = op.ino
        elif k == "write":
            f = node(op.ino)
            end = op.offset + len(op.data)
            if len(f.data) < op.offset:
                f.data.extend(b"\0" * (op.offset - len(f.data)))
            f.data[op.offset : end] = op.data
        elif k == "trunc":
            f = node(op.ino)
            if op.size < len(f.data):
                del f.data[op.size :]
            else:
                f.data.extend(b"\0" * (op.size - len(f.data)))
        elif k == "chmod":
            node(op.ino).mode = op.mode
        elif k == "chown":
            f = node(op.ino)
            if op.uid != -1:
                f.uid = op.uid
            if op.gid != -1:
                f.gid = op.gid

    def digest(self) -> str:
        h = hashlib.sha256()
        seen: dict[int, str] = {}

        def walk(ino: int, path: str) -> None:
            nd = self.nodes[ino]
            if ino in seen and nd.kind != "d":
                h.update(f"L {path} {seen[ino]}\n".encode())
                return
            seen[ino] = path
            h.update(f"{nd.kind} {path} {nd.mode:o} {nd.uid} {nd.gid} {nd.target}\n".encode())
            if nd.kind == "f":
                h.update(hashlib.sha256(nd.data).digest())
            for name in sorted(nd.entries):
                if nd.entries[name] in self.nodes:
                    walk(nd.entries[name], f"{path}/{name}")

        walk(0, "")
        return h.hexdigest()

    def files(self) -> dict[str, bytes]:
        """Every regular file reachable from the root, by relative path."""
        out: dict[str, bytes] = {}

        def walk(ino: int, path: str) -> None:
            nd = self.nodes[ino]
            if nd.kind == "f":
                out[path] = bytes(nd.data)
            for name, child in nd.entries.items():
                if child in self.nodes:
                    walk(child, f"{path}/{name}".lstrip("/"))

        walk(0, "")
        return out

    def write_to(self, root: str) -> None:
        """Make this tree the real folder ``root`` (removed first), hard links included."""
        if os.path.lexists(root):
            shutil.rmtree(root)
        made: dict[int, str] = {}

        def walk(ino: int, path: str) -> None:
            nd = self.nodes[ino]
            if nd.kind == "d":
                os.mkdir(path, 0o700)
            elif ino in made:
                os.link(made[ino], path)
                return
            elif nd.kind == "l":
                os.symlink(nd.target, path)
                made[ino] = path
                return
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, bytes(nd.data))
                os.close(fd)
            made[ino] = path
            for name, child in nd.entries.items():
                if child in self.nodes:
                    walk(child, os.path.join(path, name))
            os.lchown(path, nd.uid, nd.gid)
            os.chmod(path, stat.S_IMODE(nd.mode))

        walk(0, root)


def snapshot(root: str) -> tuple[Tree, dict[tuple[int, int], int]]:
    """The folder ``root`` as a Tree, and the real (dev, inode) -> model inode map."""
    nodes: dict[int, Node] = {}
    ids: dict[tuple[int, int], int] = {}

    def walk(path: str) -> int:
        st = os.lstat(path)
        key = (st.st_dev, st.st_ino)
        if key in ids:
            return ids[key]
        ino = len(nodes)
        ids[key] = ino
        if stat.S_ISDIR(st.st_mode):
            nodes[ino] = Node("d", st.st_mode, st.st_uid, st.st_gid)
            for name in sorted(os.listdir(path)):
                child = os.path.join(path, name)
                cst = os.lstat(child)
                if (
                    stat.S_ISDIR(cst.st_mode)
                    or stat.S_ISREG(cst.st_mode)
                    or stat.S_ISLNK(cst.st_mode)
                ):
                    nodes[ino].entries[name] = walk(child)
        elif stat.S_ISLNK(st.st_mode):
            nodes[ino] = Node("l", st.st_mode, st.st_uid, st.st_gid, target=os.readlink(path))
        else:
            with open(path, "rb") as f:
                nodes[ino] = Node("f", st.st_mode, st.st_uid, st.st_gid, bytearray(f.read()))
        return ino

    walk(root)
    return Tree(nodes), ids


# --- reading strace's output ----------------------------------------------------------------

_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_RET = re.compile(r"^\s*=\s*(-?\d+|0x[0-9a-f]+)(?:<(.*)>)?")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<(.*?)>)?(?:\(deleted\))?$")
_ESC = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "\\": 92, '"': 34, "'": 39, "a": 7, "b": 8}


def unquote(s: str) -> bytes:
    """An strace string argument (quotes and C escapes) as bytes."""
    if s.endswith("..."):
        raise ValueError("strace truncated a string: raise -s")
    body = s[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("latin-1") if ord(c) < 256 else c.encode()
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == "x":
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        elif nxt in _ESC:
            out.append(_ESC[nxt])
            i += 2
        elif nxt.isdigit():
            j = i + 1
            while j < len(body) and j < i + 4 and body[j] in "01234567":
                j += 1
            out.append(int(body[i + 1 : j], 8))
            i = j
        else:
            out.append(ord(nxt))
            i += 2
    return bytes(out)


def split_args(text: str) -> tuple[list[str], str]:
    """The top-level arguments of ``name(`` ... ``)`` and what follows the parenthesis."""
    args: list[str] = []
    cur: list[str] = []
    depth = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            end = j + 1
            if text.startswith("...", end):
                end += 3
            cur.append(text[i:end])
            i = end
            continue
        if c == "<" and depth == 0:
            j = text.index(">", i)
            cur.append(text[i : j + 1])
            i = j + 1
            continue
        if c in "{[(":
            depth += 1
        elif c in "}])":
            if depth == 0:
                if cur or args:
                    args.append("".join(cur).strip())
                return args, text[i + 1 :]
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    raise ValueError(f"unbalanced strace line: {text[:200]}")


def fd_arg(a: str) -> tuple[int | None, str | None]:
    m = _FD.match(a)
    if not m:
        return None, None
    num = -100 if m.group(1) == "AT_FDCWD" else int(m.group(1))
    return num, m.group(2)


@dataclass
class Call:
    pid: int
    ts: float
    name: str
    args: list[str]
    ret: int | None
    ret_path: str | None
    exit: int | None = None  # "+++ exited with N +++"


def parse(path: str) -> list[Call]:
    calls: list[Call] = []
    pending: dict[int, tuple[str, str]] = {}
    with open(path, encoding="latin-1") as f:
        for raw in f:
            m = _LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            pid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
            if rest.startswith("+++ exited with "):
                calls.append(Call(pid, ts, "+exit", [], None, None, int(rest.split()[3])))
                continue
            if rest.startswith("+++") or rest.startswith("---"):
                calls.append(Call(pid, ts, "+exit", [], None, None, -1))
                continue
            if rest.endswith("<unfinished ...>"):
                name, _, args = rest.partition("(")
                pending[pid] = (name, args[: -len("<unfinished ...>")].rstrip())
                continue
            if rest.startswith("<... "):
                name = rest[5:].split()[0]
                tail = rest[rest.index("resumed>") + len("resumed>") :]
                _pname, head = pending.pop(pid, (name, ""))
                text = head + tail
            else:
                name, _, text = rest.partition("(")
            try:
                args, after = split_args(text)
            except (ValueError, IndexError):
                continue
            r = _RET.match(after)
            if not r:
                continue
            val = r.group(1)
            ret = int(val, 16) if val.startswith("0x") else int(val)
            calls.append(Call(pid, ts, name, args, ret, r.group(2)))
    return calls


# --- from calls to operations ---------------------------------------------------------------


class _OFD:
    def __init__(self, ino: int | None, append: bool) -> None:
        self.ino = ino
        self.pos = 0
        self.append = append


@dataclass
class _Proc:
    fds: dict[int, _OFD]
    uid: int = 0
    gid: int = 0
    umask: int = 0o022
    cwd: str = "/"


@dataclass
class Trace:
    root: str
    base: Tree  # the folder before the workload
    ops: list[Op]
    inits: dict[int, Node]  # what each inode created by the workload starts as
    marks: list[tuple[int, str, str]]  # (position, kind, what): acks, stores
    live: Tree  # the folder after the workload (every operation applied)
    contents: dict[int, bytes]  # per op index of name removals: the inode's bytes then

    def acked_at(self, cut: int) -> set[str]:
        return {w for p, k, w in self.marks if k == "ack" and p <= cut}


class Recorder:
    """Turns the calls of several traced commands, one after the other, into one Trace."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.base, _ids = snapshot(self.root)
        self.live = self.base.copy()
        self.next_ino = len(self.base.nodes)
        self.ops: list[Op] = []
        self.inits: dict[int, Node] = {}
        self.marks: list[tuple[int, str, str]] = []
        self.contents: dict[int, bytes] = {}
        self.procs: dict[int, _Proc] = {}
        self.last_ts = 0.0
        self.times: list[float] = []  # ts of each op

    def rel(self, path: str | None, proc: _Proc, base: str | None = None) -> str | None:
        if path is None:
            return None
        if not path.startswith("/"):
            path = os.path.join(base or proc.cwd, path)
        path = os.path.normpath(path)
        if path == self.root:
            return ""
        if path.startswith(self.root + "/"):
            return path[len(self.root) + 1 :]
        return None

    def _emit(self, op: Op) -> None:
        if op.kind in NAMES and op.kind not in ("create", "mkdir", "symlink", "link"):
            self.contents[len(self.ops)] = (
                bytes(self.live.nodes[op.ino].data) if op.ino in self.live.nodes else b""
            )
        self.live.apply(op, self.inits)
        self.ops.append(op)
        self.times.append(op.ts)

    def _parent(self, rel: str) -> tuple[int | None, str]:
        d, _, name = rel.rpartition("/")
        return self.live.lookup(d), name

    def _new(self, kind: str, mode: int, proc: _Proc, parent: int) -> int:
        ino = self.next_ino
        self.next_ino += 1
        pnode = self.live.nodes[parent]
        gid = pnode.gid if pnode.mode & stat.S_ISGID else proc.gid
        if kind == "d" and pnode.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        fmt = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}[kind]
        self.inits[ino] = Node(kind, fmt | mode, proc.uid, gid)
        return ino

    def add(self, trace_file: str, acks: list[str], bs: bool = False) -> int | None:  # noqa: C901
        """Read one command's trace; ``acks``: what its success tells the caller (on exit 0,
        or with ``bs`` on each 250 after a 354 written to stdout). Returns the exit status."""
        calls = parse(trace_file)
        top = calls[0].pid if calls else None
        parents: dict[int, tuple[int, bool]] = {}
        for c in calls:
            if c.name in ("clone", "clone3", "fork", "vfork") and c.ret and c.ret > 0:
                parents[c.ret] = (c.pid, "CLONE_FILES" in " ".join(c.args))
        if top is not None:
            self.procs[top] = _Proc({})
        todo = list(acks)
        status = None
        saw_354 = False
        for c in calls:
            if c.pid not in self.procs:
                ppid, share = parents.get(c.pid, (top, False))
                self._fork(ppid, c.pid, share)
            proc = self.procs[c.pid]
            self.last_ts = c.ts
            if c.name == "+exit":
                if c.pid == top:
                    status = c.exit
                    if c.exit == 0 and not bs:
                        for w in todo:
                            self.marks.append((len(self.ops), "ack", w))
                        todo = []
                continue
            if c.ret is None or c.ret < 0:
                continue
            if bs and c.pid == top and c.name == "write" and c.args and c.args[0].startswith("1"):
                for line in unquote(c.args[1]).split(b"\r\n"):
                    if line.startswith(b"354"):
                        saw_354 = True
                    elif line[:1] in b"2345" and saw_354 and line:
                        saw_354 = False
                        if line.startswith(b"250") and todo:
                            self.marks.append((len(self.ops), "ack", todo.pop(0)))
                        elif todo:
                            todo.pop(0)
                continue
            self._call(c, proc)
            if (
                c.name in ("clone", "clone3", "fork", "vfork")
                and c.ret > 0
                and c.ret not in self.procs
            ):
                self._fork(c.pid, c.ret, parents.get(c.ret, (c.pid, False))[1])
        return status

    def _fork(self, ppid: int | None, pid: int, share: bool) -> None:
        parent = self.procs.get(ppid) if ppid is not None else None
        if parent is None:
            self.procs[pid] = _Proc({})
            return
        fds = parent.fds if share else dict(parent.fds)
        self.procs[pid] = _Proc(fds, parent.uid, parent.gid, parent.umask, parent.cwd)

    def mark(self, ts: float, kind: str, what: str) -> None:
        """A fact known by time (a listener storing a message): placed before the first
        operation that came after it."""
        pos = sum(1 for t in self.times if t < ts)
        self.marks.append((pos, kind, what))

    def _call(self, c: Call, proc: _Proc) -> None:  # noqa: C901 - one branch per call
        name, a = c.name, c.args
        for arg in a:
            if arg.startswith("AT_FDCWD<"):
                proc.cwd = fd_arg(arg)[1] or proc.cwd
        op = lambda kind, ino, **kw: self._emit(Op(kind, ino, c.pid, c.ts, **kw))  # noqa: E731

        def at(dirarg: str, patharg: str) -> str | None:
            _, dpath = fd_arg(dirarg)
            return self.rel(unquote(patharg).decode("utf-8", "surrogateescape"), proc, dpath)

        if name in ("openat", "open", "creat"):
            flags = a[2] if name == "openat" else (a[1] if name == "open" else "O_CREAT|O_TRUNC")
            rel = self.rel(c.ret_path, proc)
            if rel is None and c.ret_path is None:
                rel = at(a[0], a[1]) if name == "openat" else self.rel(unquote(a[0]).decode(), proc)
            ino = self.live.lookup(rel) if rel is not None else None
            if rel is not None and ino is None and "O_CREAT" in flags:
                parent, base = self._parent(rel)
                if parent is not None:
                    mode_arg = a[3] if name == "openat" else a[2] if name == "open" else a[1]
                    mode = int(mode_arg, 8) & ~proc.umask
                    ino = self._new("f", mode, proc, parent)
                    op("create", ino, dir=parent, name=base)
            elif ino is not None and "O_TRUNC" in flags and self.live.nodes[ino].data:
                op("trunc", ino, size=0)
            proc.fds[c.ret] = _OFD(ino, "O_APPEND" in flags)
        elif name == "close":
            proc.fds.pop(fd_arg(a[0])[0] or -1, None)
        elif name in ("dup", "dup2", "dup3") or (name == "fcntl" and "F_DUPFD" in a[1]):
            old = proc.fds.get(fd_arg(a[0])[0] or -1)
            if old is not None:
                proc.fds[c.ret] = old
        elif name in ("write", "pwrite64", "writev", "pwritev", "pwritev2"):
            ofd = proc.fds.get(fd_arg(a[0])[0] or -1)
            if ofd is None or ofd.ino is None:
                return
            if name in ("writev", "pwritev", "pwritev2"):
                bases = re.findall(r'iov_base=("(?:[^"\\]|\\.)*")', a[1])
                data = b"".join(unquote(b) for b in bases)
            else:
                data = unquote(a[1])
            data = data[: c.ret]
            if name.startswith("pwrite"):
                op("write", ofd.ino, offset=int(a[3]), data=data)
                return
            pos = len(self.live.nodes[ofd.ino].data) if ofd.append else ofd.pos
            op("write", ofd.ino, offset=pos, data=data)
            ofd.pos = pos + len(data)
        elif name == "lseek":
            ofd = proc.fds.get(fd_arg(a[0])[0] or -1)
            if ofd is not None:
                ofd.pos = c.ret
        elif name in ("ftruncate", "truncate"):
            if name == "ftruncate":
                ofd = proc.fds.get(fd_arg(a[0])[0] or -1)
                ino = ofd.ino if ofd else None
            else:
                rel = self.rel(unquote(a[0]).decode(), proc)
                ino = self.live.lookup(rel) if rel is not None else None
            if ino is not None:
                op("trunc", ino, size=int(a[1]))
        elif name in ("fsync", "fdatasync"):
            ofd = proc.fds.get(fd_arg(a[0])[0] or -1)
            if ofd is not None and ofd.ino is not None:
                self._emit(Op("fsync", ofd.ino, c.pid, c.ts, uid=proc.uid))
        elif name in ("sync", "syncfs"):
            self._emit(Op("fsync", -1, c.pid, c.ts))
        elif name in ("link", "linkat"):
            src = self.rel(unquote(a[0]).decode(), proc) if name == "link" else at(a[0], a[1])
            dst = self.rel(unquote(a[1]).decode(), proc) if name == "link" else at(a[2], a[3])
            if src is None or dst is None:
                return
            ino = self.live.lookup(src)
            parent, base = self._parent(dst)
            if ino is not None and parent is not None:
                op("link", ino, dir=parent, name=base)
        elif name in ("rename", "renameat", "renameat2"):
            src = self.rel(unquote(a[0]).decode(), proc) if name == "rename" else at(a[0], a[1])
            dst = self.rel(unquote(a[1]).decode(), proc) if name == "rename" else at(a[2], a[3])
            if src is None or dst is None:
                return
            ino = self.live.lookup(src)
            sp, sb = self._parent(src)
            dp, db = self._parent(dst)
            if ino is None or sp is None or dp is None:
                return
            old = self.live.nodes[dp].entries.get(db, -1)
            op("rename", ino, dir=sp, name=sb, dir2=dp, name2=db, replaced=old)
        elif name in ("unlink", "unlinkat", "rmdir"):
            rel = self.rel(unquote(a[0]).decode(), proc) if name != "unlinkat" else at(a[0], a[1])
            if rel is None:
                return
            ino = self.live.lookup(rel)
            parent, base = self._parent(rel)
            if ino is None or parent is None:
                return
            kind = (
                "rmdir"
                if name == "rmdir" or "AT_REMOVEDIR" in (a[2] if len(a) > 2 else "")
                else "unlink"
            )
            op(kind, ino, dir=parent, name=base)
        elif name in ("mkdir", "mkdirat"):
            rel = self.rel(unquote(a[0]).decode(), proc) if name == "mkdir" else at(a[0], a[1])
            if rel is None:
                return
            parent, base = self._parent(rel)
            if parent is None:
                return
            mode = int(a[1] if name == "mkdir" else a[2], 8) & ~proc.umask
            ino = self._new("d", mode, proc, parent)
            op("mkdir", ino, dir=parent, name=base)
        elif name in ("symlink", "symlinkat"):
            rel = self.rel(
                unquote(a[-1]).decode(), proc, fd_arg(a[1])[1] if name == "symlinkat" else None
            )
            if rel is None:
                return
            parent, base = self._parent(rel)
            if parent is None:
                return
            ino = self._new("l", 0o777, proc, parent)
            self.inits[ino].target = unquote(a[0]).decode()
            op("symlink", ino, dir=parent, name=base)
        elif name in ("fchmod", "fchmodat", "chmod"):
            ino = self._target(name, a, proc, at)
            if ino is not None:
                node = self.live.nodes[ino]
                mode_arg = a[1] if name != "fchmodat" else a[2]
                op("chmod", ino, mode=stat.S_IFMT(node.mode) | int(mode_arg, 8))
        elif name in ("fchown", "fchownat", "chown", "lchown"):
            ino = self._target(name, a, proc, at)
            if ino is not None:
                i = 2 if name == "fchownat" else 1
                op("chown", ino, uid=int(a[i]), gid=int(a[i + 1]))
        elif name in ("setuid", "setresuid", "setreuid", "setfsuid"):
            vals = [int(x) for x in a if x.lstrip("-").isdigit()]
            if vals:
                proc.uid = (
                    vals[1] if name in ("setresuid", "setreuid") and vals[1] != -1 else vals[0]
                )
        elif name in ("setgid", "setresgid", "setregid", "setfsgid"):
            vals = [int(x) for x in a if x.lstrip("-").isdigit()]
            if vals:
                proc.gid = (
                    vals[1] if name in ("setresgid", "setregid") and vals[1] != -1 else vals[0]
                )
        elif name == "umask":
            proc.umask = int(a[0], 8)
        elif name in ("copy_file_range", "sendfile", "fallocate", "mknod", "mknodat"):
            ofd = proc.fds.get(fd_arg(a[0])[0] or -1) if name != "mknod" else None
            if (ofd and ofd.ino is not None) or (name.startswith("mknod")):
                raise Unmodelled(f"{name} inside the workload folder")

    def _target(self, name: str, a: list[str], proc: _Proc, at) -> int | None:
        if name in ("fchmod", "fchown"):
            ofd = proc.fds.get(fd_arg(a[0])[0] or -1)
            return ofd.ino if ofd else None
        rel = at(a[0], a[1]) if name.endswith("at") else self.rel(unquote(a[0]).decode(), proc)
        return self.live.lookup(rel) if rel is not None else None

    def trace(self) -> Trace:
        self.marks.sort(key=lambda m: m[0])
        return Trace(
            self.root, self.base, self.ops, self.inits, self.marks, self.live, self.contents
        )


# --- crash states ---------------------------------------------------------------------------


def _drop_allowance(trace: Trace, op: Op, before: int) -> list[tuple[tuple[str, int], int]]:
    """The documented allowance: a process that may not read a folder commits its own name
    operations there on this inode by fsyncing the file. Returns (object, ops covered)."""
    out = []
    for j in range(before - 1, -1, -1):
        o = trace.ops[j]
        if o.ino != op.ino or o.kind not in NAMES or o.pid != op.pid:
            continue
        d = trace.base.nodes.get(o.dir) or trace.inits.get(o.dir)
        if d is not None and op.uid not in (0, d.uid) and not d.mode & 0o004:
            out.append((("d", o.dir), j))
    return out


def _vectors(ranges: list[range], limit: int, rng: random.Random):
    total = 1
    for r in ranges:
        total *= len(r)
        if total > limit:
            break
    if total <= limit:
        yield from itertools.product(*ranges)
        return
    hi = tuple(r[-1] for r in ranges)
    lo = tuple(r[0] for r in ranges)
    seen = {hi, lo}
    yield hi
    yield lo
    for i, r in enumerate(ranges):
        for v in r:
            for basev in (hi, lo):
                vec = (*basev[:i], v, *basev[i + 1 :])
                if vec not in seen:
                    seen.add(vec)
                    yield vec
    tries = 0
    while len(seen) < limit and tries < limit * 4:
        tries += 1
        vec = tuple(rng.choice(r) for r in ranges)
        if vec not in seen:
            seen.add(vec)
            yield vec


@dataclass
class State:
    cut: int
    model: str
    kept: frozenset[int]  # indices of the operations (before the cut) that reached the disk

    @property
    def lost(self) -> int:
        return self.cut - len(self.kept)


def states(trace: Trace, model: str, limit: int = 64, seed: int = 27):
    """Every (bounded) crash state after every prefix of the trace, under ``model``."""
    rng = random.Random(seed)
    ops = trace.ops
    for cut in range(len(ops) + 1):
        if cut and ops[cut - 1].kind == "fsync" and cut < len(ops):
            pass  # durability changes: still a cut worth taking
        yield from _states_at(trace, model, cut, limit, rng)


def _states_at(trace: Trace, model: str, cut: int, limit: int, rng: random.Random):  # noqa: C901
    ops = trace.ops[:cut]
    if model == "conservative":
        lists: dict[tuple[str, int], list[int]] = {}
        dur: dict[tuple[str, int], int] = {}
        for i, op in enumerate(ops):
            if op.kind == "fsync":
                if op.ino == -1:
                    for obj, lst in lists.items():
                        dur[obj] = len(lst)
                    continue
                for obj in (("f", op.ino), ("d", op.ino)):
                    if obj in lists:
                        dur[obj] = len(lists[obj])
                for obj, j in _drop_allowance(trace, op, i):
                    dur[obj] = max(dur.get(obj, 0), lists[obj].index(j) + 1)
                continue
            for obj in op.objects():
                lists.setdefault(obj, []).append(i)
        free = [obj for obj, lst in lists.items() if dur.get(obj, 0) < len(lst)]
        ranges = [range(dur.get(obj, 0), len(lists[obj]) + 1) for obj in free]
        for vec in _vectors(ranges, limit, rng):
            kept = set()
            for lst in lists.values():
                kept.update(lst)
            ok = True
            for obj, k in zip(free, vec, strict=True):
                kept.difference_update(lists[obj][k:])
            # a rename between two folders is all or nothing
            for i in list(kept):
                op = ops[i]
                if op.kind == "rename" and op.dir != op.dir2:
                    a = i in _prefix(lists, free, vec, ("d", op.dir))
                    b = i in _prefix(lists, free, vec, ("d", op.dir2))
                    if a != b:
                        ok = False
                        break
            if ok:
                yield State(cut, model, frozenset(kept))
        return
    # ext4 data=ordered
    meta = [i for i, op in enumerate(ops) if op.kind in META]
    writes: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        if op.kind == "write":
            writes.setdefault(op.ino, []).append(i)
    last_sync = max((i for i, op in enumerate(ops) if op.kind == "fsync"), default=-1)
    mmin = sum(1 for i in meta if i < last_sync)
    dmin: dict[int, int] = {}
    for i, op in enumerate(ops):
        if op.kind == "fsync" and op.ino in writes:
            dmin[op.ino] = sum(1 for j in writes[op.ino] if j < i)
    files = list(writes)
    ranges = [range(mmin, len(meta) + 1)] + [
        range(dmin.get(f, 0), len(writes[f]) + 1) for f in files
    ]
    for vec in _vectors(ranges, limit, rng):
        kept = set(meta[: vec[0]])
        for f, k in zip(files, vec[1:], strict=True):
            need = k
            for i in meta[: vec[0]]:  # auto_da_alloc: a rename over a file flushes its bytes
                op = ops[i]
                if op.kind == "rename" and op.replaced != -1 and op.ino == f:
                    need = max(need, sum(1 for j in writes[f] if j < i))
            kept.update(writes[f][:need])
        yield State(cut, "ext4", frozenset(kept))


def _prefix(lists, free, vec, obj) -> set[int]:
    if obj in free:
        return set(lists[obj][: vec[free.index(obj)]])
    return set(lists[obj])


def build(trace: Trace, state: State) -> Tree:
    tree = trace.base.copy()
    for i in sorted(state.kept):
        tree.apply(trace.ops[i], trace.inits)
    return tree


def durable_only(trace: Trace, model: str, cut: int) -> State:
    """The state at ``cut`` in which nothing but what an fsync made durable reached the disk."""
    return min(_states_at(trace, model, cut, 1, random.Random(0)), key=lambda s: len(s.kept))
