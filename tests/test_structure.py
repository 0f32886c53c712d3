"""Size and import rules of the project code (developers' guide, "Style"): modules of at most
~400 lines, functions of at most ~60 lines unless a comment right above says why, and no import of
dagc inside a function (imports that dodge a cycle hide a layering problem)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dagc", "trainer", "compiler", "runtime", "tools")
MODULE_LINES = 400
FUNCTION_LINES = 60
# The CLI imports each command's layer when that command runs, so `dagc --help` and a mistyped
# option answer without importing PyTorch.
LAZY_IMPORTS_ALLOWED = {"tools/cli.py", "tools/cli_train.py"}

SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MODULE_LINES, f"{_rel(path)} has {n} lines; split it by job (limit {MODULE_LINES})"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_long_functions_say_why(path):
    lines = path.read_text().splitlines()
    long = []
    for fn in _functions(ast.parse("\n".join(lines))):
        start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
        if fn.end_lineno - fn.lineno + 1 > FUNCTION_LINES and not lines[start - 2].strip().startswith("#"):
            long.append(f"{fn.name} (line {fn.lineno}, {fn.end_lineno - fn.lineno + 1} lines)")
    assert not long, f"{_rel(path)}: functions over {FUNCTION_LINES} lines without a comment above saying why: {long}"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_dagc_import_inside_a_function(path):
    if _rel(path) in LAZY_IMPORTS_ALLOWED:
        return
    found = []
    for fn in _functions(ast.parse(path.read_text())):
        for node in ast.walk(fn):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{n} (line {node.lineno})" for n in names if n == "dagc" or n.startswith("dagc.")]
    assert not found, f"{_rel(path)} imports dagc inside a function: {found}"
