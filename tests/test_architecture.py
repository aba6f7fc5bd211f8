"""The import directions DESIGN.md states, read from the source (every import, also those inside
functions): no circle; spec -> transforms -> engine -> datasets/jobs/pool/worker -> servicer ->
server -> cli, never backwards; transform definitions import no server module; the client uses
only the protocol side of augsvc; nothing in augsvc imports torch or trainer_client."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("augsvc", "trainer_client")

#: The layer of each augsvc module (a package counts as one): an import may go to the same layer
#: or a lower one, never higher. Layer 0 holds the pieces everything shares.
LAYERS: dict[str, int] = {
    **dict.fromkeys(["augsvc.errors", "augsvc.rng", "augsvc.v1", "augsvc._albumentations", "augsvc.validation",
                     "augsvc.security", "augsvc.metrics", "augsvc.shm", "augsvc.procfs", "augsvc.tensors",
                     "augsvc.wire", "augsvc.plan", "augsvc.settings", "augsvc.samples", "augsvc.launcher"], 0),
    "augsvc.spec": 1,
    "augsvc.transforms": 2,
    "augsvc.engine": 3,
    "augsvc": 3,  # the package's public face: errors, plan, spec, and (lazily) the engine
    **dict.fromkeys(["augsvc.preview", "augsvc.sizing"], 4),  # tools over the engine
    **dict.fromkeys(["augsvc.datasets", "augsvc.jobs", "augsvc.pool", "augsvc.worker"], 4),
    "augsvc.servicer": 5,
    "augsvc.server": 6,
    "augsvc.cli": 7,
}
#: What trainer_client may use of augsvc: the public API and the wire / shared-memory protocol.
CLIENT_MAY_USE = {"augsvc", "augsvc.errors", "augsvc.plan", "augsvc.spec", "augsvc.v1", "augsvc.wire",
                  "augsvc.tensors", "augsvc.shm", "augsvc.security", "augsvc.validation", "augsvc.launcher",
                  "augsvc.procfs"}
SERVER_SIDE = {"augsvc.datasets", "augsvc.jobs", "augsvc.pool", "augsvc.worker", "augsvc.servicer",
               "augsvc.server", "augsvc.cli", "augsvc.settings", "augsvc.engine"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _node(module: str) -> str:
    """A module's unit in the layering: a package below augsvc counts as one."""
    parts = module.split(".")
    if parts[0] == "augsvc" and len(parts) > 2:
        return ".".join(parts[:2])
    return module


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known  # `from . import x`
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in sources.items():
        for target in _imports(module, path, known):
            edges[module].add(target)
    return edges


def _internal(edges: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    """Node-level edges among modules of `prefix` (self-edges dropped)."""
    out: dict[str, set[str]] = defaultdict(set)
    for src, targets in edges.items():
        if not src.startswith(prefix):
            continue
        for t in targets:
            if t == prefix.rstrip(".") or t.startswith(prefix):
                a, b = _node(src), _node(t)
                if a != b:
                    out[a].add(b)
    return out


def test_every_augsvc_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    nodes = {_node(m) for m in _sources() if m.split(".")[0] == "augsvc"}
    assert nodes - set(LAYERS) == set(), "new modules need a place in LAYERS (and in the README's map)"


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    for prefix in ("augsvc.", "trainer_client."):
        edges = _internal(graph, prefix)
        state: dict[str, int] = {}

        def visit(n: str, path: list[str], edges: dict[str, set[str]] = edges, state: dict[str, int] = state) -> None:
            state[n] = 1
            for m in sorted(edges.get(n, ())):
                if state.get(m) == 1:
                    raise AssertionError(f"import circle: {' -> '.join([*path, n, m])}")
                if m not in state:
                    visit(m, [*path, n])
            state[n] = 2

        for n in sorted(edges):
            if n not in state:
                visit(n, [])


def test_imports_flow_down_the_layers(graph: dict[str, set[str]]) -> None:
    wrong = [f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
             for a, targets in _internal(graph, "augsvc.").items() for b in targets
             if a in LAYERS and b in LAYERS and LAYERS[b] > LAYERS[a]]
    assert not wrong, "\n".join(wrong)


def test_transform_definitions_import_no_server_module(graph: dict[str, set[str]]) -> None:
    used = {_node(t) for m, targets in graph.items() if m.startswith("augsvc.transforms") for t in targets}
    assert used & SERVER_SIDE == set()


def test_the_client_uses_only_the_protocol_side(graph: dict[str, set[str]]) -> None:
    used = {_node(t) for m, targets in graph.items() if m.startswith("trainer_client") for t in targets
            if t.split(".")[0] == "augsvc"}
    assert used <= CLIENT_MAY_USE, sorted(used - CLIENT_MAY_USE)


def test_augsvc_never_imports_torch_or_the_client(graph: dict[str, set[str]]) -> None:
    for module, targets in graph.items():
        if module.split(".")[0] == "augsvc":
            bad = {t for t in targets if t.split(".")[0] in ("torch", "trainer_client", "torchvision")}
            assert not bad, f"{module} imports {bad}"
    # and at run time: every augsvc module loaded (albumentations would pull torch in if let)
    modules = sorted(m for m in _sources() if m.split(".")[0] == "augsvc")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer_client'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
