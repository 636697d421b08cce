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
    (tmp_path / "trainer" / "bad.py").write_text("import os, eval.ppl as p\n")
    assert layering_violations(tmp_path) == [
        "pipeline/bad.py:2 imports trainer",
        "trainer/bad.py:1 imports eval",
    ]


def test_the_demo_lives_at_the_top():
    assert (ROOT / "eval" / "demo.py").is_file()
    assert not (ROOT / "pipeline" / "demo.py").exists()
