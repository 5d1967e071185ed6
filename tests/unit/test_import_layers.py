"""The import rules of src/dirtune: no cycle, and no import from a lower layer to a higher one.

Every `import` / `from ... import` in every module counts, at module level or inside a function
(a lazy import is still a dependency), except those under `if TYPE_CHECKING:`.

Layers, low to high (a package may import its own modules and those of the layers it lists):

    method        pure torch: the penalty, BalancedAdamW, the fused kernels     -> nothing
    data          records, templates, tokenisation, splits (beside method)       -> nothing
    models        loading, conversion, LoRA, DirectionPenalty's discovery       -> method, data
                  (data: a chat prompt is rendered exactly as training renders it)
    train         config, the trainer, callbacks, the run folder, checkpoints   -> models, method, data
    integrations  the method inside other people's trainers (above train)       -> train and below
    bench         grids of runs, metrics, reports                               -> train and below
    cli           argparse, one function per subcommand                         -> everything but integrations

Top-level modules sit in the layer of what they need: `dirtune/__init__.py` (the public API:
method and models), `errors.py` and `eval.py` with train, `demo.py` with bench (it uses the
bench's steps-to-target). bench and integrations are siblings: neither imports the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "dirtune"

LAYER_OF_MODULE = {  # top-level modules: the layer they belong to
    "dirtune": "api",
    "dirtune.errors": "train",
    "dirtune.eval": "train",
    "dirtune.demo": "bench",
    "dirtune.cli": "cli",
}
MAY_IMPORT = {
    "method": {"method"},
    "data": {"data"},
    "models": {"models", "method", "data"},
    "api": {"api", "method", "models"},
    "train": {"train", "models", "method", "data"},
    "integrations": {"integrations", "train", "models", "method", "data"},
    "bench": {"bench", "train", "models", "method", "data"},
    "cli": {"cli", "bench", "train", "models", "method", "data"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> str:
    if module in LAYER_OF_MODULE:
        return LAYER_OF_MODULE[module]
    return module.split(".")[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _resolve(name: str) -> str:
    """The module `name` refers to: itself if it is one, else its package (a name imported from it)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """The dirtune modules `module` imports, anywhere in its body."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name in base
        else:
            continue
        for name in names:
            if name == "dirtune" or name.startswith("dirtune."):
                target = _resolve(name)
                if target != module:
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_walk_sees_lazy_imports():
    # a function-level import in runner-free territory: eval imports the LoRA loader at the top,
    # the cli imports everything inside its functions
    assert "dirtune.train.config" in GRAPH["dirtune.cli"]
    assert all(m in MODULES for deps in GRAPH.values() for m in deps)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_lower_layer_to_a_higher_one(module):
    layer = _layer(module)
    bad = sorted(t for t in GRAPH[module] if _layer(t) not in MAY_IMPORT[layer])
    assert not bad, f"{module} ({layer}) imports {bad}; {layer} may import {sorted(MAY_IMPORT[layer])}"


def test_no_import_cycle():
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
