"""``pip install .`` (not editable) gives a working ``maskscale`` that finds its configs.

The repository's files are copied to a scratch folder and installed with pip into a fresh
venv, offline: ``--no-deps --no-build-isolation --no-index`` with the shared venv's
site-packages added to the new venv's path by a ``.pth`` line, so torch & co. are not
reinstalled and the shared venv's editable maskscale (installed by a .pth *hook* there, which a
plain path line does not run) stays invisible. Then, from a folder outside the repository, the
installed console script and the installed packages must load a model preset and a corpus
config from the installed ``maskscale_configs`` copy, and ``MASKSCALE_CONFIG_DIR`` must still
win over it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["pipeline", "trainer", "eval"]
SOURCES = ["pyproject.toml", "README.md", *PACKAGES, "configs"]

PROBE = """
import json, pipeline, trainer.presets as p
from eval.demo.run import recipe_path
from eval.demo.config import DEFAULT, load_demo_config
from pipeline.config import CorpusConfig
from pipeline.configdir import config_path
from pipeline.configlib import load_config
corpus = load_config(CorpusConfig, "configs/corpus/sotu.yaml", ["output=x", "input=[y]"])
demo = load_demo_config(str(config_path(DEFAULT)), quick=True)
print(json.dumps({"pipeline": pipeline.__file__, "presets": str(p.preset_dir()),
                  "names": p.list_presets(), "d_model": p.load_preset("1028M").d_model,
                  "cutoff": str(corpus.split.cutoff), "demo": str(recipe_path(demo.corpus))}))
"""


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MASKSCALE_CONFIG_DIR")}
    _run([base, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "_shared_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    pip += ["--no-build-isolation", "--no-index", "--ignore-installed", str(src)]
    _run(pip, tmp, env)
    return venv, env


@pytest.mark.slow
def test_installed_package_reads_its_own_configs(installed, tmp_path):
    venv, env = installed
    site = next((venv / "lib").glob("python3*/site-packages"))
    shipped = site / "maskscale_configs"
    want = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == want
    packages = [
        p.parent.relative_to(ROOT) for n in PACKAGES for p in (ROOT / n).rglob("__init__.py")
    ]
    assert [p for p in packages if not (site / p / "__init__.py").is_file()] == []

    out = _run([str(venv / "bin" / "maskscale"), "train", "--help"], tmp_path, env)
    assert "--config" in out
    probe = json.loads(_run([str(venv / "bin" / "python"), "-c", PROBE], tmp_path, env))
    assert Path(probe["pipeline"]).is_relative_to(site)  # the installed copy, not the repo
    assert Path(probe["presets"]) == shipped / "model"
    assert "1028M" in probe["names"] and "tiny-1M" in probe["names"]
    assert probe["d_model"] == 1792
    assert probe["cutoff"].startswith("1990")
    assert Path(probe["demo"]) == shipped / "corpus" / "sotu.yaml"  # the demo's recipes too


@pytest.mark.slow
def test_config_dir_environment_wins_over_the_installed_copy(installed, tmp_path):
    venv, env = installed
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("n_layer: 1\nn_head: 1\nd_model: 8\n")
    code = "import trainer.presets as p; print(p.list_presets(), p.load_preset('mine').d_model)"
    env = {**env, "MASKSCALE_CONFIG_DIR": str(tmp_path)}
    out = _run([str(venv / "bin" / "python"), "-c", code], tmp_path, env)
    assert out.split() == ["['mine']", "8"]
