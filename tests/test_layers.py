"""The package's layers, read from its source: every import counts (at run time, in a function, or only
for the type checker), so a layer that needs to tell a higher one something takes a callback or a
Protocol, never an import. docs/design.md draws the same layers."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pi_controller

PACKAGE = Path(pi_controller.__file__).parent

# Lowest first; a module may import from its own layer and the layers below, never above. A module is
# in the layer of the longest name here that it is or is inside of ("pi_controller" is the package's
# __init__ alone: a module named nowhere is in no layer, and the test says so).
LAYERS: list[tuple[str, ...]] = [
    # what anything may use: time, bounded schema fields, logging, names, counters, keys and files
    ("pi_controller", "pi_controller.clock", "pi_controller.schema", "pi_controller.logs",
     "pi_controller.token_bucket", "pi_controller.names", "pi_controller.stats", "pi_controller.reloads",
     "pi_controller.keys", "pi_controller.files"),
    # the plugin ABI: context, readings, commands, and a plugin's typed config
    ("pi_controller.contract", "pi_controller.plugins.plugin_config"),
    ("pi_controller.devices",),
    ("pi_controller.simulators",),
    ("pi_controller.config",),
    ("pi_controller.safety", "pi_controller.plugins", "pi_controller.arbitration", "pi_controller.observer",
     "pi_controller.readiness", "pi_controller.fleet.protocol"),
    ("pi_controller.operator", "pi_controller.operator_values"),
    ("pi_controller.loop",),
    # what follows the loop and shows it: telemetry, metrics, recordings, the status view, systemd
    ("pi_controller.mqtt", "pi_controller.metrics", "pi_controller.sim.record", "pi_controller.status",
     "pi_controller.systemd"),
    # a node's part in fleet rollouts: it follows the status and speaks through the inbox's rows
    ("pi_controller.fleet", "pi_controller.fleet.node"),
    ("pi_controller.daemon",),
    # the engines and commands that run a daemon or stand in for one
    ("pi_controller.sim",),
    ("pi_controller.cli", "pi_controller.__main__", "pi_controller.fleet.tool", "pi_controller.fleet.simulate"),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("pi_controller", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            # `from package import module` imports the module; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def placings(module: str) -> list[tuple[int, int]]:
    """(length of the name, layer) for every name in LAYERS that `module` is or is inside of."""
    return [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
            if module == prefix or (prefix != "pi_controller" and module.startswith(prefix + "."))]


def layer_of(module: str) -> int:
    matches = placings(module)
    assert matches, f"{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return max(matches)[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_is_in_a_layer() -> None:
    """A new module is placed, even one that imports nothing of the package (the checks below ask only
    about modules along an import)."""
    assert [module for module in graph() if not placings(module)] == []


def test_no_import_circle_anywhere_in_the_package() -> None:
    assert cycles(graph()) == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in sorted(graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_devices_and_simulators_never_import_config() -> None:
    """The kinds take the sections they use: importing one device pulls in no config and no other kind."""
    offenders = [module for module, targets in graph().items()
                 if module.startswith(("pi_controller.devices", "pi_controller.simulators"))
                 and "pi_controller.config" in targets]
    assert offenders == []


def test_the_walk_sees_circles_and_upward_imports() -> None:
    """The checks above can fail: a made-up circle is found, and so is an import of a higher layer."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = graph()
    assert "pi_controller.contract" in edges["pi_controller.devices.sensors"]  # the walk finds real imports
    assert "pi_controller.devices.kernel_files" in edges["pi_controller.devices.mock_pins"]
    assert layer_of("pi_controller.devices.relay") < layer_of("pi_controller.config") < layer_of("pi_controller.loop")
    assert layer_of("pi_controller.plugins.plugin_config") < layer_of("pi_controller.plugins.sandbox")
