"""The modules of mps form layers that import only downward: no import
cycle (at any level: module top, functions, TYPE_CHECKING blocks), and no
private name imported from another module (STYLE 16, 17)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "mps"
#: The compiled modules setup.py builds (no .py file to find them by).
EXTENSIONS = {"mps._mpscore", "mps._accept", "mps.http._speedups"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "mps" or target.startswith("mps."):
                names = []
                for alias in node.names:     # `from . import status` names a module
                    sub = f"{target}.{alias.name}"
                    if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
                            (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists() \
                            or sub in EXTENSIONS:
                        out.append((sub, []))
                    else:
                        names.append(alias.name)
                if names:
                    out.append((target, names))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("mps.")]
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, _ in imports(path):
            if target in modules and target != mod and target != "mps":
                edges[mod].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_module_imports_the_package_facade() -> None:
    # mps/__init__ re-exports the public API; a module importing it would sit
    # both below and above it.
    offenders = [module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                 and any(target == "mps" for target, _ in imports(p))]
    assert offenders == []


def test_modules_import_only_downward() -> None:
    cycle = find_cycle(graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [(module_name(p), target, name) for p in PACKAGE.rglob("*.py")
               for target, names in imports(p) for name in names
               if name.startswith("_") and not name.startswith("__")
               and target not in EXTENSIONS]    # e.g. the cffi extension's ffi/lib pair
    assert private == []
