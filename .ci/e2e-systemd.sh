#!/usr/bin/env bash
# The .deb under a real systemd (issue 23): a debootstrap'd Debian bookworm booted with
# systemd-nspawn (loopback only), the package installed with apt, then what an administrator
# trips on, with real processes: a configuration broken before any good one, a misspelt key,
# a broken file after a good one (the runner's last good configuration, and its published
# copy for a user who never sent mail), a user's own mailq and queue show after pickup,
# the units serving alone (the timer's runs mark the spool: no agent from a user's sendmail,
# an idle minute logs nothing; the timer stopped: `check` says so and, once the mark is
# stale, sendmail starts agents again), and `apt-get remove` / `purge` with a delivery agent
# and the daemon running.
#
# The bookworm root is built once (about 5 minutes) and cached in $E2E_ROOT; each run boots
# it with a throw-away overlay (--volatile=overlay). The packaged timer runs unchanged (no
# drop-in), so a run waits for its first run (a minute after boot), an idle minute and the
# mark's 150 s: about 4 minutes in all.
# Needs root, debootstrap and systemd-container (installed with apt when missing).
# Run: make e2e-systemd   (builds the .deb first)
set -euo pipefail
cd "$(dirname "$0")/.."

E2E_ROOT=${E2E_ROOT:-/var/cache/mailshim-e2e/bookworm-root}
DEB=$(ls -1 dist/mailshim_*_all.deb | tail -1)
PACKAGES=systemd,systemd-sysv,dbus,cron,adduser,python3,python3-aiosmtplib,python3-click
PACKAGES=$PACKAGES,python3-platformdirs,python3-aiosmtpd,procps,less,passwd

say() { printf '\n== %s\n' "$*"; }
fail() {
  printf 'e2e-systemd: FAILED: %s\n' "$*" >&2
  [ -n "${LEADER:-}" ] && c journalctl --no-pager -n 60 >&2 || true
  exit 1
}

need() { command -v "$1" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
need debootstrap debootstrap
need systemd-nspawn systemd-container

if [ ! -x "$E2E_ROOT/usr/bin/python3" ]; then
  say "debootstrap a bookworm root into $E2E_ROOT (once)"
  rm -rf "$E2E_ROOT.tmp"
  mkdir -p "$(dirname "$E2E_ROOT")"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$E2E_ROOT.tmp" \
    http://deb.debian.org/debian >/dev/null
  mv "$E2E_ROOT.tmp" "$E2E_ROOT"
fi

say "boot it under systemd-nspawn"
LOG=$(mktemp /tmp/e2e-systemd.XXXXXX.log)
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$E2E_ROOT" --volatile=overlay -b \
  --register=no --keep-unit --console=pipe --private-network \
  --bind-ro="$PWD/dist:/mnt/dist" >"$LOG" 2>&1 &
NSPAWN=$!
LEADER=""
cleanup() {
  if kill -0 "$NSPAWN" 2>/dev/null; then
    kill -TERM "$NSPAWN" 2>/dev/null || true # nspawn asks the container's systemd to halt
    for _ in $(seq 30); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 1; done
    kill -KILL "$NSPAWN" 2>/dev/null || true
  fi
}
trap cleanup EXIT
for _ in $(seq 60); do # the container's init: nspawn's child once it has become systemd
  LEADER=$(pgrep -P "$NSPAWN" -x systemd | head -1 || true)
  [ -n "$LEADER" ] && break
  sleep 0.5
done
[ -n "$LEADER" ] || { cat "$LOG"; fail "the container did not start"; }

# A command inside the container, as root, with a clean environment.
c() { nsenter -t "$LEADER" -m -u -i -n -p -C -- /usr/bin/env -i \
  PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
# A command as a user, in their own login environment (runuser resets it).
as() { local user=$1; shift; c runuser -l "$user" -c "$*"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out waiting for: $what"
    sleep 1
  done
}
sink_has() { c sh -c "grep -rlq -- '$1' /tmp/sink/ 2>/dev/null"; }
cron_mail() { # cron_mail USER MARKER: what Debian's cron runs, with what it writes
  printf 'From: root (Cron Daemon)\nTo: %s\nSubject: Cron <%s@e2e> %s\n\n%s\n' "$1" "$1" "$2" "$2" |
    c runuser -u "$1" -- /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem "$1"
}
# One run of the runner as the path unit starts it (mailshim-pickup.service: it does not
# mark the spool as served, so only the timer's own runs do that here); the scenario starts
# it more often than systemd's default start limit (5 in 10 s) allows, so the count is reset
# first.
run_flush() {
  c systemctl reset-failed mailshim-pickup.service mailshim-flush.path 2>/dev/null || true
  c systemctl start mailshim-pickup.service
}
# When the timer's service (only the timer starts it here) last ended a run: seconds since
# the epoch, empty before its first.
timer_last() { c systemctl show --timestamp=unix -P InactiveEnterTimestamp mailshim-flush.service | tr -d @; }
timer_ran_since() { # timer_ran_since LAST: a run of the timer's service ended after LAST
  local now
  now=$(timer_last)
  [ -n "$now" ] && [ "$now" != "$1" ] && ! c systemctl is-active --quiet mailshim-flush.service
}
mark_age() { # seconds since the `served` mark's last refresh
  echo $(($(c date +%s) - $(c stat -c %Y /var/spool/mailshim/served)))
}
spooled() { c sh -c 'ls /var/spool/mailshim/incoming /var/spool/mailshim/queue | grep -c "^[0-9A-Z]\{8,\}$"'; }

state=""
for _ in $(seq 60); do
  state=$(c systemctl is-system-running 2>/dev/null || true)
  case $state in running|degraded) break ;; esac
  sleep 1
done
echo "systemd in the container: $state"

say "install the .deb with apt (the maintainer scripts run under systemd)"
c apt-get install -y -qq --no-download "/mnt/dist/$(basename "$DEB")" >/dev/null 2>&1 ||
  c apt-get install -y "/mnt/dist/$(basename "$DEB")"
c systemctl is-active --quiet mailshim-flush.timer || fail "the timer is not active"
c systemctl is-active --quiet mailshim-flush.path || fail "the path unit is not active"
c useradd -m alice
c useradd -m bob
c useradd -m carol
c systemd-run -q --unit=e2e-sink /usr/bin/mailshim sink --port 10025 --dir /tmp/sink --quiet
GOOD='[addresses]
domain = "e2e.example.org"

[aliases]
root = "admin@e2e.example.org"
'
good_config() { printf '%s' "$GOOD" | c tee /etc/mailshim/config.toml >/dev/null; }

say "1a. a broken file before any good one: sendmail spools (exit 0), the runner waits and says so"
printf '%s[[[ broken\n' "$GOOD" | c tee /etc/mailshim/config.toml >/dev/null
cron_mail alice E2E-BROKEN-FIRST || fail "sendmail failed with a broken configuration (exit $?)"
[ "$(spooled)" -ge 1 ] || fail "nothing spooled"
c mailq | grep -q "alice@" || { c mailq; fail "mailq does not list alice's message"; }
run_flush # exits 78, a success for the unit (SuccessExitStatus)
wait_for 20 "the runner's line about the mail that waits" \
  c sh -c 'journalctl -u "mailshim*" --no-pager | grep -q "message(s) wait in /var/spool/mailshim"'
c mailshim check >/tmp/e2e-check.txt 2>&1 && fail "check passed a broken file"
grep -q "line 6" /tmp/e2e-check.txt || { cat /tmp/e2e-check.txt; fail "check does not name the line"; }
sink_has E2E-BROKEN-FIRST && fail "delivered with the built-in defaults"
echo "queued: $(spooled) message(s); the runner: $(c journalctl -u 'mailshim*' --no-pager -o cat | grep -m1 'wait in')"

say "1b. the file fixed: the next run delivers it"
good_config
run_flush
wait_for 60 "the message kept while the file was broken" sink_has E2E-BROKEN-FIRST

say "1c. a misspelt key: a warning, and the mail flows"
printf '%s' "$GOOD" | sed 's/^domain/domian = "typo.example.org"\ndomain/' | c tee /etc/mailshim/config.toml >/dev/null
cron_mail alice E2E-MISSPELT || fail "sendmail failed on a misspelt key"
run_flush
wait_for 60 "the mail sent with a misspelt key" sink_has E2E-MISSPELT
c mailshim check 2>&1 | grep -q "unknown key 'domian' ignored" || fail "check does not warn about the key"

say "1d. a broken file after a good one: the runner delivers with the last good configuration"
good_config
run_flush # the runner's cache now holds this file, and its copy for users is published
c cmp -s /etc/mailshim/config.toml /var/spool/mailshim/status/config.toml ||
  fail "the runner did not publish its copy of the valid file in status/"
printf '%s[[[ broken\n' "$GOOD" | c tee /etc/mailshim/config.toml >/dev/null
# bob never sent mail while the file was good: his sendmail has no last good configuration
# of its own and addresses as the runner's published copy says; alice's has one.
cron_mail bob E2E-LAST-GOOD || fail "sendmail failed with a broken configuration"
cron_mail alice E2E-ALICE-LAST-GOOD || fail "sendmail failed with a broken configuration"
run_flush
wait_for 60 "delivery with the last good configuration" sink_has E2E-LAST-GOOD
wait_for 60 "alice's delivery with her last good configuration" sink_has E2E-ALICE-LAST-GOOD
wait_for 20 "the runner's line about the last good configuration" \
  c sh -c 'journalctl -u "mailshim*" --no-pager | grep -q "using the last configuration from this file"'
c sh -c "grep -rl E2E-ALICE-LAST-GOOD /tmp/sink/ | xargs grep -q '^X-Sink-Rcpt-To: <alice@e2e.example.org>'" ||
  fail "alice's mail not addressed with her last good configuration's domain"
c sh -c "grep -rl E2E-LAST-GOOD /tmp/sink/ | xargs grep -q '^X-Sink-Rcpt-To: <bob@e2e.example.org>'" ||
  fail "bob's mail not addressed as the runner's copy of the last valid file says"
good_config

say "4. a user's mailq and queue show: her own deferred message after pickup, nobody else's"
c systemctl stop e2e-sink
cron_mail carol E2E-CAROL-DEFERRED
run_flush || true # picks it up into the private queue/ and defers it (listener down)
c sh -c 'ls /var/spool/mailshim/incoming | grep -q "^[0-9A-Z]\{20\}$"' && fail "not picked up"
out=$(as carol mailq 2>&1 || true)
echo "$out"
echo "$out" | grep -q "Mail queue is empty" && fail "carol's mailq claims an empty queue"
echo "$out" | grep -q "carol@e2e.example.org" || fail "carol's mailq does not list her message"
echo "$out" | grep -q "next try" || fail "carol's mailq shows no next try"
qid=$(echo "$out" | awk 'NR == 2 {print $1}')
as carol mailshim queue show "$qid" | grep -q "next attempt:" || fail "carol cannot show $qid"
theirs=$(as alice mailshim queue show "$qid" 2>&1 || true)
echo "$theirs" | grep -q "no such queue id" || fail "alice sees $qid: $theirs"
as alice mailq 2>&1 | grep -q -e "carol@" -e "$qid" && fail "alice's mailq shows carol's message"
as alice ls /var/spool/mailshim/status >/dev/null 2>&1 && fail "alice can list status/"

say "5. the timer's runs mark the spool: a user's sendmail leaves no agent beside the units"
# Nothing is marked by hand: the timer (OnBootSec=1min, then a minute after each of its runs)
# starts mailshim-flush.service, whose runs refresh `served`; the path unit's runs do not.
last=$(timer_last)
wait_for 90 "a run of the timer" timer_ran_since "$last"
c grep -qx units /var/spool/mailshim/served || fail "the timer's run did not mark the spool as served"
echo "the timer's run marked the spool $(mark_age) s ago"
cron_mail alice E2E-NO-AGENT # the listener is still down: the path unit's run defers it
sleep 3
c pgrep -u alice -f 'mailshim.agent' && fail "alice's sendmail left an agent beside the units"
c systemd-run -q --unit=e2e-sink2 /usr/bin/mailshim sink --port 10025 --dir /tmp/sink --quiet
wait_for 20 "the sink" c bash -c 'exec 3<>/dev/tcp/127.0.0.1/10025'
# Both wait on their schedule (the next try a minute on): a flush sends them now.
c runuser -u mailshim -- env MAILSHIM_CACHE_DIR=/var/cache/mailshim /usr/bin/mailshim flush
wait_for 60 "alice's mail, left to the units" sink_has E2E-NO-AGENT
wait_for 60 "carol's deferred mail" sink_has E2E-CAROL-DEFERRED
[ "$(as carol mailq)" != "${out}" ] || fail "carol's mailq did not change after delivery"
views=$(c sh -c 'ls -A /var/spool/mailshim/status | grep -vx config.toml' || true)
[ -z "$views" ] || fail "views left in status/: $views"

say "5b. an idle minute with the units serving writes nothing to the journal"
wait_for 20 "the path unit's runs after the flush" c sh -c '! systemctl is-active --quiet mailshim-pickup.service'
sleep 2
cursor=$(c journalctl -n0 --show-cursor -o cat | sed -n 's/^-- cursor: //p')
last=$(timer_last)
idle_from=$SECONDS
wait_for 90 "the timer's run in the idle minute" timer_ran_since "$last"
sleep $((60 - (SECONDS - idle_from) > 0 ? 60 - (SECONDS - idle_from) : 0))
idle=$(c journalctl -u 'mailshim*' --after-cursor="$cursor" --no-pager -o cat | grep -c . || true)
echo "journal lines in $((SECONDS - idle_from)) idle seconds (a timer run included): $idle"
all=$(c journalctl --after-cursor="$cursor" --no-pager -o cat | grep -c . || true)
crons=$(c journalctl --after-cursor="$cursor" --no-pager -o cat -t CRON | grep -c . || true)
ours=$(c journalctl --after-cursor="$cursor" --no-pager -o cat -t CRON | grep -c mailshim || true)
echo "the whole journal meanwhile: $all line(s), $crons of them cron's, $ours about mailshim"
# Where systemd runs, the .deb installs no every-minute cron job (postinst): cron logs none.
c test ! -e /etc/cron.d/mailshim || fail "/etc/cron.d/mailshim installed where systemd runs"
[ "$ours" -eq 0 ] || fail "cron logged a mailshim job on an idle host"
[ "$idle" -eq 0 ] || { c journalctl -u 'mailshim*' --after-cursor="$cursor" --no-pager; fail "an idle host logs"; }

say "5c. the timer stopped: check says so, and once the mark is stale sendmail starts agents"
c systemctl stop e2e-sink2
c systemctl stop mailshim-flush.timer # the path unit stays: new mail still starts runs
c mailshim check >/tmp/e2e-check.txt 2>&1 || true
grep -q "mailshim-flush.timer is enabled but inactive" /tmp/e2e-check.txt ||
  { cat /tmp/e2e-check.txt; fail "check does not say that the stopped timer retries nothing"; }
grep "mailshim-flush.timer is enabled" /tmp/e2e-check.txt
grep -q "retried by mailshim-flush.timer" /tmp/e2e-check.txt &&
  { cat /tmp/e2e-check.txt; fail "check counts the stopped timer as a retrier"; }
# The path unit's runs (this submission starts one) must not refresh the mark.
cron_mail bob E2E-TIMER-STOPPED
wait_for 20 "the path unit's run" c sh -c '! systemctl is-active --quiet mailshim-pickup.service'
stale=$((150 - $(mark_age) + 3))
echo "waiting ${stale} s for the mark to go stale (150 s after the timer's last run)"
sleep "$stale"
[ "$(mark_age)" -ge 150 ] || fail "the mark was refreshed with the timer stopped"
# Nothing serves the spool's retries now, so alice's sendmail starts a delivery agent, which
# lingers to retry while the listener is down.
cron_mail alice E2E-AGENT-LEFT
wait_for 30 "alice's lingering delivery agent" c pgrep -u alice -f 'mailshim.agent'

say "3. apt-get remove stops the units, the daemon and every delivery agent"
c systemctl stop mailshim-flush.path
c systemctl start mailshim-daemon.service
wait_for 30 "the daemon" c systemctl is-active --quiet mailshim-daemon.service
before=$(c pgrep -fc 'mailshim' || true)
echo "mailshim processes before removal: $before"
c apt-get remove -y mailshim >/tmp/e2e-remove.txt 2>&1 || { cat /tmp/e2e-remove.txt; fail "remove failed"; }
cat /tmp/e2e-remove.txt | grep '^mailshim:' || true
left=$(c pgrep -fa 'mailshim' || true)
[ -z "$left" ] || fail "still running after remove: $left"
grep -q "undelivered message(s) remain in /var/spool/mailshim" /tmp/e2e-remove.txt ||
  fail "remove did not say what mail is left"
c systemctl is-active --quiet mailshim-daemon.service && fail "the daemon is still active"

say "3b. purge: the caches go, the spool with its mail stays, and it says so"
c apt-get purge -y mailshim >/tmp/e2e-purge.txt 2>&1 || { cat /tmp/e2e-purge.txt; fail "purge failed"; }
grep '^mailshim:' /tmp/e2e-purge.txt || true
c test -e /var/cache/mailshim && fail "/var/cache/mailshim survived purge"
c test -d /var/spool/mailshim/queue -o -d /var/spool/mailshim/incoming || fail "purge removed the undelivered mail"
grep -q "was kept" /tmp/e2e-purge.txt || fail "purge did not say what it keeps"
echo "e2e-systemd: passed"
