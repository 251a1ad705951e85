"""``mailshim``: the administrator's command (click): config, check, send-test, flush, run, queue,
log, sink (and setup-spool, daemon from ``admin_spool``).

A thin layer: each command parses its options, calls the library, prints. Errors are one line
on stderr with a sysexits code, like ``sendmail``'s; usage errors too (64). Colour only on a
terminal, never with ``NO_COLOR`` set. Works with click 8.1.3 (Debian bookworm) and newer.

Trust: run by administrators (root or the ``mailshim`` user) and by users for their own
per-user spool. It acts only on spools the caller can already read or write.

Raises nothing to the shell: ``main`` prints one line and exits with the error's sysexits code
(64 for click's usage errors, 66 for an unreadable file, 75 when interrupted, 70 with a log line
for a bug).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import click

from mailshim import (
    maillog,
    paths,
    queueselect,
    queueview,
    spool,
    spoolchoice,
    spoolentry,
    spoolfmt,
)
from mailshim.cli import queuerun, standard_fds
from mailshim.cli.group import _config, cli
from mailshim.errors import (
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    MailshimError,
    TempFailError,
    UsageError,
    one_line,
    printable,
)

if TYPE_CHECKING:
    from mailshim.config import Config

# --- config ---------------------------------------------------------------------------


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (seconds, bytes).")
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool) -> None:
    """Print the effective configuration and where each value comes from.

    Values read as the configuration file writes them (5d, ["1m", "5m"], 50M, 30s);
    --json gives seconds and bytes instead.

    \b
    Examples:
      mailshim config
      mailshim -C /etc/mailshim/test.toml config --json
    """
    from mailshim import configview

    cfg = _config(ctx)
    table = configview.rows(cfg, configview.spool_listener_size(cfg))
    if as_json:
        values = {r.key: {"value": r.value, "source": r.source} for r in table}
        click.echo(json.dumps({"file": cfg.path, "values": values}, indent=2))
        return
    click.echo(configview.format_rows(cfg, table), nl=False)


# --- queue ----------------------------------------------------------------------------


def _print_items(items: Iterable[queueview.Item], as_json: bool) -> None:
    """Print as the entries are read (a queue of 100,000 is never held in memory)."""
    if as_json:
        pieces = queueview.json_lines("entries", items)
        color = False
    else:
        color = queueview.use_color(sys.stdout)
        pieces = queueview.table_lines(items, time.time(), color)
    for piece in pieces:
        click.echo(piece, nl=False, color=color)


def _queued_ids(cfg: Any) -> Iterator[str]:
    """Every queued id, from the schedule index: no entry is opened."""
    from mailshim import spoolindex

    for target in spoolchoice.known_spools(cfg):
        for row in spoolindex.rows(target):
            yield row[0]


@cli.group("queue", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON document for scripts (schema 1).")
@click.option("--dead", is_flag=True, help="Only the dead letters (failed for good), with why.")
@click.option("--ids", is_flag=True, hidden=True, help="One queue id per line (completions).")
@click.pass_context
def queue_cmd(ctx: click.Context, as_json: bool, dead: bool, ids: bool) -> None:
    """List the queue (the default), or act on entries.

    One row per message: id, age, size, tries, status (new, deferred with the next try,
    partly delivered, held), sender and recipients, and the last error below it. Dead
    letters (refused or expired; the sender got a bounce) follow in a section of their own
    with the reason; --dead lists only them, and `mailshim queue requeue ID` puts one back.
    Colour only on a terminal, never with NO_COLOR set. `mailq` shows the queue in
    Postfix's layout.

    \b
    Examples:
      mailshim queue
      mailshim queue --dead
      mailshim queue --json | jq -r '.entries[] | select(.held) | .id'
      mailshim queue show 18F2C0A1B3D4E5F6G7H8
      mailshim queue hold --all
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        _list_queue(_config(ctx), as_json, dead, ids)
    except BrokenPipeError as exc:
        # `mailshim queue | head`: the reader has all it wants (click would exit 1 for it).
        ctx.exit(queuerun.failed(exc))


def _list_queue(cfg: Any, as_json: bool, dead: bool, ids: bool) -> None:
    """The listing of ``mailshim queue``, streamed (see queue_cmd)."""
    from mailshim import deadletters

    if dead:
        buried = deadletters.collect(cfg)
        if ids:
            for d in buried:
                click.echo(d.queue_id)
        elif as_json:
            doc = queueview.json_doc("dead", [d.as_dict() for d in buried])
            click.echo(json.dumps(doc, indent=2))
        else:
            color = queueview.use_color(sys.stdout)
            text = queueview.format_dead(buried, time.time(), color)
            click.echo(text, nl=False, color=color)
        return
    if ids:
        for qid in _queued_ids(cfg):
            click.echo(qid)
        return
    _print_items(queueview.iter_items(cfg), as_json)
    if not as_json:
        buried = deadletters.collect(cfg)
        if buried:
            color = queueview.use_color(sys.stdout)
            click.echo("")
            click.echo("Dead letters (failed for good):")
            click.echo(queueview.format_dead(buried, time.time(), color), nl=False, color=color)


def _filter_options(f: Any) -> Any:
    """--sender, --recipient, --user, --older-than, --newer-than, --dry-run."""
    for option in reversed([
        click.option("--sender", "senders", multiple=True, metavar="ADDR",
                     help="Sender address, @domain, or <> (repeatable: any of them)."),
        click.option("--recipient", "recipients", multiple=True, metavar="ADDR",
                     help="A recipient's address or @domain (repeatable)."),
        click.option("--user", "users", multiple=True, metavar="USER",
                     help="Submitting user, login or uid (repeatable)."),
        click.option("--older-than", "older", metavar="AGE", help="Queued at least AGE (2h, 3d)."),
        click.option("--newer-than", "newer", metavar="AGE", help="Queued less than AGE."),
        click.option("-n", "--dry-run", is_flag=True,
                     help="Say how many entries would be touched; change nothing."),
    ]):  # fmt: skip
        f = option(f)
    return f


def _selection(
    ids: tuple[str, ...],
    all_: bool,
    senders: tuple[str, ...],
    recipients: tuple[str, ...],
    users: tuple[str, ...],
    older: str | None,
    newer: str | None,
) -> queueselect.Selection | None:
    """The entries named by filters or ids ("-" reads ids from stdin, one per line: what
    `mailshim queue --ids` prints); None when only ids on the command line are given."""
    listed: list[str] | None = None
    if "-" in ids:
        listed = [i for i in ids if i != "-"] + [
            line.split()[0] for line in sys.stdin if line.strip()
        ]
    sel = queueselect.Selection(
        ids=listed,
        senders=senders,
        recipients=recipients,
        users=[queueselect.parse_user(u) for u in users],
        older_than=None if older is None else queueselect.parse_age("--older-than", older),
        newer_than=None if newer is None else queueselect.parse_age("--newer-than", newer),
    )
    if listed is None and not sel.filtered and not all_:
        if not ids:
            raise UsageError("name queue ids (or - to read them from stdin), a filter, or --all")
        return None
    if listed is None and ids:
        sel.ids = {i.rstrip("!*").upper() for i in ids}
    return sel


@queue_cmd.command(
    "requeue",
    epilog="\b\nExamples:\n  mailshim queue requeue 18F2C0A1B3D4E5F6G7H8\n"
    "  mailshim queue requeue --recipient @example.net --dry-run\n"
    "  mailshim queue --dead --ids | mailshim queue requeue -\n"
    "  mailshim queue requeue --all",
)
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@_filter_options
@click.pass_context
def queue_requeue(
    ctx: click.Context,
    ids: tuple[str, ...],
    all_: bool,
    senders: tuple[str, ...],
    recipients: tuple[str, ...],
    users: tuple[str, ...],
    older: str | None,
    newer: str | None,
    dry_run: bool,
) -> None:
    """Put dead letters back in the queue with a fresh schedule (each one is logged).

    Named by id (- reads ids from stdin), chosen by filters (all must hold; the age is
    since they were queued), or --all. Recipients that were delivered stay delivered; the
    others are tried again at once and, if they fail again, retried and bounced as for a
    new message.
    """
    from mailshim import deadletters

    if not ids and not all_ and not (senders or recipients or users or older or newer):
        raise UsageError("name one or more dead letters' ids (- reads stdin), a filter, or --all")
    cfg = _config(ctx)
    sel = _selection(ids, all_, senders, recipients, users, older, newer)
    if sel is None:
        sel = queueselect.Selection(ids=ids)
    wanted = set(sel.ids or ()) if not ("-" in ids or sel.filtered) else set()
    done = 0
    for target, qid in sel.dead(spoolchoice.known_spools(cfg)):
        wanted.discard(qid)
        if not dry_run:
            deadletters.requeue(target, qid)
        done += 1
    if wanted:
        raise UsageError(f"no such dead letter: {', '.join(sorted(wanted))}")
    noun = f"entr{'y' if done == 1 else 'ies'}"
    if dry_run:
        click.echo(f"requeue: {done} {noun} would be touched (dry run: nothing changed)")
        return
    click.echo(f"requeue: {done} {noun}")
    if done:
        _wake_agents(cfg)


def _wake_agents(cfg: Config) -> None:
    """Entries became due (requeue, release, retry): start the agent of each spool this
    user may write, or wake the one serving it, as a new submission would; else the mail
    would wait for the next submission where no runner runs."""
    if cfg.delivery_mode == "queue":
        return
    from mailshim import agent, serving

    for target in spoolchoice.known_spools(cfg):
        if target.writable() and not serving.served(target):
            agent.start(target, cfg)  # the daemon sees the change; the timer's next run


@queue_cmd.command(
    "list",
    epilog="\b\nExamples:\n  mailshim queue list\n  mailshim queue list --json",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON document for scripts (schema 1).")
@click.pass_context
def queue_list(ctx: click.Context, as_json: bool) -> None:
    """List the queue (the same as `mailshim queue`)."""
    _print_items(queueview.iter_items(_config(ctx)), as_json)


def _targets(
    ctx: click.Context, ids: tuple[str, ...], all_: bool
) -> Iterator[tuple[spool.Spool, str]]:
    """The entries named (each looked up: the queue is not listed), or every one (--all,
    streamed from the schedule index). Unknown ids are a usage error before anything is done."""
    cfg = _config(ctx)
    if not ids and not all_:
        raise UsageError("name one or more queue ids, or --all")
    spools = spoolchoice.known_spools(cfg)
    if all_:
        return _all_entries(spools)
    # "!" is how mailq marks a held entry: accept ids pasted from its listing.
    found: list[tuple[spool.Spool, str]] = []
    missing = []
    for qid in dict.fromkeys(i.rstrip("!*").upper() for i in ids):
        where = [t for t in spools if spoolfmt.valid_id(qid) and t.exists(qid)]
        if where:
            found.append((where[0], qid))
        else:
            missing.append(qid)
    if missing:
        raise UsageError(f"no such queue id: {', '.join(sorted(missing))}")
    return iter(found)


def _all_entries(spools: list[spool.Spool]) -> Iterator[tuple[spool.Spool, str]]:
    from mailshim import spoolindex

    for target in spools:
        for row in spoolindex.rows(target):
            yield target, row[0]


def _locked(target: spool.Spool, qid: str) -> spoolentry.LockedEntry:
    locked = target.lock(qid)
    if locked is None:
        raise TempFailError(f"{qid} is being delivered right now; try again in a moment")
    return locked


@queue_cmd.command(
    "show",
    epilog="\b\nExamples:\n  mailshim queue show 18F2C0A1B3D4E5F6G7H8\n  mailshim queue show --all",
)
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every entry.")
@click.option("--json", "as_json", is_flag=True, help="JSON with the raw values (schema 1).")
@click.pass_context
def queue_show(ctx: click.Context, ids: tuple[str, ...], all_: bool, as_json: bool) -> None:
    """Print the envelope, state and headers of entries.

    Dates are local with their age ("2026-12-02 02:00:55 +0000 (3m ago)"); fields with
    nothing to say are left out. --json gives the raw values (epoch seconds, bytes).
    """
    shown_items: list[dict[str, object]] = []
    if ids and not all_:
        # A user's own entries in the system spool she may not list (queueview.own_items):
        # by the id her mailq shows or the one her sendmail gave.
        for item in queueview.own_items(_config(ctx)):
            names = {item.queue_id, item.drop_id}
            if not any(i.rstrip("!*").upper() in names for i in ids):
                continue
            ids = tuple(i for i in ids if i.rstrip("!*").upper() not in names)
            if as_json:
                shown_items.append(item.as_dict())
            else:
                click.echo(queueview.format_show(item, time.time()))
        if not ids:
            if as_json:
                click.echo(json.dumps(queueview.json_doc("entries", shown_items), indent=2))
            return
    for target, qid in _targets(ctx, ids, all_):
        try:
            item = queueview.Item(target, qid, target.read_envelope(qid), target.load_state(qid))
            queueview.mark_waiting(_config(ctx), [item])
        except FileNotFoundError:
            if not as_json:
                click.echo(f"{qid}: delivered or removed meanwhile\n")
            continue
        if as_json:
            shown_items.append(item.as_dict())
            continue
        click.echo(queueview.format_show(item, time.time()), nl=False)
        locked = target.lock(qid)
        if locked is not None:
            try:
                with locked.message() as body:
                    head = body.read(64 * 1024).split(b"\r\n\r\n", 1)[0]
            finally:
                locked.release()
            click.echo("")
            # Headers are the sender's text: escapes in a Subject must not reach the terminal.
            for line in head.decode("utf-8", "replace").split("\r\n"):
                folded = line[:1] in (" ", "\t")
                click.echo(("    " if folded else "") + printable(line))
        click.echo("")
    if as_json:
        click.echo(json.dumps(queueview.json_doc("entries", shown_items), indent=2))


def _queue_action(
    ctx: click.Context,
    ids: tuple[str, ...],
    all_: bool,
    action: str,
    sel: queueselect.Selection | None = None,
    dry_run: bool = False,
) -> None:
    """Carry out ``action`` on each entry, one at a time (flat memory), logging each change.
    Named ids that are being delivered stop the command (75); in a selection they are left
    as they were and counted."""
    cfg = _config(ctx)
    pairs = _targets(ctx, ids, all_) if sel is None else sel.queued(spoolchoice.known_spools(cfg))
    done = busy = woken = 0
    # The spools the entries came from: a deletion's fsync of queue/ is owed by the object
    # that removed the names (another Spool for the same folder has nothing to sync).
    touched: dict[str, spool.Spool] = {}
    for target, qid in pairs:
        if dry_run:
            done += 1
            continue
        if sel is None:
            locked = _locked(target, qid)
        else:
            got = target.lock(qid)
            if got is None:
                if target.exists(qid):
                    busy += 1
                continue
            locked = got
        if action == "delete":
            touched[target.root] = target
            locked.remove()
        else:
            state = locked.state()
            if action == "hold":
                state.held = True
            elif action == "release":
                woken += state.held
                state.held = False
            elif action == "retry":
                woken += not state.held
                state.next_attempt = 0
            locked.save_state(state)
            locked.release()
        maillog.log(f"{qid}: {action} by uid {os.getuid()} (mailshim queue {action})")
        done += 1
    for target in touched.values():
        target.sync(force=True)
    noun = f"entr{'y' if done == 1 else 'ies'}"
    if dry_run:
        click.echo(f"{action}: {done} {noun} would be touched (dry run: nothing changed)")
        return
    click.echo(f"{action}: {done} {noun}")
    if woken:
        _wake_agents(cfg)
    if busy:
        raise TempFailError(f"{busy} being delivered right now were left as they were; try again")


for _name, _help in (
    ("delete", "Delete entries (they are not delivered)."),
    ("hold", "Hold entries: no delivery until released."),
    ("release", "Release held entries."),
    ("retry", "Make entries due now (the next flush or agent takes them)."),
):

    def _make(name: str) -> Any:
        @click.argument("ids", nargs=-1)
        @click.option("--all", "all_", is_flag=True, help="Every entry.")
        @_filter_options
        @click.pass_context
        def cmd(
            ctx: click.Context,
            ids: tuple[str, ...],
            all_: bool,
            senders: tuple[str, ...],
            recipients: tuple[str, ...],
            users: tuple[str, ...],
            older: str | None,
            newer: str | None,
            dry_run: bool,
        ) -> None:
            sel = _selection(ids, all_, senders, recipients, users, older, newer)
            _queue_action(ctx, ids, all_, name, sel, dry_run)

        return cmd

    queue_cmd.command(
        _name,
        help=_help
        + " Entries are named by id (- reads ids from stdin), chosen by filters (all must"
        " hold), or --all. Each change is logged.",
        epilog=f"\b\nExamples:\n  mailshim queue {_name} 18F2C0A1B3D4E5F6G7H8\n"
        f"  mailshim queue {_name} --sender cron@example.org --older-than 1h --dry-run\n"
        f"  mailshim queue --ids | head -100 | mailshim queue {_name} -\n"
        f"  mailshim queue {_name} --all",
    )(_make(_name))


@queue_cmd.command(
    "shape",
    epilog="\b\nExamples:\n  mailshim queue shape\n  mailshim queue shape --by sender --top 10",
)
@click.option(
    "--by", type=click.Choice(["recipient", "sender"]), default="recipient", show_default=True,
    help="Count by the recipients' domains or the sender's.",
)  # fmt: skip
@click.option("--top", type=int, default=0, metavar="N", help="Only the N biggest domains.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@click.pass_context
def queue_shape(ctx: click.Context, by: str, top: int, as_json: bool) -> None:
    """How the queue is made: messages per domain and age, like Postfix's qshape.

    The first row is the total; then one row per domain, biggest first. Columns: the
    total, then how many have waited less than 5, 10, 20 ... 1280 minutes, and longer.
    A message counts once in each domain among its recipients still to do.
    """
    sh = queueselect.shape(spoolchoice.known_spools(_config(ctx)), by)
    if as_json:
        click.echo(json.dumps(sh.as_dict(top), indent=2))
    else:
        click.echo(queueselect.format_shape(sh, top), nl=False)


# --- flush ----------------------------------------------------------------------------


@cli.command("flush")
@click.option("-v", "--verbose", is_flag=True, help="Show the SMTP dialogue (on stderr).")
@click.pass_context
def flush_cmd(ctx: click.Context, verbose: bool) -> None:
    """Deliver everything in the queue now, due or not, over parallel sessions.

    On a terminal a progress bar counts delivered, deferred and bounced messages; otherwise
    one line per message ("ID: delivered"). The same as `sendmail -q` (Postfix's
    `postqueue -f`). A message that fails again keeps its place on the retry schedule: a
    flush never makes the next automatic attempt later. `mailshim run` tries only what is
    due.

    \b
    Examples:
      mailshim flush
      mailshim flush -v
    """
    _run_queue(ctx, verbose, force=True)


@cli.command("run")
@click.option("-v", "--verbose", is_flag=True, help="Show the SMTP dialogue (on stderr).")
@click.pass_context
def run_cmd(ctx: click.Context, verbose: bool) -> None:
    """Run the retry schedule once: deliver only the messages that are due.

    What the packaged timer and path units (mailshim-flush.timer, mailshim-flush.path)
    start: new messages go at once; deferred ones wait for their next attempt ([queue]
    retry), greylisting and rate-limit pauses are kept. A run that finds nothing due
    changes nothing in the spool. `mailshim flush` delivers everything now instead.

    \b
    Examples:
      mailshim run
      mailshim run -v
    """
    _run_queue(ctx, verbose, force=False)


def _run_queue(ctx: click.Context, verbose: bool, force: bool) -> None:
    queuerun.run_queue(_config(ctx), verbose, force)


# --- check ----------------------------------------------------------------------------

CHECK_SCHEMA = 1  # `check --json`'s shape (docs/monitoring.md); a new shape is a new number


@cli.command("check")
@click.option(
    "--rcpt", "rcpts", multiple=True, metavar="ADDR",
    help="Also try RCPT TO for this address (repeatable; aliases apply).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@click.pass_context
def check_cmd(ctx: click.Context, rcpts: tuple[str, ...], as_json: bool) -> None:
    """Say whether mail would flow, and if not, why and what to change.

    Checks the configuration, the secret's and the spool's permissions, whether anything
    retries deferred mail (systemd timer or a running `mailshim daemon`), then connects to
    each listener as delivery would (TCP or socket, TLS, EHLO, AUTH) and tries MAIL FROM
    with the default sender and RCPT TO for root's alias (and each --rcpt), then RSET and
    QUIT: no message is sent. Each line is ok, warning or error, with the fix below it.

    Exit status: 0 when mail would flow (warnings allowed), else the first error's code:
    69 listener unavailable or refusing, 77 permission or authentication, 78 configuration.

    \b
    Examples:
      mailshim check
      mailshim check --rcpt alice@example.org
      mailshim -C /etc/mailshim/test.toml check --json | jq .findings
    """
    from mailshim import address, check

    for word in rcpts:
        if not word.strip() or any(ord(ch) < 32 for ch in word):
            raise UsageError(f"--rcpt {word!r}: not an address")
        for addr in address.parse_address_list(word):  # DataError (65) names a bad one
            address.check_envelope_address(addr)
    report = check.run(ctx.obj.get("config_path"), list(rcpts))
    if as_json:
        click.echo(json.dumps({"schema": CHECK_SCHEMA, **report.as_dict()}, indent=2))
    else:
        color = queueview.use_color(sys.stdout)
        click.echo(check.format_report(report, color), nl=False, color=color)
    ctx.exit(report.exit_code)


# --- send-test ------------------------------------------------------------------------

TEST_MESSAGE = """\
Subject: mailshim test message from {host}
To: {to}
Auto-Submitted: auto-generated
Content-Type: text/plain; charset=UTF-8

This is a test message sent by `mailshim send-test` on {host}
by {user} at {when}.

If it reached you, mail from this machine works: cron, at, sudo and
scripts can reach you the same way. Nothing needs to be done.
"""


@cli.command("send-test")
@click.argument("address", required=False, default="root")
@click.pass_context
def send_test_cmd(ctx: click.Context, address: str) -> None:
    """Send a short test message now and show the listener's reply.

    The message goes through the normal submission path (spool first), delivered at once
    as `sendmail -odi -v` would: the SMTP dialogue is shown on stderr. ADDRESS defaults to
    root, through its alias. Exit 0 when the listener took it, 67 when it refused a
    recipient, 75 when it was deferred (it stays queued and is retried).

    \b
    Examples:
      mailshim send-test
      mailshim send-test alice@example.org
    """
    from mailshim import submit
    from mailshim.errors import NoUserError

    cfg = _config(ctx)
    finals = submit.rewrite_recipient(cfg, address)
    user = submit.current_user()
    text = TEST_MESSAGE.format(
        host=paths.fqdn(),
        to=", ".join(finals),
        user=user.login,
        when=time.strftime("%Y-%m-%d %H:%M:%S %z"),
    )
    data = text.encode("utf-8")
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + n]
        pos += len(chunk)
        return chunk

    sub = submit.Submission(recipients=[address], mode="interactive", verbose=True)
    click.echo(f"sending a test message to {', '.join(f'<{a}>' for a in finals)}", err=True)
    outcome = submit.submit(cfg, sub, read)
    click.echo(f"queue id {outcome.queue_id}: {outcome.status}")
    for rcpt, reply in outcome.replies.items():
        click.echo(f"  <{rcpt}>: {reply}")
    refused = [r for r, reply in outcome.replies.items() if reply.permanent]
    if refused:
        raise NoUserError(f"the listener refused {', '.join(f'<{r}>' for r in refused)}")
    if outcome.status == "deferred" or any(r.temporary for r in outcome.replies.values()):
        raise TempFailError(
            f"deferred: the message stays queued as {outcome.queue_id} and is retried"
            " (mailshim log " + outcome.queue_id + " tells its story)"
        )
    if outcome.status == "sent":
        click.echo("the listener took it: check the mailbox of " + ", ".join(finals))
    else:
        click.echo(f"queued as {outcome.queue_id}; the delivery agent or runner sends it")


# --- log ------------------------------------------------------------------------------


@cli.command("log")
@click.argument("queue_id", metavar="QUEUE_ID", required=False)
@click.option(
    "--file", "path", metavar="PATH", hidden=True,
    help="Read this log file instead of the journal and /var/log/mail.log.",
)  # fmt: skip
@click.option(
    "--summary", is_flag=True,
    help="Count delivered, deferred, bounced and expired recipients (as pflogsumm does).",
)  # fmt: skip
@click.option("--day", metavar="YYYY-MM-DD", help="With --summary: only this day's lines.")
@click.pass_context
def log_cmd(
    ctx: click.Context, queue_id: str | None, path: str | None, summary: bool, day: str | None
) -> None:
    """Show one message's whole story from the logs, or (--summary) the day's figures.

    Every submission, attempt, deferral, delivery, bounce and expiry is one log line with
    the queue id. This prints them from the journal (journalctl -o json, every mailshim
    line) when it has them, else from the [log] file when one is configured, else from
    /var/log/mail.log (or /var/log/maillog); `--file PATH` reads that file instead. A
    bounce's own queue id is followed too. Exit 66 when no line is found.

    --summary counts what pflogsumm counts from the same lines (delivered, deferred,
    bounced) plus expired recipients, from --file or the [log] file or the mail log.

    \b
    Examples:
      mailshim log 18F2C0A1B3D4E5F6G7H8
      mailshim log 18F2C0A1B3D4E5F6G --file /var/log/mail.log.1
      mailshim log --summary --day 2026-12-01 --file /var/log/mail.log
    """
    from mailshim.errors import NoInputError

    if summary:
        _log_summary(ctx, path, day)
        return
    if queue_id is None:
        raise UsageError("name a queue id, or give --summary")
    wanted = queue_id.strip().rstrip("!*").upper()
    if not maillog.looks_like_id(wanted):
        raise UsageError(f"{queue_id!r} is not a queue id (20 letters and digits, or a prefix)")
    try:
        log_file = _config(ctx).log_file
    except MailshimError:
        log_file = None  # a broken config must not hide the system's logs
    try:
        lines, searched = maillog.story(wanted, path, log_file)
    except OSError as exc:
        raise NoInputError(f"{path}: {exc.strerror}") from None
    if not lines:
        raise NoInputError(f"no log line mentions {wanted} in {'; '.join(searched)}")
    for line in lines:
        click.echo(line)


def _log_summary(ctx: click.Context, path: str | None, day: str | None) -> None:
    from mailshim import logsummary
    from mailshim.errors import NoInputError

    if day is not None and not (len(day) == 10 and day[4] == day[7] == "-"):
        raise UsageError(f"--day {day!r}: write the day as YYYY-MM-DD")
    if path is None:
        try:
            path = _config(ctx).log_file
        except MailshimError:
            path = None
    files = [path] if path is not None else maillog.default_files()
    if not files:
        raise NoInputError(
            f"no log file to read ({' or '.join(maillog.LOG_FILES)} missing); name one with --file"
        )
    counts = dict.fromkeys(logsummary.FIELDS, 0)
    for name in files:
        try:
            found = logsummary.summarize(maillog.file_lines(name), day)
        except OSError as exc:
            raise NoInputError(f"{name}: {exc.strerror}") from None
        for key, n in found.items():
            counts[key] += n
    click.echo(logsummary.format_summary(counts), nl=False)


# --- metrics and the monitoring check -------------------------------------------------


@cli.command("metrics")
@click.pass_context
def metrics_cmd(ctx: click.Context) -> None:
    """Print the queue's figures and the delivery counters in Prometheus' text format.

    Per spool: entries, bytes and the oldest entry's age per queue (new, deferred, held,
    dead, incoming), recipients delivered, deferred, bounced and expired by relay and reply
    class, the delivery delay histogram, the last delivery, whether each listener answered
    at its last attempt, sending-limit holds. The runner writes the same text after each
    pass when [monitoring] textfile_dir is set (node_exporter's textfile collector). A user
    who may not read the spool gets the figures of its public summary (queues, last
    delivery, listeners). docs/monitoring.md lists the metrics (schema 1).

    \b
    Examples:
      mailshim metrics
      mailshim metrics | promtool check metrics
    """
    from mailshim import metrics, queuestats

    cfg = _config(ctx)
    now = time.time()
    snaps = [metrics.collect(target, now) for target in spoolchoice.known_spools(cfg)]
    if not snaps:
        root = cfg.queue_dir or paths.SYSTEM_SPOOL
        summary = queuestats.read_summary(root)  # NoInputError (66) says what is missing
        snap = queuestats.Snapshot(summary.spool or root, summary.written)
        snap.queues.update(summary.queues)
        snaps = [snap]
    click.echo(metrics.render(snaps), nl=False)


@cli.command(
    "check-queue",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def check_queue_cmd(ctx: click.Context, args: tuple[str, ...]) -> None:
    """A Nagios/Icinga check of the queue: one status line with perfdata; exit 0-3.

    Thresholds for waiting entries, the oldest one's age, held and dead entries, and the
    stall (mail waiting, nothing delivered); no network unless --probe. Runs as any user
    (counts and ages only). `mailshim check-queue --help` lists the options.
    """
    from mailshim.cli import checkqueue

    ctx.exit(checkqueue.main(list(args), ctx.obj.get("config_path")))


# --- sink -----------------------------------------------------------------------------


@cli.command("sink")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=10025, show_default=True, type=int, help="Port to listen on.")
@click.option("--dir", "folder", default=None, help="Also store each message as DIR/<n>.eml.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print messages.")
def sink_cmd(host: str, port: int, folder: str | None, quiet: bool) -> None:
    """A debugging listener that prints every message it receives.

    \b
    Examples:
      mailshim sink
      mailshim sink --port 2525 --dir /tmp/mail
    """
    from mailshim import sink

    sink.serve(host, port, folder, quiet)


# Commands kept in their own modules register themselves on `cli` when imported.
from mailshim.cli import admin_spool  # noqa: E402,F401


def _click_error(exc: click.ClickException) -> int:
    """One line on stderr for click's own errors (usage: 64), as for every other error."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)  # click >= 8.2
    if no_args is not None and isinstance(exc, no_args) and exc.ctx is not None:
        click.echo(exc.ctx.get_help())
        return EX_OK
    message = one_line(exc.format_message()).rstrip(".")
    if isinstance(exc, click.UsageError):
        path = exc.ctx.command_path if exc.ctx is not None else "mailshim"
        click.echo(f"{path}: {message} (see {path} --help)", err=True)
        return EX_USAGE
    click.echo(f"mailshim: {message}", err=True)
    return EX_NOINPUT if isinstance(exc, click.FileError) else EX_USAGE


def _run() -> int:
    try:
        code = cli.main(prog_name="mailshim", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("mailshim: interrupted", err=True)
        return EX_TEMPFAIL
    except click.ClickException as exc:
        return _click_error(exc)
    except Exception as exc:
        return queuerun.failed(exc)
    return code if isinstance(code, int) else EX_OK


def main() -> None:
    """The click CLI (``queuerun.main``, the ``mailshim`` command, comes here for everything
    but a plain ``run`` or ``flush`` off a terminal)."""
    standard_fds()
    queuerun.leave(_run())


if __name__ == "__main__":
    main()
