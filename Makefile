# The two set-up commands of the README. Both install torch==2.13.0 first: on these machines it is a
# local CPU wheel, and installing it before the project keeps pip from pulling a CUDA build.
PY ?= python3
RUN ?= runs/demo
ART ?= $(RUN)-art

.PHONY: install demo test lint bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"

# The main job in one command: train, compile at fp32 and int8 (int8 checked on the tasks' held-out
# metrics), bench at batch 8, and a summary (tools/demo.py).
demo: install
	rm -rf $(RUN) $(ART) $(RUN)-bench.json $(RUN)-bench.png
	dagc train --out $(RUN) --quiet
	dagc compile $(RUN)/checkpoint.safetensors --precision fp32,int8 --out $(ART)
	dagc bench $(ART) --checkpoint $(RUN)/checkpoint.safetensors --batch 8 --json $(RUN)-bench.json --plot $(RUN)-bench.png
	$(PY) -m dagc.tools.demo $(RUN) $(ART) $(RUN)-bench.json

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

bench:
	$(PY) benchmarks/bench_stacked.py
