"""The package's import rules (docs/architecture.md): no import cycle inside `editing/`; data,
metrics and report never import editors, tuners or the evaluation; the core's math modules never
import the Editor; no module is longer than 400 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "editing"


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package a file imports (at any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("editing"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycle():
    known = modules()
    graph = {m: imports(p, known) for m, p in known.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("lower,forbidden", [
    (("editing.data", "editing.metrics", "editing.report"), ("editing.editors", "editing.tuners", "editing.evaluation")),
    (("editing.tuners",), ("editing.editors", "editing.evaluation", "editing.data")),
    (("editing.editors.locate.templates", "editing.editors.locate.keys", "editing.editors.locate.targets",
      "editing.editors.locate.spread", "editing.editors.locate.fusion", "editing.editors.locate.history",
      "editing.editors.locate.statistics"), ("editing.editors.base", "editing.editors.locate.editor")),
])
def test_import_rules(lower, forbidden):
    known = modules()
    for m, p in known.items():
        if m.startswith(lower):
            bad = {n for n in imports(p, known) if n.startswith(forbidden)}
            assert not bad, f"{m} imports {sorted(bad)}"


def test_no_module_over_400_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long

