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
# Only the benchmark compares against these. awscli (the copy-first baseline) comes from Debian,
# outside the venv, so its botocore never moves the one tierfs runs on; a release without it
# still benchmarks (copy-first then copies with boto3, and the report says so).
BENCH_PACKAGES := s3fs rclone
BENCH_OPTIONAL_PACKAGES := awscli
BENCH_STAMP := $(VENV)/.tierfs-bench-installed
# tests/test_stats.py drives `tierfs stats` in a real terminal.
TEST_PACKAGES := tmux

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

.PHONY: all deps bench-deps venv .venv lint test demo bench bench-cold bench-rss bench-accel bench-shared \
	bench-write bench-door bench-snapshot stress clean test-ecosystem \
	install uninstall deb install-test deb-test container-test container-deps

all: test

deps:
	$(call apt_install,$(SYSTEM_PACKAGES) $(TEST_PACKAGES))

# The peers from Debian, and the venv's `bench` extra (s3torchconnector beside the pinned CPU torch).
bench-deps: deps $(BENCH_STAMP)
	$(call apt_install,$(BENCH_PACKAGES))
	-$(call apt_install,$(BENCH_OPTIONAL_PACKAGES))

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -e '.[dev,torch,bench]'
	touch $@

venv .venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project's dependencies may have changed. The torch extra (pinned
# CPU build, found on the local wheel path: ~12 s) is installed so the dataset tests run, not skip.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev,torch]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check tierfs tests tools
	$(VENV)/bin/mypy

# Run pytest with the given arguments and say how it went; pytest exits 5 when it collected
# nothing, and a test run that tested nothing must fail.
define pytest_run
	@$(VENV)/bin/pytest $(2); rc=$$?; \
	if [ $$rc -eq 0 ]; then echo "make $(1): PASSED"; \
	elif [ $$rc -eq 5 ]; then echo "make $(1): FAILED - pytest collected no tests (exit 5)"; rc=1; \
	else echo "make $(1): FAILED - pytest exit status $$rc"; fi; \
	exit $$rc
endef

# tests/test_install.py installs into the real /usr/local/bin, /sbin and dpkg database and
# starts dockerd: it runs only through the three targets below (and .ci/run), not here.
# tests/ecosystem needs the data libraries of the ecosystem extra: `make test-ecosystem`.
test: deps $(STAMP) lint
	$(call pytest_run,test,--ignore=tests/test_install.py --ignore=tests/ecosystem)

# The data libraries (pyarrow, pandas, datasets, webdataset, safetensors) on a real mount (issue 24).
# Installing the extra into an existing venv took 47 s here (PyPI wheels; torch stays the pinned
# CPU build of the torch extra); the tests take about 5 minutes on a busy 2-core machine.
ECO_STAMP := $(VENV)/.tierfs-ecosystem-installed
$(ECO_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -e '.[dev,torch,ecosystem]'
	touch $@

test-ecosystem: deps $(ECO_STAMP)
	$(call pytest_run,test-ecosystem,tests/ecosystem)

demo: deps $(STAMP)
	$(PY) -m tools.demo

bench: deps bench-deps $(STAMP)
	$(PY) -m tools.bench $(BENCH_ARGS)

# Cold small files and `tierfs prefetch` against awscrt with 16 GETs in flight, boto3 and
# `aws s3 cp --recursive` (issue 16).
bench-cold: deps $(STAMP)
	$(PY) -m tools.bench_cold $(BENCH_ARGS)

# Two nodes, one shared cache tier, the origin behind a shaping proxy (docs/shared-cache.md).
bench-shared: deps $(STAMP)
	$(PY) -m tools.bench_shared $(BENCH_ARGS)

bench-rss: deps $(STAMP)
	$(PY) -m tools.bench_rss $(BENCH_ARGS)

# Dataset versions (issue 22): a 1M-entry snapshot on a fresh node, find against the cold
# LIST walk, snapshot create's RSS; BENCH_ARGS="--entries 10000000 --server seaweedfs" for 10M.
bench-snapshot: deps $(STAMP)
	$(PY) -m tools.bench_snapshot $(BENCH_ARGS)

# Write rows of issue 16 (checkpoint, small files, close to durable), each with its raw
# boto3 baseline in the same run; --quick for a smoke-test size.
bench-write: deps $(STAMP)
	$(PY) -m tools.bench_write $(BENCH_ARGS)

# Accelerator utilisation (issue 13): emulated accelerators fed by a DataLoader, for a local
# copy, the FUSE mount, the direct reader and s3fs/rclone where installed; cold and warm.
bench-accel: deps $(STAMP)
	$(PY) -m tools.bench_accel $(BENCH_ARGS)

# The Python door's start-up (issue 23): fresh processes that import tierfs.reader and do one
# direct read, median/p90 against the 30 ms target; DataLoader epochs if torch is installed.
bench-door: deps $(STAMP)
	$(PY) -m tools.bench_door $(BENCH_ARGS)

# The concurrency stress test of issue 11 at full size: 10 minutes, 16 threads, two busy
# loops for CPU contention. Override with e.g. STRESS_ARGS='--seconds 60 --delay-faults'.
STRESS_ARGS ?= --seconds 600 --threads 16 --busy 2

stress: deps $(STAMP)
	$(PY) -m tools.stress $(STRESS_ARGS)

# --------------------------------------------------------------------------- installing
# `make install` puts a self-contained virtualenv in PREFIX and links tierfs and
# mount.tierfs where mount(8) finds them (see packaging/install.sh for why these places).
PREFIX ?= /opt/tierfs
DESTDIR ?=
BINDIR ?= /usr/local/bin
SBINDIR ?= /sbin
UNITDIR ?= /usr/local/lib/systemd/system
# The system's Python, which the .deb depends on (not whatever python3 is first on PATH).
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_VARS = PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' BINDIR='$(BINDIR)' SBINDIR='$(SBINDIR)' \
	UNITDIR='$(UNITDIR)' PYTHON='$(INSTALL_PYTHON)'

install: deps
	packaging/install.sh install $(INSTALL_VARS)

uninstall:
	packaging/install.sh uninstall $(INSTALL_VARS)

# tierfs_<version>_<arch>.deb in DEB_DIR, holding the same layout (venv in /opt/tierfs).
DEB_DIR ?= dist
deb: deps
	$(call apt_install,dpkg-dev)
	PYTHON='$(INSTALL_PYTHON)' packaging/deb/build.sh '$(DEB_DIR)'

# The slow, machine-changing tests of issue 17, each also run by .ci/run after `make test`.
install-test: deps $(STAMP)
	$(call pytest_run,install-test,tests/test_install.py::TestMakeInstall)

deb-test: deps $(STAMP)
	$(call apt_install,dpkg-dev)
	$(call pytest_run,deb-test,tests/test_install.py::TestDebianPackage)

# dockerd; busybox for the reader image; debootstrap and dpkg-dev for the image of tierfs itself.
container-deps:
	$(call apt_install,docker.io busybox-static debootstrap dpkg-dev)

container-test: deps container-deps $(STAMP)
	$(call pytest_run,container-test,tests/test_install.py::TestContainer)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache bench-out *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
