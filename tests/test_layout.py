"""The code's layout is part of the reference: the algorithm first, modules named for what they do, no cycles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The project modules `path` imports anywhere: at the top, inside functions, under `if`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & MODULES.keys()


def test_no_import_cycle_between_project_modules():
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", f"import cycle: {' → '.join([*path, name, dep])}"
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "grpo" not in graph["evaluate"]  # evaluation does not pull in the training loop


def test_no_module_over_700_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert max(sizes.values()) <= 700, sizes


def test_grpo_reads_as_the_algorithm_first():
    tree = ast.parse((ROOT / "grpo.py").read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert defs["group_advantages"].lineno <= 300 and defs["policy_loss"].lineno <= 300
    assert defs["group_advantages"].lineno < defs["policy_loss"].lineno < defs["update"].lineno < defs["train"].lineno
    assert defs["train"].end_lineno - defs["train"].lineno + 1 <= 120
