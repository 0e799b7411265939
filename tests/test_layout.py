"""The architecture's own rules, read from the source: who may import whom, and no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "orchestrator", "servers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports anywhere in its source, lazy imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    table = modules()
    return {name: {m for m in imports(name, path) if m in table and m != name} for name, path in table.items()}


def test_the_orchestrator_knows_the_servers_only_through_mcp_and_common_knows_neither():
    for name, targets in graph().items():
        top = name.split(".")[0]
        tops = {t.split(".")[0] for t in targets}
        if top == "orchestrator":
            assert "servers" not in tops, name
        if top == "servers":
            assert "orchestrator" not in tops, name
        if top == "common":
            assert tops <= {"common"}, name


def test_no_module_imports_itself_in_a_circle():
    edges = graph()
    # A package's __init__ importing its own modules is no circle of ideas; leave those edges out.
    edges = {n: {t for t in ts if not (t.startswith(n + ".") and ROOT.joinpath(*n.split(".")).is_dir())}
             for n, ts in edges.items()}
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []
