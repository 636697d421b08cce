"""The declared dependencies are the imported ones, bounded where the code follows internals.

Why: an undeclared import works on our machines (something else pulled it in) and breaks a
user's install when that something changes; a library whose private layout we read
(DeepSpeed's BF16_Optimizer shards, datatrove's MinHash files and executors) must not move to
a new minor version under a user without us testing it. The imports are read from the source
(every ``import x`` / ``from x import``, lazy ones included) and mapped to distributions with
``importlib.metadata.packages_distributions``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ["pipeline", "trainer", "eval"]
TEST_ONLY = ["tests", "benchmarks"]
# Distributions whose internals the code follows: they need an upper bound.
BOUNDED = {"deepspeed", "datatrove", "xxhash", "lm-eval"}
# Imported by the code but not required at run time (optional extras, build tools).
OPTIONAL = {"ray", "transformers", "pytest", "setuptools", "pip"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_distributions(folders: list[str]) -> dict[str, str]:
    """{distribution: a file importing it} for third-party imports under ``folders``.

    A module several distributions provide (``mlflow``: mlflow, mlflow-skinny, ...) counts as
    the one named like the module when there is one."""
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() or p.suffix == ".py"}
    local |= {"maskscale_configs", "conftest"}
    local |= {p.stem for p in (ROOT / "benchmarks").glob("*.py")}  # scripts import each other
    owners = md.packages_distributions()
    found: dict[str, str] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in local:
                        continue
                    dists = [_name(d) for d in owners.get(top, [top])]
                    dist = _name(top) if _name(top) in dists else dists[0]
                    found.setdefault(dist, str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    declared = {_name(r) for r in _project()["dependencies"]}
    missing = {
        d: where
        for d, where in _imported_distributions(RUNTIME).items()
        if d not in declared and d not in OPTIONAL and d != "torch"
    }
    assert not missing, f"imported at run time but not in [project] dependencies: {missing}"


def test_test_only_imports_are_in_dev_and_not_runtime():
    project = _project()
    declared = {_name(r) for r in project["dependencies"]}
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    runtime_imports = set(_imported_distributions(RUNTIME))
    test_imports = set(_imported_distributions(TEST_ONLY)) - runtime_imports
    missing = sorted(d for d in test_imports if d not in declared | dev | OPTIONAL | {"torch"})
    assert not missing, f"imported by tests/benchmarks only, declare them in [dev]: {missing}"
    runtime_but_test_only = sorted((declared & test_imports) - runtime_imports)
    # a runtime dependency only tests import is dead weight for users (move it to dev) --
    # unless the code needs it without importing it by name (datatrove imports regex).
    assert set(runtime_but_test_only) <= {"regex"}, runtime_but_test_only


def test_libraries_whose_internals_we_follow_have_upper_bounds():
    reqs = {_name(r): r for r in _project()["dependencies"]}
    for dist in BOUNDED:
        assert "<" in reqs[dist], f"{dist} needs an upper bound in pyproject.toml: {reqs[dist]}"
        installed = md.version(dist)
        upper = re.search(r"<\s*([0-9.]+)", reqs[dist]).group(1)
        as_tuple = [int(x) for x in re.findall(r"\d+", installed)[:2]]
        assert as_tuple < [int(x) for x in upper.split(".")[:2]], (dist, installed, upper)


def test_readme_lists_the_tested_versions_of_the_bounded_libraries():
    """Each bounded library appears as ``name X.Y.Z`` with a version its bound admits."""
    from packaging.requirements import Requirement

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Tested versions", 1)[1].split("\n#", 1)[0]
    reqs = {_name(r): Requirement(r) for r in _project()["dependencies"]}
    for dist in sorted(BOUNDED):
        listed = re.search(rf"{dist} ([0-9][0-9.]*[0-9])", section)
        assert listed, f"README 'Tested versions' lacks a version of {dist}"
        assert reqs[dist].specifier.contains(listed.group(1)), (dist, listed.group(1))
