"""Run one fuzz target under atheris (libFuzzer, coverage-guided).

    .venv/bin/python tests/fuzz/harness.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is a key of ``targets.TARGETS``. ``tests/fuzz/run.sh`` runs every target for a bounded
time over a copy of the committed corpus. ``--strict`` (before the libFuzzer options) also
stops on the open bugs listed in ``targets.OPEN_BUGS``; without it they are skipped, so a known,
reported crash does not hide new ones.
"""

from __future__ import annotations

import os
import sys

import atheris

# This folder (for ``targets``) is sys.path[0] when run as a script.
with atheris.instrument_imports(include=["mailshim"]):
    import mailshim.address
    import mailshim.argv
    import mailshim.bounce
    import mailshim.message
    import mailshim.smtpserver
    import mailshim.spoolfmt  # noqa: F401  (instrumented before targets imports them)

import targets


def main() -> None:
    args = sys.argv[1:]
    strict = "--strict" in args
    args = [a for a in args if a != "--strict"]
    if not args or args[0] not in targets.TARGETS:
        names = ", ".join(targets.TARGETS)
        sys.stderr.write(f"usage: harness.py [--strict] TARGET [...]; targets: {names}\n")
        sys.exit(64)
    name = args[0]
    target = targets.TARGETS[name]
    skipped: set[str] = set()

    def one(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:
            bug = None if strict else targets.open_bug(name, exc)
            if bug is None:
                raise
            if bug not in skipped:
                # libFuzzer ends the process with exit(): say it now, not at the end.
                sys.stderr.write(f"harness.py: skipping inputs that hit open bug {bug}\n")
            skipped.add(bug)

    # libFuzzer re-runs argv[0] for -merge and -fork: run.sh points MAILSHIM_FUZZ_SELF at a
    # small wrapper that runs this script with this target.
    self_command = os.environ.get("MAILSHIM_FUZZ_SELF", sys.argv[0])
    atheris.Setup([self_command, *args[1:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
