#!/usr/bin/env bash
# Install the real listeners tests/test_real_listeners.py runs: Dovecot LMTP from Debian and
# Haraka from npm into a cache folder. Idempotent, quiet, and a no-op when both are there.
# Where one cannot be installed (not root, no apt-get, no npm) it says so on one line and
# exits 0: those tests then skip with the same reason (outside CI; in CI they fail).
set -euo pipefail

HARAKA_VERSION=3.3.4
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mailshim-tests"
haraka_dir="${MAILSHIM_HARAKA_DIR:-$cache/haraka}"

say() { echo "real-listeners: $*" >&2; }

install_dovecot() {
  if command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ]; then
    [ -x /usr/lib/dovecot/lmtp ] && return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "Dovecot LMTP missing: as root, apt-get install --no-install-recommends dovecot-core dovecot-lmtpd"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache show dovecot-lmtpd >/dev/null 2>&1; then
    apt-get update -qq
  fi
  local pkgs=(dovecot-core dovecot-lmtpd)
  # Nothing that comes along may be a mail server: mailshim is the machine's sendmail.
  local pulled
  pulled=$(apt-get install -s -qq --no-install-recommends "${pkgs[@]}" | awk '/^Inst /{print $2}')
  for pkg in $pulled; do
    if apt-cache show --no-all-versions "$pkg" | grep -Eq '^Provides:.*\bmail-transport-agent\b'; then
      say "refusing to install Dovecot: it would pull in $pkg, a mail transport agent"
      return 1
    fi
  done
  # The tests run their own instance: the packaged service must not start (and bind 143,
  # 993...) during the installation. policy-rc.d is Debian's switch for that.
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

install_haraka() {
  local have=""
  if [ -f "$haraka_dir/node_modules/Haraka/package.json" ]; then
    have=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$haraka_dir/node_modules/Haraka/package.json" | head -1)
  fi
  [ "$have" = "$HARAKA_VERSION" ] && return 0
  if ! command -v npm >/dev/null; then
    say "Haraka missing: npm is not installed (apt-get install npm), then run $0 again"
    return 0
  fi
  mkdir -p "$haraka_dir"
  # Its own package.json: npm must not look for a project further up the tree.
  [ -f "$haraka_dir/package.json" ] || echo '{"private": true}' >"$haraka_dir/package.json"
  npm install --prefix "$haraka_dir" --no-audit --no-fund --omit=dev --loglevel=error \
    "Haraka@$HARAKA_VERSION" >/dev/null </dev/null
}

install_dovecot
install_haraka
