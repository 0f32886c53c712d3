#!/usr/bin/env bash
# benchmarks/gpu_check.sh — everything of dagc that needs a CUDA GPU, in one run of about 8 minutes.
#
#   bash benchmarks/gpu_check.sh                            # on the GPU machine, from the repository root
#   DAGC_GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # the CPU dry run (also: no CUDA detected)
#
# Steps, each with its own time limit, each logged to $OUT/<step>.log (OUT defaults to ./gpu_out):
#   0. environment: GPU, driver, CUDA and torch versions -> $OUT/environment.json; which of the
#      Python modules dagc needs are missing; makes dagc importable (see "What it needs").
#   1. pytest -m gpu on the test files that hold gpu tests -> $OUT/pytest_gpu.log, pytest_gpu.xml
#   2. CUDA training steps, stacked vs one task at a time, fp32 and bf16 (benchmarks/bench_gpu_train.py,
#      960 iterations) -> $OUT/gpu_train.json
#   3. an end-to-end `dagc train --device cuda --amp bf16` run (250 iterations) -> $OUT/train_cuda/
#   4. the GPU benchmark table at batch 1/8/32: unpruned and masked supernets in PyTorch CUDA eager,
#      the compiled shared model as AOTInductor CUDA packages in fp32, fp16 and bf16
#      (benchmarks/bench_runtime.py --gpu-only) -> $OUT/runtime_tiny_gpu.json, runtime_vgg16_gpu.json
#   $OUT/summary.txt says which steps passed, failed, timed out or were skipped, and why; the exit
#   status is 1 when a step failed or timed out. DAGC_GPU_CHECK_STEPS=pytest_gpu,gpu_table (names
#   as above: pytest_gpu, gpu_train, train_cuda, gpu_table) runs only those steps.
#
# Without CUDA (or with DAGC_GPU_CHECK_DRY_RUN=1) the GPU parts are skipped with one line each and
# the CPU side of every step runs quickly instead (the same scripts with CPU sizes; pytest collects
# the gpu tests, which skip themselves), so that the script is tested before a GPU is there
# (tests/test_gpu_check.py).
#
# What it needs. The GPU machine this project may get has Python 3.12, torch 2.11+cu130, triton and
# onnxruntime 1.30 (CPU); whether it has the rest of dagc's dependencies (click, safetensors, onnx,
# tqdm, pillow, onnx, pytest, onnxconverter-common) was never checked: step 0 lists what is
# missing in $OUT/environment.json. What these steps import beyond torch, numpy, triton and
# onnxruntime: click, safetensors, tqdm, pillow, onnx (with protobuf and ml_dtypes), pytest (with
# pluggy, iniconfig, packaging); onnxconverter-common only for the fp16 TensorRT path, whose tests
# skip without TensorRT anyway; scipy only for the edge metric at inputs of about 94x94 and more
# (not used here). Their cp312 manylinux wheels should come to roughly 25-30 MiB (an estimate from
# their usual sizes, not measured). Nothing outside that machine can be reached, so missing
# packages must travel with the run as wheels (64 MiB of files in all): put them in ./wheels (or
# $DAGC_WHEELS) on the machine that starts the run and carry that folder (git ignores ./wheels and
# ./gpu_out, so a carry list must name wheels); this script installs
# them with `pip install --no-index --no-deps`. It does not download anything. dagc itself is made
# importable with `pip install --no-deps --no-build-isolation -e .`, or, where that fails, through
# a folder of links laid out as the installed package (PYTHONPATH), which needs nothing installed.
# TensorRT is not needed and cannot be installed there (its libraries come only from NVIDIA's index):
# its tests skip.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${DAGC_WHEELS:-$ROOT/wheels}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
: > "$OUT/summary.txt"

say() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }
record() { echo "$1: $2" >> "$OUT/summary.txt"; say "$1: $2"; }

# run_step NAME LIMIT_SECONDS COMMAND...: the command's output to $OUT/NAME.log, its outcome to the summary.
# A step not named in DAGC_GPU_CHECK_STEPS (comma-separated; unset: all) is recorded as skipped.
run_step() {
    local name="$1" limit="$2"
    shift 2
    if [ -n "${DAGC_GPU_CHECK_STEPS:-}" ] && [[ ",$DAGC_GPU_CHECK_STEPS," != *",$name,"* ]]; then
        record "$name" "skipped (not in DAGC_GPU_CHECK_STEPS)"
        return 0
    fi
    say "step $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if declare -F "$1" > /dev/null; then  # a function of this script (its commands are short)
        "$@" > "$OUT/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    fi
    local rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        record "$name" "passed in ${took}s"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" "TIMED OUT after ${took}s (limit ${limit}s); see $name.log"
    else
        record "$name" "FAILED (exit $rc) in ${took}s; last lines of $name.log:"
        tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    fi
    return 0
}

# expect_refusal COMMAND...: passes when the command ends with exit 2 and one "dagc: error:" line.
expect_refusal() {
    local err rc
    err="$("$@" 2>&1 >/dev/null)"
    rc=$?
    echo "$err"
    [ $rc -eq 2 ] && [ "$(printf '%s\n' "$err" | grep -c .)" -eq 1 ] && [[ "$err" == "dagc: error: "* ]]
}

# ---------------------------------------------------------------------------- 0. environment
if [ "${DAGC_GPU_CHECK_NO_INSTALL:-0}" != "1" ] && [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    say "installing the carried wheels of $WHEELS (no index, no dependencies)"
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl >> "$OUT/gpu_check.log" 2>&1 \
        || say "some carried wheels did not install (see gpu_check.log)"
fi

dagc_here() {  # is the dagc that Python imports this checkout's?
    "$PY" - "$ROOT" <<'EOF' > /dev/null 2>&1
import os, sys
import dagc.tools.cli, dagc.trainer, dagc.compiler, dagc.runtime
sys.exit(0 if os.path.realpath(os.path.dirname(dagc.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "dagc")) else 1)
EOF
}

if ! dagc_here; then
    # DAGC_GPU_CHECK_NO_INSTALL=1 (the tests): never install into this Python, use the links.
    if [ "${DAGC_GPU_CHECK_NO_INSTALL:-0}" = "1" ]; then
        installed=1
    else
        say "making this checkout importable: pip install --no-deps --no-build-isolation -e ."
        "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >> "$OUT/gpu_check.log" 2>&1 && dagc_here
        installed=$?
    fi
    if [ "$installed" -ne 0 ]; then
        # The package-dir mapping of pyproject.toml (dagc.trainer is trainer/, ...) as a folder of links.
        LINKS="$OUT/.dagc_links"
        rm -rf "$LINKS" && mkdir -p "$LINKS/dagc"
        for f in "$ROOT"/dagc/*; do ln -s "$f" "$LINKS/dagc/"; done
        for sub in trainer compiler runtime tools; do ln -s "$ROOT/$sub" "$LINKS/dagc/$sub"; done
        export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
        say "pip could not install it; importing dagc through the links in $LINKS (PYTHONPATH)"
    fi
fi

"$PY" - "$OUT/environment.json" <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import importlib.util, json, platform, shutil, subprocess, sys
mods = ["torch", "numpy", "click", "safetensors", "tqdm", "PIL", "scipy", "onnx", "onnxruntime", "pytest",
        "triton", "onnxconverter_common", "onnxscript", "sklearn", "matplotlib", "hypothesis", "tensorrt"]
env = {"python": platform.python_version(), "platform": platform.platform(),
       "missing": [m for m in mods if importlib.util.find_spec(m) is None],
       # AOTInductor compiles its C++ wrapper with the first of these (torch._inductor.config.cpp.cxx)
       "cxx": shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"), "nvcc": shutil.which("nvcc")}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as e:  # the report must be written whatever is broken
    env["torch_error"] = repr(e)
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    env["driver"] = None
try:
    import onnxruntime
    env["onnxruntime"] = onnxruntime.__version__
except Exception:
    pass
json.dump(env, open(sys.argv[1], "w"), indent=2)
print("environment:", json.dumps(env))
EOF

DRY="${DAGC_GPU_CHECK_DRY_RUN:-0}"
if [ "$DRY" != "1" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "no CUDA GPU detected: dry run"
    DRY=1
fi
if [ "$DRY" = "1" ]; then
    say "DRY RUN: GPU parts skipped; the CPU side of each step runs with CPU sizes (these are not GPU figures)"
    echo "mode: dry run (no GPU figures)" >> "$OUT/summary.txt"
else
    echo "mode: GPU" >> "$OUT/summary.txt"
fi
# Everything runs from $OUT with absolute paths: with the links of step 0, a Python started in the
# checkout (python -m ...) would import its bare dagc/ folder first, which lacks dagc.trainer & co.
cd "$OUT" || exit 1

# ---------------------------------------------------------------------------- 1. pytest -m gpu
GPU_TESTS=$(grep -l "pytest.mark.gpu" "$ROOT"/tests/test_*.py | tr '\n' ' ')
if [ "$DRY" = "1" ]; then
    # Collects every gpu test (imports and fixtures of those files) and runs the CPU-side tests of
    # tests/test_gpu.py; the gpu ones skip themselves without CUDA.
    run_step pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_gpu.py" -m "not slow" \
        --rootdir "$ROOT" -k "flags or qdq or refus" --junitxml="$OUT/pytest_gpu.xml"
else
    # shellcheck disable=SC2086 # the file list is meant to split
    run_step pytest_gpu 210 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --rootdir "$ROOT" $GPU_TESTS \
        --junitxml="$OUT/pytest_gpu.xml"
fi

# ---------------------------------------------------------------------------- 2. training steps
if [ "$DRY" = "1" ]; then
    say "training steps on CUDA: skipped (no GPU); one CPU step of each kind instead"
    run_step gpu_train 60 "$PY" "$ROOT"/benchmarks/bench_gpu_train.py --device cpu --json "$OUT/gpu_train.json"
else
    run_step gpu_train 60 "$PY" "$ROOT"/benchmarks/bench_gpu_train.py --device cuda --json "$OUT/gpu_train.json"
fi

# ---------------------------------------------------------------------------- 3. dagc train on CUDA
if [ "$DRY" = "1" ]; then
    say "dagc train --device cuda: skipped (no GPU); its one-line refusal (exit 2) is checked instead"
    run_step train_cuda 60 expect_refusal "$PY" -m dagc train --out "$OUT/train_cuda" --device cuda --quiet \
        --warmup-iters 1 --search-iters 1 --finetune-iters 1
else
    run_step train_cuda 60 "$PY" -m dagc train --out "$OUT/train_cuda" --device cuda --amp bf16 --quiet \
        --warmup-iters 100 --search-iters 100 --finetune-iters 50
fi

# ---------------------------------------------------------------------------- 4. the GPU table
if [ "$DRY" = "1" ]; then
    say "GPU benchmark table: skipped (no GPU); its code path once on the CPU instead"
    run_step gpu_table 90 "$PY" "$ROOT"/benchmarks/bench_runtime.py --dry-run --json-dir "$OUT"
else
    # No AOTInductor package is begun after 110 s (vgg16's take longest), so the table ends in its limit.
    run_step gpu_table 170 "$PY" "$ROOT"/benchmarks/bench_runtime.py --gpu-only --json-dir "$OUT" --budget-s 110
fi

say "done in ${SECONDS}s; summary in $OUT/summary.txt"
cat "$OUT/summary.txt"
grep -qE "FAILED|TIMED OUT" "$OUT/summary.txt" && exit 1
exit 0
