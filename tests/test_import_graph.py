"""The import graph of `weights/`, `pipelines/` and `server/`, drawn from the source (ast, every import, the ones
inside functions included): no circles, and nothing importing a layer above its own.

Layers, bottom up. A module may import its own layer and those below it, never one above.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("weights", "pipelines", "server")
LAYERS = [
    ("weights",),  # the weights on disk
    ("pipelines",),  # the model, diffusers-style
    ("server.config", "server.errors", "server.logs", "server.schemas", "server.endpoints"),  # shared by all below
    ("server.net",),  # outbound HTTP
    ("server.files",),  # output files
    ("server.service",),  # the edit service: the only owner of the model
    ("server.queue",),  # the queue and its dispatcher
    ("server.process",),  # one process's services, typed, built by `serve` and `worker` alike
    ("server.http",),  # the HTTP API
    ("server.cli",),  # processes and commands
]
ALLOWED_AT_TOP = {"server"}  # the package docstring


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a `from package import submodule` counts as the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where c is a name: the closest module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer_of(name: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer_and_imports_none_above_it():
    upward = []
    for name, targets in graph().items():
        if name in ALLOWED_AT_TOP:
            continue
        for target in targets:
            if target not in ALLOWED_AT_TOP and layer_of(target) > layer_of(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    edges = graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def defined_names(path: Path) -> set[str]:
    """Top-level names a module defines or imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:  # `A = 1` and `A, B = 1, 2`
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names |= {e.id for e in elements if isinstance(e, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_import_of_a_project_module_resolves():
    """`from server import x` where `x` is neither a module nor a name there (say, after a move) fails here,
    in the tests and benchmarks too, rather than when that line first runs."""
    known = modules()
    broken = []
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.ImportFrom)
                    and not node.level
                    and (node.module or "").split(".")[0] in PACKAGES
                ):
                    if node.module not in known:
                        broken.append(f"{path.relative_to(ROOT)}: no module {node.module}")
                        continue
                    defined = defined_names(known[node.module])
                    for alias in node.names:
                        if f"{node.module}.{alias.name}" not in known and alias.name not in defined:
                            broken.append(f"{path.relative_to(ROOT)}: {node.module} has no {alias.name}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] in PACKAGES and alias.name not in known:
                            broken.append(f"{path.relative_to(ROOT)}: no module {alias.name}")
    assert not broken, "\n".join(broken)


def test_the_graph_is_read_correctly():
    """The reader sees a function-level import, and a `from package import submodule`."""
    edges = graph()
    assert "server.queue.sqlite_queue" in edges["server.queue.connect"]  # imported inside open_queue
    assert "server.cli.doctor" in edges["server.cli"]  # `from server.cli import doctor as doctor_command`
    assert layer_of("server.http.routes.edit") > layer_of("server.service.edit")


def test_the_command_line_and_its_supervisor_load_no_model_code():
    """`flux2-server` parses its arguments (and a supervisor process lives) without importing torch."""
    code = "import sys, server.cli; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
