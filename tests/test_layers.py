"""The package's shape, checked on the tree: which module may import which, no circles, no oversized modules,
and ``sys.exit`` only where a command answers the user."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradsweep", "hydra_plugins")
MAX_LINES = 400

# The layers, lowest first: a module imports only from its own layer or a lower one. Each sub-package is one layer;
# the top-level modules are the base (what every layer uses) or the commands above everything.
LAYERS = [
    {"gradsweep", "gradsweep.errors", "gradsweep.lazy", "gradsweep.progress", "gradsweep.shutdown", "gradsweep.hydra_shim"},
    {"gradsweep.config"},
    {"gradsweep.engine"},
    {"gradsweep.results"},
    {"gradsweep.sweep"},
    {"gradsweep.report"},
    {"gradsweep.tune"},
    {"gradsweep.__main__", "gradsweep.bench", "hydra_plugins"},
]
# What each sub-package never imports, besides the layers above it: the report reads results, it does not train.
NEVER = {"gradsweep.report": ("gradsweep.engine",)}
# Where sys.exit / SystemExit may appear: the commands, and the Hydra plugin (where Hydra calls gradsweep's sweep).
EXITS = {"gradsweep/sweep/cli.py", "gradsweep/report/build.py", "gradsweep/tune/cli.py",
         "hydra_plugins/gradsweep_launcher/launcher.py", "hydra_plugins/gradsweep_launcher/sweeper.py"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every first-party module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def layer_of(module: str) -> int:
    """The layer that names ``module``, or else the one that names its nearest package."""
    for name in [".".join(module.split(".")[:k]) for k in range(module.count(".") + 1, 0, -1)]:
        for i, layer in enumerate(LAYERS):
            if name in layer and (name != "gradsweep" or module == "gradsweep"):
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it")


GRAPH = {m: imports(p, set(modules())) - {m} for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down(module):
    up = [t for t in GRAPH[module] if layer_of(t) > layer_of(module) and not t.startswith(module + ".")]
    assert not up, f"{module} (layer {layer_of(module)}) imports higher layers: {up}"


def test_no_import_circle():
    # Within one layer imports may go either way; across the package there is no circle at all.
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH.get(m, ())):
            if t.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_each_sub_package_imports_only_those_below_it():
    """Stated per package: the engine imports nothing of the results, the sweep, the report or the tuner; the results
    nothing of the sweep, the report or the tuner; and so on up."""
    packages = [sorted(layer)[0] for layer in LAYERS[1:-1]]
    for i, package in enumerate(packages):
        banned = (*packages[i + 1:], *NEVER.get(package, ()))
        found = {m: sorted(t for t in GRAPH[m] if t.startswith(banned)) for m in GRAPH if m.startswith(package)}
        assert not {m: t for m, t in found.items() if t}, f"{package} imports what lies above it"


def test_every_module_lives_in_a_sub_package_or_is_named_as_base():
    flat = {m for m in GRAPH if m.count(".") == 1 and m.startswith("gradsweep.")}
    packages = {m for m in flat if (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    named = set().union(LAYERS[0], LAYERS[-1])
    assert flat - packages <= named, f"top-level modules outside every layer: {sorted(flat - packages - named)}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_size(module):
    n = len(modules()[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it along its concerns (at most {MAX_LINES})"


MAX_FUNCTION_LINES = 60
# Functions allowed over MAX_FUNCTION_LINES, each with why it reads better whole: keep it empty where you can.
LONG_FUNCTIONS: dict[str, str] = {}


def test_no_function_is_longer_than_a_screen():
    """Every function (a method, a nested one) fits on a screen, decorators and docstring included."""
    long = {}
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
                if n > MAX_FUNCTION_LINES and f"{module}.{node.name}" not in LONG_FUNCTIONS:
                    long[f"{module}.{node.name} (line {node.lineno})"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines; split them along their concerns: {long}"


def test_sys_exit_only_in_commands():
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if rel not in EXITS:
            assert "sys.exit(" not in text and "SystemExit(" not in text, rel


def test_private_api_uses_are_documented():
    """Every access to another library's private members (``obj._name``, ``x._internal``) has a comment within the
    three lines above it (or on its line) saying why there is no public way."""
    for path in modules().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            private = (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                       and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")))
            private |= isinstance(node, ast.ImportFrom) and "._" in (node.module or "")
            if not private:
                continue
            window = lines[max(0, node.lineno - 4):node.lineno]
            assert any("#" in line and "rivate" in line for line in window) or _own(node, lines), \
                f"{path.relative_to(ROOT)}:{node.lineno}: undocumented private access: {lines[node.lineno - 1].strip()}"


def _own(node: ast.AST, lines: list[str]) -> bool:
    """An attribute of gradsweep's own objects (a module's private helper, a dataclass field)."""
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in (
        "figures", "store", "schema", "report", "train", "groups")


def test_the_hydra_plugins_do_not_import_gradsweep_when_scanned():
    """Hydra imports every plugin module of every app it starts: importing gradsweep there would set MKL_CBWR (and
    load pandas) in other people's Hydra apps. gradsweep is imported inside the plugins' methods only."""
    for m, path in modules().items():
        if not m.startswith("hydra_plugins"):
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "gradsweep" or n.startswith("gradsweep.") for n in names), f"{m}: {ast.unparse(node)}"
