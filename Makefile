# fedsim: `make demo` and `make test` bootstrap .venv on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Loopback-only Ray, no usage stats, no hub downloads: for every Ray/HF start below.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench bench-flower clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsim run --config configs/demo.yaml $(ARGS)

# pytest's exit 5 ("no tests collected") is turned into a failure, never a silent pass.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# the quick loop: everything but the tests that start Ray or take more than ~30 s
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not ray and not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; exit 1; fi; exit $$rc

# ruff (style, docstrings, imports) on everything; mypy strict on the three packages and the examples (pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy fedsim actors aggregation examples

bench: $(STAMP)
	$(BIN)/python benchmarks/round_overhead.py
	$(BIN)/python benchmarks/aggregate.py --quick
	$(BIN)/python benchmarks/engine_compare.py --quick
	$(BIN)/python benchmarks/demo_task.py --quick
	$(BIN)/python benchmarks/paper_ablation.py --quick
	$(BIN)/python benchmarks/expert_lora.py --quick
	$(BIN)/python benchmarks/run_memory.py --quick

# fedsim vs Flower's simulation engine; Flower pins its own ray, so it gets its own venv (needs PyPI once).
FLOWER_STAMP := .venv-flower/.installed
$(FLOWER_STAMP): benchmarks/flower/requirements.txt
	test -x .venv-flower/bin/python || $(PYTHON) -m venv .venv-flower
	.venv-flower/bin/pip install -q torch==2.13.0
	.venv-flower/bin/pip install -q -r benchmarks/flower/requirements.txt
	touch $(FLOWER_STAMP)

bench-flower: $(STAMP) $(FLOWER_STAMP)
	$(BIN)/python benchmarks/vs_flower.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-flower .cache runs benchmarks/results
