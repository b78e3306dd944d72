# The two set-up-included commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch pin lives in pyproject.toml; it is installed on its own, before the rest, so that no
# other requirement can pull an unpinned CUDA build of torch first.
TORCH_PIN := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

.PHONY: demo test test-fast lint bench clean-venv

$(STAMP): pyproject.toml
	@test -n "$(TORCH_PIN)" || { echo "no torch==X pin found in pyproject.toml"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_PIN)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

# The main job: a real GRPO run on the toy task, two DeepSpeed CPU ranks with the reference
# server in the loop (examples/toy/run_demo.py); about 3 minutes on 2 cores.
demo: $(STAMP)
	$(BIN)/python examples/toy/run_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

# The fast layers only (no launcher, server or worker processes): about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .

# The LM-head benchmark behind the README table: 1,024 tokens, three interleaved rounds (about 10 minutes).
bench: $(STAMP)
	$(BIN)/python scripts/bench_logprobs.py --batch 1 --length 1024 --rounds 3 --repeats 1 --json bench_results/bench_logprobs.json

clean-venv:
	rm -rf $(VENV)
