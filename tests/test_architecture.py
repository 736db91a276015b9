"""The product's layering, read from the source with `ast` (nothing is imported):

- `shared/` imports nothing above it (no edge, cloud or kgpu);
- `edge/` and `cloud/` never import each other, nor `kgpu/`;
- no import circle among the product's modules: every import counts, at module level, inside a
  function (a "late" import only hides a circle) or under `if TYPE_CHECKING:` (a circle of types is
  still a circle);
- no product module over 600 lines (Alembic revisions aside);
- nothing in edge/, cloud/ or shared/ imports the harness (`kgpu.lab`, `tests`) or a mock or test
  library (`kmock`, `pytest`, `hypothesis`): a production install needs none of them.

`import a.b.c` depends on the module `a.b.c` (not on the packages `a` and `a.b` that Python
runs first: a package's `__init__` that re-exports its modules would otherwise be in a circle
with each of them); `from a.b import c` depends on `a.b.c` when that is a module, else on `a.b`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "edge", "cloud", "kgpu")
MAX_LINES = 600
FORBIDDEN_IN_CORE = ("kgpu.lab", "tests", "kmock", "pytest", "hypothesis")
ALLOWED_ABOVE = {  # what each package may import of the product
    "shared": {"shared"},
    "edge": {"shared", "edge"},
    "cloud": {"shared", "cloud"},
    "kgpu": {"shared", "edge", "cloud", "kgpu"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the product module imported, or the external name (e.g. "kmock.emulator")
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _is_revision(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return any(a in ("migrations", "alembic") and b == "versions" for a, b in zip(parts, parts[1:]))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def product_files() -> dict[str, Path]:
    """Module name -> file, for every .py under the product packages."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[_module_name(path)] = path
    return files


def _resolve(name: str, modules: Iterable[str]) -> str:
    """The longest product module `name` is, or lies in; `name` itself when it is external."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return name


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every import in the file, wherever it stands (module level, function, TYPE_CHECKING)."""
    modules = product_files()
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, _resolve(alias.name, modules), path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                submodule = f"{stem}.{alias.name}"
                target = submodule if submodule in modules else stem
                yield Import(module, _resolve(target, modules), path, node.lineno)


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(imp for module, path in product_files().items() for imp in imports_of(module, path))


def _top(name: str) -> str:
    return name.split(".")[0]


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _listing(found: Iterable[Import]) -> str:
    return "\n".join(f"  {imp.where}: {imp.source} imports {imp.target}" for imp in found)


# ---- the layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_is_below_it(package: str) -> None:
    modules = product_files()
    upward = [imp for imp in all_imports()
              if _top(imp.source) == package and imp.target in modules and _top(imp.target) not in ALLOWED_ABOVE[package]]
    allowed = ", ".join(sorted(ALLOWED_ABOVE[package]))
    assert not upward, f"{package}/ may import only {allowed}; found:\n{_listing(upward)}"


@pytest.mark.parametrize("package", ["shared", "edge", "cloud"])
def test_no_harness_mock_or_test_library_in_the_product(package: str) -> None:
    found = [imp for imp in all_imports()
             if _top(imp.source) == package and any(_in(imp.target, bad) for bad in FORBIDDEN_IN_CORE)]
    assert not found, (f"{package}/ is installed without the harness and test libraries "
                       f"({', '.join(FORBIDDEN_IN_CORE)}); found:\n{_listing(found)}")


# ---- no circles -------------------------------------------------------------------------------


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: every group of two or more modules that reach each other
    (and every module that imports itself), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in graph.get(node, ()):
                    groups.append(sorted(group))
    return sorted(groups)


def _one_circle(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete circle through the group's first member (breadth-first: a shortest one)."""
    members, start = set(group), group[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, set()) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


def import_graph() -> dict[str, set[str]]:
    modules = product_files()
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for imp in all_imports():
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package: str) -> None:
    graph = import_graph()
    circles = [group for group in strongly_connected(graph) if any(_top(m) == package for m in group)]
    lines = {(imp.source, imp.target): imp.where for imp in reversed(all_imports())}
    report = []
    for group in circles:
        circle = _one_circle(group, graph)
        steps = "\n".join(f"      {a} -> {b}  ({lines[(a, b)]})" for a, b in zip(circle, circle[1:]))
        report.append(f"  {len(group)} modules reach each other: {', '.join(group)}\n    for example:\n{steps}")
    assert not circles, (f"import circles involving {package}/ (function-local and TYPE_CHECKING "
                         f"imports count):\n" + "\n".join(report))


# ---- size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_600_lines(package: str) -> None:
    too_long = sorted(
        (len(path.read_text(encoding="utf-8").splitlines()), str(path.relative_to(ROOT)))
        for module, path in product_files().items()
        if _top(module) == package and not _is_revision(path)
    )
    too_long = [(n, name) for n, name in too_long if n > MAX_LINES]
    assert not too_long, (f"split these {package}/ modules by concern (at most {MAX_LINES} lines each):\n"
                          + "\n".join(f"  {name}: {n} lines" for n, name in reversed(too_long)))


# ---- the checker itself -----------------------------------------------------------------------


def test_the_walk_sees_every_kind_of_import() -> None:
    """Guards against a checker that passes because it finds nothing."""
    assert {"shared.protocol", "edge.daemon", "cloud.ingest", "kgpu.cli"} <= set(product_files())
    found = {(imp.source, imp.target) for imp in all_imports()}
    assert ("edge.daemon", "edge.store") in found  # from edge.store import EdgeStore
    assert ("edge.daemon", "edge.health") in found  # from edge import health as health_rules
    assert ("shared.protocol", "shared.topics") in found
    assert ("edge.sync", "edge.daemon") in found  # under `if TYPE_CHECKING:`
    assert any(imp.source == "kgpu.cli" and imp.target == "typer" for imp in all_imports())  # external
    assert _is_revision(ROOT / "cloud" / "store" / "alembic" / "versions" / "0001_initial.py")
    assert _is_revision(ROOT / "cloud" / "migrations" / "versions" / "0001_initial.py")
    assert not _is_revision(ROOT / "cloud" / "store" / "alembic" / "env.py")


def test_circles_are_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"]]
    assert _one_circle(["a", "b", "c"], graph) == ["a", "b", "c", "a"]
    assert strongly_connected({"x": {"y"}, "y": set()}) == []
