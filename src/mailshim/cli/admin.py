"""``mailshim``: the administrator's command (click): config, queue, flush, sink, setup-spool.

A thin layer: each command parses its options, calls the library, prints. Errors are one line
on stderr with a sysexits code, like ``sendmail``'s.

Trust: run by administrators (root or the ``mailshim`` user) and by users for their own
per-user spool. It acts only on spools the caller can already read or write.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from mailshim import __version__, maillog, paths, queueview, spool
from mailshim import config as config_mod
from mailshim.errors import (
    EX_SOFTWARE,
    EX_USAGE,
    MailshimError,
    NoPermError,
    TempFailError,
    UsageError,
    one_line,
)


def _config(ctx: click.Context) -> config_mod.Config:
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        obj["config"] = config_mod.load(obj.get("config_path"))
    cfg: config_mod.Config = obj["config"]
    return cfg


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Examples:\n\n  mailshim config\n\n  mailshim queue\n\n  mailshim flush",
)
@click.option("-C", "--config", "config_path", metavar="FILE", help="Read this config file.")
@click.version_option(__version__, prog_name="mailshim")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Administer mailshim: the sendmail that hands mail to one SMTP listener."""
    ctx.ensure_object(dict)["config_path"] = config_path


# --- config ---------------------------------------------------------------------------


def _config_rows(cfg: config_mod.Config) -> list[tuple[str, object, str]]:
    rows: list[tuple[str, object, str]] = []
    multi = len(cfg.relays) > 1
    for i, relay in enumerate(cfg.relays):
        prefix = f"relay[{i}]" if multi else "relay"
        for key in (
            "name", "host", "port", "socket", "tls", "verify", "ca_file", "username",
            "password_file", "timeout", "helo", "protocol", "retry_after_failure",
        ):
            value = getattr(relay, key)
            src_key = f"relay[{i}].{key}" if multi else f"relay.{key}"
            rows.append((f"{prefix}.{key}", value, cfg.source(src_key)))
    dom_src = cfg.source("addresses.domain")
    rows.append(("addresses.domain", cfg.domain, dom_src if dom_src != "default" else "host FQDN"))
    for key, attr in (("sender", "sender"), ("aliases_file", "aliases_file"), ("from_header", "from_header")):
        rows.append((f"addresses.{key}", getattr(cfg, attr), cfg.source(f"addresses.{key}")))
    for name, targets in sorted(cfg.aliases.items()):
        rows.append((f"aliases.{name}", list(targets), cfg.source(f"aliases.{name}")))
    rows.append(("queue.dir", cfg.queue_dir or paths.SYSTEM_SPOOL, cfg.source("queue.dir")))
    rows.append(("queue.retry", list(cfg.retry), cfg.source("queue.retry")))
    rows.append(("queue.lifetime", cfg.lifetime, cfg.source("queue.lifetime")))
    rows.append(("queue.warn_after", cfg.warn_after, cfg.source("queue.warn_after")))
    rows.append(("delivery.mode", cfg.delivery_mode, cfg.source("delivery.mode")))
    rows.append(("submission.max_size", cfg.max_size, cfg.source("submission.max_size")))
    rows.append(("submission.max_recipients", cfg.max_recipients, cfg.source("submission.max_recipients")))
    rows.append(("submission.trusted_users", list(cfg.trusted_users), cfg.source("submission.trusted_users")))
    return rows


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool) -> None:
    """Print the effective configuration and where each value comes from.

    \b
    Examples:
      mailshim config
      mailshim -C /etc/mailshim/test.toml config --json
    """
    cfg = _config(ctx)
    rows = _config_rows(cfg)
    if as_json:
        click.echo(json.dumps({"file": cfg.path, "values": {k: {"value": v, "source": s} for k, v, s in rows}}, indent=2))
        return
    click.echo(f"# configuration file: {cfg.path or 'none (built-in defaults)'}")
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        shown = "unset" if value is None else json.dumps(value) if not isinstance(value, str) else value
        click.echo(f"{key:<{width}}  {shown}    # {source}")


# --- queue ----------------------------------------------------------------------------


@cli.group("queue", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable listing.")
@click.option("--ids", is_flag=True, hidden=True, help="One queue id per line (completions).")
@click.pass_context
def queue_cmd(ctx: click.Context, as_json: bool, ids: bool) -> None:
    """List the queue, or act on entries (show, delete, hold, release, retry).

    \b
    Examples:
      mailshim queue
      mailshim queue --json
      mailshim queue show 0645F1A2B3C4DK3J9QXA
      mailshim queue hold --all
    """
    if ctx.invoked_subcommand is not None:
        return
    items = queueview.collect(_config(ctx))
    if ids:
        for item in items:
            click.echo(item.queue_id)
    elif as_json:
        click.echo(json.dumps([i.as_dict() for i in items], indent=2))
    else:
        click.echo(queueview.format_listing(items, time.time()), nl=False)


def _targets(ctx: click.Context, ids: tuple[str, ...], all_: bool) -> list[tuple[spool.Spool, str]]:
    cfg = _config(ctx)
    found: list[tuple[spool.Spool, str]] = []
    if not ids and not all_:
        raise UsageError("name one or more queue ids, or --all")
    wanted = set(ids)
    for target in spool.known_spools(cfg):
        for qid in target.ids():
            if all_ or qid in wanted:
                found.append((target, qid))
                wanted.discard(qid)
    if wanted:
        raise UsageError(f"no such queue id: {', '.join(sorted(wanted))}")
    return found


def _locked(target: spool.Spool, qid: str) -> spool.LockedEntry:
    locked = target.lock(qid)
    if locked is None:
        raise TempFailError(f"{qid} is being delivered right now; try again in a moment")
    return locked


@queue_cmd.command("show")
@click.argument("ids", nargs=-1)
@click.pass_context
def queue_show(ctx: click.Context, ids: tuple[str, ...]) -> None:
    """Show envelope, state and headers of entries."""
    for target, qid in _targets(ctx, ids, False):
        item = queueview.Item(target, qid, target.read_envelope(qid), target.load_state(qid))
        for key, value in item.as_dict().items():
            click.echo(f"{key}: {json.dumps(value) if not isinstance(value, str) else one_line(value)}")
        locked = target.lock(qid)
        if locked is not None:
            with locked.message() as body:
                head = body.read(64 * 1024).split(b"\r\n\r\n", 1)[0]
            locked.release()
            click.echo("")
            click.echo(head.decode("utf-8", "replace").replace("\r\n", "\n"))
        click.echo("")


def _queue_action(ctx: click.Context, ids: tuple[str, ...], all_: bool, action: str) -> None:
    done = 0
    for target, qid in _targets(ctx, ids, all_):
        locked = _locked(target, qid)
        if action == "delete":
            locked.remove()
        else:
            state = locked.state()
            if action == "hold":
                state.held = True
            elif action == "release":
                state.held = False
            elif action == "retry":
                state.next_attempt = 0
            locked.save_state(state)
            locked.release()
        maillog.log(f"{qid}: {action} by uid {os.getuid()} (mailshim queue {action})")
        done += 1
    click.echo(f"{action}: {done} entr{'y' if done == 1 else 'ies'}")


for _name, _help in (
    ("delete", "Delete entries (they are not delivered)."),
    ("hold", "Hold entries: no delivery until released."),
    ("release", "Release held entries."),
    ("retry", "Make entries due now (the next flush or agent takes them)."),
):

    def _make(name: str) -> Any:
        @click.argument("ids", nargs=-1)
        @click.option("--all", "all_", is_flag=True, help="Every entry.")
        @click.pass_context
        def cmd(ctx: click.Context, ids: tuple[str, ...], all_: bool) -> None:
            _queue_action(ctx, ids, all_, name)

        return cmd

    queue_cmd.command(_name, help=_help)(_make(_name))


# --- flush ----------------------------------------------------------------------------


@cli.command("flush")
@click.option("-v", "--verbose", is_flag=True, help="Show the SMTP dialogue.")
@click.pass_context
def flush_cmd(ctx: click.Context, verbose: bool) -> None:
    """Deliver everything in the queue now, over one connection.

    \b
    Examples:
      mailshim flush
      mailshim flush -v
    """
    from mailshim import runner

    cfg = _config(ctx)
    spools = [s for s in spool.known_spools(cfg) if s.writable()]
    if not spools:
        click.echo("nothing to flush: no spool this user can write")
        return
    total = sum(len(s.ids()) for s in spools)
    tty = sys.stdout.isatty()
    seen = {"n": 0}

    def progress(qid: str, status: str) -> None:
        seen["n"] += 1
        if tty:
            click.echo(f"\r[{seen['n']}/{total}] {qid} {status:<10}", nl=False)
        else:
            click.echo(f"{qid}: {status}")

    def transcript(line: str) -> None:
        click.echo(line, err=True)

    counts = runner.flush(cfg, spools, progress=progress, transcript=transcript if verbose else None)
    if tty and seen["n"]:
        click.echo("")
    click.echo(f"{counts.sent} delivered, {counts.deferred} deferred, {counts.bounced} bounced")


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


def main() -> None:
    try:
        code = cli.main(prog_name="mailshim", standalone_mode=False)
    except MailshimError as exc:
        click.echo(f"mailshim: {exc.message}", err=True)
        sys.exit(exc.code)
    except click.exceptions.Abort:
        click.echo("mailshim: interrupted", err=True)
        sys.exit(75)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EX_USAGE if isinstance(exc, click.UsageError) else 1)
    except Exception as exc:
        maillog.log(f"internal error: {exc.__class__.__name__}: {exc}", error=True)
        click.echo(f"mailshim: internal error ({exc.__class__.__name__}: {exc}); please report it", err=True)
        sys.exit(EX_SOFTWARE)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
