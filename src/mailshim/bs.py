"""`sendmail -bs`: run the SMTP dialogue of ``smtpserver.ServerSession`` over stdin/stdout.

``serve()`` reads what the client sends, answers in order (PIPELINING: replies are written
as soon as no complete command is left in the input, never held back waiting for more),
streams each message's DATA section through ``smtpserver.DataDecoder`` into
``submit.submit()`` (so memory stays flat whatever the message size), and answers the final
dot once the message is durably spooled (background and queue mode: the agent or the runner
delivers it, as Postfix's ``sendmail -bs`` does), or, in interactive mode (``-odi``, ``-v``),
once the listener has given its verdict.

Exit status (returned; ``cli/sendmail.py`` exits with it):

- 0 when the session ended (QUIT, or end of input between commands, as Postfix's stand-alone
  smtpd does) and every message whose data the client completed was accepted or spooled.
  Commands the client got an error for (a bad address, a command out of order) do not count:
  the client was told, and no message was lost.
- otherwise the sysexits code of the first message that was not accepted: 67 refused by the
  listener, 69 refused at MAIL FROM (not tied to a recipient), 65 too large or malformed,
  75 a local temporary failure (spool full).
- 65 when the input ends in the middle of DATA (the message is neither sent nor kept) or after
  too many protocol errors; 75 after the idle timeout (``421 4.4.2``).

Nothing is written to stderr: Symfony Mailer treats early stderr output as a failed start, and
the client learns everything from the replies.

Trust: runs as whoever started ``sendmail -bs`` (not set-id). The client and every byte it
sends are untrusted; the configuration is trusted. Submission (preparation, spool, relay) is
``mailshim.submit``'s job, with the same checks as for a message piped to ``sendmail``.

Raises nothing to its caller: ``serve`` returns the exit status above; ``DataError`` and
``TempFailError`` raised inside a DATA section become that status and a 4xx/5xx reply.
"""

from __future__ import annotations

import errno
import os
import select

from mailshim import errors, smtpserver, spoolchoice, submit
from mailshim.constants import (
    BACKGROUND,
    BOUNCED,
    DEFERRED,
    INTERACTIVE,
    QUEUED,
    REJECTED,
    SENT,
)
from mailshim.errors import DataError, MailshimError, TempFailError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from mailshim.config import Config
    from mailshim.submit import Outcome

READ_SIZE = 65536
# Statuses of submit.Outcome meaning the message is safe: with the listener, or in the spool
# (for "bounced", some recipients accepted it and the rest get a bounce from the spool).
_ACCEPTED = frozenset({SENT, DEFERRED, QUEUED, BOUNCED})


class _Session:
    """One ``sendmail -bs`` run: the buffers and the state of the data phase."""

    def __init__(
        self, config: Config, infd: int, outfd: int, idle_timeout: float, mode: str
    ) -> None:
        self.config = config
        self.mode = mode
        self.infd = infd
        self.outfd = outfd
        self.timeout_ms = max(1, int(idle_timeout * 1000))
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.eof = False
        self.broken = False  # the client no longer reads our replies
        self.status = errors.EX_OK
        # SIZE in EHLO and the DATA cut-off: what submit() would take from this spool.
        self.max_size = config.max_size_for(
            spoolchoice.choose(config, create=False).listener_size()
        )
        self.smtp = smtpserver.ServerSession(
            config.helo_name,
            self.max_size,
            max_recipients=config.max_recipients,
            rewrite=self._rewrite,
        )
        self.poller = select.poll()
        self.poller.register(infd, select.POLLIN | select.POLLPRI)
        # The data phase.
        self.decoder = smtpserver.DataDecoder()
        self.pending = b""
        self.pending_at = 0
        self.abort: str | None = None  # "eof" | "timeout" | "oversize", once read() gave up

    def _rewrite(self, addr: str) -> list[str]:
        return submit.rewrite_recipient(self.config, addr)

    # Output ------------------------------------------------------------------------------

    def flush(self) -> None:
        view = memoryview(self.outbuf)
        done = 0
        try:
            while done < len(view) and not self.broken:
                try:
                    done += os.write(self.outfd, view[done:])
                except BlockingIOError:
                    # A non-blocking pipe inherited from the client: wait until it drains.
                    select.select([], [self.outfd], [], self.timeout_ms / 1000)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise
            self.broken = True
        finally:
            view.release()
            self.outbuf.clear()

    # Input -------------------------------------------------------------------------------

    def fill(self) -> bool:
        """Wait for input and append it to ``inbuf``, replies flushed first. False at end of
        input; False with ``abort = "timeout"`` after the idle timeout."""
        if self.eof:
            return False
        self.flush()
        while True:
            # EINTR is retried by Python itself (PEP 475); a signal handler that raises ends
            # the session through the CLI.
            if not self.poller.poll(self.timeout_ms):
                self.abort = "timeout"
                return False
            try:
                data = os.read(self.infd, READ_SIZE)
            except BlockingIOError:
                continue  # a non-blocking descriptor that poll() called ready too early
            if not data:
                self.eof = True
                return False
            self.inbuf += data
            return True

    def next_line(self) -> bytes | None:
        """The next command line; ``b""`` for a line that was too long (discarded); None at
        end of input or on timeout."""
        skipping = False
        while True:
            nl = self.inbuf.find(b"\n")
            if nl >= 0:
                line = bytes(self.inbuf[: nl + 1])
                del self.inbuf[: nl + 1]
                return b"" if skipping else line
            if len(self.inbuf) > smtpserver.MAX_COMMAND_LINE:
                # Keep memory bounded: drop what we have and skip to the end of the line.
                skipping = True
                self.inbuf.clear()
            if not self.fill():
                if self.abort or skipping or not self.inbuf:
                    return None
                # A last command without its line ending: take it as a line.
                line = bytes(self.inbuf)
                self.inbuf.clear()
                return line

    def read(self, size: int) -> bytes:
        """The ``read`` callable given to ``submit()``: message bytes, ``b""`` after the
        terminating dot. Raises (so that submit keeps nothing) at end of input, on timeout,
        and once the message exceeds ``max_size``."""
        while self.pending_at >= len(self.pending):
            if self.decoder.done:
                return b""
            self.pending, self.pending_at = self._decode_some(), 0
            if self.abort == "eof":
                raise DataError("connection closed in DATA")
            if self.abort == "timeout":
                raise TempFailError("idle timeout in DATA")
            if self.decoder.size > self.max_size:
                self.abort = "oversize"
                raise DataError("message too large")
        start = self.pending_at
        self.pending_at = min(len(self.pending), start + max(1, size))
        return self.pending[start : self.pending_at]

    def _decode_some(self) -> bytes:
        """Decode what is buffered, or wait for more; leftover commands stay in ``inbuf``."""
        if not self.inbuf and not self.fill():
            if self.abort is None:
                self.abort = "eof"
            return b""
        chunk = bytes(self.inbuf)
        self.inbuf.clear()
        payload, end = self.decoder.feed(chunk)
        if end is not None:
            self.inbuf += chunk[end:]
        return payload

    def drain(self) -> None:
        """Skip the rest of the DATA section (after a refusal) up to the terminating dot."""
        self.pending, self.pending_at = b"", 0
        while not self.decoder.done and self.abort in (None, "oversize"):
            self._decode_some()

    # The dialogue ------------------------------------------------------------------------

    def run(self) -> int:
        self.outbuf += self.smtp.greeting()
        while not self.broken:
            line = self.next_line()
            if line is None:
                if self.abort == "timeout":
                    self.outbuf += self.smtp.timeout()
                    self.flush()
                    return errors.EX_TEMPFAIL
                break
            response = self.smtp.line_too_long() if not line else self.smtp.command(line)
            self.outbuf += response.data
            if response.close:
                if self.smtp.errors >= self.smtp.hard_error_limit:
                    self._failed(errors.EX_DATAERR)
                break
            if response.transaction is not None:
                result = self.message(response.transaction)
                if result is not None:
                    return result
        self.flush()
        return self.status

    def _failed(self, code: int) -> None:
        if self.status == errors.EX_OK:
            self.status = code

    def message(self, tx: smtpserver.Transaction) -> int | None:
        """Receive and submit one message; None to go on with the session, else the exit
        status (the client went away or timed out)."""
        self.decoder = smtpserver.DataDecoder()
        self.pending, self.pending_at = b"", 0
        self.abort = None
        submission = submit.Submission(
            tx.sender or "<>",
            list(tx.recipients),
            extract=False,
            dot_ends=False,
            mode=self.mode,
            discard_rejected=True,
        )
        outcome: Outcome | None = None
        failure: MailshimError | None = None
        try:
            outcome = submit.submit(self.config, submission, self.read)
        except MailshimError as exc:
            failure = exc
        except Exception:
            # A bug or a signal: tell the client, then let the CLI report it.
            self.outbuf += smtpserver.reply(
                421, "4.3.0 Error: local error, message not kept, closing"
            )
            self.flush()
            raise
        if self.abort in (None, "oversize") and not self.decoder.done:
            # Refused before reading to the end: skip the rest before answering.
            self.drain()
        if self.abort == "eof":
            return errors.EX_DATAERR
        if self.abort == "timeout":
            self.outbuf += self.smtp.timeout()
            self.flush()
            return errors.EX_TEMPFAIL
        answer, code = self._verdict(outcome, failure)
        self.outbuf += self.smtp.data_finished(answer)
        if code != errors.EX_OK:
            self._failed(code)
        return None

    def _verdict(self, outcome: Outcome | None, failure: MailshimError | None) -> tuple[bytes, int]:
        """The reply to the final dot and the exit status it implies."""
        if self.abort == "oversize" or self.decoder.size > self.max_size:
            return (
                smtpserver.reply(552, "5.3.4 Message size exceeds fixed maximum message size"),
                errors.EX_DATAERR,
            )
        if failure is not None:
            return _failure_reply(failure), failure.code
        assert outcome is not None
        if outcome.status == REJECTED:
            replies = list(outcome.replies.values())
            permanent = [r for r in replies if r.permanent] or replies
            code = errors.EX_UNAVAILABLE if permanent and permanent[0].at_mail else errors.EX_NOUSER
            return smtpserver.listener_reply(permanent[0] if permanent else None), code
        if outcome.status not in _ACCEPTED:
            # e.g. "quarantined": the entry we just wrote could not be read back.
            return _failure_reply(errors.SoftwareError(outcome.status)), errors.EX_TEMPFAIL
        qid = "".join(ch for ch in outcome.queue_id if ch.isalnum() or ch in "-_.")
        return smtpserver.reply(250, f"2.0.0 Ok: queued as {qid}"), errors.EX_OK


def _failure_reply(exc: MailshimError) -> bytes:
    """A local failure while preparing or spooling the message; nothing was kept."""
    if isinstance(exc, DataError):
        return smtpserver.reply(554, f"5.6.0 Error: {exc.message}")
    if isinstance(exc, errors.ConfigError):
        return smtpserver.reply(451, "4.3.5 Error: local configuration problem, try again later")
    if isinstance(exc, (errors.NoUserError, errors.UnavailableError)):
        return smtpserver.reply(554, f"5.0.0 Error: {exc.message}")
    return smtpserver.reply(451, "4.3.0 Error: local error, message not kept, try again later")


def serve(
    config: Config,
    infd: int = 0,
    outfd: int = 1,
    idle_timeout: float = 300.0,
    *,
    mode: str | None = None,
    verbose: bool = False,
) -> int:
    """Run one ``sendmail -bs`` session on ``infd``/``outfd``; returns the exit status.

    ``mode`` (``-od``, else ``[delivery] mode``): in background and queue mode each message
    is answered 250 once it is durably spooled, and the agent (or the runner) delivers it,
    as for a piped message: a listener that never answers holds no client. Interactive mode
    (``-odi``, or ``-v``) relays first and answers with the listener's per-recipient verdict.
    """
    chosen = mode or config.delivery_mode
    if verbose and chosen == BACKGROUND:
        chosen = INTERACTIVE
    return _Session(config, infd, outfd, idle_timeout, chosen).run()
