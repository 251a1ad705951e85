#!/usr/bin/env bash
# CI (issue 25): the real monitoring tools the tests drive: promtool (prometheus),
# prometheus-node-exporter (textfile collector), nagios4 (a real check cycle) and pflogsumm.
# Their services are not wanted running: the tests start what they need on loopback ports.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends \
  prometheus prometheus-node-exporter nagios4-core pflogsumm >/dev/null
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus prometheus-node-exporter nagios4 >/dev/null 2>&1 || true
fi
