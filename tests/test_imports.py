"""Imports point down: every module of cbdm_fast (with kernels/ and bench/ under their installed names
cbdm_fast.kernels and cbdm_fast.bench) is parsed with ast, and the test fails on an import of a layer
above the importer's or on an import cycle. Imports inside functions (lazy ones) and
importlib.import_module("cbdm_fast....") count as much as those at the top of a file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where the installed package's modules live in the repository (setup.py's package_dir).
SOURCES = {"cbdm_fast": ROOT / "cbdm_fast", "cbdm_fast.kernels": ROOT / "kernels", "cbdm_fast.bench": ROOT / "bench"}

# The layer map, bottom first (ARCHITECTURE.md "Layers"). A module may import its own layer and the layers
# below it. Each entry is a module or a package (all its submodules).
#   The package root cbdm_fast/__init__.py imports nothing when it loads (its public names are looked up
#   lazily), so any module may read __version__ from it: it sits at the bottom.
#   Programs: what every program stands on (processes, files, data sets, interrupt handling), then the
#   jobs: a sampling job; evaluation, which can run one (evaluate --ckpt); training, whose evaluation
#   during training (training/evaluator.py) scores samples with evaluation's metrics. Nothing imports a
#   CLI (a library never calls a CLI's main), and nothing in the package imports bench.
LAYERS = (
    ("package root", ("cbdm_fast",)),
    ("kernels", ("cbdm_fast.kernels", "cbdm_fast._C")),  # Triton kernels; _C: the C++/CUDA extension
    ("ops", ("cbdm_fast.ops",)),
    ("nn", ("cbdm_fast.nn",)),
    ("model and diffusion", ("cbdm_fast.model", "cbdm_fast.schedule", "cbdm_fast.losses", "cbdm_fast.samplers")),
    ("program foundations", ("cbdm_fast.dist", "cbdm_fast.files", "cbdm_fast.data", "cbdm_fast.interrupts",
                             "cbdm_fast.flags")),
    ("sampling", ("cbdm_fast.sampling",)),
    ("evaluation", ("cbdm_fast.evaluation",)),
    ("training", ("cbdm_fast.training",)),
    ("CLIs", ("cbdm_fast.train", "cbdm_fast.sample", "cbdm_fast.evaluate")),
    ("bench", ("cbdm_fast.bench",)),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest map entry that is the module or a package above it (the root
    entry "cbdm_fast" stands for the root module only)."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            inside = module.startswith(entry + ".") and entry != "cbdm_fast"
            if (module == entry or inside) and len(entry) > best_len:
                best, best_len = index, len(entry)
    if best is None:
        raise AssertionError(f"{module} is on no layer: add it to LAYERS in tests/test_imports.py")
    return best


def package_modules() -> dict[str, Path]:
    """{installed module name: file} for every module of the package's Python packages (folders with an
    __init__.py, as find_packages sees them; bench/suites and bench/experiments are scripts)."""
    modules = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if not all((folder.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(len(parts))):
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _literal_prefix(node: ast.expr) -> str | None:
    """The module named by import_module's argument: a string, or an f-string's leading text up to its
    last dot (f"cbdm_fast.kernels.{name}" names the package cbdm_fast.kernels)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value.rpartition(".")[0] or None
    return None


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The cbdm_fast modules ``name`` imports anywhere in its file, with the packages above them that
    Python loads first. ``from P import x`` imports the module P.x when there is one, else P itself (x is
    a name P defines)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" and node.args):
            target = _literal_prefix(node.args[0])
            if target:
                found.add(target)
    found = {m for m in found if m == "cbdm_fast" or m.startswith("cbdm_fast.")}
    return found | {parent for m in found for parent in _packages_above(m)
                    if parent != name and parent not in _packages_above(name)}


def _packages_above(module: str) -> set[str]:
    """The packages Python loads (runs the __init__ of) before ``module``: importing
    cbdm_fast.training.config runs cbdm_fast/training/__init__.py first, and that may import much more.
    A module's own packages are already loading when it runs, so they add no edge of its own."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_scan_sees_the_whole_package():
    modules = package_modules()
    for name in ("cbdm_fast", "cbdm_fast.ops.q_sample", "cbdm_fast.kernels.q_sample", "cbdm_fast.bench",
                 "cbdm_fast.bench.ops.run", "cbdm_fast.training.trainer", "cbdm_fast.samplers.fast"):
        assert name in modules, name
    assert not any(".suites" in m or ".experiments" in m for m in modules)
    # the lazy import of the Triton kernels counts
    assert "cbdm_fast.kernels" in import_graph()["cbdm_fast.ops._common"]


def test_every_module_is_on_a_layer():
    for name in package_modules():
        layer_of(name)


def test_imports_point_down():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports that point up a layer:\n  " + "\n  ".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("cbdm_fast.ops.q_sample") > layer_of("cbdm_fast.kernels.q_sample")
    assert layer_of("cbdm_fast.bench.ops.run") > layer_of("cbdm_fast.ops")  # bench.ops is not ops
    assert layer_of("cbdm_fast.sample") > layer_of("cbdm_fast.samplers.ddpm")
    with pytest.raises(AssertionError, match="on no layer"):
        layer_of("cbdm_fast.unmapped")
