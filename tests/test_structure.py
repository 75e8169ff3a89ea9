"""The package's shape: no import cycle among its modules, and nothing read from outside it."""

from __future__ import annotations

import ast
from pathlib import Path

import knapspec

PKG = Path(knapspec.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (module level or inside functions: a
    lazy import is a dependency too, and the cycle this test guards against ran through one)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("knapspec"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("knapspec"):
                continue
            if node.module:                                 # `from .x import y`: x (y may be x.y)
                out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)   # `from . import native`: a module
    return out


def test_no_import_cycle():
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    # every submodule needs the top package, which is initialised first: no edge to it
    graph = {m: {d for d in _imports(p, m) if d in files and d not in (m, "knapspec")} for m, p in files.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(d):], d]))
            if d not in state:
                dfs(d)
        path.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_nothing_reads_from_outside_the_repository():
    """The package and the tests never name a folder beside the checkout."""
    needle = ".." + "/shared"                      # spelt so that this file does not hold it
    for root in (PKG, Path(__file__).resolve().parent):
        for p in root.rglob("*.py"):
            assert needle not in p.read_text(), p
