# Two commands on a fresh machine, both idempotent (the environment is made once, then reused):
#   make demo   build the demo artifact from the demo checkpoint, then recommend for a demo history
#   make test   run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO := artifacts/demo

.PHONY: demo test env

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q -e ".[export,dev]"
	rm -f $(VENV)/.installed-* && touch $@

$(DEMO)/manifest.json: $(STAMP) checkpoints/demo/nezha/model.safetensors
	$(BIN)/python export/build.py --out $(DEMO) --force

demo: $(DEMO)/manifest.json
	$(BIN)/nezha recommend $(DEMO) --history 12,55,102 -k 10

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra
