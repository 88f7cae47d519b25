# The two commands of the README: `make demo` and `make test` (each sets up what it needs).
VENV ?= .venv
export VENV

.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/metaprune prune --arch mobilenet_v1 --width-mult 0.25 --macs-ratio 0.3 \
		--preset quick --baseline --out runs/demo --resume

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/bench_counting.py
	$(VENV)/bin/python bench/bench_engine.py
