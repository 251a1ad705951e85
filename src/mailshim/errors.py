"""The exception tree; each class carries its sysexits(3) code.

This is the only place where a failure is mapped to an exit status: every other module raises
one of these classes, and only ``mailshim.cli`` turns them into ``sys.exit``.

Trust: imported by every process (``sendmail`` as any user, the runner, the admin CLI). It
holds no state and touches nothing; messages must already be safe to print (one line, no
control characters), which ``MailshimError`` enforces.

Raises nothing itself; ``MailshimError`` is the base of everything the other modules raise on
purpose, and its subclasses' ``code`` is the exit status: 64 usage, 65 data, 66 no input, 67 no
user, 69 unavailable, 70 software, 73 cannot create, 74 I/O, 75 temporary, 77 permission, 78
configuration.
"""

from __future__ import annotations

import errno

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


# Characters that must never reach a terminal or a log as themselves: they end or forge a
# line (CR, LF, U+2028, U+2029), start escape sequences (ESC, and the C1 CSI/OSC/DCS bytes
# U+0080-U+009F that a UTF-8 terminal also obeys), or reorder what is shown (the bidi
# embeddings, overrides and isolates U+202A-U+202E, U+2066-U+2069). Lone surrogates stand for
# undecodable bytes and cannot be printed at all.
_HIDDEN = frozenset(range(0x20)) | frozenset(range(0x7F, 0xA0)) | frozenset(range(0x202A, 0x202F))
_HIDDEN |= frozenset(range(0x2066, 0x206A)) | {0x2028, 0x2029}


def printable(text: str, limit: int = 0, *, ascii_only: bool = False) -> str:
    """The one helper that makes text from a message, a listener or a user safe to print:
    a single line for a terminal, syslog, a report or a reply.

    Line ends become spaces; every other control (C0, DEL, C1), bidi override or isolate,
    line separator and lone surrogate becomes "?" (so a Subject cannot retitle, recolour
    or rewrite root's terminal through ``mailq``); ``ascii_only`` also turns anything
    beyond ASCII into "?". The result is stripped and, with ``limit``, cut to that many
    characters plus "...".

    >>> printable("bad\\r\\nline\\x00 \\x1b]0;pwned\\x07 \\u202eevil \\x9b31m")
    'bad line? ?]0;pwned? ?evil ?31m'
    """
    if not (text.isprintable() and (text.isascii() or not ascii_only)):
        text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        out = []
        for ch in text:
            code = ord(ch)
            if code in _HIDDEN or 0xD800 <= code <= 0xDFFF or (ascii_only and code > 0x7E):
                out.append(" " if ch == "\t" else "?")
            else:
                out.append(ch)
        text = "".join(out)
    text = text.strip()
    return text if not limit or len(text) <= limit else text[:limit] + "..."


def one_line(text: str) -> str:
    """Make ``text`` safe for a single stderr or syslog line (``printable``, unbounded).

    >>> one_line("bad\\r\\nline\\x00")
    'bad line?'
    """
    return printable(text)


class MailshimError(Exception):
    """A failure with a one-line explanation and a sysexits code."""

    code = EX_SOFTWARE

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(MailshimError):
    """The command line is wrong (unknown flag, missing argument, no recipients)."""

    code = EX_USAGE


class DataError(MailshimError):
    """The input is wrong: a malformed address, a header block too large, a bad spool entry."""

    code = EX_DATAERR


class NoInputError(MailshimError):
    """A file named on the command line does not exist or cannot be read."""

    code = EX_NOINPUT


class NoUserError(MailshimError):
    """The listener refused every recipient (or one of them, in interactive mode)."""

    code = EX_NOUSER


class UnavailableError(MailshimError):
    """The listener refused the message permanently (5xx) for a reason not tied to a user."""

    code = EX_UNAVAILABLE


class SoftwareError(MailshimError):
    """A bug: something that should not happen did."""

    code = EX_SOFTWARE


class CantCreateError(MailshimError):
    """A spool file or folder cannot be created (missing, read-only file system)."""

    code = EX_CANTCREAT


class SpoolIOError(MailshimError):
    """Reading or writing failed half-way (EIO and friends)."""

    code = EX_IOERR


class TempFailError(MailshimError):
    """Try again later: disk full, listener down in a mode that does not spool, a lock held."""

    code = EX_TEMPFAIL


class NoPermError(MailshimError):
    """Permission denied: the spool, a secret, or an operation reserved to root."""

    code = EX_NOPERM


class ConfigError(MailshimError):
    """The configuration is wrong: names the file, the key and the problem.

    ``key`` ("[addresses] domain") lets ``mailshim check`` name the same key in its fix."""

    code = EX_CONFIG

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def from_oserror(exc: OSError, doing: str) -> MailshimError:
    """Classify an ``OSError`` raised while ``doing`` something ("writing the spool entry").

    Full disks and quotas are temporary (the caller may retry, nothing was kept); a
    read-only or missing folder is "can't create"; permissions are EX_NOPERM; the rest is I/O.
    """
    reason = exc.strerror or str(exc)
    text = f"{doing}: {reason}"
    if exc.filename:
        text = f"{doing} {exc.filename}: {reason}"
    num = exc.errno
    if num in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EMFILE, errno.ENFILE):
        return TempFailError(text + " (nothing was kept; try again later)")
    if num in (errno.EACCES, errno.EPERM):
        return NoPermError(text)
    if num in (errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.ELOOP):
        return CantCreateError(text)
    return SpoolIOError(text)
