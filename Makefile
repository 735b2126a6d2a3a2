# Two commands on a fresh machine, both idempotent (the environment is made once, then reused):
#   make demo   build the demo artifact from the demo checkpoint, then recommend for a demo history
#   make test   build the C++ runtime (release + sanitizers) and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO := artifacts/demo

.PHONY: demo test env cpp

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt -e ".[export,dev]"
	rm -f $(VENV)/.installed-* && touch $@

$(DEMO)/manifest.json: $(STAMP) checkpoints/demo/nezha/model.safetensors runtime/manifest.py $(wildcard export/*.py)
	$(BIN)/python export/build.py --out $(DEMO) --force

demo: $(DEMO)/manifest.json
	$(BIN)/nezha recommend $(DEMO) --history 12,55,102 -k 10

# The C++ runtime (runtime/cpp): ONNX Runtime's headers and the Debian -dev packages (setup_ort.sh, idempotent),
# a release build and an AddressSanitizer + UndefinedBehaviorSanitizer build; tests/test_cpp_runtime.py runs both.
cpp: $(STAMP)
	runtime/cpp/setup_ort.sh
	cmake -S runtime/cpp -B runtime/cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build runtime/cpp/build -j 2
	cmake -S runtime/cpp -B runtime/cpp/build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNEZHA_SANITIZE=ON >/dev/null
	cmake --build runtime/cpp/build-asan -j 2

# In CI (CI set) a C++ build failure fails the run; elsewhere tests/test_cpp_*.py then skip with the reason.
test: $(STAMP)
	@if [ -n "$$CI" ]; then $(MAKE) --no-print-directory cpp; \
	 else $(MAKE) --no-print-directory cpp || echo "make test: the C++ runtime was not built (above); tests/test_cpp_*.py skip"; fi
	$(BIN)/python -m pytest -q -ra
