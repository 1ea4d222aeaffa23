"""The import direction flows -> tasks -> schemas, checked on the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"prefect", "prefect_dask", "dask", "distributed", "flows"}


def _modules(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    return files


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that touch os.environ / os.getenv / os.putenv, however they were imported."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(a.name in ("environ", "getenv", "putenv", "environb") for a in node.names):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", _modules("tasks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tasks_import_no_orchestration_and_read_no_environment(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not (_imported_roots(tree) & ORCHESTRATION), f"{path} imports {_imported_roots(tree) & ORCHESTRATION}"
    assert not _environment_reads(tree), f"{path} reads the environment on lines {_environment_reads(tree)}"


@pytest.mark.parametrize("path", _modules("schemas"), ids=lambda p: str(p.relative_to(ROOT)))
def test_schemas_import_nothing_from_tasks_or_flows(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not (_imported_roots(tree) & ({"tasks"} | ORCHESTRATION)), f"{path} imports from the project or Prefect"
    assert not _environment_reads(tree)


def test_the_checks_would_catch_a_violation():
    bad = ast.parse("import os\nfrom prefect import task\nimport dask.dataframe\nx = os.environ['A']\n"
                    "from os import getenv\nfrom flows.settings import S\n")
    assert _imported_roots(bad) >= {"prefect", "dask", "flows"}
    assert sorted(_environment_reads(bad)) == [4, 5]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports anywhere in it (a lazy import in a function counts:
    it is still a cycle a reader has to untangle)."""
    modules = {_module_name(p): p for package in ("flows", "tasks", "schemas") for p in _modules(package)}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.update(f"{node.module}.{a.name}" for a in node.names)
                targets.add(node.module)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(f"{t}.")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_in_flows_tasks_or_schemas():
    assert _cycle(_import_graph()) is None, " -> ".join(_cycle(_import_graph()))


def test_the_cycle_check_would_catch_one():
    assert _cycle({"flows.curate": {"flows.ops"}, "flows.ops": {"flows.curate"}}) == [
        "flows.curate", "flows.ops", "flows.curate"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
