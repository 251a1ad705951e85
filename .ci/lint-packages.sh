#!/usr/bin/env bash
# Build the .deb and the .rpm from this tree and lint what was built: lintian and rpmlint
# must report no error and no warning beyond what the project's filter files explain
# (packaging/debian/mailshim.lintian-overrides, packaging/rpm/rpmlintrc; every entry there
# says why). A filter that no longer matches anything fails too (rpmlint's
# unused-rpmlintrc-filter, lintian's unused-override), so the files cannot go stale.
# Run by .ci/run and `make lint-packages`; as root or with sudo, no stdin needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

fail() { printf 'lint-packages: FAILED: %s\n' "$*" >&2; exit 1; }
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

# Debian's rpm (rpmbuild), rpmlint and lintian; `make deb` adds the Build-Depends itself.
# The lock timeout: another apt-get may be running on a shared machine.
if ! command -v rpmbuild >/dev/null || ! command -v rpmlint >/dev/null ||
  ! command -v lintian >/dev/null; then
  apt_install() {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=300 rpm rpmlint lintian >/dev/null
  }
  apt_install || { $sudo apt-get update -qq && apt_install; } || fail "apt-get could not install rpm rpmlint lintian"
fi

# Fresh output folders: lint exactly what this run built, not a leftover of another version.
rm -rf build/pkg dist/mailshim_*_all.deb dist/mailshim-*.noarch.rpm
mkdir -p build
make --no-print-directory deb >build/lint-packages-deb.log 2>&1 ||
  { tail -n 40 build/lint-packages-deb.log >&2; fail "make deb (log: build/lint-packages-deb.log)"; }
make --no-print-directory rpm >build/lint-packages-rpm.log 2>&1 ||
  { tail -n 40 build/lint-packages-rpm.log >&2; fail "make rpm (log: build/lint-packages-rpm.log)"; }
ls dist/mailshim_*_all.deb dist/mailshim-*.noarch.rpm

status=0
printf '\n== lintian\n'
out=$(make --no-print-directory deb-lint 2>&1) || status=1
printf '%s\n' "$out"
# lintian reports an override that matched nothing (or no longer matches) as information.
if grep -Eq '(unused|mismatched)-override' <<<"$out"; then status=1; fi
count() { grep -c "^$1: " <<<"$out" || true; }
echo "lintian: $(count E) errors, $(count W) warnings, $(count I) info"
printf '\n== rpmlint\n'
make --no-print-directory rpm-lint || status=1

[ "$status" = 0 ] || fail "lintian or rpmlint reported what packaging/ does not explain (above)"
echo "lint-packages: lintian and rpmlint clean"
