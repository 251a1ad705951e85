"""The ``mailshim`` click group and the configuration every command shares.

Its own module so that the command modules (``admin``, ``admin_spool``) import it and not
each other: imports run one way (admin -> admin_spool -> group).

Trust: as ``cli/admin.py``. Raises ``MailshimError`` (configload.load: 78 and friends) from
``_config``; click's own errors are turned into sysexits codes by ``admin.main``.
"""

from __future__ import annotations

import click

from mailshim import __version__, configload
from mailshim import config as config_mod


def _config(ctx: click.Context) -> config_mod.Config:
    """The configuration; an invalid file is said on stderr and in the log, and the last good
    one (or the defaults) is used: the queue can still be listed and run (issue 23). The
    commands that deliver refuse the defaults (``queuerun.refuse_defaults``)."""
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        loaded = configload.load_or_fallback(obj.get("config_path"))
        line = configload.announce(loaded)
        if line is not None:
            click.echo(f"mailshim: error: {line}", err=True)
        obj["config"] = loaded
    cfg: config_mod.Config = obj["config"]
    return cfg


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nExamples:\n  mailshim check\n  mailshim send-test\n  mailshim queue\n"
    "  mailshim flush\n  mailshim log 18F2C0A1B3D4E5F6G7H8\n  mailshim -C /etc/mailshim/test.toml"
    " config",
)
@click.option("-C", "--config", "config_path", metavar="FILE", help="Read this config file.")
@click.version_option(__version__, prog_name="mailshim")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Administer mailshim: the sendmail that spools mail and hands it to one SMTP listener.

    Each command has --help with examples. Errors are one line on stderr with a sysexits
    code.
    """
    ctx.ensure_object(dict)["config_path"] = config_path
