# Packages, man pages: `make deb`, `make rpm`, `make man-lint` (and deb-lint, rpm-lint;
# `make lint-packages` builds both packages and lints them, as CI does).
#
# Included by the top-level Makefile; also works alone: make -f mk/packaging.mk deb
# Missing build tools are installed with apt (as root, or through sudo). See
# packaging/README.md.

VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PYTHON ?= python3

PKG_BUILD ?= build/pkg
PKG_DIST ?= dist
PKG_TREE = $(PKG_BUILD)/tree
DEB_TOP = $(PKG_BUILD)/deb
DEB_SRC = $(DEB_TOP)/mailshim-$(VERSION)
DEB_FILE = $(PKG_DIST)/mailshim_$(VERSION)_all.deb
RPM_TOP = $(abspath $(PKG_BUILD)/rpm)

# Debian's own tools and python3, not a virtualenv or pyenv shim that happens to be on PATH.
PKG_ENV = env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PKG_SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PKG_APT_INSTALL = $(PKG_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	--no-install-recommends
# apt-get install, refreshing the package lists once if a package is not found.
pkg_apt = $(PKG_APT_INSTALL) $(1) || { $(PKG_SUDO) apt-get update -q && $(PKG_APT_INSTALL) $(1); }

DEB_TOOLS = dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all \
	python3-setuptools lintian
RPM_TOOLS = rpm python3

.PHONY: deb deb-lint rpm rpm-lint lint-packages man-lint pkg-tree

# The source tree as a clean checkout has it: tracked files, plus new files git does not
# ignore; no dot-folders, no virtualenv, no build output.
pkg-tree:
	rm -rf $(PKG_TREE)
	mkdir -p $(PKG_TREE)
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	    git ls-files -z --cached --others --exclude-standard; \
	else \
	    find . -path ./build -prune -o -path ./dist -prune -o -type f -print0 | sed -z 's,^\./,,'; \
	fi | grep -zv '^\.' | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(PKG_TREE)

deb: pkg-tree
	@changelog=$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version 2>/dev/null \
	    || sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' packaging/debian/changelog); \
	if [ "$$changelog" != "$(VERSION)" ]; then \
	    echo "packaging/debian/changelog is at $$changelog but pyproject.toml at $(VERSION):" \
	        "add a changelog entry (dch -v $(VERSION))" >&2; exit 1; \
	fi
	rm -rf $(DEB_TOP)
	mkdir -p $(DEB_TOP)
	cp -a $(PKG_TREE) $(DEB_SRC)
	cp -a packaging/debian $(DEB_SRC)/debian
	command -v dpkg-checkbuilddeps >/dev/null || { $(call pkg_apt,dpkg-dev); }
	cd $(DEB_SRC) && dpkg-checkbuilddeps 2>/dev/null \
	    || { $(call pkg_apt,$(DEB_TOOLS)) && $(PKG_SUDO) apt-get build-dep -y -q ./; }
	cd $(DEB_SRC) && $(PKG_ENV) dpkg-buildpackage -us -uc -b
	mkdir -p $(PKG_DIST)
	cp $(DEB_TOP)/mailshim_$(VERSION)_all.deb $(DEB_FILE)
	@echo "built $(DEB_FILE)"

# No errors and no warnings; every override carries its reason in
# packaging/debian/mailshim.lintian-overrides.
deb-lint:
	command -v lintian >/dev/null || { $(call pkg_apt,lintian); }
	lintian --fail-on error,warning --display-info --info \
	    $(DEB_TOP)/mailshim_$(VERSION)_*.changes

rpm: pkg-tree
	command -v rpmbuild >/dev/null || { $(call pkg_apt,$(RPM_TOOLS)); }
	rm -rf $(RPM_TOP)
	mkdir -p $(RPM_TOP)/SOURCES $(RPM_TOP)/SPECS
	tar -czf $(RPM_TOP)/SOURCES/mailshim-$(VERSION).tar.gz -C $(PKG_BUILD) \
	    --transform 's,^tree,mailshim-$(VERSION),' tree
	cp packaging/systemd/mailshim.sysusers $(RPM_TOP)/SOURCES/
	cp packaging/rpm/mailshim.spec $(RPM_TOP)/SPECS/
	# On Debian the build requirements are Debian packages that rpm's database does not
	# know about: --nodeps there, and nowhere else.
	$(PKG_ENV) rpmbuild -bb $(if $(wildcard /etc/debian_version),--nodeps) \
	    --define "_topdir $(RPM_TOP)" --define "mailshim_version $(VERSION)" \
	    $(RPM_TOP)/SPECS/mailshim.spec
	mkdir -p $(PKG_DIST)
	cp $(RPM_TOP)/RPMS/noarch/mailshim-$(VERSION)-*.noarch.rpm $(PKG_DIST)/
	@ls $(PKG_DIST)/mailshim-$(VERSION)-*.noarch.rpm

# No errors and no warnings (--strict makes every message an error); every filter carries
# its reason in packaging/rpm/rpmlintrc, and a filter that matches nothing is an error.
rpm-lint:
	command -v rpmlint >/dev/null || { $(call pkg_apt,rpmlint); }
	rpmlint --strict -r packaging/rpm/rpmlintrc packaging/rpm/mailshim.spec \
	    $(PKG_DIST)/mailshim-$(VERSION)-*.noarch.rpm

# Both packages built afresh and both linters on them (.ci/lint-packages.sh, run by CI).
lint-packages:
	bash .ci/lint-packages.sh

man-lint:
	@command -v mandoc >/dev/null || { echo "man-lint needs mandoc: apt-get install mandoc" >&2; exit 1; }
	mandoc -Tlint -W all man/*.[1-8]

# The .deb under a real systemd: a debootstrap'd bookworm (built once, cached in
# /var/cache/mailshim-e2e) booted with systemd-nspawn; about 5 minutes a run (it waits for
# the real timer and for the served mark to go stale). Needs root.
.PHONY: e2e-systemd
e2e-systemd: deb
	bash .ci/e2e-systemd.sh
