"""The package's import graph: no circle, and every import points down the layers of docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gem3d"

# lowest first; a module may import its own layer or the ones below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("gem3d", "gem3d.files", "gem3d.config", "gem3d.configs", "gem3d.checkpoint", "gem3d.ema",
              "gem3d.optim")),
    ("data and models", ("gem3d.data", "gem3d.models")),
    ("sampling and training", ("gem3d.sampling", "gem3d.denoiser", "gem3d.training")),
    ("model folders and conversion", ("gem3d.model_dirs", "gem3d.convert")),
    ("inference, export, segmentation and metrics",
     ("gem3d.inference", "gem3d.export", "gem3d.segmentation", "gem3d.metrics")),
    ("experiments and the demo", ("gem3d.downstream", "gem3d.demo")),
]
# pairs in the same or a lower layer that must still not know each other
FORBIDDEN = [("gem3d.inference", "gem3d.convert"), ("gem3d.convert", "gem3d.inference"),
             ("gem3d.data", "gem3d.export"), ("gem3d.models", "gem3d.convert")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def owner(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes if p != "gem3d") or module in prefixes


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if owner(module, prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md")


def imports_of(module: str) -> set[str]:
    """The gem3d modules ``module`` imports anywhere in its file (``from gem3d.a import b`` -> ``gem3d.a.b`` when
    that is a module, else ``gem3d.a``; relative imports resolved)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = [(dep, LAYERS[layer_of(dep)][0]) for dep in GRAPH[module] if layer_of(dep) > layer_of(module)]
    assert not up, f"{module} ({LAYERS[layer_of(module)][0]}) imports from a higher layer: {up}"
    for importer, imported in FORBIDDEN:
        if owner(module, (importer,)):
            bad = [dep for dep in GRAPH[module] if owner(dep, (imported,))]
            assert not bad, f"{module} must not import {imported}: {bad}"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                circle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError(f"import circle: {' -> '.join(circle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_circles_and_upward_imports(monkeypatch):
    monkeypatch.setitem(GRAPH, "gem3d.files", {"gem3d.inference.engine"})
    with pytest.raises(AssertionError, match="higher layer"):
        test_imports_point_down("gem3d.files")
    monkeypatch.setitem(GRAPH, "gem3d.inference.engine", GRAPH["gem3d.inference.engine"] | {"gem3d.files"})
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()
