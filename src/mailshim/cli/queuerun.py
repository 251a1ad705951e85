"""``mailshim run`` and ``mailshim flush`` from the command line, without click: the progress
lines or bar, the summary, the one-line errors and the exit.

Both ways in use it: the click commands in admin.py, and cli/entry.py's shortcut for a plain
``run`` or ``flush`` off a terminal (what the units and cron start).

Trust: as cli/admin.py: run by administrators, the units (as ``mailshim``) and users on their
own spool; it acts only on spools the caller can write.

Raises nothing to the shell: errors are one line on stderr with the sysexits code
(``MailshimError``'s; 75 when interrupted; 70 with a log line for a bug).
"""

from __future__ import annotations

import os
import sys
import time
from typing import NoReturn

from mailshim import maillog, spoolchoice
from mailshim.errors import (
    EX_IOERR,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    ConfigError,
    MailshimError,
    SpoolIOError,
    one_line,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim import spool
    from mailshim.config import Config

_SHOWN_STATUS = {
    "sent": "delivered",
    "deferred": "deferred",
    "bounced": "bounced",
    "rejected": "bounced",
    "quarantined": "unreadable",
}


_COLOURS = {"green": "32", "yellow": "33", "red": "31"}


class Progress:
    """A one-line bar on a terminal (delivered / deferred / bounced); plain lines otherwise.

    Output that cannot be written (a full disk, a reader gone) stops the lines, never the
    delivery: ``failed`` keeps why, for the exit status."""

    def __init__(self, total: int, tty: bool, color: bool) -> None:
        self.total = total
        self.tty = tty
        self.color = color
        self.counts = {"delivered": 0, "deferred": 0, "bounced": 0, "unreadable": 0}
        self.seen = 0
        self.flushed = time.monotonic()
        self.failed: OSError | None = None

    def __call__(self, qid: str, status: str) -> None:
        shown = _SHOWN_STATUS.get(status, status)
        self.counts[shown] = self.counts.get(shown, 0) + 1
        self.seen += 1
        if self.failed is not None:
            return
        if not self.tty:
            # Buffered, flushed twice a second: a write and a tty check per message were a
            # few per cent of a flush's own CPU (bench/RESULTS.md (h)).
            try:
                sys.stdout.write(f"{qid}: {shown}\n")
                if time.monotonic() - self.flushed >= 0.5:
                    sys.stdout.flush()
                    self.flushed = time.monotonic()
            except OSError as exc:
                self.failed = exc
            return
        self.draw()

    def _style(self, text: str, fg: str) -> str:
        from mailshim.paint import painter

        return painter(self.color, _COLOURS)(fg, text)

    def draw(self) -> None:
        import shutil

        total = max(self.total, self.seen)
        counts = (
            self._style(f"{self.counts['delivered']} delivered", "green")
            + ", "
            + self._style(f"{self.counts['deferred']} deferred", "yellow")
            + ", "
            + self._style(f"{self.counts['bounced']} bounced", "red")
        )
        width = max(10, min(40, shutil.get_terminal_size((80, 24)).columns - 60))
        filled = width * self.seen // total if total else width
        bar = "#" * filled + "-" * (width - filled)
        try:
            sys.stdout.write(f"\r[{bar}] {self.seen}/{total}  {counts}\x1b[K")
            sys.stdout.flush()
        except OSError as exc:
            self.failed = exc

    def finish(self) -> None:
        if self.failed is not None:
            return
        try:
            if self.tty and self.seen:
                sys.stdout.write("\n")
            sys.stdout.flush()
        except OSError as exc:
            self.failed = exc


def run_queue(cfg: Config, verbose: bool, force: bool) -> None:
    """One run over every spool this user can write: ``force`` (flush) tries everything,
    else only what is due. Progress on stdout, the SMTP dialogue on stderr with ``verbose``,
    then the summary line. Raises ``SpoolIOError`` (74) when the output cannot be written."""
    from mailshim import queueview, runner

    spools = [s for s in spoolchoice.known_spools(cfg) if s.writable()]
    if not spools:
        _say("nothing to deliver: no spool this user can write")
        return
    if not force and os.environ.get("MAILSHIM_SERVED") == "units":
        _mark_units(spools)
    refuse_defaults(cfg, spools)
    publish_config(cfg, spools)
    from mailshim import spoolindex

    total = sum(spoolindex.totals(s)[0] for s in spools)
    # The transcript goes to stderr line by line: a bar redrawn in between would garble it.
    tty = isatty(sys.stdout) and not verbose
    progress = Progress(total, tty, tty and queueview.use_color(sys.stdout))

    def transcript(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    if tty and total:
        progress.draw()
    try:
        counts = runner.flush(
            cfg,
            spools,
            progress=progress,
            transcript=transcript if verbose else None,
            force=force,
        )
    finally:
        progress.finish()
    if isinstance(progress.failed, BrokenPipeError):
        return  # the reader has all it wants (`mailshim flush | head`)
    if progress.failed is not None:
        raise SpoolIOError(f"cannot write the output: {progress.failed.strerror}")
    untried = total - counts.total() - counts.skipped
    untried = untried if untried > 0 and counts.deferred else 0
    if force or tty or verbose or counts.total() or counts.errors or counts.limited or untried:
        _say(counts.summary(untried))
    # else: a scheduled run that tried nothing says nothing (the timer starts one a minute;
    # "Nothing to deliver." each time was most of an idle host's journal)


def _mark_units(spools: list[spool.Spool]) -> None:
    """Started by mailshim-flush.service (``MAILSHIM_SERVED=units``), which only the timer
    starts: the units serve these spools, so ``sendmail`` leaves delivery to them
    (serving.served). The path unit starts mailshim-pickup.service, whose runs do not
    refresh the mark: with the timer stopped it goes stale and agents start again, even
    while the path unit still runs on new mail. (Not told apart by ``TRIGGER_UNIT``:
    systemd 252 keeps the first trigger's for every later run.)"""
    from mailshim import serving

    for target in spools:
        serving.mark_served(target, serving.UNITS)


def publish_config(cfg: Config, spools: list[spool.Spool]) -> None:
    """The system file loaded and is valid: keep the runner's copy of it in each spool's
    ``status/`` up to date, for users whose ``sendmail`` finds it broken later (issue 23)."""
    from mailshim import paths

    if cfg.broken is not None or not cfg.path:
        return
    if os.path.abspath(cfg.path) != paths.SYSTEM_CONFIG:
        return
    from mailshim import ownview

    for target in spools:
        if target.has_incoming():
            ownview.publish_config(target.root, cfg.path)


def refuse_defaults(cfg: Config, spools: list[spool.Spool]) -> None:
    """Deliver nothing with the built-in defaults standing in for a broken file: they may
    name the wrong listener. Raises ``ConfigError`` (78) saying what waits, and where; the
    mail is delivered by the first run after the file is fixed."""
    from mailshim import configload

    if configload.usable(cfg):
        return
    waiting = sum(len(s.ids()) + _dropped(s) for s in spools)
    where = ", ".join(s.root for s in spools)
    text = (
        f"{cfg.path or 'the configuration'} is invalid and no earlier configuration from it"
        f" was valid here: nothing is delivered; {waiting} message(s) wait in {where}"
        " (sendmail still spools); fix the file and they are delivered at the next run"
    )
    maillog.log(f"error: {text}", error=True)
    raise ConfigError(text)


def _dropped(target: spool.Spool) -> int:
    """Entries users left in the drop folder (listable by the runner and root only)."""
    from mailshim import spoolfmt

    try:
        return sum(1 for n in os.listdir(target.incoming) if spoolfmt.valid_id(n))
    except OSError:
        return 0


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def isatty(stream: object) -> bool:
    """Whether ``stream`` is a terminal (a closed or missing stream is not)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # closed
        return False


def failed(exc: BaseException) -> int:
    """Say what went wrong in one line on stderr; the exit code (sysexits)."""
    if isinstance(exc, MailshimError):
        sys.stderr.write(f"mailshim: {exc.message}\n")
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("mailshim: interrupted\n")
        return EX_TEMPFAIL
    if isinstance(exc, BrokenPipeError):
        # `mailshim queue | head`: the reader has all it wants. Point stdout at /dev/null so
        # the final flush does not fail again.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        return EX_OK
    maillog.log(f"internal error: {exc.__class__.__name__}: {exc}", error=True)
    sys.stderr.write(
        f"mailshim: internal error ({exc.__class__.__name__}: {one_line(str(exc))});"
        " please report it\n"
    )
    return EX_SOFTWARE


def leave(code: int) -> NoReturn:
    """Exit with ``code`` once the output is out, without the interpreter's teardown of the
    ~230 modules a flush loads (about 20 ms of CPU, bench/RESULTS.md (h)); ``sendmail``
    leaves the same way. Nothing is left to finish: spool files are closed and the event
    loop is gone by then. Output that cannot be written is still an error (74), as the
    interpreter's final flush would have made it one."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # the reader has all it wants
    except (OSError, ValueError) as exc:
        if code == EX_OK:  # otherwise the failure has been said already
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            try:
                sys.stderr.write(f"mailshim: cannot write the output: {why}\n")
            except (OSError, ValueError):
                pass
            code = EX_IOERR
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)
