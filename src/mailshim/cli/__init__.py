"""Command-line front ends: the only code that calls sys.exit.

Trust: runs as any user, in whatever process state the caller left (closed descriptors
included); ``standard_fds()`` makes that state safe before anything is opened.

Raises nothing: ``standard_fds`` gives up quietly when even /dev/null cannot be opened. Its
submodules turn every ``MailshimError`` into its exit code.
"""

from __future__ import annotations

import os
import sys


def standard_fds() -> None:
    """Reopen a closed fd 0, 1 or 2 on /dev/null and give Python streams for them.

    A caller may start us with only fd 0 open (GNU mailutils does). The next file opened
    would then become stdout or stderr, so a spool entry could receive our messages; and
    Python sets ``sys.stdout``/``sys.stderr`` to None, which turned every exit into 1.
    Postfix's programs do the same at start-up, before they open anything. Raises nothing:
    with no /dev/null at all there is nothing better to do than go on.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                new = os.open(os.devnull, os.O_RDWR)
            except OSError:
                return
            if new != fd:  # a lower fd was closed too and is now taken: fill in order
                os.dup2(new, fd)
                os.close(new)
    if sys.stdin is None:
        sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)  # noqa: SIM115
    if sys.stdout is None:
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
