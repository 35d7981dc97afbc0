"""A class body that defines the same method twice keeps only the last one, silently (an actor's
`heartbeat` once replaced the group-membership `heartbeat` this way). Catch it for the whole package."""
from __future__ import annotations

import ast
import pathlib

import ray_broker

PACKAGE = pathlib.Path(ray_broker.__file__).parent


def _redefined(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        seen: dict[str, int] = {}
        for item in node.body:
            if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            # property setters/deleters and typing overloads legitimately reuse the name
            decorators = {ast.unparse(d) for d in item.decorator_list}
            if any(d.endswith((".setter", ".deleter")) or d in ("overload", "typing.overload") for d in decorators):
                continue
            if item.name in seen:
                out.append(f"{node.name}.{item.name} (lines {seen[item.name]} and {item.lineno})")
            seen[item.name] = item.lineno
    return out


def test_no_class_in_the_package_defines_a_method_twice():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += [f"{path.relative_to(PACKAGE)}: {p}" for p in _redefined(ast.parse(path.read_text()))]
    assert not problems, problems


def test_the_check_sees_a_redefinition():
    src = "class A:\n    def f(self): pass\n    async def f(self, x): pass\n"
    assert _redefined(ast.parse(src)) == ["A.f (lines 2 and 3)"]
