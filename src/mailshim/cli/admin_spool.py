"""``mailshim`` commands that set up and run the spool: ``setup-spool`` and ``daemon``.

Trust: ``setup-spool`` runs as root (packages call it from postinst); it creates folders with
fixed owners and modes, opens each without following links, and gives root-owned entries to
the runner user only when they have a single link. ``daemon`` runs as root or the
``mailshim`` user (mailshim-daemon.service), or as any user on their own per-user spool; it
treats every entry as hostile (runner.py, spool.py).

Raises ``NoPermError`` (77) when ``setup-spool`` is not run by root or ``daemon`` finds no spool
the caller can run, ``NoUserError`` (67) when the runner user does not exist; ``admin.main``
prints them and exits with the code.
"""

from __future__ import annotations

import os
import pwd

import click

from mailshim import maillog, paths, spool, spoolchoice, spoolsetup
from mailshim.cli import queuerun
from mailshim.cli.group import _config, cli
from mailshim.errors import NoPermError, NoUserError

DEFAULT_USER = "mailshim"


@cli.command("setup-spool")
@click.option(
    "--user",
    "user",
    default=DEFAULT_USER,
    metavar="NAME",
    help="The user the runner runs as and who owns the queue (default: mailshim).",
)
@click.pass_context
def setup_spool_cmd(ctx: click.Context, user: str) -> None:
    """Create the system spool with its owners and modes (run as root; packages call it).

    \b
    The spool root belongs to root (0711); queue/, tmp/, state/, dead/ and corrupt/ to the
    runner user (0700); incoming/ is the drop folder every user may write but not list
    (3733, group of the runner user). It changes nothing that is already right.

    \b
    Examples:
      mailshim setup-spool
      mailshim setup-spool --user mail
    """
    if os.geteuid() != 0:
        raise NoPermError("setup-spool must run as root")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise NoUserError(
            f"user {user} does not exist: create it first (the packages do; by hand:"
            f" useradd --system --home-dir {paths.SYSTEM_SPOOL} --shell /usr/sbin/nologin"
            f" {user}), or name another with --user"
        ) from None
    cfg = _config(ctx)
    target = spool.Spool(cfg.queue_dir or paths.SYSTEM_SPOOL)
    for change in spoolsetup.setup(target, pw.pw_uid, pw.pw_gid):
        click.echo(change)
    click.echo(f"spool ready: {target.root} (runner user {user})")


@cli.command("daemon")
@click.pass_context
def daemon_cmd(ctx: click.Context) -> None:
    """Run the spool in the foreground (for containers and hosts without systemd).

    \b
    Delivers new entries as they arrive (the drop folder included) and retries deferred
    ones on their schedule, over parallel sessions while there is work. SIGTERM or SIGINT
    stops it once the message in flight is finished; a second signal stops it at once
    (that message stays in the spool).

    \b
    Examples:
      mailshim daemon
      mailshim setup-spool && exec mailshim daemon
    """

    cfg = _config(ctx)
    # Readable is enough to be chosen: a read-only spool is then refused with the reason.
    # With none yet, the one this user's sendmail would create (root: the configured one).
    spools = spoolchoice.known_spools(cfg) or [spoolchoice.choose(cfg)]
    if not any(s.writable() for s in spools):
        raise NoPermError(
            "no spool this user can run: the system spool needs root or the mailshim user"
        )
    queuerun.refuse_defaults(cfg, [s for s in spools if s.writable()])

    def say(line: str) -> None:
        click.echo(f"mailshim: {line}", err=True)

    # Without syslog or a [log] file, the log lines go where a container's logs are kept.
    maillog.use_stderr(True)
    from mailshim import daemon

    code = daemon.run(cfg, spools, say)
    if code:
        ctx.exit(code)
