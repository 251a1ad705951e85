#!/bin/sh
# Run the tests that exercise the libraries (relay, sendmail end to end, -bs, relay targets,
# the admin CLI) against Debian bookworm's versions (aiosmtplib 2.0.0, click 8.1.3,
# platformdirs 2.6.0); the test tools (pytest, aiosmtpd, trustme, hypothesis) may be the
# newest. The venv lives in /tmp and is reused between runs; mailshim is installed into it
# without dependencies so its console scripts exist and the pins stay in force.
#
#   tests/compat/run-bookworm.sh [pytest args...]   (default: the files listed below)
#   PYTHON=/path/to/python3.10 tests/compat/run-bookworm.sh     (another interpreter)
#
# The interpreter defaults to Debian's own /usr/bin/python3 (3.11.2 on bookworm) when present.
set -eu

here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
tag=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
venv=${BOOKWORM_VENV:-/tmp/mailshim-bookworm-py$tag}
pins="aiosmtplib==2.0.0 click==8.1.3 platformdirs==2.6.0"
case $tag in 3.10.*)  pins="$pins tomli==2.0.1" ;; esac

if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
fi
# Quick when everything is already installed; the pins are re-applied every time.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$venv/bin/python" -m pip install --disable-pip-version-check \
        $pins pytest aiosmtpd trustme hypothesis >"$log" 2>&1; then
    cat "$log" >&2
    echo "run-bookworm: pip install failed" >&2
    exit 1
fi

"$venv/bin/python" - <<'PY'
import sys

import aiosmtplib
import click
import platformdirs

print("python", sys.version.split()[0], "aiosmtplib", aiosmtplib.__version__,
      "click", click.__version__, "platformdirs", platformdirs.__version__)
assert aiosmtplib.__version__ == "2.0.0", aiosmtplib.__version__
PY

cd "$here"
if ! "$venv/bin/python" -m pip install --disable-pip-version-check --no-deps --force-reinstall \
        "$here" >"$log" 2>&1; then
    cat "$log" >&2
    echo "run-bookworm: installing mailshim failed" >&2
    exit 1
fi
if [ $# -eq 0 ]; then
    set -- tests/test_relay.py tests/test_sendmail.py tests/test_bs.py \
        tests/test_relay_targets.py tests/test_config.py
    [ -f tests/test_admin.py ] && set -- "$@" tests/test_admin.py
    # STARTTLS, AUTH and LMTP against real servers (Dovecot, Haraka) with aiosmtplib 2.0
    [ -f tests/test_real_listeners.py ] && set -- "$@" tests/test_real_listeners.py
fi
"$venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
