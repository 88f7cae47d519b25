# The two commands of the README: `make demo` and `make test` (each sets up what it needs);
# `make setup` is their set-up alone, `make bench` the quick CPU benchmarks (docs/benchmarks.md).
VENV ?= .venv
export VENV

.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/bench_counting.py
	$(VENV)/bin/python bench/bench_engine.py
