# The two set-up commands of the README. Both install torch==2.13.0 first: on these machines it is a
# local CPU wheel, and installing it before the project keeps pip from pulling a CUDA build.
PY ?= python3
RUN ?= runs/demo

.PHONY: install demo test lint bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"

demo: install
	rm -rf $(RUN)
	dagc train --out $(RUN)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

bench:
	$(PY) benchmarks/bench_stacked.py
