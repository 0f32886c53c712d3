# The two set-up commands of the README. Both install torch==2.13.0 first: on these machines it is a
# local CPU wheel, and installing it before the project keeps pip from pulling a CUDA build.
# nvidia-pytriton (the Triton server binary of `dagc serve`) goes in without its dependencies: they
# would replace numpy 2 with numpy 1 (pyproject.toml, the serve extra).
PY ?= python3
RUN ?= runs/demo
ART ?= $(RUN)-art

.PHONY: install demo test lint bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev,serve]"
	$(PY) -m pip install -q --no-deps "nvidia-pytriton>=0.7,<0.8"

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
