#!/usr/bin/env bash
# make demo: a cron-style message through the real `sendmail` to a local debugging listener.
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
TOML

echo "== starting the sink (mailshim sink) on 127.0.0.1:$port"
"$BIN/mailshim" sink --port "$port" --dir "$work/mail" --quiet &
sink_pid=$!
for _ in $(seq 100); do
  "$BIN/python" -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
  sleep 0.1
done

echo "== as Debian's cron does: sendmail -FCronDaemon -i -B8BITMIME -oem root"
printf 'From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@%s> echo backup done\nMIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n\nbackup done\n' "$(hostname)" |
  MAILSHIM_CONFIG="$work/config.toml" "$BIN/sendmail" -FCronDaemon -i -B8BITMIME -oem root
echo "   sendmail exited $?"

for _ in $(seq 200); do
  ls "$work/mail"/*.eml >/dev/null 2>&1 && break
  sleep 0.05
done
echo "== the listener received:"
cat "$work/mail"/*.eml | tr -d '\r'
echo "== queue after delivery:"
MAILSHIM_CONFIG="$work/config.toml" "$BIN/mailq"
