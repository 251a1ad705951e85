#!/usr/bin/env bash
# What a `pipx install mailshim` user gets, from the built wheel: pipx in a throwaway venv,
# a clean PIPX_HOME, the wheel with its [sink] extra; the man pages and completions where the
# wheel puts them; then the demo with the installed commands: `mailshim check` against its
# own sink, a message through the installed `sendmail`, its story from `mailshim log`.
#
#   .ci/pypi-check.sh dist/mailshim-VERSION-py3-none-any.whl
set -euo pipefail
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/pipx-venv"
"$work/pipx-venv/bin/pip" install -q pipx
export PIPX_HOME="$work/pipx" PIPX_BIN_DIR="$work/bin" PIPX_MAN_DIR="$work/man"
"$work/pipx-venv/bin/pipx" install "$wheel[sink]" >/dev/null
bin="$work/bin"
venv="$PIPX_HOME/venvs/mailshim"

echo "== installed: $("$bin/mailshim" --version)"
for page in share/man/man8/sendmail.8 share/man/man8/mailshim.8 share/man/man5/mailshim.toml.5 \
    share/man/man1/mailq.1 share/bash-completion/completions/mailshim.bash \
    share/zsh/site-functions/_mailshim share/fish/vendor_completions.d/mailshim.fish; do
  [ -f "$venv/$page" ] || { echo "missing from the wheel's data: $page" >&2; exit 1; }
done
echo "== man pages and completions are in $venv/share"

echo "== the demo, run with the installed commands (scripts/demo.sh)"
out=$(VENV="$venv" bash "$(dirname "$0")/../scripts/demo.sh")
echo "$out"
# The sink got it, root's alias applied, the header qualified, and the log tells its story.
grep -qx 'X-Sink-Rcpt-To: <admin@example.org>' <<<"$out"
grep -qx 'To: root@example.org' <<<"$out"
grep -qx 'backup done' <<<"$out"
grep -q 'status=sent' <<<"$out"
grep -qx 'Mail queue is empty' <<<"$out"
echo "== pipx install: mailshim check and a sink round trip passed"
