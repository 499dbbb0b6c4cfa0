"""The package's shape (issue 21): no import circle in ``dlsm/``, short modules and functions, and configs saved
before the layout change still parse. The import graph is read with ``ast`` (no import runs), so a new circle
fails here even where Python would tolerate it at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dlsm"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_REASON = "long because"  # a longer function says why in its docstring


def module_name(path: Path, package_root: Path) -> str:
    parts = path.relative_to(package_root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of the code (an import inside a function is still a
    dependency). Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``, so those count too, except the
    importer's own packages (Python has already started them)."""
    files = {module_name(p, package_root): p for p in package_root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        own = {*_ancestors(name), name}
        deps: set[str] = set()
        for t in targets:
            for m in (*_ancestors(t), t):
                if m in files and m not in own:
                    deps.add(m)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package():
    graph = import_graph(PACKAGE)
    assert "dlsm.experiment" in graph and "dlsm.stages.base" in graph["dlsm.stages.score"]
    assert cycles(graph) == []


def test_the_graph_check_finds_circles(tmp_path):
    """The checker itself on a planted package: a direct circle, one through a package ``__init__``, one through a
    function-level import; and a sibling import inside a package is not a circle."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from p import b\n")
    (pkg / "b.py").write_text("def f():\n    from p.a import x\n")
    (pkg / "sub" / "__init__.py").write_text("from p.sub.leaf import y\n")
    (pkg / "sub" / "leaf.py").write_text("from p.sub import other\n")
    (pkg / "sub" / "other.py").write_text("")
    (pkg / "c.py").write_text("from p.sub.other import z\n")
    (pkg / "sub" / "back.py").write_text("import p.c\n")
    assert cycles(import_graph(pkg)) == [["p.a", "p.b"]]
    (pkg / "sub" / "other.py").write_text("from ..c import q\n")  # p.sub.other -> p.c -> p.sub (its __init__) -> ...
    assert ["p.c", "p.sub", "p.sub.leaf", "p.sub.other"] in cycles(import_graph(pkg))


def _python_files():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_short(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {n} lines; split it (limit {MAX_MODULE_LINES})"


def long_functions(path: Path) -> list[str]:
    """Functions over the limit whose docstring does not say why they are long."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or "").lower():
                out.append(f"{node.name} ({n} lines, line {node.lineno})")
    return out


def test_functions_are_short_or_say_why():
    found = {str(p.relative_to(ROOT)): f for p in _python_files() if (f := long_functions(p))}
    assert found == {}


def test_the_length_check_counts_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    '''Long because: a reason.'''\n{body}\n")
    assert long_functions(tmp_path / "m.py") == [f"f ({MAX_FUNCTION_LINES + 1} lines, line 1)"]


@pytest.mark.parametrize("saved", sorted((ROOT / "tests" / "data").glob("operative_config_*.gin")),
                         ids=lambda p: p.name)
def test_configs_saved_before_the_layout_change_still_parse(saved):
    """Operative configs logged by runs of main at ba2b850 (before the subpackages) parse with every check on."""
    import gin

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config

    parse_config([str(saved)], [])
    assert gin.query_parameter("experiment.score_loss").selector == "dsm_loss"
    assert gin.query_parameter("experiment.stages")  # the stage list survived: every stage's name resolved
    gin.clear_config()
