"""The suite itself: no skip hides in CI, no test passes by returning early, no subprocess a test
starts can hang it."""
import ast
from pathlib import Path

import ci_skips

TESTS = Path(__file__).resolve().parent


def suite_files():
    return sorted(TESTS.glob("*.py"))


INNER = """
import pytest

@pytest.mark.skip(reason="a tool is missing")
def test_skipped():
    pass

def test_passes():
    pass
"""


def test_a_skip_fails_under_ci_unless_listed(pytester, monkeypatch):
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest("-p", "ci_skips", "-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=1)
    monkeypatch.setenv("CI", "true")
    failed = pytester.runpytest("-p", "ci_skips", "-p", "no:cacheprovider")
    failed.assert_outcomes(passed=1, errors=1)     # a skip mark acts at setup: an error, the run fails
    assert failed.ret != 0
    failed.stdout.fnmatch_lines(["*skipped under CI=true (a tool is missing)*CI_MAY_SKIP*"])
    monkeypatch.setitem(ci_skips.CI_MAY_SKIP, "test_inner.py::test_skipped", "listed, with its reason")
    pytester.runpytest("-p", "ci_skips", "-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=1)


def test_every_test_ci_may_skip_exists():
    for node_id in ci_skips.CI_MAY_SKIP:
        path, name = node_id.split("::")
        assert f"def {name}(" in (TESTS.parent / path).read_text(), node_id


def functions(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def own_nodes(function):
    """The nodes of `function`'s body, not those of functions or lambdas defined in it."""
    nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    stack = [node for node in function.body if not isinstance(node, nested)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, nested))


def test_no_test_passes_by_returning_early():
    early = [f"{path.name}::{test.name} line {node.lineno}" for path in suite_files()
             for test in functions(ast.parse(path.read_text())) if test.name.startswith("test_")
             for node in own_nodes(test) if isinstance(node, ast.Return)]
    assert early == [], "a test that returns early passes without checking: skip (with a reason) or fail"


def test_every_subprocess_a_test_starts_has_a_timeout():
    # subprocess.run and friends need timeout=; a started process's wait() and communicate() a limit.
    unbounded = []
    for path in suite_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            has_limit = any(k.arg == "timeout" for k in node.keywords)
            runs = (isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                    and node.func.attr in ("run", "call", "check_call", "check_output"))
            waits = node.func.attr in ("wait", "communicate") and not node.args
            if (runs or waits) and not has_limit:
                unbounded.append(f"{path.name} line {node.lineno}: {ast.unparse(node)[:80]}")
    assert unbounded == []
