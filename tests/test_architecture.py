"""The package table of ARCHITECTURE.md, checked on the source: who may import whom, no import
cycle between modules, adapters free of sockets, and one clock.

Imports are read with `ast` (every `import` and `from … import`, wherever it is written, lazy
ones inside functions included), so a cycle hidden in a function body counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "agentproxy"

# Leaves every package may import: they import nothing of ours (but errors for core).
LEAVES = {"errors", "clock", "core", "config.model", "approvals.lifecycle"}
# ARCHITECTURE.md's "may import" column (packages, and the modules named there).
ALLOWED: dict[str, set[str]] = {
    "core": {"errors"},
    "errors": set(),
    "clock": set(),
    "config": {"core"},
    "protocols": set(),
    "identity": {"store"},
    "policy": {"config"},  # config.yamldoc for positions in errors; config.policies for tests
    "store": set(),
    "approvals": {"store"},
    "metering": {"store"},
    "audit": set(),
    "telemetry": set(),
    "admin": {
        "approvals",
        "audit",
        "config",
        "identity",
        "metering",
        "policy",
        "protocols",
        "store",
    },
    "proxy": {
        "admin",
        "approvals",
        "audit",
        "config",
        "identity",
        "metering",
        "policy",
        "protocols",
        "store",
        "telemetry",
    },
}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[0] == "v1":  # generated from proto/
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[str]:
    """The agentproxy modules `path` imports (relative to the package), however written."""
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agentproxy" or node.module.startswith("agentproxy."):
                base = node.module.removeprefix("agentproxy").lstrip(".")
                names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                names.append(base)
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("agentproxy.")
                for a in node.names
                if a.name.startswith("agentproxy.")
            ]
        for name in names:
            # `from agentproxy.proxy import runtime` names a module; `from x import Thing` not.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                yield name


GRAPH = {name: set(imports(path)) - {name} for name, path in MODULES.items()}


def package(module: str) -> str:
    return module.partition(".")[0]


def is_leaf(module: str) -> bool:
    return module in LEAVES or package(module) in {"errors", "clock", "core"}


def test_no_import_cycle_between_modules() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if package(m) in ALLOWED))
def test_packages_import_only_what_the_table_allows(module: str) -> None:
    own = package(module)
    wrong = sorted(
        target
        for target in GRAPH[module]
        if package(target) != own and not is_leaf(target) and package(target) not in ALLOWED[own]
    )
    assert wrong == [], f"{module} imports {wrong}; ARCHITECTURE.md does not allow it"


def test_leaves_stay_leaves() -> None:
    for leaf in ("errors", "clock", "config.model", "approvals.lifecycle"):
        ours = GRAPH[leaf] - {"errors", "core", "clock"}
        assert ours == set(), f"{leaf} imports {ours}"


def test_admin_reaches_the_proxy_only_through_the_backend_protocol() -> None:
    for module in MODULES:
        if package(module) == "admin":
            assert {package(t) for t in GRAPH[module]}.isdisjoint({"proxy", "cli"}), module


def third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.partition(".")[0])
    return found


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if package(m) in {"protocols", "policy"})
)
def test_adapters_and_policy_never_touch_a_socket_or_the_store(module: str) -> None:
    touched = third_party(MODULES[module]) & {"aiohttp", "grpc", "redis", "socket", "asyncio"}
    assert touched == set(), f"{module} imports {touched}: adapters and policy are pure"


def test_nothing_but_the_clock_reads_the_time() -> None:
    readers = []
    for module, path in MODULES.items():
        if module == "clock":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "time"
                and node.attr in {"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"}
            ) or (
                isinstance(node, ast.Attribute)
                and node.attr in {"now", "utcnow", "today"}
                and isinstance(node.value, ast.Name)
                and node.value.id in {"datetime", "date"}
            ):
                readers.append(f"{module}:{node.lineno}")
    assert readers == [], "read the time from the Clock passed in (agentproxy.clock)"


def test_pipeline_is_only_the_loop() -> None:
    """The stages live in proxy/stages/, their order in proxy/assemble.py."""
    pipeline = MODULES["proxy.pipeline"]
    assert not {t for t in GRAPH["proxy.pipeline"] if t.startswith("proxy.stages")}
    assert len(pipeline.read_text().splitlines()) < 200
    stages = {m for m in MODULES if m.startswith("proxy.stages.")}
    assert {
        f"proxy.stages.{name}"
        for name in ("identify", "describe", "pins", "decide", "gate", "limits", "audit")
    } | {"proxy.stages.settle", "proxy.stages.record"} <= stages
    assemblers = sorted(
        m
        for m in MODULES
        if any(t.startswith("proxy.stages.") for t in GRAPH[m]) and "stages" not in m
    )
    assert assemblers == ["proxy.assemble"], "only assemble.py writes the stage order"
