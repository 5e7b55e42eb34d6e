"""The shape docs/architecture.md promises, checked on the source: the module graph is a DAG,
the protocol core stays sans-IO, and only the CLI starts the composition root."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "yuubin"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(yuubin modules imported anywhere in the file, top-level names of every import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    roots: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            roots.add(name.split(".")[0])
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.startswith("yuubin"):
                found.add(name)
    return found, roots


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph, roots = {}, {}
    for name, path in files.items():
        deps, top = _imports(path, modules)
        graph[name] = deps - {name, "yuubin"}
        roots[name] = top
    return graph, roots


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_module_graph_is_a_dag():
    graph, _ = _graph()
    assert "yuubin.app" in graph and "yuubin.intake" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_builds_the_application():
    graph, _ = _graph()
    users = sorted(m for m, deps in graph.items() if "yuubin.app" in deps)
    assert users == ["yuubin.cli.serve"], users


def test_the_protocol_core_is_sans_io():
    _, roots = _graph()
    io = {"asyncio", "socket", "ssl", "time", "os", "selectors", "dns"}
    assert not roots["yuubin.smtp.protocol"] & io, roots["yuubin.smtp.protocol"] & io


def test_lower_layers_never_import_higher_ones():
    graph, _ = _graph()
    upper = {"yuubin.app", "yuubin.cli", "yuubin.smtp.listener", "yuubin.intake", "yuubin.net.shell"}
    lower = ("yuubin.policy", "yuubin.auth", "yuubin.queue", "yuubin.delivery", "yuubin.store", "yuubin.dns",
             "yuubin.config", "yuubin.durable", "yuubin.smtp.protocol", "yuubin.smtp.address")
    for mod, deps in graph.items():
        if mod.startswith(lower):
            bad = {d for d in deps if d in upper or d.startswith("yuubin.cli")}
            assert not bad, f"{mod} imports {bad}"
