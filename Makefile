# cdi.py: make [all] | setup | check | check-other | lint | unit | test | demo |
#         man | install | uninstall

# The interpreter nbdkit-python-plugin embeds: the only one with the nbd module.
PYTHON = /usr/bin/python3
# Everything the plugin and its tests use, on a minimal system too: requests
# for reading registries; zstandard for streaming zstd layers; yaml for
# registries.d and cryptography for sigstore signatures; file for
# nbdinfo's "content" line; cryptography for the tests' token issuer; a
# kernel, busybox, syslinux and qemu to make and boot a tiny VM disk
# (tests/e2e/vm.py); perl's pod2man and podchecker for the manual, and
# man-db to read it (a minimal root, as make check-other makes, has neither);
# containerd and stargz-snapshotter's ctr-remote to make eStargz layers.
DEBIAN_PACKAGES = nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd python3-requests \
	podman uidmap procps skopeo qemu-utils docker-registry python3-pytest python3-hypothesis \
	python3-cryptography python3-zstandard python3-yaml perl man-db \
	file qemu-system-x86 linux-image-amd64 busybox-static cpio syslinux syslinux-common \
	mtools dosfstools fdisk containerd stargz-snapshotter
# cosign, from Debian 13 on: the tests check cdi.py against its signatures.
CODENAME := $(shell . /etc/os-release && echo $$VERSION_CODENAME)
DEBIAN_PACKAGES += $(if $(filter bookworm,$(CODENAME)),,cosign)
RUFF_VERSION = 0.17.6
# Through the interpreter: a pip-installed ruff may have no command on PATH yet.
RUFF = python3 -m ruff
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: all man setup packages ruff check check-other lint unit test demo install uninstall \
	bench bench-shaped soak check-slow

# The manual, nbdkit-cdipy-plugin(1): built from its POD, never committed.
MANUAL_POD = docs/nbdkit-cdipy-plugin.pod
MANUAL = docs/nbdkit-cdipy-plugin.1
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

all: man

man: $(MANUAL)

$(MANUAL): $(MANUAL_POD) pyproject.toml
	podchecker $(MANUAL_POD)
	pod2man --section=1 --center=nbdkit --release="cdi.py $(VERSION)" \
		--name=nbdkit-cdipy-plugin $(MANUAL_POD) > $@.tmp
	mv $@.tmp $@

# Install whatever is missing: Debian packages, then ruff from PyPI.
setup: packages ruff

packages:
	@missing=$$(for package in $(DEBIAN_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$package 2>/dev/null | \
			grep -q 'ok installed' || echo $$package; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

ruff:
	@$(RUFF) --version 2>/dev/null | grep -qx 'ruff $(RUFF_VERSION)' || \
		python3 -m pip install --quiet --disable-pip-version-check 'ruff==$(RUFF_VERSION)' || \
		python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
			'ruff==$(RUFF_VERSION)'

lint: ruff
	$(RUFF) check cdi.py cdipy tests bench
	$(PYTHON) -m py_compile cdi.py
	podchecker $(MANUAL_POD)

# The core alone, in seconds: no nbdkit, podman or registry.
unit: packages
	$(PYTHON) -m pytest tests/unit

# Unit tests first, then end to end with real nbdkit, podman and registries.
test: unit
	$(PYTHON) -m pytest tests/e2e

check: lint test

# The whole suite again on the other Debian release (12 on 13, 13 on 12), in
# a root made with debootstrap and reused (CDI_ROOT=DIR to choose where);
# lint runs on this machine alone.  As root.  See .ci/in-other-release.
check-other:
	$(SUDO) .ci/in-other-release make test

demo: setup
	tests/demo.sh

# Benchmarks in a private podman and registry: BENCH_SIZE (default 1G) and
# BENCH_RUNS (default 5).  See bench/README.md.
bench: setup
	@BENCH_SIZE="$(BENCH_SIZE)" BENCH_RUNS="$(BENCH_RUNS)" $(PYTHON) bench/bench.py

# A VM disk served before it has arrived, over a shaped link, against its
# download (as root: a network namespace of its own): BENCH_RUNS (default 3),
# SHAPED_RATE (default 200mbit), SHAPED_RTT (default 0.010 s a request),
# SHAPED_ROWS (the rows to measure, as "8,20-23"; default all).
bench-shaped: setup
	@BENCH_RUNS="$(BENCH_RUNS)" SHAPED_RATE="$(SHAPED_RATE)" SHAPED_RTT="$(SHAPED_RTT)" \
		SHAPED_ROWS="$(SHAPED_ROWS)" \
		$(SUDO) $(PYTHON) bench/shaped.py

# Minutes of random reads on 16 connections, every byte checked, memory
# watched: CDI_SOAK_SECONDS (default 300).
soak: setup
	$(PYTHON) -m pytest -m soak tests/e2e/test_reliability.py

# The tests too long for make check: an 8.1 GiB file stored sparsely (~3 min).
check-slow: setup
	$(PYTHON) -m pytest -m slow tests/e2e

# make install [PREFIX=/usr/local] [DESTDIR=...]: the cdipy package on the
# embedded Python's path, the plugin as nbdkit-cdipy-plugin in nbdkit's
# plugin directory, so that "nbdkit cdipy name=IMAGE" runs it, and its
# manual in man1, so that "man nbdkit-cdipy-plugin" shows it.
PREFIX = /usr/local
MANDIR = $(PREFIX)/share/man
PLUGINDIR = $(shell nbdkit --dump-config 2>/dev/null | sed -n 's/^plugindir=//p')
# The directory of Python's path under PREFIX (Debian: .../dist-packages).
PYTHONDIR = $(shell $(PYTHON) -c 'import sys, sysconfig; \
	print(next((p for p in sys.path if p.startswith("$(PREFIX)/lib/") and p.endswith("-packages")), \
	sysconfig.get_path("purelib", "posix_prefix", {"base": "$(PREFIX)"})))')

install: man
	@test -n "$(PLUGINDIR)" || { echo "make install: nbdkit not found; run make setup"; exit 1; }
	install -d $(DESTDIR)$(PLUGINDIR)
	for package in cdipy cdipy/oci cdipy/sources; do \
		install -d $(DESTDIR)$(PYTHONDIR)/$$package && \
		install -m 0644 $$package/*.py $(DESTDIR)$(PYTHONDIR)/$$package/ || exit 1; \
	done
	install -m 0755 cdi.py $(DESTDIR)$(PLUGINDIR)/nbdkit-cdipy-plugin
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 $(MANUAL) $(DESTDIR)$(MANDIR)/man1/nbdkit-cdipy-plugin.1

uninstall:
	rm -rf $(DESTDIR)$(PYTHONDIR)/cdipy $(DESTDIR)$(PLUGINDIR)/nbdkit-cdipy-plugin \
		$(DESTDIR)$(MANDIR)/man1/nbdkit-cdipy-plugin.1
