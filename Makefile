# `make test` and `make speedrun` work on a fresh clone: they create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup test test-slow speedrun bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Install the CPU build of torch first: a bare `pip install torch` here pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,ray,export,rag]"
	touch $@

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PIP) install -q -e ".[dev,ray,export,rag,lmeval]"
	$(PY) -m pytest -q -m slow

speedrun: setup
	$(VENV)/bin/lmstack speedrun --config recipes/speedrun.yaml

bench: setup
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
