"""The layout's rules, read from the code with `ast` (docs/architecture.md, "The library, floor by floor").

Every import counts, a function-level one too: an import written inside a function to dodge a cycle is still an
arrow a reader has to follow.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders that install as the `secateurs` package (pyproject.toml's package-dir).
PACKAGE_DIRS = {"secateurs": "secateurs", "secateurs.components": "components", "secateurs.pipelines": "pipelines"}
# The bottom floor: the step registry and the config built from it. They import nothing of secateurs but each other.
FLOOR = {"secateurs.registry", "secateurs.placement", "secateurs.config"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed package."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the module `name` imports anywhere in its body (top level or in a function)."""

    def owner(dotted: str) -> str | None:
        # `import secateurs.tracking.runs` and `from secateurs.data import x` both name a module or its attribute.
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(owner(f"{base}.{alias.name}"))
    found.discard(None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` reaches, each with one import path that gets there (breadth first: the shortest)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for nxt in sorted(graph[current]):
            if nxt not in paths:
                paths[nxt] = paths[current] + [nxt]
                queue.append(nxt)
    return paths


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 1 for a module that imports none of the package, else one above the highest it imports.

    Defined only for a graph without a circle (the test below holds the package to that)."""
    floor: dict[str, int] = {}

    def of(name: str) -> int:
        if name not in floor:
            floor[name] = 1 + max((of(low) for low in graph[name]), default=0)
        return floor[name]

    for name in graph:
        of(name)
    return floor


def test_the_graph_reads_the_package():
    graph = import_graph()
    # The reader finds the modules and their arrows, top level and function level alike.
    assert {"secateurs.config", "secateurs.registry", "secateurs.components.steps", "secateurs.pipelines.recipe"} <= set(graph)
    assert "secateurs.config" in graph["secateurs.prune"]
    assert "secateurs.tracking.backend" in graph["secateurs.tracking.runs"]  # a relative import
    assert "secateurs.manifest" in graph["secateurs.components.prologue"]  # imported inside `step`


def test_a_function_level_import_is_an_arrow(tmp_path):
    # The oracle for the reader: a module whose only import of a sibling sits inside a function.
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n    from .c import g\n")
    modules = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py", "pkg.c": tmp_path / "c.py"}
    assert imported_modules("pkg.a", tmp_path / "a.py", modules) == {"pkg.b", "pkg.c"}


def test_a_floor_is_one_above_the_highest_import():
    # a -> b -> c and a -> c: c is on the ground, b above it, a above b (not above c alone).
    assert floors({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": set()}) == {"a": 3, "b": 2, "c": 1, "d": 1}


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    circles = []
    for name in sorted(graph):
        for imported in sorted(graph[name]):
            back = reachable(graph, imported)
            if name in back:
                circles.append(" -> ".join([name, *back[name]]))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_floor_imports_nothing_above_it():
    graph = import_graph()
    upward = {f"{low} -> {high}" for low in FLOOR for high in graph[low] if high not in FLOOR}
    assert not upward, f"the config and the step registry import modules above them: {sorted(upward)}"


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_every_module_imports(name):
    # An import the graph does not show (a name that moved, a typo in a lazy path) fails at import time here.
    if name == "secateurs.__main__":
        pytest.skip("runs the CLI when imported")
    importlib.import_module(name)


def test_every_package_is_in_the_wheel():
    # setuptools installs only the packages pyproject.toml lists: a new package folder left out of the list works in
    # an editable install and is missing from the image's wheel.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in package_modules().items() if path.name == "__init__.py"}
    assert found == listed, f"packages on disk but not in pyproject.toml: {sorted(found - listed)}; listed but gone: {sorted(listed - found)}"


if __name__ == "__main__":
    # `python tests/test_layout.py` prints the floors, bottom up: the table of docs/architecture.md.
    by_floor: dict[int, list[str]] = {}
    for module, level in floors(import_graph()).items():
        by_floor.setdefault(level, []).append(module.removeprefix("secateurs."))
    for level in sorted(by_floor):
        print(level, ", ".join(sorted(by_floor[level])))
