#!/usr/bin/env bash
# What a `pipx install mailshim` user gets, from the built wheel: pipx in a throwaway venv,
# a clean PIPX_HOME, the wheel with its [sink] extra; then `mailshim check` against its own
# sink, a message through the installed `sendmail` to that sink, and the man pages and
# completions where the wheel puts them.
#
#   .ci/pypi-check.sh dist/mailshim-VERSION-py3-none-any.whl
set -euo pipefail
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
python=${PYTHON:-python3}
work=$(mktemp -d)
cleanup() {
  [ -n "${sink_pid:-}" ] && kill "$sink_pid" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

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

port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/config.toml" <<TOML
[relay]
host = "127.0.0.1"
port = $port

[addresses]
domain = "example.org"

[aliases]
root = "admin@example.org"

[queue]
dir = "$work/spool"

[log]
file = "$work/mailshim.log"
TOML
export MAILSHIM_CONFIG="$work/config.toml" MAILSHIM_CACHE_DIR="$work/cache" HOME="$work/home"

"$bin/mailshim" sink --port "$port" --dir "$work/mail" --quiet &
sink_pid=$!
for _ in $(seq 100); do
  "$python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done

echo "== mailshim check"
"$bin/mailshim" check

echo "== a cron-style message through the installed sendmail"
printf 'From: root (Cron Daemon)\nTo: root\nSubject: pipx round trip\n\nhello\n' |
  "$bin/sendmail" -FCronDaemon -i -odi root
got=$(cat "$work/mail"/*.eml | tr -d '\r')
grep -qx 'X-Sink-Rcpt-To: <admin@example.org>' <<<"$got"
grep -qx 'To: root@example.org' <<<"$got"
grep -qx 'hello' <<<"$got"
qid=$(sed -n 's/^Message-ID: <\([A-Z0-9]*\)@.*/\1/p' <<<"$got")
"$bin/mailshim" log "$qid" | grep -q "status=sent"
echo "== the sink received it, and mailshim log $qid tells its story"
