"""The package's own imports: no circle among the modules of selpo/ and kernels/ (the latter imported as
selpo.kernels), and the test helpers of selpo.testing used by no module of the package.

Every import statement counts, at the top of a module or inside a function (a function's import runs at its
first call, where a circle fails as surely), except those under ``if TYPE_CHECKING:``, which never run.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"selpo": REPO / "selpo", "selpo.kernels": REPO / "kernels"}


def package_modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under each root (a package's ``__init__.py`` is the
    package itself)."""
    found = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """The Import and ImportFrom nodes of a module, anywhere but under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = node.orelse if isinstance(node, ast.If) and _is_type_checking(node) else ast.iter_child_nodes(node)
        stack.extend(children)


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules among ``modules`` it names in an import: ``import X`` and ``from X import name``
    name X, and X.name too when that is a module. Relative imports are resolved from the importing module's
    package; the packages above it are left out (they are being imported already), and so are the packages
    above a named module, which Python runs first but which a submodule may import back into."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets - _ancestors(name) if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None when there is none (depth-first search)."""
    done, path = set(), []
    on_path = set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no circle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_a_planted_circle_through_a_function_level_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(package_modules({"pkg": pkg}))
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.c"] == set()  # TYPE_CHECKING: never runs
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_the_package_has_no_import_circle():
    modules = package_modules(ROOTS)
    assert {"selpo.cli", "selpo.kernels.streaming.fused_loss", "selpo.methods.sepo"} <= set(modules)
    graph = import_graph(modules)
    assert {"selpo.kernels", "selpo.kernels.linear_logprobs"} <= graph["selpo.logprobs"]
    assert "selpo.stages.pipeline" in graph["selpo.stages"] and "selpo" not in graph["selpo.stages.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_of_the_package_imports_the_test_helpers():
    graph = import_graph(package_modules(ROOTS))
    users = sorted(name for name, targets in graph.items() if "selpo.testing" in targets)
    assert users == [], f"selpo.testing is for tests only, but {users} import it"


def test_stages_read_each_other_only_through_the_run_folder():
    """A stage imports no other stage: what an earlier one wrote is read through selpo.context; the pipeline's
    bookkeeping (selpo.stages.pipeline) is shared."""
    graph = import_graph(package_modules(ROOTS))
    stage_modules = {name for name in graph if name.startswith("selpo.stages.")} - {"selpo.stages.pipeline"}
    crossing = {name: sorted(graph[name] & stage_modules) for name in stage_modules if graph[name] & stage_modules}
    assert crossing == {}, f"stages importing other stages: {crossing}"
