"""The layers import one way only (cost_model <- kernels <- passes <- compiler) and no modules form
an import cycle, read from the source with `ast` (every import statement, those inside functions
included: a deferred import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# directory -> (package, layer): a module may import its own layer and those below it
LAYERS = {"cost_model": ("attnfx.cost_model", 0), "kernels": ("attnfx.kernels", 1), "passes": ("attnfx.passes", 2),
          "compiler": ("attnfx", 3)}


def _modules() -> dict[str, Path]:
    """Every module of the four layers by its import name ("attnfx.kernels.fused")."""
    found = {}
    for folder, (package, _) in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    """The layer of an attnfx module: the longest package it lies in."""
    package, layer = max((p for p in LAYERS.values() if module == p[0] or module.startswith(p[0] + ".")),
                         key=lambda p: len(p[0]))
    return layer


def _imports(module: str, path: Path) -> set[str]:
    """The attnfx modules `module` imports (a name imported from a package counts as its module
    when there is one, else as the package)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name == "attnfx" or name.startswith("attnfx.")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_layer_has_modules():
    assert {_layer(m) for m in MODULES} == {0, 1, 2, 3}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_it(module):
    above = sorted(name for name in GRAPH[module] if _layer(name) > _layer(module))
    assert above == [], f"{module} (layer {_layer(module)}) imports {above}"


def test_no_import_cycle():
    """Depth-first search over module imports (package __init__ re-exports included)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checker itself: a kernels module importing attnfx.passes is reported, and two modules
    importing each other form a cycle."""
    bad = tmp_path / "bad.py"
    bad.write_text("from attnfx.passes.site import Site\nfrom ..cost_model import spec\n")
    imports = _imports("attnfx.kernels.bad", bad)
    assert imports == {"attnfx.passes.site", "attnfx.cost_model.spec"}
    assert [name for name in imports if _layer(name) > _layer("attnfx.kernels.bad")] == ["attnfx.passes.site"]
    monkeypatch.setitem(GRAPH, "attnfx.kernels.a_loop", {"attnfx.kernels.b_loop"})
    monkeypatch.setitem(GRAPH, "attnfx.kernels.b_loop", {"attnfx.kernels.a_loop"})
    with pytest.raises(AssertionError, match="import cycle: attnfx.kernels.a_loop -> attnfx.kernels.b_loop -> "
                                             "attnfx.kernels.a_loop"):
        test_no_import_cycle()
