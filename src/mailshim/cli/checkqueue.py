"""``mailshim check-queue``: parse the plugin's options, run the check, print one status line,
exit 0/1/2/3 (the Monitoring Plugins' codes, not sysexits: a monitoring system reads them).

Reached without click from cli/entry.py (a check every minute should not pay for the command
tree) and from the click command of the same name, which hands its arguments here, so both
parse alike. Every failure, a bad option included, is ``MAILSHIM UNKNOWN: why`` and exit 3.

Trust: any user (a monitoring account). Prints figures only (monplugin.py).

Raises nothing: ``main`` returns the exit code.
"""

from __future__ import annotations

import argparse
import sys

from mailshim.monplugin import UNKNOWN, PluginError, run, unknown

LIMITS = (
    ("waiting", "entries waiting to be delivered (new, deferred, in the drop folder)"),
    ("age", "seconds the oldest waiting entry has waited"),
    ("held", "held entries"),
    ("dead", "dead letters (failed for good)"),
    ("stall", "seconds mail has waited with nothing delivered (default 900 and 3600)"),
)
EPILOG = """\
thresholds are ranges: 10 (alert outside 0..10), 10: (below 10), ~:10 (above 10),
10:20 (outside 10..20), @10:20 (inside 10..20).

examples:
  mailshim check-queue
  mailshim check-queue -w 50 -c 500 --warning-age 3600 --critical-dead 0
  mailshim check-queue --warning-stall 600 --critical-stall 1800 --probe
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise PluginError(f"{message} (see mailshim check-queue --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mailshim check-queue",
        description="The queue as a Nagios/Icinga check: one status line with perfdata;"
        " exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. No network unless --probe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, what in LIMITS:
        short_w = ["-w"] if name == "waiting" else []
        short_c = ["-c"] if name == "waiting" else []
        p.add_argument(*short_w, f"--warning-{name}", metavar="RANGE", help=f"warn on {what}")
        p.add_argument(*short_c, f"--critical-{name}", metavar="RANGE", help="critical on it")
    p.add_argument("--spool", metavar="PATH", help="the spool to check (default: the configured)")
    p.add_argument("--probe", action="store_true", help="also connect to each listener")
    p.add_argument("-C", "--config", metavar="PATH", help="the configuration file")
    return p


def main(argv: list[str], config_path: str | None = None) -> int:
    """Run the check for ``argv`` (the words after ``check-queue``); returns the exit code."""
    try:
        args = parser().parse_args(argv)
        thresholds: dict[str, tuple[str | None, str | None]] = {}
        for name, _ in LIMITS:
            warn = getattr(args, f"warning_{name}")
            crit = getattr(args, f"critical_{name}")
            label = "oldest" if name == "age" else name
            if warn is not None or crit is not None or name != "stall":
                thresholds[label] = (warn, crit)
        path = args.config or config_path
        from mailshim import config, configload
        from mailshim.errors import MailshimError

        try:
            cfg = configload.load(path)
        except MailshimError as exc:
            if args.spool is None:
                raise PluginError(exc.message) from None
            cfg = config.Config()  # --spool names the spool: the defaults do for the rest
        code, line = run(cfg, path, thresholds, spool_root=args.spool, with_probe=args.probe)
    except PluginError as exc:
        code, line = UNKNOWN, unknown(str(exc))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # a bug: still one UNKNOWN line, never a traceback
        code, line = UNKNOWN, unknown(f"internal error: {type(exc).__name__}: {exc}")
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError:
        pass
    return code
