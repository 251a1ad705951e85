#!/usr/bin/env bash
# make demo: a cron-style message through the real `sendmail` to a local debugging listener.
# VENV names the environment whose bin/ holds python, sendmail, mailq and mailshim (make's
# .venv, or a pipx venv: .ci/pypi-check.sh runs this on the installed wheel).
set -euo pipefail
BIN="${VENV:-.venv}/bin"
work=$(mktemp -d)
port=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { [ -n "${sink_pid:-}" ] && kill "$sink_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/config.toml" <<TOML
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
export MAILSHIM_CONFIG="$work/config.toml" MAILSHIM_CACHE_DIR="$work/cache"

echo "== starting the sink (mailshim sink) on 127.0.0.1:$port"
"$BIN/mailshim" sink --port "$port" --dir "$work/mail" --quiet &
sink_pid=$!
for _ in $(seq 100); do
  "$BIN/python" -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
  sleep 0.1
done

echo "== will mail flow? mailshim check"
"$BIN/mailshim" check

echo "== as Debian's cron does: sendmail -FCronDaemon -i -B8BITMIME -oem root"
printf 'From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@%s> echo backup done\nMIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n\nbackup done\n' "$(hostname)" |
  "$BIN/sendmail" -FCronDaemon -i -B8BITMIME -oem root
echo "   sendmail exited $?"

for _ in $(seq 200); do
  ls "$work/mail"/*.eml >/dev/null 2>&1 && break
  sleep 0.05
done
echo "== the listener received:"
received=$(cat "$work/mail"/*.eml | tr -d '\r')
echo "$received"
qid=$(sed -n 's/^Message-ID: <\([A-Z0-9]*\)@.*/\1/p' <<<"$received")
for _ in $(seq 100); do
  grep -q "$qid: to=.*status=sent" "$work/mailshim.log" 2>/dev/null && break
  sleep 0.05
done
echo "== its story: mailshim log $qid"
"$BIN/mailshim" log "$qid"
echo "== queue after delivery:"
"$BIN/mailq"
