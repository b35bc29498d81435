"""The import rule of docs/architecture.md: floors from toolkit.core up to cli.py, nothing imports a higher floor,
graphs/ and calibration/ use only toolkit.core, toolkit.model and toolkit.backends, no import circles, and no
module imports another's private names. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolkit", "graphs", "calibration", "cli")
# (module prefix, floor), most specific first; calibration may use graphs (both floor 3), never the reverse
FLOORS = (
    ("toolkit.core", 0), ("toolkit.model", 1), ("toolkit.backends", 2), ("graphs", 3), ("calibration", 3.5),
    ("toolkit.evaluate", 4), ("toolkit.report", 5), ("toolkit.example", 6), ("toolkit.commands", 7), ("cli", 8),
    ("toolkit", 0),  # toolkit/__init__.py: the version only
)  # fmt: skip


def floor(module: str) -> float:
    return next(level for prefix, level in FLOORS if module == prefix or module.startswith(prefix + "."))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    files = [ROOT / "cli.py"] + [p for pkg in PACKAGES[:-1] for p in (ROOT / pkg).rglob("*.py")]
    return {module_name(p): p for p in files}


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported product module, names taken from it) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            # `from toolkit.core import fileio` imports the module toolkit.core.fileio
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in modules else (node.module, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
    return found


MODULES = product_modules()
GRAPH = {name: imports(path, MODULES) for name, path in MODULES.items()}


def test_the_floors_cover_every_product_module():
    assert all(floor(name) is not None for name in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_floor(module):
    upward = [target for target, _ in GRAPH[module] if floor(target) > floor(module)]
    assert not upward, f"{module} (floor {floor(module)}) imports {upward}"


def test_graphs_and_calibration_use_only_core_model_and_backends():
    allowed = ("toolkit.core", "toolkit.model", "toolkit.backends", "graphs", "calibration")
    wrong = {
        module: [t for t, _ in GRAPH[module] if t.startswith("toolkit.") and not t.startswith(allowed)]
        for module in MODULES
        if module.split(".")[0] in ("graphs", "calibration")
    }
    assert not any(wrong.values()), {m: t for m, t in wrong.items() if t}


def test_no_private_name_is_imported_across_modules():
    private = [(module, target, name) for module in MODULES for target, names in GRAPH[module]
               for name in names if name.startswith("_") and name != "__version__"]  # fmt: skip
    assert not private


def test_there_are_no_import_circles():
    edges = {m: {t for t, _ in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ is imported on the way to its modules: count an edge to it only when named
    circles = []
    for start in MODULES:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    circles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not circles, circles[0]
