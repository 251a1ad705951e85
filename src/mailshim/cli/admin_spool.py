"""``mailshim`` commands that set up and run the spool: setup-spool (and the runner daemon).

Trust: ``setup-spool`` runs as root (packages call it from postinst); it creates folders with
fixed owners and modes and follows no symlinks it did not create.
"""

from __future__ import annotations

import os

import click

from mailshim import paths, spool
from mailshim.cli.admin import _config, cli
from mailshim.errors import NoPermError


@cli.command("setup-spool")
@click.pass_context
def setup_spool_cmd(ctx: click.Context) -> None:
    """Create the system spool with its owners and modes (run as root; packages call it)."""
    if os.geteuid() != 0:
        raise NoPermError("setup-spool must run as root")
    cfg = _config(ctx)
    target = spool.Spool(cfg.queue_dir or paths.SYSTEM_SPOOL)
    target.ensure()
    click.echo(f"spool ready: {target.root}")


