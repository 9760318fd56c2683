# tierfs build and test harness (GNU make). Works on a fresh Debian machine as root
# (installs the few system packages it needs) and on an already provisioned one, where
# every step below that is already done is a no-op.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tierfs-installed

# System packages: FUSE 3 for mounting, libfuse3-dev + pkg-config + a compiler and
# Python headers to build pyfuse3 (no wheel exists), python3-venv for `python3 -m venv`.
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
# Only the benchmark compares against these.
BENCH_PACKAGES := s3fs rclone

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Install the listed Debian packages that are not installed yet; nothing at all (not even
# apt-get update) when every one is present.
define apt_install
	@missing=""; \
	for pkg in $(1); do \
		dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

.PHONY: all deps bench-deps venv .venv lint test demo bench bench-rss stress clean

all: test

deps:
	$(call apt_install,$(SYSTEM_PACKAGES))

bench-deps:
	$(call apt_install,$(BENCH_PACKAGES))

venv .venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project's dependencies may have changed.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check tierfs tests tools
	$(VENV)/bin/mypy

# pytest exits 5 when it collected nothing; a test run that tested nothing must fail.
test: deps $(STAMP) lint
	@$(VENV)/bin/pytest; rc=$$?; \
	if [ $$rc -eq 0 ]; then echo "make test: PASSED"; \
	elif [ $$rc -eq 5 ]; then echo "make test: FAILED - pytest collected no tests (exit 5)"; rc=1; \
	else echo "make test: FAILED - pytest exit status $$rc"; fi; \
	exit $$rc

demo: deps $(STAMP)
	$(PY) -m tools.demo

bench: deps bench-deps $(STAMP)
	$(PY) -m tools.bench $(BENCH_ARGS)

bench-rss: deps $(STAMP)
	$(PY) -m tools.bench_rss $(BENCH_ARGS)

# The concurrency stress test of issue 11 at full size: 10 minutes, 16 threads, two busy
# loops for CPU contention. Override with e.g. STRESS_ARGS='--seconds 60 --delay-faults'.
STRESS_ARGS ?= --seconds 600 --threads 16 --busy 2

stress: deps $(STAMP)
	$(PY) -m tools.stress $(STRESS_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache bench-out *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
