# The two set-up commands of the README. Both install torch==2.13.0 first: on these machines it is a
# local CPU wheel, and installing it before the project keeps pip from pulling a CUDA build.
# nvidia-pytriton (the Triton server binary of `dagc serve`) goes in without its dependencies: they
# would replace numpy 2 with numpy 1 (pyproject.toml, the serve extra).
PY ?= python3
RUN ?= runs/demo

.PHONY: install demo test lint bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev,serve]"
	$(PY) -m pip install -q --no-deps "nvidia-pytriton>=0.7,<0.8"

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
