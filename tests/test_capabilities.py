"""Targets, backends and precisions are declared records (issue 22): resolution loops over them
instead of comparing names, the precision names are spelled in one table, and no function grows
past 80 lines. The counts here are read from the source (AST), so they fail when a name test
comes back."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import dagc
from dagc.manifest import MODEL_FORMATS
from dagc.precision_table import TABLE
from dagc.precisions import CHECKS
from dagc.runtime.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dagc": "dagc", "dagc.trainer": "trainer", "dagc.compiler": "compiler", "dagc.runtime": "runtime",
            "dagc.tools": "tools"}
COUNTED = ("compiler", "runtime", "tools")  # where choosing by name is what the records replace
MAX_NAME_TESTS = 5
MAX_FUNCTION_LINES = 80


def _names() -> frozenset[str]:
    """Every target, model format, backend and precision name (and precision check name)."""
    from dagc.compiler.targets import REGISTRY

    targets = {n for t in REGISTRY.values() for n in (t.name, t.emits)}
    return frozenset({*targets, *MODEL_FORMATS, *BACKENDS, *TABLE, *CHECKS})


def _modules():
    """Every module of the packages that imports here (tools/triton_model.py runs inside Triton only)."""
    names = [m.name for m in pkgutil.iter_modules(dagc.__path__, "dagc.") if not m.ispkg and m.name != "dagc.__main__"]
    for package in PACKAGES:
        if package != "dagc":
            names += [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")]
    for name in names:
        try:
            yield importlib.import_module(name)
        except ImportError:
            continue


def _aliases(names: frozenset[str]) -> frozenset[str]:
    """Module-level identifiers anywhere in the packages bound to a name (``REFERENCE``, ``INT8``,
    ``AUTO``): a comparison with one of them is a name test too."""
    return frozenset(k for m in _modules() for k, v in vars(m).items() if isinstance(v, str) and v in names)


def _is_name(node: ast.AST, names: frozenset[str], aliases: frozenset[str]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in names
    if isinstance(node, ast.Name):
        return node.id in aliases
    if isinstance(node, ast.Attribute):
        return node.attr in aliases
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_name(e, names, aliases) for e in node.elts)
    return False


def name_tests(tree: ast.AST, names: frozenset[str], aliases: frozenset[str]) -> list[int]:
    """Lines of the ``==`` / ``!=`` / ``in`` / ``not in`` / ``is`` comparisons with a target,
    backend or precision name (a literal, an alias of one, or a collection holding one) and of the
    ``match`` cases on one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(_is_name(x, names, aliases) for x in (node.left, *node.comparators)):
                found.append(node.lineno)
        elif isinstance(node, ast.match_case):
            if any(isinstance(p, ast.MatchValue) and _is_name(p.value, names, aliases) for p in ast.walk(node.pattern)):
                found.append(node.pattern.lineno)
    return found


def _sources(folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_counter_sees_literals_aliases_collections_and_match_cases():
    names, aliases = frozenset({"int8", "onnx"}), frozenset({"INT8"})
    code = ("a == 'int8'\nb != INT8\nc in ('x', 'onnx')\nd.format == m.INT8\ne == 'other'\nf in NAMES\n"
            "match g:\n    case 'onnx':\n        pass\n    case _:\n        pass\n")
    assert name_tests(ast.parse(code), names, aliases) == [1, 2, 3, 4, 8]


def test_few_name_tests_in_the_compiler_runtime_and_tools():
    names = _names()
    aliases = _aliases(names)
    assert {"REFERENCE", "AUTO"} <= aliases  # the counter resolves the constants that spell names
    hits = [f"{p.relative_to(ROOT)}:{line}" for p in _sources(COUNTED)
            for line in name_tests(ast.parse(p.read_text()), names, aliases)]
    assert len(hits) <= MAX_NAME_TESTS, f"{len(hits)} name tests (at most {MAX_NAME_TESTS}): {hits}"


def test_precision_names_are_spelled_in_one_table():
    table = ROOT / "dagc" / "precision_table.py"
    spelled = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in _sources(PACKAGES.values()) if p != table
               for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Constant) and n.value in TABLE]
    assert spelled == []


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines from its ``def`` to its end, its docstring not counted."""
    doc = fn.body[0]
    skip = (doc.end_lineno - doc.lineno + 1 if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str) else 0)
    return fn.end_lineno - fn.lineno + 1 - skip


def test_no_function_over_80_lines():
    long = [f"{p.relative_to(ROOT)}:{n.name} ({code_lines(n)})" for p in _sources(PACKAGES.values())
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(n) > MAX_FUNCTION_LINES]
    assert long == []
