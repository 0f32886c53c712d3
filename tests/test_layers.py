"""The layer contract (pyproject's [tool.importlinter]) holds, catches a violation, and a service
that only runs artifacts imports neither the trainer nor the compiler."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compiler_cases import compiled_artifact

from dagc.spec import TaskSpec, preset

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("trainer", "compiler", "runtime", "tools")
LINT_IMPORTS = shutil.which("lint-imports")


def _stage(dest: Path) -> Path:
    """A copy of the sources laid out as the installed package is (dagc/trainer/..., dagc/compiler/...),
    which grimp can walk: the layers sit beside the core folder in the repository."""
    pkg = dest / "dagc"
    pkg.mkdir(parents=True)
    for f in (ROOT / "dagc").glob("*.py"):
        shutil.copy(f, pkg / f.name)
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, pkg / layer, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _lint(staged: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=staged,
                          env={"PYTHONPATH": str(staged), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


needs_linter = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is a dev dependency")


@needs_linter
def test_the_layer_contracts_hold(tmp_path):
    res = _lint(_stage(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" in res.stdout and "0 broken" in res.stdout


@needs_linter
@pytest.mark.parametrize("module, line, contract", [
    ("runtime/engine.py", "import dagc.trainer.network", "The runtime runs artifacts with the core alone"),
    ("dagc/spec.py", "import dagc.compiler.ir", "The core imports no layer"),
    ("trainer/losses.py", "import dagc.compiler.passes", "Layers"),
])
def test_a_violation_breaks_the_contract(tmp_path, module, line, contract):
    staged = _stage(tmp_path)
    target = staged / "dagc" / (module[len("dagc/"):] if module.startswith("dagc/") else module)
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    res = _lint(staged)
    assert res.returncode != 0
    broken = [ln for ln in res.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), res.stdout


def test_every_core_module_is_named_in_the_core_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in config["contracts"] if c["name"] == "The core imports no layer")
    on_disk = {f"dagc.{f.stem}" for f in (ROOT / "dagc").glob("*.py") if f.stem not in ("__init__", "__main__")}
    assert set(core["source_modules"]) == on_disk
    init = ast.parse((ROOT / "dagc" / "__init__.py").read_text())
    assert not [n for n in ast.walk(init) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_a_service_runs_an_artifact_without_trainer_or_compiler_code(tmp_path):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")], input_size=(16, 16))
    art = compiled_artifact(tmp_path, spec, 3)
    script = f"""
import json, sys
import numpy as np
from dagc.runtime import load
engine = load({str(art)!r})
out = engine.run(np.zeros((2, 3, 16, 16), np.float32))
layers = sorted(m for m in sys.modules if m.split(".")[:2] in (["dagc", "trainer"], ["dagc", "compiler"], ["dagc", "tools"]))
print(json.dumps({{"shapes": {{t: list(v.shape) for t, v in out.items()}}, "layers": layers}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shapes"] == {"seg": [2, 3, 16, 16], "depth": [2, 1, 16, 16]}
    assert got["layers"] == []
