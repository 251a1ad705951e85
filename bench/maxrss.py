"""Run a command and write its peak RSS (KiB), wall time (s) and exit code to a file.

Why a helper: the kernel carries a process's peak RSS across exec, so a child spawned straight
from the (large) benchmark process reports at least the benchmark's own size. Run this with
``python3 -I -S`` (a few MB): the command it forks starts from that small image, and
``wait4`` then reports the command's own peak (floor about 5 MB, below any Python process).

Usage: python3 -I -S bench/maxrss.py RESULT_FILE PROGRAM [ARGS...]

Trust: a benchmark tool; runs what it is given as the invoking user.
"""

import os
import sys
import time


def main() -> int:
    result, argv = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as f:
        f.write(f"{usage.ru_maxrss} {wall} {code}\n")
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
