"""The package's architecture, read from its source: no import cycles, the server side free
of the client side and of PEFT, `radix/` and `kernels/` free of SGLang, and the scheme names
spelled in `lragent_sglang/scheme.py` only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lragent_sglang.scheme import LRBasis, Scheme

ROOT = Path(__file__).resolve().parent.parent
# Installed package name -> source folder (pyproject's package-dir mapping).
SOURCES = {"lragent_sglang": ROOT / "lragent_sglang", "lragent_sglang.radix": ROOT / "radix",
           "lragent_sglang.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path) -> set[str]:
    """Modules `name` imports anywhere in its body (lazy imports too), except under
    `if TYPE_CHECKING:`; relative imports resolved."""
    tree = ast.parse(path.read_text())
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports (external imports kept under their own names)."""
    mods = modules()
    return {name: {imp for imp in imports_of(name, path) if imp != name} for name, path in mods.items()}


def internal(graph: dict[str, set[str]], name: str) -> set[str]:
    return {m for m in graph[name] if m in graph}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among our modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(internal(graph, node)):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def closure(graph: dict[str, set[str]], roots: list[str]) -> dict[str, set[str]]:
    """Every module reachable from `roots` -> everything it imports (ours and external)."""
    seen: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen[node] = graph[node]
        todo.extend(internal(graph, node) - seen.keys())
    return seen


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "os"}, "b": set()}) is None


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_server_stays_free_of_the_client_side_and_peft(graph):
    server = [m for m in graph if _starts(m, ("lragent_sglang.server",))]
    forbidden = ("lragent_sglang.agents", "lragent_sglang.adapters.train", "lragent_sglang.adapters.make",
                 "lragent_sglang.adapters.cli", "lragent_sglang.eval", "peft")
    bad = {m: sorted(i for i in imps if _starts(i, forbidden)) for m, imps in closure(graph, server).items()}
    assert not {m: i for m, i in bad.items() if i}, "reachable from server/"


@pytest.mark.parametrize("package", ["lragent_sglang.radix", "lragent_sglang.kernels"])
def test_radix_and_kernels_do_not_import_sglang(graph, package):
    ours = [m for m in graph if _starts(m, (package,))]
    bad = {m: sorted(i for i in imps if _starts(i, ("sglang", "lragent_sglang")) and not _starts(i, (package,)))
           for m, imps in closure(graph, ours).items()}
    assert not {m: i for m, i in bad.items() if i}


def test_light_modules_import_no_peft_in_a_fresh_interpreter():
    """The scheduler's runtime and the adapter CLI's entry import neither PEFT nor the
    client side (seconds of import time and a dependency the server does not need)."""
    code = ("import sys, lragent_sglang.server.runtime, lragent_sglang.adapters.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'peft' or m.startswith('lragent_sglang.agents')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_scheme_names_are_spelled_in_one_module():
    """No code outside scheme.py uses a scheme or LR-basis name as a value (prose in
    docstrings and help texts may mention them)."""
    names = {*Scheme.choices(), *LRBasis.choices()}
    offenders = []
    for name, path in modules().items():
        if name == "lragent_sglang.scheme":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        offenders += [f"{name}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs]
    assert not offenders
