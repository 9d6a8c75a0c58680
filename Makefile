# cdi.py: make setup | check | lint | test | demo

# The interpreter nbdkit-python-plugin embeds: the only one with the nbd module.
PYTHON = /usr/bin/python3
DEBIAN_PACKAGES = nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd \
	podman skopeo qemu-utils docker-registry python3-pytest python3-hypothesis
RUFF_VERSION = 0.17.6
# Through the interpreter: a pip-installed ruff may have no command on PATH yet.
RUFF = python3 -m ruff
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup check lint test demo bench soak check-slow

# Install whatever is missing: Debian packages, then ruff from PyPI.
setup:
	@missing=$$(for package in $(DEBIAN_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$package 2>/dev/null | \
			grep -q 'ok installed' || echo $$package; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@$(RUFF) --version 2>/dev/null | grep -qx 'ruff $(RUFF_VERSION)' || \
		python3 -m pip install --quiet --disable-pip-version-check 'ruff==$(RUFF_VERSION)' || \
		python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
			'ruff==$(RUFF_VERSION)'

lint: setup
	$(RUFF) check cdi.py tests bench
	$(PYTHON) -m py_compile cdi.py

test: setup
	$(PYTHON) -m pytest tests

check: lint test

demo: setup
	tests/demo.sh

# Benchmarks in a private podman and registry; sizes and runs from
# BENCH_SIZES (default "1G 4G") and BENCH_RUNS (default 5).  See bench/README.md.
bench: setup
	@BENCH_SIZES="$(BENCH_SIZES)" BENCH_RUNS="$(BENCH_RUNS)" $(PYTHON) bench/bench.py

# Minutes of random reads on 16 connections, every byte checked, memory
# watched: CDI_SOAK_SECONDS (default 300).
soak: setup
	$(PYTHON) -m pytest -m soak tests/test_reliability.py

# The tests too long for make check: an 8.1 GiB file stored sparsely (~3 min).
check-slow: setup
	$(PYTHON) -m pytest -m slow tests
