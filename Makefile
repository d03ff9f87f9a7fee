# All targets use the virtualenv at .venv (created on first use).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv control-plane cluster cluster-down lint test unit image manifests demo demo-contract bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

# Builds (first run only) and caches etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, KWOK and Helm from Go modules.
control-plane:
	devtools/build-control-plane.sh

cluster: venv control-plane
	$(PY) -m devtools.cluster up

cluster-down: venv
	$(PY) -m devtools.cluster down

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: venv control-plane lint
	$(VENV)/bin/pytest

# The pure tests only: no control plane, no cluster, no emulator process; seconds.
unit: venv
	$(VENV)/bin/pytest -q -m "not cluster" tests/unit

# The container image from the Dockerfile with buildah (no daemon). Without PYTHON_IMAGE the base
# image is made from Debian 12 packages with mmdebstrap and cached; see devtools/image.py.
image: venv
	$(PY) -m devtools.image

# The CRD and sample from the models, then the chart's CRD copy and the rendered install bundle.
manifests: venv control-plane
	$(VENV)/bin/metering-operator manifests --output-dir manifests
	$(PY) -m tests.chart.sync

demo: venv control-plane
	$(PY) -m devtools.demo

# The second story: a contract product entitled by AWS License Manager seats.
demo-contract: venv control-plane
	$(PY) -m devtools.demo --contract

# Rewrites bench/results/*.md; see bench/README.md for each benchmark on its own.
bench: venv control-plane
	$(PY) -m bench

clean: cluster-down
	rm -rf $(VENV) .local
