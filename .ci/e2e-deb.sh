#!/usr/bin/env bash
# End to end as an administrator would see it: build the .deb, install it with apt on this
# machine (Debian's python3 and python3-aiosmtplib 2.0, not the venv), run Debian's real cron
# with MAILTO=root against a listener on 127.0.0.1:10025, take the listener down, let the
# spool hold the next job's mail, bring it back, flush. Then s-nail. Steps: packaging/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out waiting for: $what"
    sleep 1
  done
}
port_open() { python3 -c 'import socket; socket.create_connection(("127.0.0.1", 10025), 1)'; }
sink_has() { grep -rlq -- "$1" /tmp/sink/ 2>/dev/null; }

SINK_PID=""
CRON_STARTED=""
cleanup() {
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
  [ -n "$CRON_STARTED" ] && [ -f /run/crond.pid ] && kill "$(cat /run/crond.pid)" 2>/dev/null || true
  rm -f /etc/cron.d/mailshim-e2e
}
trap cleanup EXIT

start_sink() {
  mailshim sink --port 10025 --dir /tmp/sink --quiet >>/tmp/sink.log 2>&1 &
  SINK_PID=$!
  wait_for 30 "the sink on 127.0.0.1:10025" port_open
}

say "build and lint the package"
make deb
make deb-lint

say "install it with apt"
apt-get install -y -qq ./dist/mailshim_*_all.deb >/dev/null
dpkg -S /usr/sbin/sendmail | grep -q '^mailshim:' || fail "/usr/sbin/sendmail is not mailshim's"
/usr/sbin/sendmail -bi
newaliases
test -d /var/spool/mailshim/incoming || fail "no /var/spool/mailshim/incoming"
/usr/bin/python3 -c 'import aiosmtplib, sys; print("system aiosmtplib", aiosmtplib.__version__)'

say "configure: root's alias, the default relay 127.0.0.1:10025"
install -d /etc/mailshim
cat >/etc/mailshim/config.toml <<'TOML'
[addresses]
domain = "ci.example.org"

[aliases]
root = "admin@example.org"
TOML
rm -rf /tmp/sink && mkdir -p /tmp/sink
apt-get install -y -qq --no-install-recommends python3-aiosmtpd >/dev/null
start_sink

say "install Debian's cron (no other MTA may come with it)"
# Counted before and after: the machine may hold another MTA's leftovers already (a tool
# that needs mail(1) pulled in exim4 before mailshim was there); cron must add none.
mtas() { dpkg -l exim4-base exim4-daemon-light postfix nullmailer msmtp-mta dma 2>/dev/null | grep -c '^ii' || true; }
before=$(mtas)
apt-get install -y -qq --no-install-recommends cron >/dev/null
[ "$(mtas)" = "$before" ] || fail "installing cron installed another MTA"

say "a cron job with MAILTO=root"
printf 'MAILTO=root\n* * * * * root echo MAILSHIM-E2E-ONE\n' >/etc/cron.d/mailshim-e2e
chmod 0644 /etc/cron.d/mailshim-e2e
cron && CRON_STARTED=1
wait_for 150 "cron's mail with MAILSHIM-E2E-ONE at the listener" sink_has MAILSHIM-E2E-ONE
one=$(grep -rl MAILSHIM-E2E-ONE /tmp/sink/ | head -1)
grep -q '^X-Sink-Rcpt-To: <admin@example.org>' "$one" || fail "not addressed to root's alias"
for h in Date Message-ID From; do
  grep -qi "^$h:" "$one" || fail "header $h missing"
done
echo "received $(basename "$one") with Date, Message-ID and From, to <admin@example.org>"

say "listener down: the next job's mail waits in the spool"
kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=""
wait_for 30 "the listener to be down" bash -c '! python3 -c "import socket; socket.create_connection((\"127.0.0.1\", 10025), 1)"'
sed -i 's/MAILSHIM-E2E-ONE/MAILSHIM-E2E-TWO/' /etc/cron.d/mailshim-e2e
touch /etc/cron.d
wait_for 150 "an entry in the queue" bash -c '[ -n "$(mailshim queue --ids)" ]'
rm -f /etc/cron.d/mailshim-e2e
sleep 2
mailq
ids=$(mailshim queue --ids)

say "listener back: the systemd-less runner delivers"
start_sink
mailshim flush
count=$(grep -rl MAILSHIM-E2E-TWO /tmp/sink/ | wc -l)
[ "$count" -ge 1 ] || fail "the queued mail did not arrive"
[ -z "$(mailshim queue --ids)" ] || fail "the queue is not empty after flush"
grep -rl MAILSHIM-E2E-TWO /tmp/sink/ | xargs grep -L '^X-Sink-Rcpt-To: <admin@example.org>' | grep -q . &&
  fail "queued mail not addressed to root's alias"
echo "delivered $ids after the listener came back ($count message(s) with the marker)"

say "s-nail: mail(1) through mailshim"
apt-get install -s --no-install-recommends s-nail | grep '^Inst' | grep -Eq 'exim|postfix|nullmailer|msmtp|dma' &&
  fail "s-nail pulls in another MTA"
apt-get install -y -qq --no-install-recommends s-nail >/dev/null
echo body | s-nail -s mailshim-e2e-subject root
wait_for 30 "s-nail's message" sink_has 'Subject: mailshim-e2e-subject'

say "purge"
kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=""
kill "$(cat /run/crond.pid)" 2>/dev/null || true; CRON_STARTED=""
apt-get purge -y -qq mailshim >/dev/null
rm -rf /etc/mailshim
echo "e2e: 1 passed, 0 failed"
