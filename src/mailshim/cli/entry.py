"""The ``mailshim`` command's entry point: a plain ``run`` or ``flush`` skips click.

The packaged timer and path units, the cron fallback and scripts start ``mailshim run`` (or
``flush``) with no terminal, as often as every few seconds: for exactly those arguments, off
a terminal, ``main`` goes straight to the runner (cli/queuerun.py) without loading the click
command tree (about 20 ms of a run's start-up). Anything else (options, ``-C``, a terminal
and its progress bar, ``--help``) goes to the click CLI in admin.py, which prints the same
lines through the same code. ``check-queue`` (a monitoring system's check, every minute) also
goes straight to cli/checkqueue.py, whose exit codes are the Monitoring Plugins' (0-3).

Trust: as cli/admin.py. Raises nothing to the shell: one line on stderr and the sysexits
code, as admin.py.
"""

from __future__ import annotations

import sys

from mailshim.cli import queuerun, standard_fds
from mailshim.errors import EX_OK


def _straight(force: bool) -> int:
    from mailshim import configload

    try:
        cfg = configload.load_or_fallback(None)
        line = configload.announce(cfg)
        if line is not None:
            sys.stderr.write(f"mailshim: error: {line}\n")
        queuerun.run_queue(cfg, verbose=False, force=force)
    except (Exception, KeyboardInterrupt) as exc:
        return queuerun.failed(exc)
    return EX_OK


def main() -> None:
    """The ``mailshim`` command."""
    standard_fds()
    args = sys.argv[1:]
    if args in (["run"], ["flush"]) and not queuerun.isatty(sys.stdout):
        queuerun.leave(_straight(force=args == ["flush"]))
    config_path = None
    if args[:1] == ["-C"] and len(args) > 2:
        config_path, args = args[1], args[2:]
    if args[:1] == ["check-queue"]:
        from mailshim.cli import checkqueue

        queuerun.leave(checkqueue.main(args[1:], config_path))
    from mailshim.cli import admin

    admin.main()


if __name__ == "__main__":
    main()
