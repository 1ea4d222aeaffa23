"""Drop reasons, declared once in schemas/reasons.py: each is produced by the modules of exactly one stage.

"Produced" is read from the source with `ast`: a string literal "<stage>.<reason>", an f-string
f"{STAGE}.<reason>" (STAGE: the module's own), one whose reason is a loop variable over a literal list
(f"{STAGE}.{name}" for name in (...)), or full_reason(...). A reason built any other way fails the test
until the scan can read it, so a reason cannot slip past unseen.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
from _fixtures import ROOT

from schemas.reasons import REASONS, STAGES, stage_reasons

DECLARED = frozenset(r for s in STAGES for r in stage_reasons(s))
# Modules with no STAGE of their own that build one stage's reasons.
HELPERS = {"tasks/embed.py": "image", "tasks/io/http.py": "fetch", "tasks/io/polite.py": "fetch",
           "tasks/io/replay.py": "fetch"}
# Modules that name reasons to compare against, never to drop a row with: the paper's table, the sample
# crawl's expected outcomes. They (and flows/) must name declared reasons only.
REFERENCES = ("tasks/paper.py",
              *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tasks" / "sample").glob("*.py")))
_REASON = re.compile(rf"(?:{'|'.join(STAGES)})\.\w+")
_STAGE_DOT = re.compile(rf"(?:{'|'.join(STAGES)})\.")
_ORDER_PRESERVING = {"reversed", "list", "tuple"}


def _setting_paths() -> frozenset[str]:
    """"<stage>.<field>" of each stage's config (e.g. "image.nsfw_labels"): a setting's name, not a reason."""
    paths = set()
    for stage in STAGES:
        config = getattr(importlib.import_module(f"tasks.{stage}"), f"{stage.capitalize()}Config", None)
        if config is not None:  # crossbatch has none
            paths.update(f"{stage}.{f.name}" for f in dataclasses.fields(config))
    return frozenset(paths - DECLARED)


SETTINGS = _setting_paths()


class Scan(NamedTuple):
    stage: str | None  # the stage the module's reasons belong to; None: no STAGE and not a helper
    found: list[str]  # reasons it produces, in source order, each once
    unread: list[int]  # lines of reason builds the scan cannot read


def scan(source: str, path: str) -> Scan:
    tree = ast.parse(source)
    stage = _own_stage(tree) or HELPERS.get(path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found, unread = [], []
    for node in sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _REASON.fullmatch(node.value):
            if node.value in SETTINGS:
                continue
            built = [node.value]
        elif isinstance(node, ast.JoinedStr) and _is_reason_build(node):
            built = _render(node.values, stage, node, parents)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "full_reason":
            built = _render([node.args[0], ast.Constant("."), node.args[1]], stage, node, parents)
        else:
            continue
        if built is None or not all(_REASON.fullmatch(r) for r in built):
            unread.append(node.lineno)
        else:
            found.extend(r for r in built if r not in found)
    return Scan(stage, found, unread)


def _own_stage(tree: ast.Module) -> str | None:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "STAGE"
                and isinstance(node.value, ast.Constant)):
            return node.value.value
    return None


def _is_reason_build(node: ast.JoinedStr) -> bool:
    """Starts with STAGE or "<stage>." and has no text beyond a name (f"source.{name} must be ..." is a message)."""
    if not all(re.fullmatch(r"[\w.]*", v.value) for v in node.values if isinstance(v, ast.Constant)):
        return False
    first = node.values[0]
    if isinstance(first, ast.FormattedValue):
        return isinstance(first.value, ast.Name) and first.value.id == "STAGE"
    return _STAGE_DOT.match(first.value) is not None


def _render(parts: list[ast.expr], stage: str | None, node: ast.AST, parents: dict) -> list[str] | None:
    """Every string the pieces can make, or None where a piece is not a literal, STAGE, or a loop variable."""
    out = [""]
    for part in parts:
        value = part.value if isinstance(part, ast.FormattedValue) else part
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            options = [value.value]
        elif isinstance(value, ast.Name) and value.id == "STAGE":
            options = [stage] if stage else None
        elif isinstance(value, ast.Name):
            options = _loop_values(value.id, node, parents)
        else:
            options = None
        if options is None:
            return None
        out = [o + v for o in out for v in options]
    return out


def _loop_values(name: str, node: ast.AST, parents: dict) -> list[str] | None:
    """The literal values `name` takes, where it is the target of the nearest loop or comprehension binding it."""
    while node in parents:
        node = parents[node]
        for loop in [node] if isinstance(node, ast.For) else getattr(node, "generators", []):
            targets = loop.target.elts if isinstance(loop.target, ast.Tuple) else [loop.target]
            at = next((i for i, t in enumerate(targets) if isinstance(t, ast.Name) and t.id == name), None)
            if at is not None:
                items = _literal_list(loop.iter, node, parents)
                if items is None:
                    return None
                picked = [it if len(targets) == 1 else (it.elts[at] if isinstance(it, ast.Tuple) else None)
                          for it in items]
                ok = all(isinstance(p, ast.Constant) and isinstance(p.value, str) for p in picked)
                return [p.value for p in picked] if ok else None
    return None


def _literal_list(expr: ast.expr, loop: ast.AST, parents: dict) -> list[ast.expr] | None:
    while isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in _ORDER_PRESERVING:
        expr = expr.args[0]
    if isinstance(expr, ast.Name):  # a list assigned once in the enclosing function
        scope = loop
        while scope in parents and not isinstance(scope, ast.FunctionDef):
            scope = parents[scope]
        values = [n.value for n in ast.walk(scope) if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)]
        expr = values[0] if len(values) == 1 else None
    return expr.elts if isinstance(expr, (ast.List, ast.Tuple)) else None


def problems(scans: dict[str, Scan], declared: frozenset[str]) -> list[str]:
    """What breaks "each declared reason is produced by exactly one stage, its own, and nothing else is"."""
    out = [f"{path}:{line}: a reason built in a form this test cannot read"
           for path, s in scans.items() for line in s.unread]
    producers: dict[str, dict[str, str | None]] = {}
    for path, s in scans.items():
        for reason in s.found:
            producers.setdefault(reason, {})[path] = s.stage
    for reason, by in sorted(producers.items()):
        if reason not in declared:
            out.append(f"{reason}: produced in {sorted(by)} but not declared in schemas/reasons.py")
        stages = set(by.values())
        if stages != {reason.split(".")[0]}:
            out.append(f"{reason}: produced by the stage(s) {sorted(map(str, stages))} of {sorted(by)}, "
                       f"not by {reason.split('.')[0]} alone")
    out += [f"{reason}: declared but produced nowhere" for reason in sorted(declared - producers.keys())]
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def _tasks_scans() -> dict[str, Scan]:
    paths = [p for p in sorted((ROOT / "tasks").rglob("*.py")) if _rel(p) not in REFERENCES]
    return {_rel(p): scan(p.read_text(encoding="utf-8"), _rel(p)) for p in paths}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_module_takes_its_rules_from_the_table(stage):
    module = importlib.import_module(f"tasks.{stage}")
    assert module.STAGE == stage
    assert module.RULES is REASONS[stage]


def test_each_declared_reason_is_produced_by_exactly_one_stage():
    scans = _tasks_scans()
    assert sum(len(s.found) for s in scans.values()) >= len(DECLARED)  # the scan reads something at all
    assert problems(scans, DECLARED) == []


@pytest.mark.parametrize("stage", ["source", "refine"])
def test_first_failed_rule_wins_in_the_tables_order(stage):
    # These stages write their reasons in one list, last rule first, so a row keeps its first failed rule:
    # that list must be in the table's (SPEC's) order.
    assert _tasks_scans()[f"tasks/{stage}.py"].found == stage_reasons(stage)


@pytest.mark.parametrize("path", [*REFERENCES, *(_rel(p) for p in sorted((ROOT / "flows").rglob("*.py")))])
def test_references_name_declared_reasons_only(path):
    s = scan((ROOT / path).read_text(encoding="utf-8"), path)
    assert set(s.found) <= DECLARED
    assert not s.unread


def test_the_check_would_catch_a_misplaced_undeclared_or_unread_reason():
    staged = scan(
        'STAGE = "align"\n'
        'A = "image.geometry"\n'
        'B = f"{STAGE}.duplicate"\n'
        "def f(rows, pick):\n"
        '    rules = [("x", rows), ("y", rows)]\n'
        "    for name, bad in reversed(rules):\n"
        '        rows[bad] = f"{STAGE}.{name}"\n'
        '    return [full_reason(STAGE, r) for r in ("out_of_band",)], f"{STAGE}.{pick()}"\n',
        "tasks/a.py")
    assert staged == Scan("align", ["image.geometry", "align.duplicate", "align.x", "align.y",
                                    "align.out_of_band"], [8])
    stageless = scan('X = "image.blur"\nY = "image.min_side"\n', "tasks/b.py")  # Y: a setting's name
    assert stageless == Scan(None, ["image.blur"], [])
    declared = frozenset({"align.out_of_band", "align.x", "align.y", "image.geometry", "image.blur",
                          "crossbatch.duplicate"})
    assert problems({"tasks/a.py": staged, "tasks/b.py": stageless}, declared) == [
        "tasks/a.py:8: a reason built in a form this test cannot read",
        "align.duplicate: produced in ['tasks/a.py'] but not declared in schemas/reasons.py",
        "image.blur: produced by the stage(s) ['None'] of ['tasks/b.py'], not by image alone",
        "image.geometry: produced by the stage(s) ['align'] of ['tasks/a.py'], not by image alone",
        "crossbatch.duplicate: declared but produced nowhere",
    ]
