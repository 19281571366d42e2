# Every target creates the environment in .venv/ when it is missing (or when requirements.txt changed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-v2 clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt pytest "setuptools>=68"
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m snnet.demo

# SN-Net vs. SN-Netv2 (two-way, LoRA, ROS) on the demo's anchors w16 and w64: results/demo_v2/
demo-v2: venv
	$(BIN)/python -m snnet.demo --v2

clean-venv:
	rm -rf $(VENV)
