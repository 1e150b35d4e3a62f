"""The quick tier (``python -m pytest -q -n auto -m "not slow"``) keeps a test from every test module.

A test module whose tests are all marked ``slow`` would drop out of the quick loop unnoticed; this
reads each ``tests/test_*.py`` (its syntax tree, nothing is run) and fails naming the modules
without a quick test. A test counts as quick when neither it nor its module is marked
``pytest.mark.slow`` as a whole (a parametrized test with some slow cases still has quick ones).
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow`` (or ``mark.slow``) used as a whole mark, not inside a parameter list."""
    return isinstance(node, ast.Attribute) and node.attr == "slow" and (
        (isinstance(node.value, ast.Attribute) and node.value.attr == "mark")
        or (isinstance(node.value, ast.Name) and node.value.id == "mark"))


def _module_is_slow(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            if any(_is_slow_mark(m) for m in marks):
                return True
    return False


def quick_tests(path: Path) -> list[str]:
    """The names of the test functions in ``path`` that the quick tier runs."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if _module_is_slow(tree):
        return []
    functions = [node for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")]
    return [f.name for f in functions if not any(_is_slow_mark(d) for d in f.decorator_list)]


def test_every_test_module_has_a_quick_test():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 30
    without = [p.name for p in modules if not quick_tests(p)]
    assert not without, f"test modules with no quick test (all marked slow): {without}"


def test_the_check_sees_slow_marks(tmp_path):
    slow = tmp_path / "test_slow.py"
    slow.write_text("import pytest\n\n@pytest.mark.slow\ndef test_a():\n    pass\n")
    module = tmp_path / "test_module.py"
    module.write_text("import pytest\npytestmark = [pytest.mark.slow]\n\ndef test_a():\n    pass\n")
    mixed = tmp_path / "test_mixed.py"
    mixed.write_text("import pytest\n\n@pytest.mark.parametrize('n', [1, pytest.param(2, marks=pytest.mark.slow)])\n"
                     "def test_a(n):\n    pass\n\n@pytest.mark.slow\ndef test_b():\n    pass\n")
    assert quick_tests(slow) == [] and quick_tests(module) == [] and quick_tests(mixed) == ["test_a"]
