"""Stage keys follow the code each stage runs; settings that change no bytes stay out of them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import codekey
from pipeline.build import plan_stages
from pipeline.config import CorpusConfig
from pipeline.configlib import load_config
from pipeline.shards import read_manifest

from .conftest import ROOT, build_cmd


def _folders(dump, tmp_path, *overrides) -> list[str]:
    base = [f"input=[{dump.root}]", f"output={tmp_path / 'c'}", "records.task_bytes=4000"]
    return [s.folder for s in plan_stages(load_config(CorpusConfig, None, base + [*overrides]))]


def test_records_strict_leaves_every_stage_key(dump, tmp_path):
    lenient = _folders(dump, tmp_path, "records.strict=false")
    assert _folders(dump, tmp_path, "records.strict=true") == lenient  # publish included
    # the other record settings do shape the output: every stage moves
    assert not set(_folders(dump, tmp_path, "records.max_chars=5000")) & set(lenient)


def test_every_step_runs_code_its_stage_key_covers(dump, tmp_path):
    cfg = load_config(CorpusConfig, None, [f"input=[{dump.root}]", f"output={tmp_path}"])
    read = set(codekey.stage_modules("read"))
    for stage in plan_stages(cfg):
        covered = set(codekey.stage_modules(stage.name)) | read
        for step in stage.pipeline:
            module = type(step).__module__
            if module.startswith("pipeline."):
                assert module in covered, f"{stage.name} runs {module}: add it to STAGE_MODULES"
    with pytest.raises(KeyError, match="'dedupe' has no entry in pipeline.codekey"):
        codekey.stage_versions("dedupe")


def _markers(out: Path, folder: str) -> dict[str, int]:
    done = out / folder / "logs" / "completions"
    return {p.name: p.stat().st_mtime_ns for p in done.iterdir()}


@pytest.mark.slow
def test_patched_packing_reruns_pack_and_publish_only(built, dump, tmp_path):
    """A local patch to packing.py, in a copy of the package elsewhere on disk: the stages
    before packing are reused as they are, packing onwards reruns, the build key moves."""
    out = tmp_path / "c"
    shutil.copytree(built, out)  # copy2 keeps mtimes: the shard hash sidecars stay current
    before = read_manifest(out)
    upstream = ["exact-signatures", "exact-find", "minhash-signatures", "minhash-buckets",
                "minhash-cluster", "split", "tokenizer"]  # fmt: skip
    assert set(upstream) < set(before["stages"])
    markers = {name: _markers(out, before["stages"][name]) for name in upstream}
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pipeline", src / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    packing = src / "pipeline" / "packing.py"
    packing.write_text(packing.read_text() + "\n# a local patch that changes no bytes\n")
    # cwd outside the checkout: ``python -m`` would otherwise put the checkout first on sys.path
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(build_cmd(dump.root, out), cwd=tmp_path, env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = read_manifest(out)
    moved = {m for m, h in after["code"]["modules"].items() if before["code"]["modules"][m] != h}
    assert moved == {"pipeline.packing"}  # the build ran the copy
    for name in upstream:
        assert after["stages"][name] == before["stages"][name], name
        assert _markers(out, after["stages"][name]) == markers[name], f"{name} was rerun"
    for name in ("pack", "pack-tails", "hash"):
        assert after["stages"][name] != before["stages"][name], name
        assert _markers(out, after["stages"][name]), f"{name} did not run"
    assert after["build_key"] != before["build_key"]
    assert list((out / ".work").glob(f"*-publish-{after['build_key']}"))
    assert after["code"]["stages"]["pack"] != before["code"]["stages"]["pack"]
    assert after["code"]["stages"]["split"] == before["code"]["stages"]["split"]
    assert after["splits"] == before["splits"]  # the patch changed no bytes: same shards


def test_a_stage_code_change_moves_that_stage_and_what_follows(dump, tmp_path, monkeypatch):
    real_fingerprint = codekey.code_fingerprint
    base = _folders(dump, tmp_path)
    names = [Path(f).name.split("-", 1)[1].rsplit("-", 1)[0] for f in base]
    for target in ["read", *names]:
        monkeypatch.setattr(
            codekey,
            "code_fingerprint",
            lambda stage, t=target: real_fingerprint(stage) + (stage == t) * "+",
        )
        moved = [a != b for a, b in zip(base, _folders(dump, tmp_path))]
        first = 0 if target == "read" else names.index(target)
        # the tokenizer reads the split's output though its key skips the split's settings
        assert moved == [i >= first for i in range(len(names))], (target, moved)
