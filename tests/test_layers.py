"""agx's import layers, read from the source (every import, those inside functions included): no
cycle, and no arrow from a lower layer to a higher one. The table is the design; a new module
takes its place in it."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

AGX = Path(__file__).resolve().parent.parent / "agx"

# The floor: what every layer may import, and which imports nothing of agx.
FLOOR = {"errors", "compat"}
LAYER_OF = {  # a module's layer: the first key that its dotted name (without `agx.`) starts with
    "errors": "floor", "compat": "floor",
    "config": "config", "recipes": "config",
    "parallel": "parallel", "data": "data", "runtime": "runtime",
    "models": "models",
    "checkpoint": "checkpoint",
    "training": "training", "interop": "interop",
    "planning": "planning",
    "train": "entry", "plan": "entry", "export": "entry", "generate": "entry", "launch": "entry",
}
MAY_IMPORT = {  # layer -> the layers below it that it may import (and itself)
    "floor": set(),
    "config": {"floor"},
    "parallel": {"floor", "config"},
    "data": {"floor", "config"},
    "runtime": {"floor", "config"},
    "models": {"floor", "config", "parallel"},  # and of parallel only the layouts (MODEL_MAY_IMPORT)
    "checkpoint": {"floor", "config", "runtime"},  # runtime: processes agree on what to restore
    "training": {"floor", "config", "models", "parallel", "data", "checkpoint"},
    "interop": {"floor", "config", "models", "parallel", "data", "checkpoint"},
    "planning": {"floor", "config", "models", "parallel", "data", "runtime", "checkpoint", "training"},
    "entry": {"floor", "config", "models", "parallel", "data", "runtime", "checkpoint", "training", "interop",
              "planning"},
}
# Where arrays live is the model's business; how the layers are scheduled is not.
MODEL_MAY_IMPORT = {"agx.parallel.mesh", "agx.parallel.zero", "agx.parallel.batch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(AGX.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The agx modules `path` imports: `from agx.a import b` counts agx.a.b where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "agx"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "agx":
            assert not node.level, f"{path}: relative import"
            submodules = {f"{node.module}.{a.name}" for a in node.names}
            found |= {m for m in submodules if m in MODULES} or {node.module}
    return found


MODULES = {module_name(p) for p in AGX.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in AGX.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # agx itself
        return "entry"
    assert parts[1] in LAYER_OF, f"{module} has no layer: give it one in LAYER_OF"
    return LAYER_OF[parts[1]]


def test_every_import_goes_down_the_layers():
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in GRAPH.items() for b in targets
             if layer(b) != layer(a) and layer(b) not in MAY_IMPORT[layer(a)]]
    assert not wrong, "\n".join(wrong)


def test_models_import_only_the_layouts_of_parallel():
    wrong = [f"{a} imports {b}" for a, targets in GRAPH.items() if layer(a) == "models" for b in targets
             if layer(b) == "parallel" and b not in MODEL_MAY_IMPORT]
    assert not wrong, "\n".join(wrong)
    gpt = ast.parse((AGX / "models" / "gpt.py").read_text())
    from_parallel = [(n.module, a.name) for n in ast.walk(gpt) if isinstance(n, ast.ImportFrom)
                     and (n.module or "").startswith("agx.parallel") for a in n.names]
    assert from_parallel == [("agx.parallel.mesh", "Layout")]


def test_no_import_cycle():
    colour = defaultdict(int)  # 0 unseen, 1 on the path, 2 done

    def visit(module, path):
        colour[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if colour[target] == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if colour[target] == 0:
                visit(target, path + [target])
        colour[module] = 2

    for module in sorted(GRAPH):
        if colour[module] == 0:
            visit(module, [module])


def test_the_table_catches_an_upward_import(tmp_path):
    """The check itself fails where it should: a parallel module importing training."""
    bad = AGX / "parallel" / "mesh.py"
    source = tmp_path / "mesh.py"
    source.write_text(bad.read_text() + "\nfrom agx.training.step import loss_function\n")
    targets = imports_of(source)
    assert "agx.training.step" in targets and layer("agx.training.step") not in MAY_IMPORT[layer("agx.parallel.mesh")]
