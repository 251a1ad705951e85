"""What a power cut can do to the spool (issue 27): every workload's crash states, recovered.

Each workload runs the real ``sendmail``/``mailshim`` under ``strace -f -y`` against a real
listener (tests/crashsim.py says why strace); the trace gives the states a power cut could
leave after every prefix of it, under the conservative and the ext4 ``data=ordered`` models.
Each distinct state is written as a real folder tree in place of the workload's, what the
install runs next (``mailshim run``, then a flush, as the runner; ``sendmail -q`` for a
per-user spool) runs against a healthy listener, and the invariants are checked:

- every message whose submitter was told success (exit 0, or a 250 in ``-bs``) is delivered
  to each recipient (before the cut or after), or in ``dead/`` with its bounce, or held; every
  copy delivered is byte-exact (headers and body, ``Received`` lines aside);
- nothing is delivered that is not a complete submitted message or a bounce of one;
- a message delivered before the cut is delivered again only while the record of that
  delivery (the entry's removal or its state) was not yet durable and would have been at
  the runner's next fsync (docs/spool.md section 5, windows 1 and 3): never after;
- no state stops the queue: the recovery exits 0 without a traceback, ``queue/`` and
  ``incoming/`` end empty (held mail aside), and nothing acknowledged is in ``corrupt/``.

CI checks a bounded, evenly spread sample of the distinct states per workload
(``CI_STATES``); ``make crash-states`` (MAILSHIM_CRASH_STATES=all) checks them all and,
with MAILSHIM_CRASH_REPORT=FILE, appends one JSON line of figures per workload.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import crashsim as cs
from conftest import Listener, RecordingHandler, free_port, others_can_run, tool
from mailshim import spoolindex

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners of the materialized trees)"),
]

FULL = os.environ.get("MAILSHIM_CRASH_STATES") == "all"
# "count": the full set's figures, recovering only the state with everything kept
COUNT = os.environ.get("MAILSHIM_CRASH_STATES") == "count"
CI_STATES = 8  # distinct crash states recovered per workload in the default run
LIMIT = 64 if FULL or COUNT else 12  # combinations tried per cut point (crashsim: "Bounds")
SAMPLE = None if FULL else 0 if COUNT else CI_STATES
RUNNER, ALICE = "mshcrash-run", "mshcrash-a"


class TimedHandler(RecordingHandler):
    """Records when each message was stored, to place it in the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            self.times.append(time.time())
        return reply


def message(token: str) -> bytes:
    return f"Subject: crash {token}\nFrom: alice@example.org\n\nbody of {token}\nline 2\n".encode()


@dataclass
class Msg:
    token: str
    rcpts: list[str]


@dataclass
class Workload:
    name: str
    root: Path
    listener: Listener
    spool: str = "spool"  # relative to root
    runner: tuple[int, int] | None = None  # uid, gid of the recovery (None: root)
    user_spool: tuple[int, int] | None = None  # recovery is that user's `sendmail -q`
    env: dict[str, str] = field(default_factory=dict)
    homes: dict[tuple[int, int], Path] = field(default_factory=dict)  # HOME per user
    msgs: dict[str, Msg] = field(default_factory=dict)
    may_hold: bool = False  # entries may wait in queue/ after recovery (limits, hold)
    setup_ack: str = ""  # the folders setup-spool made must survive its ack
    releases: dict[str, int] = field(default_factory=dict)  # token: first op of its release
    deletes: dict[str, int] = field(default_factory=dict)  # token: first op of its deletion
    # what the install runs before the runner when the command that makes the spool may not
    # have finished: the next submission, or setup-spool again (both complete a half spool)
    first: list[tuple[list[str], tuple[int, int] | None, bytes]] = field(default_factory=list)
    rec: cs.Recorder | None = None
    n: int = 0

    def config(self, body: str) -> None:
        (self.root / "config.toml").write_text(textwrap.dedent(body))
        os.chmod(self.root / "config.toml", 0o644)

    def base_config(
        self, mode: str = "queue", queue: str = "", extra: str = "", spool: str | None = None
    ) -> None:
        qdir = f'dir = "{self.root / (spool or self.spool)}"' if spool != "" else ""
        self.config(
            f"""
            [relay]
            host = "127.0.0.1"
            port = {self.listener.port}
            timeout = 5
            helo = "client.example.org"
            [addresses]
            domain = "example.org"
            [queue]
            {qdir}
            retry = ["1h"]
            {queue}
            [delivery]
            mode = "{mode}"
            {extra}
            """
        )

    def argv(self, argv: list[str], user: tuple[int, int] | None) -> list[str]:
        if user is None:
            return argv
        uid, gid = user
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]

    def environ(self, user: tuple[int, int] | None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "MAILSHIM_CONFIG": str(self.root / "config.toml"),
            "MAILSHIM_NO_SYSLOG": "1",
            "LANG": "C.UTF-8",
            "HOME": str(self.root / "home"),
        }
        env.update(self.env)
        if user in self.homes:
            env["HOME"] = str(self.homes[user])
        return env

    def plain(self, argv: list[str], user=None, input: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(argv, user), input=input, capture_output=True, env=self.environ(user),
            timeout=120, cwd="/",
        )  # fmt: skip

    def submit(
        self, *rcpts: str, user=None, token=None, traced: bool = True, args=(), until=None,
        sender: str = "alice@example.org",
    ) -> str:  # fmt: skip
        """One message by ``sendmail`` (traced, or before the snapshot: then acknowledged at
        the start of the trace)."""
        self.n += 1
        token = token or f"{self.name.replace('-', '')}{self.n}"
        argv = [tool("sendmail"), *args, "-f", sender, *rcpts]
        self.msgs[token] = Msg(token, list(rcpts))
        if traced:
            r = self.traced(argv, user, message(token), acks=[token], until=until)
        else:
            r = self.plain(argv, user, message(token))
            self.pre_acked.append(token)
        assert r.returncode == 0, r.stderr.decode()
        return token

    pre_acked: list[str] = field(default_factory=list)

    def start(self) -> None:
        """Everything before this is the pre-workload tree."""
        self.listener.handler.messages.clear()
        self.listener.handler.times.clear()
        self.rec = cs.Recorder(str(self.root))
        for token in self.pre_acked:
            self.rec.marks.append((0, "ack", token))

    def traced(
        self, argv, user=None, input: bytes = b"", acks=(), bs=False, until=None
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` under strace. ``until``: a condition after which the agents the
        command left lingering are stopped (SIGKILL: what a power cut does to them too)."""
        assert self.rec is not None, "start() first"
        out = tempfile.mktemp(prefix="mailshim-strace-")
        try:
            if until is None:
                r = subprocess.run(
                    cs.strace_argv(out) + self.argv(argv, user), input=input, capture_output=True,
                    env=self.environ(user), timeout=180, cwd="/",
                )  # fmt: skip
            else:
                proc = subprocess.Popen(
                    cs.strace_argv(out) + self.argv(argv, user), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.environ(user), cwd="/",
                )  # fmt: skip
                proc.stdin.write(input)
                proc.stdin.close()
                proc.stdin = None
                deadline = time.monotonic() + 60
                while not until() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)  # what the agent does right after: in the trace too
                _stop_agents(self.root)
                stdout, stderr = proc.communicate(timeout=60)
                r = subprocess.CompletedProcess(argv, 0, stdout, stderr)
            status = self.rec.add(out, list(acks), bs=bs)
        finally:
            if os.path.exists(out):
                os.unlink(out)
        if until is None:
            assert status == r.returncode, (status, r.returncode, r.stderr.decode())
        r.returncode = status
        return r

    def finish(self) -> cs.Trace:
        assert self.rec is not None
        h = self.listener.handler
        for msg, t in zip(h.messages, h.times, strict=True):
            kind, token = identify(msg.mail_from, msg.data)
            for rcpt in msg.rcpt_tos:
                self.rec.mark(t, "store", f"{kind}|{token}|{rcpt}")
        return self.rec.trace()


def identify(mail_from: str, data: bytes) -> tuple[str, str]:
    m = re.search(rb"crash (\w+)", data)
    token = m.group(1).decode() if m else "?"
    kind = "bounce" if mail_from in ("", "<>") else "msg"
    return kind, token


def strip_received(data: bytes) -> bytes:
    head, sep, body = data.partition(b"\r\n\r\n")
    keep = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and keep and keep[-1] is None:
            continue
        if line.lower().startswith((b"received:", b"x-authentication-warning:")):
            keep.append(None)
            continue
        keep.append(line)
    return b"\r\n".join(x for x in keep if x is not None) + sep + body


# --- the checks -----------------------------------------------------------------------------


@dataclass
class Facts:
    """What was true at a cut, for every state of it: the check depends on nothing else."""

    acked: frozenset[str]
    stored: tuple[str, ...]  # "kind|token|rcpt" stored before the cut (repeats kept)
    may_repeat: frozenset[str]  # stored keys whose record was not yet durable, but would be
    holding: frozenset[str] = frozenset()  # tokens whose hold was acknowledged, no release begun
    deleting: frozenset[str] = frozenset()  # tokens whose deletion had begun (may be gone)


def durable_after(trace: cs.Trace, model: str, i: int) -> int | None:
    """The first cut at which operation ``i`` is durable under ``model`` (None: never)."""
    op = trace.ops[i]
    objs = {o[1] for o in op.objects()}
    for j in range(i + 1, len(trace.ops)):
        f = trace.ops[j]
        if f.kind != "fsync":
            continue
        if model == "ext4" or f.ino == -1 or f.ino in objs:
            return j + 1
        if any(o[1] in objs and k == i for o, k in cs._drop_allowance(trace, f, j)):
            return j + 1
    return None


def record_ops(trace: cs.Trace, spool: str) -> list[tuple[int, str, bool]]:
    """Name removals of queue and drop entries, and state saves: (op, token, is a bounce)."""
    folders = {trace.live.lookup(f"{spool}/{d}") for d in ("queue", "incoming")}
    state_dir = trace.live.lookup(f"{spool}/state")
    names: dict[str, tuple[str, bool]] = {}
    for p, content in trace.base.files().items():
        d, _, name = p.rpartition("/")
        m = re.search(rb"crash (\w+)", content)
        if m and d in (f"{spool}/queue", f"{spool}/incoming"):
            names[name] = (m.group(1).decode(), b"multipart/report" in content)
    out = []
    for i, op in enumerate(trace.ops):
        data = trace.contents.get(i)
        if (
            op.kind in ("link", "rename")
            and (op.dir2 if op.kind == "rename" else op.dir) in folders
        ):
            node = trace.live.nodes.get(op.ino)
            content = data if data is not None else (bytes(node.data) if node else b"")
            m = re.search(rb"crash (\w+)", content)
            if m:
                names[op.name2 or op.name] = (m.group(1).decode(), b"multipart/report" in content)
        if op.kind in ("unlink", "rename") and op.dir in folders and data:
            m = re.search(rb"crash (\w+)", data)
            if m:
                out.append((i, m.group(1).decode(), b"multipart/report" in data))
        if op.kind == "rename" and op.dir2 == state_dir and op.name2 in names:
            out.append((i, *names[op.name2]))
    return out


def facts_at(
    trace: cs.Trace,
    model: str,
    cut: int,
    records,
    cache: dict,
    releases: dict[str, int],
    deletes: dict[str, int] | None = None,
) -> Facts:
    key = (model, cut)
    if key not in cache:
        stored = tuple(w for p, k, w in trace.marks if k == "store" and p <= cut)
        repeat = set()
        for w in set(stored):
            kind, token, _ = w.split("|")
            pos = max(p for p, k, x in trace.marks if k == "store" and x == w and p <= cut)
            rec = [i for i, t, b in records if t == token and b == (kind == "bounce") and i >= pos]
            d = durable_after(trace, model, rec[0]) if rec else None
            if d is not None and cut < d:
                repeat.add(w)
            elif d is None:
                repeat.add("never|" + w)
        acked = frozenset(trace.acked_at(cut))
        holding = frozenset(
            a[5:] for a in acked if a.startswith("hold:") and cut <= releases.get(a[5:], cut)
        )
        deleting = frozenset(t for t, first in (deletes or {}).items() if cut > first)
        cache[key] = Facts(acked, stored, frozenset(repeat), holding, deleting)
    return cache[key]


class Checker:
    def __init__(self, wl: Workload, trace: cs.Trace) -> None:
        self.wl = wl
        self.trace = trace
        self.reference: dict[str, bytes] = {}  # token -> delivered bytes, Received aside
        base_files = trace.base.files()
        self.base_dead = {
            m.group(1).decode()
            for p, d in base_files.items()
            if p.startswith(f"{wl.spool}/dead/") and (m := re.search(rb"crash (\w+)", d))
        }
        h = wl.listener.handler
        for msg in h.messages:
            kind, token = identify(msg.mail_from, msg.data)
            if kind == "msg":
                self.reference.setdefault(token, strip_received(msg.data))
        self.final_dirs = {p: v for p, v in _dirs(trace.live).items() if p.startswith(wl.spool)}

    def run(self, facts: Facts, tree: cs.Tree) -> list[str]:
        wl = self.wl
        bad: list[str] = []
        if wl.setup_ack and wl.setup_ack in facts.acked:
            have = _dirs(tree)
            for p, want in self.final_dirs.items():
                if have.get(p) != want:
                    bad.append(f"setup-spool said done, but {p} is {have.get(p)} not {want}")
            if bad:
                return bad
        twice = _picked_twice(tree, wl.spool)
        tree.write_to(str(wl.root))
        _trust_index(wl.root / wl.spool)
        h = wl.listener.handler
        h.messages.clear()
        h.times.clear()
        h.rcpt_replies.clear()
        h.data_reply = h.mail_reply = None
        if wl.user_spool is not None:
            steps = [[tool("sendmail"), "-q"]]
            who = wl.user_spool
        else:
            steps = [[tool("mailshim"), "run"], [tool("mailshim"), "flush"]]
            who = wl.runner
        for argv, user, data in wl.first:
            self.reference.pop("next", None)  # a new submission each time: its own Date
            r = wl.plain(argv, user, data)
            if r.returncode != 0:
                bad.append(f"{argv[-1]} exited {r.returncode}: {r.stderr.decode()[-300:]}")
        for argv in steps:
            r = wl.plain(argv, who)
            err = r.stderr.decode("utf-8", "replace")
            if r.returncode != 0 or "Traceback" in err:
                bad.append(f"{' '.join(argv[-1:])} exited {r.returncode}: {err.strip()[-300:]}")
        bad += self.check(facts, [(m.mail_from, m.rcpt_tos, m.data) for m in h.messages], twice)
        return bad

    def check(  # noqa: C901
        self, facts: Facts, got: list[tuple[str, list[str], bytes]], twice: set[str] = frozenset()
    ) -> list[str]:
        wl = self.wl
        bad: list[str] = []
        files = cs.snapshot(str(wl.root))[0].files()
        where: dict[str, set[str]] = {}
        for p, data in files.items():
            parts = p.split("/")
            if len(parts) < 2 or parts[-2] not in ("queue", "dead", "corrupt", "incoming"):
                continue
            if not p.startswith(wl.spool + "/"):
                continue
            if p.endswith((".reason", ".state")) or parts[-1].startswith("."):
                continue
            m = re.search(rb"crash (\w+)", data)
            if m:
                kind = "bounce" if b"multipart/report" in data else "msg"
                where.setdefault(f"{kind}|{m.group(1).decode()}", set()).add(parts[-2])
                if kind == "msg" and parts[-2] == "queue":
                    token = m.group(1).decode()
                    if not data.endswith(
                        message(token).replace(b"\n", b"\r\n").split(b"\r\n\r\n", 1)[1]
                    ):
                        bad.append(f"{token} is queued but not byte-exact")
        delivered = Counter(facts.stored)
        after = Counter()
        for mail_from, rcpts, data in got:
            kind, token = identify(mail_from, data)
            if token not in wl.msgs:
                bad.append(f"delivered something never submitted: {data[:80]!r}")
                continue
            if kind == "msg":
                clean = strip_received(data)
                ref = self.reference.setdefault(token, clean)
                want = message(token).replace(b"\n", b"\r\n").split(b"\r\n\r\n", 1)[1]
                if clean != ref or not clean.endswith(b"\r\n\r\n" + want):
                    bad.append(f"{token} delivered but not byte-exact: {clean[-120:]!r}")
            elif b"multipart/report" not in data:
                bad.append(f"a bounce of {token} that is not a report")
            for r in rcpts:
                after[f"{kind}|{token}|{r}"] += 1
        for key, n in after.items():
            if n > 1 and not (n == 2 and key.split("|")[1] in twice and key not in delivered):
                bad.append(f"{key} delivered {n} times by the recovery alone")
            if key in delivered:
                if key in facts.may_repeat:
                    continue
                why = "never durable" if "never|" + key in facts.may_repeat else "durable"
                bad.append(f"{key} delivered before the cut and again after it (record {why})")
        for token in facts.acked:
            if token not in wl.msgs:
                continue  # an administrator's command, checked above
            places = where.get(f"msg|{token}", set())
            if f"delete:{token}" in facts.acked:
                if places & {"queue", "incoming"} or any(
                    k.startswith(f"msg|{token}|") for k in after
                ):
                    bad.append(
                        f"{token} still queued or delivered though its deletion was acknowledged"
                    )
                continue
            if token in facts.deleting:
                if "corrupt" in places:
                    bad.append(f"{token}, being deleted, went to corrupt/")
                continue  # the administrator asked: gone or still there, both are right
            if f"requeue:{token}" in facts.acked and places == {"dead"}:
                bad.append(f"{token} still dead though its requeue was acknowledged")
            if "corrupt" in places:
                bad.append(f"acknowledged {token} went to corrupt/")
            if "incoming" in places:
                bad.append(f"{token} still in incoming/ after the recovery")
            if token in facts.holding and any(k.startswith(f"msg|{token}|") for k in after):
                bad.append(f"{token} delivered though its hold was acknowledged")
            if "queue" in places and f"release:{token}" in facts.acked:
                bad.append(f"{token} still held though its release was acknowledged")
            elif "queue" in places and not wl.may_hold:
                bad.append(f"{token} still queued after a flush to a healthy listener")
            if places & {"dead", "queue"}:
                if "dead" in places and token not in self.base_dead and wl.msgs[token].rcpts:
                    bounced = any(
                        k.startswith(f"bounce|{token}|") for k in list(delivered) + list(after)
                    ) or "queue" in where.get(f"bounce|{token}", set())
                    if not bounced:
                        bad.append(f"{token} is in dead/ but its bounce is nowhere")
                continue
            for r in wl.msgs[token].rcpts:
                k = f"msg|{token}|{r}"
                if not delivered[k] and not after[k]:
                    bad.append(f"acknowledged {token} lost for {r}")
        return bad


def _trust_index(spool: Path) -> None:
    """Make the materialized spool's folders look as the schedule index and its journal last
    accounted for them (docs/spool.md section 9): the worst case, in which the runner trusts
    the index as it is on disk (a journal line lost in the same clock tick as the change it
    recorded), so a state the index does not show must still be delivered or kept."""
    folder = spool / "state" / "schedule"
    last: tuple[int, int] | None = None
    try:
        with open(folder / "index", "r+b") as f:
            head = f.readline()
            words = head.split()
            if words[:1] == [b"MAILSHIM-SCHEDULE"]:
                last = (int(words[5]), int(words[6]))
            # the recovery runs after a reboot: the index was written in the boot before
            boot = spoolindex.this_boot().encode()
            if boot != b"-" and boot in head:
                f.seek(0)
                f.write(head.replace(boot, b"0" * len(boot)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(folder / "journal", "rb") as f:
            for raw in f:
                words = raw.split()
                if raw.endswith(b"\n") and len(words) >= 4 and words[0] in (b"+", b"=", b"-"):
                    last = (int(words[-2]), int(words[-1]))
    except (OSError, ValueError):
        pass
    if last is not None and (spool / "queue").is_dir() and (spool / "state").is_dir():
        os.utime(spool / "queue", ns=(last[0], last[0]))
        os.utime(spool / "state", ns=(last[1], last[1]))


def _picked_twice(tree: cs.Tree, spool: str) -> set[str]:
    """Tokens both in incoming/ and, as pickup's copy, in queue/: docs/spool.md section 5,
    window 4 (the next pickup copies the original again)."""
    seen: dict[str, set[str]] = {}
    for p, data in tree.files().items():
        d = p.rpartition("/")[0]
        m = re.search(rb"crash (\w+)", data)
        if m and d in (f"{spool}/incoming", f"{spool}/queue"):
            seen.setdefault(m.group(1).decode(), set()).add(d)
    return {t for t, ds in seen.items() if len(ds) == 2}


def _dirs(tree: cs.Tree) -> dict[str, tuple[int, int, int]]:
    out = {}

    def walk(ino: int, path: str) -> None:
        nd = tree.nodes[ino]
        if nd.kind == "d":
            out[path] = (nd.mode & 0o7777, nd.uid, nd.gid)
            for name, child in nd.entries.items():
                if child in tree.nodes:
                    walk(child, f"{path}/{name}".lstrip("/"))

    walk(0, "")
    return out


# --- exploring ------------------------------------------------------------------------------


@dataclass
class Figures:
    workload: str
    ops: int = 0
    fsyncs: int = 0
    generated: dict[str, int] = field(default_factory=dict)
    distinct: int = 0
    checked: int = 0
    violations: list[str] = field(default_factory=list)


def explore(wl: Workload, trace: cs.Trace, sample: int | None) -> Figures:
    fig = Figures(wl.name, len(trace.ops), sum(op.kind == "fsync" for op in trace.ops))
    records = record_ops(trace, wl.spool)
    if os.environ.get("MAILSHIM_CRASH_DEBUG"):
        for i, op in enumerate(trace.ops):
            print(i, op.kind, op.ino, op.dir, op.name, op.dir2, op.name2, len(op.data), op.pid)
        print(trace.marks, records)
    cache: dict = {}
    distinct: dict[tuple, tuple[cs.State, cs.Tree, Facts]] = {}
    for model in ("conservative", "ext4"):
        n = 0
        for st in cs.states(trace, model, LIMIT):
            n += 1
            tree = cs.build(trace, st)
            facts = facts_at(trace, model, st.cut, records, cache, wl.releases, wl.deletes)
            key = (tree.digest(), facts.acked, facts.stored, facts.may_repeat)
            distinct.setdefault(key, (st, tree, facts))
        fig.generated[model] = n
    fig.distinct = len(distinct)
    chosen = list(distinct.values())
    chosen.sort(key=lambda x: (x[0].cut, x[0].model, len(x[0].kept)))
    checker = Checker(wl, trace)
    # the state every operation reached first: it also gives the reference bytes
    final = cs.State(len(trace.ops), "all", frozenset(range(len(trace.ops))))
    ffacts = facts_at(trace, "conservative", final.cut, records, cache, wl.releases, wl.deletes)
    todo = [(final, cs.build(trace, final), ffacts)]
    if sample is not None and len(chosen) > sample:
        step = len(chosen) / sample if sample else 0
        chosen = [chosen[int(i * step)] for i in range(sample)]
    todo += chosen
    for st, tree, facts in todo:
        bad = checker.run(facts, tree)
        fig.checked += 1
        for b in bad:
            lost = [i for i in range(st.cut) if i not in st.kept and trace.ops[i].kind != "fsync"]
            fig.violations.append(
                f"[{st.model} cut {st.cut}/{len(trace.ops)} lost ops {lost} acked "
                f"{sorted(facts.acked)}] {b}"
            )
    report = os.environ.get("MAILSHIM_CRASH_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(fig.__dict__) + "\n")
    return fig


# --- the workloads ----------------------------------------------------------------------------


@pytest.fixture
def timed_listener():
    lst = Listener(free_port())
    lst.handler = TimedHandler()
    lst.start()
    yield lst
    lst.stop()


@pytest.fixture
def plain_root(tmp_path, timed_listener):
    root = Path(tempfile.mkdtemp(prefix="mailshim-crash-", dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "home").mkdir()
    yield root, timed_listener
    _stop_agents(root)
    shutil.rmtree(root, ignore_errors=True)


def _stop_agents(root: Path) -> None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read()
                if b"mailshim" in cmd and b"agent" in cmd:
                    env = open(f"/proc/{name}/environ", "rb").read()  # noqa: SIM115
                    if str(root).encode() in env:
                        os.kill(int(name), 9)
            except OSError:
                pass


def _spool_ready(wl: Workload) -> None:
    from mailshim import spool

    spool.Spool(str(wl.root / wl.spool)).ensure()


def w_submit_root(wl: Workload) -> None:
    wl.base_config()
    _spool_ready(wl)
    wl.start()
    wl.submit("bob@example.org", "carol@example.org")
    wl.submit("dave@example.org")


def w_first_submit(wl: Workload) -> None:
    wl.base_config()
    wl.start()
    wl.submit("bob@example.org")
    wl.msgs["next"] = Msg("next", ["carol@example.org"])
    wl.first = [
        ([tool("sendmail"), "-f", "alice@example.org", "carol@example.org"], None, message("next"))
    ]


def w_background(wl: Workload) -> None:
    wl.base_config(mode="background")
    _spool_ready(wl)
    wl.start()
    wl.submit("bob@example.org", "carol@example.org")


def w_bs(wl: Workload) -> None:
    wl.base_config(mode="queue")
    _spool_ready(wl)
    wl.start()
    toks = []
    lines = ["EHLO client.example.org"]
    for i in (1, 2):
        tok = f"bs{i}"
        toks.append(tok)
        wl.msgs[tok] = Msg(tok, ["bob@example.org"])
        body = message(tok).decode().replace("\n", "\r\n")
        lines += ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.org>", "DATA", body + "."]
    lines.append("QUIT")
    r = wl.traced(
        [tool("sendmail"), "-bs"], None, "\r\n".join(lines).encode() + b"\r\n", toks, bs=True
    )
    assert r.returncode == 0, r.stderr.decode()


def _deliver(
    wl: Workload, replies: dict[str, str], rcpts_list, queue: str = "", arrival=None, uid=None
) -> None:
    wl.base_config(queue=queue)
    _spool_ready(wl)
    if arrival is None and uid is None:
        for rcpts in rcpts_list:
            wl.submit(*rcpts, traced=False)
    else:
        from mailshim import spool

        target = spool.Spool(str(wl.root / wl.spool))
        for rcpts in rcpts_list:
            wl.n += 1
            token = f"{wl.name.replace('-', '')}{wl.n}"
            w = target.new_entry("alice@example.org", list(rcpts), uid or 0, arrival=arrival)
            w.write(message(token).replace(b"\n", b"\r\n"))
            w.commit(False)
            wl.msgs[token] = Msg(token, list(rcpts))
            wl.pre_acked.append(token)
    wl.listener.handler.rcpt_replies.update(replies)
    wl.start()
    r = wl.traced([tool("mailshim"), "run"], wl.runner)
    assert r.returncode in (0, 75), r.stderr.decode()


def w_deliver_all(wl: Workload) -> None:
    _deliver(
        wl,
        {},
        [["bob@example.org"], ["carol@example.org", "dave@example.org"], ["erin@example.org"]],
    )


def w_deliver_refused(wl: Workload) -> None:
    _deliver(
        wl,
        {"no@example.org": "550 5.1.1 no such user"},
        [["bob@example.org", "no@example.org"], ["carol@example.org"]],
    )


def w_deliver_deferred(wl: Workload) -> None:
    _deliver(
        wl,
        {"later@example.org": "451 4.3.0 try later"},
        [["bob@example.org", "later@example.org"], ["later@example.org"]],
    )


def w_deliver_bounced(wl: Workload) -> None:
    _deliver(wl, {"no@example.org": "550 5.1.1 no such user"}, [["no@example.org"]])


def w_expired(wl: Workload) -> None:
    _deliver(wl, {"late@example.org": "451 4.3.0 try later"}, [["late@example.org"]],
             queue='lifetime = "1d"', arrival=int(time.time()) - 3 * 86400)  # fmt: skip


def w_limits(wl: Workload) -> None:
    _deliver(wl, {}, [["bob@example.org"], ["carol@example.org"]], uid=4242)
    wl.may_hold = True


def _dead_one(wl: Workload) -> str:
    wl.base_config()
    _spool_ready(wl)
    token = wl.submit("no@example.org", traced=False)
    wl.listener.handler.rcpt_replies["no@example.org"] = "550 5.1.1 no such user"
    r = wl.plain([tool("mailshim"), "flush"])
    assert r.returncode == 0, r.stderr.decode()
    wl.listener.handler.rcpt_replies.clear()
    return token


def w_requeue(wl: Workload) -> None:
    _dead_one(wl)
    qid = next(n for n in os.listdir(wl.root / wl.spool / "dead") if "." not in n)
    wl.start()
    r = wl.traced([tool("mailshim"), "queue", "requeue", qid])
    assert r.returncode == 0, r.stderr.decode()
    r = wl.traced([tool("mailshim"), "run"])
    assert r.returncode == 0, r.stderr.decode()


def w_hold_release(wl: Workload) -> None:
    wl.base_config()
    _spool_ready(wl)
    token = wl.submit("bob@example.org", traced=False)
    qid = os.listdir(wl.root / wl.spool / "queue")[0]
    wl.may_hold = True
    wl.start()
    for cmd in ("hold", "release"):
        if cmd == "release":
            wl.releases[token] = len(wl.rec.ops)
        r = wl.traced([tool("mailshim"), "queue", cmd, qid], acks=[f"{cmd}:{token}"])
        assert r.returncode == 0, r.stderr.decode()
    r = wl.traced([tool("mailshim"), "run"])
    assert r.returncode == 0, r.stderr.decode()


def w_bulk(wl: Workload) -> None:
    """queueselect: hold, requeue and delete chosen by sender, then a run; the other
    sender's mail must not be touched, and what each command acknowledged must hold."""
    wl.base_config()
    _spool_ready(wl)
    cron = "cron@example.org"
    dead = wl.submit("no@example.org", traced=False, sender=cron)
    wl.listener.handler.rcpt_replies["no@example.org"] = "550 5.1.1 no such user"
    r = wl.plain([tool("mailshim"), "flush"])
    assert r.returncode == 0, r.stderr.decode()
    wl.listener.handler.rcpt_replies.clear()
    crons = [wl.submit("bob@example.org", traced=False, sender=cron) for _ in range(2)]
    kept = wl.submit("dave@example.org", traced=False)
    wl.may_hold = True
    wl.start()
    r = wl.traced([tool("mailshim"), "queue", "hold", "--sender", cron],
                  acks=[f"hold:{t}" for t in crons])  # fmt: skip
    assert r.returncode == 0 and b"hold: 2 " in r.stdout, r.stdout + r.stderr
    r = wl.traced(
        [tool("mailshim"), "queue", "requeue", "--sender", cron], acks=[f"requeue:{dead}"]
    )
    assert r.returncode == 0 and b"requeue: 1 " in r.stdout, r.stdout + r.stderr
    for t in (*crons, dead):
        wl.deletes[t] = len(wl.rec.ops)
    r = wl.traced([tool("mailshim"), "queue", "delete", "--sender", cron],
                  acks=[f"delete:{t}" for t in (*crons, dead)])  # fmt: skip
    assert r.returncode == 0 and b"delete: 3 " in r.stdout, r.stdout + r.stderr
    r = wl.traced([tool("mailshim"), "run"])
    assert r.returncode == 0, r.stderr.decode()
    assert kept in str(wl.listener.handler.messages[0].data)


def w_index(wl: Workload) -> None:
    """The schedule index: its journal appended by submissions, then a rebuild (``queue/``
    changed behind it) inside the run that delivers them."""
    wl.base_config()
    _spool_ready(wl)
    wl.submit("bob@example.org", traced=False)
    r = wl.plain([tool("mailshim"), "queue"])  # builds the index
    assert r.returncode == 0, r.stderr.decode()
    assert (wl.root / wl.spool / "state" / "schedule" / "index").exists()
    wl.start()
    wl.submit("carol@example.org")
    wl.submit("dave@example.org", "erin@example.org")
    r = wl.traced(["touch", str(wl.root / wl.spool / "queue")])  # stale: the run rebuilds
    assert r.returncode == 0, r.stderr.decode()
    r = wl.traced([tool("mailshim"), "run"])
    assert r.returncode == 0, r.stderr.decode()


ROOT_WORKLOADS = {
    "submit-root": w_submit_root,
    "first-submit": w_first_submit,
    "background": w_background,
    "bs": w_bs,
    "deliver-all": w_deliver_all,
    "deliver-refused": w_deliver_refused,
    "deliver-deferred": w_deliver_deferred,
    "deliver-bounced": w_deliver_bounced,
    "expired": w_expired,
    "limits": w_limits,
    "requeue": w_requeue,
    "hold-release": w_hold_release,
    "bulk": w_bulk,
    "index": w_index,
}


def _assert_clean(fig: Figures) -> None:
    print(f"\n{fig.workload}: {fig.ops} ops ({fig.fsyncs} fsyncs), generated {fig.generated}, "
          f"{fig.distinct} distinct, {fig.checked} recovered")  # fmt: skip
    assert not fig.violations, "\n".join(fig.violations[:30])


@pytest.mark.parametrize("name", list(ROOT_WORKLOADS))
def test_power_cut_states_root_spool(name, plain_root):
    root, listener = plain_root
    wl = Workload(name, root, listener)
    ROOT_WORKLOADS[name](wl)
    trace = wl.finish()
    _assert_clean(explore(wl, trace, SAMPLE))


# --- the system spool with its drop folder, real users ---------------------------------------


@pytest.fixture
def box(timed_listener):
    if not others_can_run():
        pytest.skip(f"other users cannot run {sys.executable} (its folder is private)")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    from test_multiuser import users_in_tmp

    with users_in_tmp("mailshim-crash-", (RUNNER, ALICE)) as (base, users):
        yield base, users, timed_listener


def _box_workload(name: str, box) -> tuple[Workload, tuple[int, int], tuple[int, int]]:
    base, users, listener = box
    run = (users[RUNNER].uid, users[RUNNER].gid)
    alice = (users[ALICE].uid, users[ALICE].gid)
    (base / "home").mkdir(exist_ok=True)
    wl = Workload(name, base, listener, runner=run)
    wl.homes = {alice: users[ALICE].home, run: users[RUNNER].home}
    return wl, run, alice


def _setup_system(wl: Workload) -> None:
    wl.base_config()
    r = wl.plain([tool("mailshim"), "setup-spool", "--user", RUNNER])
    assert r.returncode == 0, r.stderr.decode()


def w_drop_submit(wl: Workload, alice) -> None:
    _setup_system(wl)
    wl.start()
    wl.submit("bob@example.org", "carol@example.org", user=alice)
    wl.submit("dave@example.org", user=alice)


def w_pickup(wl: Workload, alice) -> None:
    _setup_system(wl)
    wl.submit("bob@example.org", user=alice, traced=False)
    wl.submit("carol@example.org", "dave@example.org", user=alice, traced=False)
    wl.start()
    r = wl.traced([tool("mailshim"), "run"], wl.runner)
    assert r.returncode == 0, r.stderr.decode()


def w_drop_agent(wl: Workload, alice) -> None:
    _setup_system(wl)
    wl.base_config(mode="background")
    wl.listener.handler.rcpt_replies["no@example.org"] = "550 5.1.1 no such user"
    wl.start()
    incoming = wl.root / wl.spool / "incoming"

    def rewritten() -> bool:
        return any(
            b"failed" in p.read_bytes() for p in incoming.iterdir() if not p.name.startswith(".")
        )

    wl.submit("bob@example.org", "no@example.org", user=alice, until=rewritten)


def w_setup_spool(wl: Workload, alice) -> None:
    wl.base_config()
    wl.start()
    wl.setup_ack = "setup"
    r = wl.traced([tool("mailshim"), "setup-spool", "--user", RUNNER], None, acks=["setup"])
    assert r.returncode == 0, r.stderr.decode()
    wl.first = [([tool("mailshim"), "setup-spool", "--user", RUNNER], None, b"")]


def w_user_spool(wl: Workload, alice) -> None:
    nowhere = wl.root / "nowhere"
    nowhere.mkdir()
    os.chmod(nowhere, 0o755)
    wl.spool = f"home-{ALICE}/.local/state/mailshim/spool"
    wl.base_config(spool="nowhere/spool")
    wl.user_spool = alice
    wl.start()
    wl.submit("bob@example.org", user=alice)


BOX_WORKLOADS = {
    "drop-submit": w_drop_submit,
    "pickup": w_pickup,
    "drop-agent": w_drop_agent,
    "setup-spool": w_setup_spool,
    "user-spool": w_user_spool,
}


@pytest.mark.parametrize("name", list(BOX_WORKLOADS))
def test_power_cut_states_system_spool(name, box):
    wl, _run, alice = _box_workload(name, box)
    BOX_WORKLOADS[name](wl, alice)
    trace = wl.finish()
    _assert_clean(explore(wl, trace, SAMPLE))


# --- the findings, each replayed ---------------------------------------------------------------


def _replay(wl: Workload, trace: cs.Trace, st: cs.State) -> list[str]:
    records = record_ops(trace, wl.spool)
    checker = Checker(wl, trace)
    facts = facts_at(trace, st.model, st.cut, records, {}, wl.releases, wl.deletes)
    return checker.run(facts, cs.build(trace, st))


def test_replay_the_first_spool_keeps_an_acknowledged_message(plain_root):
    """Finding 1: the first submission made the spool's folders without fsyncing them into
    their parents; with only what was fsynced on disk, the acknowledged entry was gone."""
    root, listener = plain_root
    wl = Workload("first-submit", root, listener)
    w_first_submit(wl)
    trace = wl.finish()
    st = cs.durable_only(trace, "conservative", len(trace.ops))
    tree = cs.build(trace, st)
    queued = [p for p in tree.files() if p.startswith("spool/queue/")]
    assert len(queued) == 1, sorted(tree.files())
    assert _replay(wl, trace, st) == []


def test_replay_a_dead_letter_keeps_its_state_until_the_move_is_durable(plain_root):
    """Finding 2: bury() removed state/<id> before the move to dead/ was fsynced; a power
    cut could keep the removal and lose the move, and the entry, back in queue/ without the
    record of its delivered recipients, went to them again."""
    root, listener = plain_root
    wl = Workload("deliver-refused", root, listener)
    w_deliver_refused(wl)
    trace = wl.finish()
    seen = 0
    for st in cs.states(trace, "conservative", limit=4096):
        files = cs.build(trace, st).files()
        for p in files:
            if p.startswith("spool/queue/") and f"spool/dead/{p[12:]}.state" in files:
                seen += 1
                assert f"spool/state/{p[12:]}" in files, (st.cut, sorted(files))
    assert seen, "no state has the entry both in queue/ and its state linked into dead/"


def test_replay_setup_spool_is_durable_once_it_says_done(box):
    """Finding 3: setup-spool fsynced nothing; once it had said done, a power cut could still
    take incoming/ (users' mail would then go to per-user spools no runner reads)."""
    wl, _run, alice = _box_workload("setup-spool", box)
    w_setup_spool(wl, alice)
    trace = wl.finish()
    tree = cs.build(trace, cs.durable_only(trace, "conservative", len(trace.ops)))
    want = {p: v for p, v in _dirs(trace.live).items() if p.startswith("spool")}
    assert {p: v for p, v in _dirs(tree).items() if p.startswith("spool")} == want


def test_replay_a_half_made_spool_does_not_stop_the_runner(plain_root):
    """Finding 4: a crash while the first submission made the spool can leave tmp/ and
    queue/ without state/; the next submission fills it without looking, and every run
    then refused with "the spool cannot be written" (exit 73): the queue stopped."""
    root, listener = plain_root
    wl = Workload("half-spool", root, listener)
    wl.base_config()
    for name in ("tmp", "queue"):
        (root / "spool" / name).mkdir(parents=True, mode=0o700)
    r = wl.plain(
        [tool("sendmail"), "-f", "alice@example.org", "bob@example.org"], None, message("half")
    )
    assert r.returncode == 0, r.stderr.decode()
    r = wl.plain([tool("mailshim"), "run"])
    assert r.returncode == 0, r.stderr.decode()
    (got,) = listener.messages
    assert got.data.endswith(b"\r\n\r\nbody of half\r\nline 2\r\n")
    # monitor/: the runner's public summary after its pass (issue 25)
    assert sorted(os.listdir(root / "spool")) == [
        "corrupt", "dead", "monitor", "queue", "state", "tmp"
    ]  # fmt: skip


def test_replay_an_interrupted_requeue_neither_loses_nor_quarantines(plain_root):
    """Finding 5 (review): ``mailshim queue requeue`` removed the names in dead/ before its link
    into queue/ was durable: a power cut could keep the removals and lose the link, and the
    dead letter was gone from both. Stopped after its link (a kill, or the cut keeping it),
    the entry had two links, and the runner sent it to corrupt/."""
    root, listener = plain_root
    wl = Workload("requeue", root, listener)
    w_requeue(wl)
    trace = wl.finish()
    link = next(i for i, op in enumerate(trace.ops) if op.kind == "link")
    qid, pid = trace.ops[link].name, trace.ops[link].pid
    end = max(i for i, op in enumerate(trace.ops) if op.pid == pid) + 1
    checked = 0
    for st in cs.states(trace, "conservative", limit=4096):
        if st.cut <= end:
            files = cs.build(trace, st).files()
            where = [p for p in files if p in (f"spool/dead/{qid}", f"spool/queue/{qid}")]
            assert where, (st.cut, sorted(st.kept), sorted(files))
            checked += 1
    assert checked > end
    # killed (or cut with everything kept) right after the link: the runner finishes it
    everything = cs.State(link + 1, "conservative", frozenset(range(link + 1)))
    assert _replay(wl, trace, everything) == []


def test_replay_a_bulk_delete_is_durable_once_it_says_done(plain_root):
    """Finding 6: ``mailshim queue delete`` fsynced ``queue/`` through a Spool object other
    than the one that removed the names (a no-op): once it had said "delete: 3 entries", a
    power cut could bring them back, and the requeued one, not held, was then delivered."""
    root, listener = plain_root
    wl = Workload("bulk", root, listener)
    w_bulk(wl)
    trace = wl.finish()
    start = min(wl.deletes.values())
    pid = trace.ops[start].pid
    end = max(i for i, op in enumerate(trace.ops) if op.pid == pid) + 1
    st = cs.durable_only(trace, "conservative", end)
    files = cs.build(trace, st).files()
    queued = sorted(
        m.group(1).decode()
        for p, data in files.items()
        if p.startswith("spool/queue/") and (m := re.search(rb"crash (\w+)", data))
    )
    assert queued == ["bulk4"], queued
    assert _replay(wl, trace, st) == []


def test_replay_a_lost_journal_line_does_not_hide_an_entry(plain_root):
    """Finding 7: an entry's journal line is appended after its link into ``queue/`` is
    durable, and is not fsynced. A power cut that loses the line, with ``queue/``'s time
    what the journal last recorded (the same clock tick), left an index that looked whole
    and did not have the entry: the runner skipped acknowledged mail until the index aged
    out (an hour). Fixed: the index names the boot it was written in, and one written before
    a reboot is rebuilt (the explorer's recovery runs after one: ``_trust_index``)."""
    root, listener = plain_root
    wl = Workload("index", root, listener)
    w_index(wl)
    trace = wl.finish()
    journal = trace.live.lookup("spool/state/schedule/journal")
    queue = trace.live.lookup("spool/queue")
    last_link = [i for i, op in enumerate(trace.ops) if op.kind == "link" and op.dir == queue][-1]
    line = next(
        i
        for i, op in enumerate(trace.ops)
        if i > last_link and op.kind == "write" and op.ino == journal
    )
    pid = trace.ops[line].pid
    end = max(i for i, op in enumerate(trace.ops) if op.pid == pid) + 1
    st = cs.State(end, "conservative", frozenset(i for i in range(end) if i != line))
    assert "index3" in trace.acked_at(end)
    assert _replay(wl, trace, st) == []
