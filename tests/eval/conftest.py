"""Shared eval fixtures: a tiny corpus with dated holdouts and a tiny ARM and MDM trained on it.

Built once per session through the real code paths: Arrow shards and tokenizer.json written by
the trainer tests' corpus factory, then two runs of the real trainer (DeepSpeed ZeRO-2 on CPU,
``configs/train/tiny-cpu.yaml`` with ``model=tiny-0.3M``, 20 steps, checkpoints at 10 and 20,
an export at the end; training-time validation on ``validation`` only, to stay fast) tracked in
a real MLflow sqlite store.

The corpus: ``train`` and ``validation`` hold learnable "ramp" rows; ``holdout_2021`` and
``holdout_2023`` too (same distribution); ``holdout_recent`` holds random rows (a distribution
shift the models have never seen, so its degradation is clearly positive). ``holdout_recent``
is dated only through the manifest's ``split.holdout_ranges`` (2025-2026), so period ordering
must use the ranges as well as the years in the names. Small shards (20 rows) make every split
span several shards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.trainer.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ_LEN, ROWS_PER_SHARD = 64, 32, 20
HOLDOUTS = ["holdout_2021", "holdout_2023", "holdout_recent"]
RECENT_RANGE = ["2025-01-01", "2026-12-31"]


@dataclass
class EvalRuns:
    corpus: Path
    arm: Path
    mdm: Path
    mlflow_uri: str
    root: Path


def build_corpus(root: Path) -> Path:
    splits = {"train": 320, "validation": 100, "holdout_2021": 80, "holdout_2023": 80}
    corpus = make_corpus(
        root / "corpus", vocab_size=VOCAB, seq_len=SEQ_LEN, splits=splits, kind="ramp",
        rows_per_shard=ROWS_PER_SHARD, batch_rows=8,
    )  # fmt: skip
    shifted = make_corpus(
        root / "shifted", vocab_size=VOCAB, seq_len=SEQ_LEN, splits={"holdout_recent": 80},
        kind="random", seed=1, rows_per_shard=ROWS_PER_SHARD, batch_rows=8,
    )  # fmt: skip
    shutil.move(shifted / "holdout_recent", corpus / "holdout_recent")
    manifest = json.loads((corpus / "manifest.json").read_text())
    extra = json.loads((shifted / "manifest.json").read_text())
    assert extra["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    manifest["splits"]["holdout_recent"] = extra["splits"]["holdout_recent"]
    manifest["config"] = {"split": {"holdout_ranges": {"holdout_recent": RECENT_RANGE}}}
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(shifted)
    return corpus


def train_run(corpus: Path, run_dir: Path, objective: str, uri: str) -> Path:
    from trainer.cli import load_train_config
    from trainer.loop import train

    overrides = [
        f"corpus={corpus}", f"objective={objective}", "model=tiny-0.3M", "steps=20",
        f"run_dir={run_dir}", f"tracking.uri={uri}", "tracking.experiment=eval-tests",
        "checkpoint.every=10", "optim.lr=3e-3", "eval.max_rows=32", "eval.n_samples=4",
        "log.every=10", "eval.splits=[validation]",
    ]  # fmt: skip
    cfg = load_train_config(str(ROOT / "configs/train/tiny-cpu.yaml"), overrides)
    train(cfg)
    return run_dir


@pytest.fixture(scope="session")
def eval_runs(tmp_path_factory) -> EvalRuns:
    root = tmp_path_factory.mktemp("eval")
    corpus = build_corpus(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    arm = train_run(corpus, root / "runs" / "arm", "arm", uri)
    mdm = train_run(corpus, root / "runs" / "mdm", "mdm", uri)
    return EvalRuns(corpus, arm, mdm, uri, root)


def copy_run(run_dir: Path, dest: Path, checkpoints: bool = False) -> Path:
    """A private copy of a trained run (its eval/ outputs do not leak into other tests)."""
    ignore = None if checkpoints else shutil.ignore_patterns("checkpoints", "eval")
    shutil.copytree(run_dir, dest, ignore=ignore)
    return dest


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``maskscale ARGV`` in this process: (exit code, stdout, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def add_split(corpus: Path, split: str, rows: list[list[int]], n_pad: list[int]) -> Path:
    """Add a split of the given rows (their trailing ``n_pad`` ids EOS padding) to a corpus,
    shard and manifest entry written as the packer writes them."""
    import numpy as np

    from pipeline.shards import ShardMeta, ShardWriter, file_sha256, open_shard

    manifest = json.loads((corpus / "manifest.json").read_text())
    first = manifest["splits"]["validation"]["shards"][0]["path"]
    meta = open_shard(corpus / first)[1]
    meta = ShardMeta(**{**meta.__dict__, "split": split})
    rel = f"{split}/tails_00000.arrow"
    with ShardWriter(corpus / rel, meta) as writer:
        writer.write(np.asarray(rows), "web", np.asarray(n_pad))
    width = meta.seq_len + 1
    manifest["splits"][split] = {
        "documents": sum(int(np.sum(np.asarray(r)[: width - p] == meta.eos_id)) for r, p in zip(rows, n_pad)),
        "tokens": len(rows) * width - sum(n_pad), "rows": len(rows), "pad_tokens": sum(n_pad),
        "tail_tokens": len(rows) * width - sum(n_pad),
        "shards": [{"path": rel, "sha256": file_sha256(corpus / rel), "rows": len(rows)}],
        "tail_segments": [{"task": 0, "source": "web", "shard": rel, "start_token": 0,
                           "length": len(rows) * width - sum(n_pad)}],
    }  # fmt: skip
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return corpus
