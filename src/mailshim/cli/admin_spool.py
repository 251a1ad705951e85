"""``mailshim`` commands that set up and run the spool: ``setup-spool``, ``daemon`` and
``retrier`` (what retries a user's mail where no runner serves the spool).

Trust: ``setup-spool`` runs as root (packages call it from postinst); it creates folders with
fixed owners and modes, opens each without following links, and gives root-owned entries to
the runner user only when they have a single link. ``daemon`` runs as root or the
``mailshim`` user (mailshim-daemon.service), or as any user on their own per-user spool; it
treats every entry as hostile (runner.py, spool.py). ``retrier`` runs as any user on their
own crontab or systemd user units (retrier.py).

Raises ``NoPermError`` (77) when ``setup-spool`` is not run by root or ``daemon`` finds no spool
the caller can run, ``NoUserError`` (67) when the runner user does not exist; ``admin.main``
prints them and exits with the code; ``retrier`` raises what retrier.py raises (69, 73, 75).
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


@cli.group("retrier")
def retrier_cmd() -> None:
    """Set up what retries your deferred mail where no runner serves the spool.

    \b
    pip, pipx, a venv or the per-user spool have no timer or daemon: the delivery agent
    sendmail starts retries deferred mail while it lives, and once it is gone (OOM killer,
    SIGKILL, a reboot) nothing does until the next submission. `install` sets up a retrier
    that survives reboots; `mailshim check` names it. Containers: run `mailshim daemon`.
    """


@retrier_cmd.command("install")
@click.option("--systemd", "kind", flag_value="systemd", help="A systemd user timer.")
@click.option("--cron", "kind", flag_value="cron", help="Your crontab (@reboot, every minute).")
@click.pass_context
def retrier_install_cmd(ctx: click.Context, kind: str | None) -> None:
    """Run `mailshim run` at boot and every minute, as you.

    \b
    A systemd user timer (mailshim-retry.timer in ~/.config/systemd/user) where your
    systemd user manager runs, else two lines in your crontab between marker comments.
    `mailshim run` tries only what is due, so the [queue] retry schedule holds. Running it
    again replaces what it installed.

    \b
    Examples:
      mailshim retrier install
      mailshim retrier install --cron
      mailshim -C ~/mail.toml retrier install
    """
    from mailshim import retrier

    _config(ctx)  # a configuration that cannot be read is refused now, not every minute
    obj = ctx.ensure_object(dict)
    config_path = obj.get("config_path") or os.environ.get("MAILSHIM_CONFIG")
    for line in retrier.install(retrier.choose(kind), config_path):
        click.echo(line)


@retrier_cmd.command("remove")
def retrier_remove_cmd() -> None:
    """Remove the retrier `install` set up (timer or crontab lines).

    \b
    Examples:
      mailshim retrier remove
    """
    from mailshim import retrier

    for line in retrier.remove():
        click.echo(line)
