PY ?= python3

.PHONY: setup lint types test check bench demo

setup:
	bash scripts/setup.sh

lint:
	$(PY) -m ruff check stabwatch tests benchmarks examples
	$(PY) -m ruff format --check stabwatch tests benchmarks examples

types:
	$(PY) -m mypy stabwatch

test:
	$(PY) -m pytest -q -p no:cacheprovider

# lint, types and tests: what CI runs
check: lint types test

bench:
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_svd.py
	$(PY) benchmarks/bench_snn.py
	$(PY) benchmarks/bench_shadow.py
	$(PY) benchmarks/bench_sinks.py
	$(PY) benchmarks/bench_alerts.py
	$(PY) benchmarks/bench_analysis.py

demo:
	stabwatch demo
