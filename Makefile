# Every target creates the environment in .venv/ when it is missing (or when a requirements file changed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser slurm lint test test-fast demo demo-v2 demo-results demo-check gpu-check docs docs-blocks \
	clean-venv

venv: $(STAMP)

# requirements-extras.txt: optional experiment logging (--log-tensorboard, --log-wandb), installed so its tests run
# requirements-browser.txt: the browser driver of tests/test_report.py (Chromium itself: the browser target)
# requirements-docs.txt: mkdocs, for the documentation site (make docs; its strict build is a test)
# requirements-dev.txt: ruff and mypy (make lint, run by make test)
$(STAMP): requirements.txt requirements-extras.txt requirements-browser.txt requirements-docs.txt \
		requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt pytest pytest-xdist "setuptools>=68"
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-extras.txt -c constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-browser.txt -c constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-docs.txt -c constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Chromium and its driver for tests/test_report.py (docs/report.md), best effort: only where apt-get exists and
# /usr/bin/chromium or /usr/bin/chromedriver is missing (as root, or with password-less sudo). A failed install is
# reported and the browser tests are then skipped, saying why (-rs prints the reason). About 80 s on a fresh
# Debian 12 machine.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
BROWSER_LOG ?= $(or $(TMPDIR),/tmp)/snnet-browser-install.log

browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: no apt-get here; install Chromium and chromedriver by hand or the browser tests are skipped"; \
	else \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; start=$$(date +%s); \
		echo "browser: installing chromium, chromium-driver for tests/test_report.py (log: $(BROWSER_LOG))"; \
		if { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver fonts-liberation; } >$(BROWSER_LOG) 2>&1; then \
			echo "browser: installed in $$(( $$(date +%s) - start )) s"; \
		else \
			echo "browser: install failed after $$(( $$(date +%s) - start )) s (see $(BROWSER_LOG));" \
				"the browser tests will be skipped"; \
		fi; \
	fi

# Slurm and munge for tests/test_slurm.py (docs/slurm.md), best effort as for Chromium: only where apt-get exists and
# slurmctld, slurmd, sbatch or munged is missing (as root, or with password-less sudo). The tests start their own
# single-node cluster under a temporary folder (as root) and stop it; without root or the packages they are
# skipped, saying why. About 60 s on a fresh Debian 12 machine.
SLURM_LOG ?= $(or $(TMPDIR),/tmp)/snnet-slurm-install.log

slurm:
	@if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && \
		command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "slurm: no apt-get here; install slurm-wlm and munge by hand or the slurm tests are skipped"; \
	else \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; start=$$(date +%s); \
		echo "slurm: installing slurm-wlm, munge for tests/test_slurm.py (log: $(SLURM_LOG))"; \
		if { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends slurm-wlm munge; } >$(SLURM_LOG) 2>&1; then \
			echo "slurm: installed in $$(( $$(date +%s) - start )) s"; \
		else \
			echo "slurm: install failed after $$(( $$(date +%s) - start )) s (see $(SLURM_LOG));" \
				"the slurm tests will be skipped"; \
		fi; \
	fi

# ruff (lint rules and import order) and mypy (types), both configured in pyproject.toml; a few seconds
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# lint, then every test; the 15 slowest are listed at the end. One OpenMP thread per process: two pytest workers and
# the processes the tests start share two cores, and torch's idle OpenMP threads spin for CPU the others need.
test: venv browser slurm lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -n 2 --durations=15 tests

# the fast tier: no test over ~1.5 s, nothing that starts several processes, no browser, no Slurm cluster (markers:
# pyproject.toml);
# on both cores (pytest-xdist), as make test
test-fast: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -n 2 -m "not slow and not dist and not browser" tests

# the digits demo: 3 anchors (w16, w32, w64) and their SN-Net, everything under output/demo (gitignored): the fresh
# table, plot and report in output/demo/results/demo; the committed results/ do not change (make demo-results)
demo: venv
	$(BIN)/python -m snnet.demo

# SN-Net vs. SN-Netv2 (two-way, LoRA, ROS) on the demo's anchors w16 and w64: output/demo/results/demo_v2
demo-v2: venv
	$(BIN)/python -m snnet.demo --v2

# the only way the committed results/demo and results/demo_v2 change: both demos afresh, then copied there
demo-results: demo demo-v2
	$(BIN)/python tools/publish_demo.py

# both demos afresh, then every cfg_id's route, FLOPs and top-1/top-5 compared with the committed results (exit 1)
demo-check: demo demo-v2
	$(BIN)/python -m snnet.demo --check

# on a machine with CUDA, within 10 minutes: tests/test_cuda.py, a nccl run of the digits demo config checked against a
# CPU evaluation, and real-size benchmarks -> results/gpu/<gpu name>.md; without CUDA one line and exit 2
gpu-check: venv
	@$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# the documentation site from docs/ (mkdocs.yml) into site/; --strict: a broken link or anchor fails the build
docs: venv
	$(BIN)/mkdocs build --strict

# regenerate the console blocks of README.md and docs/*.md from the committed results (tools/docs_blocks.py;
# tests/test_docs.py runs --check, so a number that differs from what the results give fails the tests)
docs-blocks: venv
	$(BIN)/python tools/docs_blocks.py --write
	$(BIN)/python tools/config_reference.py --write

clean-venv:
	rm -rf $(VENV)
