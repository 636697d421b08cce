"""The house's import arrows point one way: eval -> trainer -> pipeline.

Parsed with ast over every module (imports inside functions included), so a lazy import that
would only fail at run time in an installed layout is caught here. ``pipeline/cli.py`` names the
upper packages' CLI modules as *strings* (a plugin list, imported by name when present); that is
registration, not a dependency, and is not an import statement.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["pipeline", "trainer", "eval"]
"""Bottom to top: a package may import only itself and the packages below it."""


def imported_packages(path: Path, package: str) -> dict[str, int]:
    """{top-level package imported: first line} of one file (relative imports = own package)."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package if node.level else (node.module or "")]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def layering_violations(root: Path = ROOT) -> list[str]:
    out = []
    for level, package in enumerate(LAYERS):
        above = set(LAYERS[level + 1 :])
        for path in sorted((root / package).rglob("*.py")):
            for name, line in imported_packages(path, package).items():
                if name in above:
                    out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


def test_imports_point_down_the_house():
    assert layering_violations() == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "trainer").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "pipeline" / "bad.py").write_text("def f():\n    from trainer.loop import train\n")
    (tmp_path / "trainer" / "ok.py").write_text("from . import x\nimport pipeline.cli\n")
    (tmp_path / "trainer" / "bad.py").write_text("import os, eval.measure.ppl as p\n")
    assert layering_violations(tmp_path) == [
        "pipeline/bad.py:2 imports trainer",
        "trainer/bad.py:1 imports eval",
    ]


def test_the_demo_lives_at_the_top():
    assert (ROOT / "eval" / "demo" / "run.py").is_file()
    assert not (ROOT / "pipeline" / "demo.py").exists()


# ------------------------------------------------------------------ inside eval/: rooms


ROOMS = {
    "eval.measure": 0,
    "eval.generation": 1,
    "eval.zeroshot": 2,
    "eval.studies.reversal": 3,
    "eval.studies.scaling": 3,
    "eval.demo": 3,
}
"""Rank of each room of eval/: a module may import its own room and rooms of lower rank only
(rooms of equal rank never import each other). Modules directly in eval/ (the ``maskscale
eval`` parsers) rank above every room."""
TOP = 4


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> dict[str, int]:
    """{absolute module name imported: first line}; ``from a import b`` names ``a.b`` when
    that is a module of the repository, else ``a``. Lazy imports count as much as top-level,
    and so does ``importlib.import_module`` of a literal name (names in a registry list, run
    later, do not)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if _is_module(sub, root) else base)
        elif _literal_import_module(node):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            found.setdefault(target, node.lineno)
    return found


def _literal_import_module(node: ast.AST) -> bool:
    """``importlib.import_module("a.b")`` with a literal name: an import in other syntax."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "import_module" and isinstance(node.args[0].value, str)


def _is_module(name: str, root: Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def room_of(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def rank_of(module: str) -> int:
    room = room_of(module)
    return ROOMS[room] if room else TOP


def room_violations(root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / "eval").rglob("*.py")):
        me = module_name(path, root)
        for target, line in imported_modules(path, root).items():
            if not target.startswith("eval.") or room_of(target) == room_of(me):
                continue
            if rank_of(target) >= rank_of(me) and room_of(target) is not None:
                out.append(f"{path.relative_to(root)}:{line} imports {target}")
    return out


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Every strongly connected group of >1 module (or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            me = module_name(path, root)
            targets = imported_modules(path, root)
            graph[me] = {t for t in targets if t.split(".")[0] in LAYERS and t != me}
            if me in targets:
                graph[me].add(me)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_eval_rooms_import_downwards_only():
    assert room_violations() == []


def test_no_import_circle_anywhere():
    assert import_cycles() == []


def test_every_eval_module_lives_in_a_room():
    loose = {p.name for p in (ROOT / "eval").glob("*.py")}
    assert loose == {"__init__.py", "cli.py"}
    for room in ROOMS:
        init = ROOT.joinpath(*room.split("."), "__init__.py")
        assert init.is_file() and len(ast.get_docstring(ast.parse(init.read_text())) or "") > 80


def test_the_room_and_circle_checks_can_fail(tmp_path):
    for room in ("pipeline", "trainer", "eval", "eval/measure", "eval/generation"):
        (tmp_path / room).mkdir()
        (tmp_path / room / "__init__.py").write_text("")
    (tmp_path / "eval" / "measure" / "a.py").write_text(
        "def f():\n    from eval.generation.b import g\n"
    )
    (tmp_path / "eval" / "generation" / "b.py").write_text("from eval.measure import a\n")
    (tmp_path / "eval" / "cli.py").write_text(
        "import importlib\nimportlib.import_module('eval.x')\n"
    )
    (tmp_path / "eval" / "x.py").write_text("from .cli import y\n")
    assert room_violations(tmp_path) == ["eval/measure/a.py:2 imports eval.generation.b"]
    assert import_cycles(tmp_path) == [
        ["eval.cli", "eval.x"],
        ["eval.generation.b", "eval.measure.a"],
    ]
