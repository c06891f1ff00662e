PY ?= python3

.PHONY: setup lint types test docs check bench demo

setup:
	bash scripts/setup.sh

lint:
	$(PY) -m ruff check stabwatch tests benchmarks examples
	$(PY) -m ruff format --check stabwatch tests benchmarks examples

types:
	$(PY) -m mypy stabwatch

test:
	$(PY) -m pytest -q -p no:cacheprovider

# the documentation site, warnings as errors (browse it with `mkdocs serve`)
docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

# lint, types, tests and the docs build: what CI runs
check: lint types test docs

bench:
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_svd.py
	$(PY) benchmarks/bench_snn.py
	$(PY) benchmarks/bench_shadow.py
	$(PY) benchmarks/bench_sinks.py
	$(PY) benchmarks/bench_alerts.py
	$(PY) benchmarks/bench_snn_diagnosis.py
	$(PY) benchmarks/bench_ftle.py
	$(PY) benchmarks/bench_rnn_spectrum.py
	$(PY) benchmarks/bench_sharpness.py
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_analysis.py

demo:
	stabwatch demo
