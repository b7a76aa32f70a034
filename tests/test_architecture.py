"""ARCHITECTURE.md kept honest: imports run one way, from later stages to earlier ones.

The stage order is read from ARCHITECTURE.md's package table, so the document and the code
cannot drift apart: a new import that points backwards, or an import cycle between any two
modules, fails here with the modules named.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "toolkit" / "mathq"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every mathq module and the mathq modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from mathq.x import y` imports mathq.x, and mathq.x.y when y is a module
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for t in found if t in modules and t != name}
        graph[name] = targets
    return graph


def stage_order() -> list[str]:
    """The first column of ARCHITECTURE.md's package table, in order."""
    rows = re.findall(r"^\| `(mathq[\w.]*)/?` \|", ARCHITECTURE.read_text(), flags=re.M)
    assert rows, "ARCHITECTURE.md has no package table"
    return rows


def unit_of(module: str, units: list[str]) -> str:
    """The table entry a module belongs to (its package, or itself for a top module)."""
    best = max((u for u in units if module == u or module.startswith(u + ".")), key=len,
               default=None)
    assert best is not None, f"{module} is not in ARCHITECTURE.md's package table"
    return best


def test_every_module_belongs_to_a_documented_unit():
    units = stage_order()
    for module in import_graph():
        if module != "mathq":
            unit_of(module, units)


def test_imports_run_from_later_stages_to_earlier_ones():
    units = stage_order()
    rank = {u: i for i, u in enumerate(units)}
    backwards = []
    for module, targets in import_graph().items():
        if module == "mathq":
            continue
        mine = unit_of(module, units)
        for target in targets:
            if target == "mathq":
                continue
            theirs = unit_of(target, units)
            if rank[theirs] > rank[mine]:
                backwards.append(f"{module} -> {target}")
    assert not backwards, "imports against the stage order:\n" + "\n".join(sorted(backwards))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_among_modules():
    assert find_cycles(import_graph()) == []


def test_the_cycle_check_finds_a_planted_cycle():
    graph = import_graph()
    graph["mathq.recipes.prompt"] = graph["mathq.recipes.prompt"] | {"mathq.recipes.recipe"}
    assert ["mathq.recipes.prompt", "mathq.recipes.recipe"] in find_cycles(graph)


def test_help_imports_no_stage_machinery():
    """``mathq --help`` stays fast: no llama.cpp, NumPy, SymPy or matplotlib at start-up."""
    code = ("import sys; from mathq.cli import cli\n"
            "try:\n    cli(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('llama_cpp', 'numpy', 'sympy', 'matplotlib', 'gguf',"
            " 'huggingface_hub', 'math_verify') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "HEAVY []" in out, out
