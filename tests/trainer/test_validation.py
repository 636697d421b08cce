"""Validation rows and the logged training loss, on real Arrow corpora, models and runs.

The sample tests simulate ranks by constructing readers/evaluators with ``rank``/``world``
arguments (the reduction over ranks is a plain sum, done here by hand). The loss-logging tests
train three tiny real runs in this process: per-step losses (log.every=1), the same run logged
every 3 steps (MLflow on sqlite), and that run resumed from its step-4 checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import EVAL_KEY_SEED, EvalSample, iter_eval_batches, mix_keys
from trainer.model import ModelConfig, Transformer
from trainer.objectives import ARMObjective, MDMObjective
from trainer.validation import EVAL_ROWS, Evaluator

from .conftest import make_corpus
from .test_data import read_split
from .test_train import config, metrics

SOURCES = ("arxiv", "book", "code", "web")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """validation: 400 rows in 8 shards, the 4 sources written one after another."""
    root = tmp_path_factory.mktemp("val_corpus") / "corpus"
    splits = {"train": 256, "validation": 400, "holdout_2024": 60}
    return make_corpus(root, splits=splits, sources=SOURCES, rows_per_shard=50, batch_rows=20)


def shard_of(corpus: Path, split: str, rows: np.ndarray) -> np.ndarray:
    manifest = json.loads((corpus / "manifest.json").read_text())
    counts = [s["rows"] for s in manifest["splits"][split]["shards"]]
    return np.searchsorted(np.cumsum(counts), rows, side="right")


def test_sample_spans_every_shard_and_source_and_is_fixed(corpus):
    sample = EvalSample(corpus, "validation", max_rows=40)
    rows = sample.rows
    assert len(rows) == len(set(rows.tolist())) == 40 and np.all(np.diff(rows) > 0)
    assert len(set(shard_of(corpus, "validation", rows).tolist())) >= 6  # of 8 shards
    _, sources = read_split(corpus, "validation")
    assert set(sources[rows]) == set(SOURCES)  # a file-order prefix would hold "arxiv" only
    again = EvalSample(corpus, "validation", max_rows=40)
    np.testing.assert_array_equal(again.rows, rows)  # a function of corpus + max_rows + seed
    assert again.describe() == sample.describe()
    assert not np.array_equal(EvalSample(corpus, "validation", 40, seed=1).rows, rows)
    everything = EvalSample(corpus, "validation", max_rows=None)
    np.testing.assert_array_equal(everything.rows, np.arange(400))
    np.testing.assert_array_equal(EvalSample(corpus, "validation", 10_000).rows, np.arange(400))
    with pytest.raises(ValueError, match="max_rows"):
        EvalSample(corpus, "validation", max_rows=0)


@pytest.mark.parametrize("batch_size", [1, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_read_the_sample_exactly_once_for_any_world_and_batch(corpus, batch_size, world):
    ref, _ = read_split(corpus, "validation")
    want = EvalSample(corpus, "validation", max_rows=45).rows  # world 1, no batch size
    seen = []
    for rank in range(world):
        for tokens, keys, _ in iter_eval_batches(
            corpus, "validation", batch_size, max_rows=45, rank=rank, world_size=world
        ):
            assert len(keys) <= batch_size
            # recover each row's index from its key (keys are a bijection of the row index)
            index = {int(k): r for r, k in zip(want, mix_keys(want, EVAL_KEY_SEED))}
            rows = np.array([index[int(k)] for k in keys])
            np.testing.assert_array_equal(tokens.numpy(), ref[rows])
            seen.extend(rows.tolist())
    assert sorted(seen) == want.tolist() and len(seen) == len(set(seen))


def tiny_model(causal: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=64, seq_len=16)
    return Transformer(cfg, causal=causal).eval()


class CountingARM(ARMObjective):
    """The real ARM objective, counting forward passes (ZeRO-3 needs equal counts per rank)."""

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def eval_token_losses(self, model, tokens, keys, n_samples=1, lengths=None):
        self.forwards += 1
        return super().eval_token_losses(model, tokens, keys, n_samples, lengths)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_run_equal_forwards_and_their_sums_equal_one_process(corpus, world):
    model = tiny_model(causal=True)
    args = (corpus, ["holdout_2024"], 8, 20, 1)  # 20 rows -> 3 batches
    with torch.no_grad():
        one = Evaluator(*args, 0, 1, torch.device("cpu")).split_sums(
            model, ARMObjective(), "holdout_2024"
        )
        sums, rows, forwards = 0.0, 0, []
        for rank in range(world):
            objective = CountingARM()
            ev = Evaluator(*args, rank, world, torch.device("cpu"))
            loss_sum, n = ev.split_sums(model, objective, "holdout_2024")
            sums, rows = sums + loss_sum, rows + n
            forwards.append(objective.forwards)
    assert forwards == [-(-3 // world)] * world  # a rank without a batch still runs one
    assert rows == one[1] == 20 * 16  # scored tokens: 20 rows of T = 16 targets
    assert sums == pytest.approx(one[0], rel=1e-6)


@pytest.mark.parametrize("objective", ["arm", "mdm"])
def test_full_split_mean_equals_the_file_order_mean(corpus, objective):
    """max_rows=None scores every row in file order: the old full-split validation loss."""
    model = tiny_model(causal=objective == "arm")
    obj = ARMObjective() if objective == "arm" else MDMObjective(64)
    ref, _ = read_split(corpus, "holdout_2024")
    rows = np.arange(len(ref))
    with torch.no_grad():
        want = obj.eval_loss(
            model, torch.from_numpy(ref), torch.from_numpy(mix_keys(rows, EVAL_KEY_SEED)), 4
        )
        ev = Evaluator(corpus, ["holdout_2024"], 16, None, 4, 0, 1, torch.device("cpu"))
        loss_sum, n = ev.split_sums(model, obj, "holdout_2024")
    assert n == 60 * 16  # scored tokens
    assert loss_sum / n == pytest.approx(float(want), rel=1e-5)


def test_record_names_the_rows(corpus, tmp_path):
    splits = ["validation", "holdout_2024"]
    ev = Evaluator(corpus, splits, 8, 100, 1, 0, 1, torch.device("cpu"))
    rec = json.loads(ev.write_record(tmp_path).read_text())
    val = rec["splits"]["validation"]
    assert val["row_index"] == EvalSample(corpus, "validation", 100).rows.tolist()
    assert val["split_rows"] == 400 and val["rows"] == 100 and len(val["rows_sha256"]) == 64
    assert "row_index" not in rec["splits"]["holdout_2024"]  # all of its 60 rows
    (tmp_path / "rank1").mkdir()
    other = Evaluator(corpus, splits, 3, 100, 1, 1, 2, torch.device("cpu"))  # batch 3, rank 1/2
    assert rec == json.loads(other.write_record(tmp_path / "rank1").read_text())


# ----------------------------------------------------------------------------- logged loss

STEPS = 8


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """(per-step losses, run logged every 3 steps, its resumption from step 4, MLflow uri)."""
    from trainer.loop import train

    base = tmp_path_factory.mktemp("loss_runs")
    common = [f"steps={STEPS}", "eval.every=0", "eval.max_rows=16"]
    train(config(corpus, base / "every1", *common, "log.every=1", "checkpoint.every=0"))
    uri = f"sqlite:///{base / 'mlflow.db'}"
    logged = [*common, "log.every=3", "checkpoint.every=4"]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        summary = train(
            config(corpus, base / "every3", *logged, "tracking.enabled=true", f"tracking.uri={uri}")
        )
    (base / "every3" / "console.txt").write_text(console.getvalue())
    resume = f"checkpoint.resume={base / 'every3/checkpoints/step00000004'}"
    train(config(corpus, base / "resumed", *logged, resume))
    return base, summary, uri


def test_logged_loss_is_the_interval_mean_with_the_last_step_kept(runs):
    base, summary, uri = runs
    per_step = {s: r["loss"] for s, r in metrics(base / "every1").items() if "loss" in r}
    assert sorted(per_step) == list(range(1, STEPS + 1))
    rec = metrics(base / "every3")
    windows = {3: [1, 2, 3], 6: [4, 5, 6], 8: [7, 8]}  # the last step always logs
    assert sorted(s for s in rec if "loss" in rec[s]) == sorted(windows)
    for step, window in windows.items():
        want = sum(per_step[s] for s in window) / len(window)
        assert rec[step]["loss"] == pytest.approx(want, abs=1e-6), step
        assert rec[step]["loss_last"] == pytest.approx(per_step[step], abs=1e-6), step
    assert rec[3]["loss"] != pytest.approx(rec[3]["loss_last"], abs=1e-6)  # not trivially equal
    assert summary["final_loss"] == rec[STEPS]["loss"]
    assert summary["final_loss_steps"] == [7, STEPS]
    assert summary["final_loss_last_step"] == rec[STEPS]["loss_last"]
    assert "mean" in summary["final_loss_is"]
    console = (base / "every3" / "console.txt").read_text()
    line = next(x for x in console.splitlines() if f"step 3/{STEPS} " in x)
    assert f"loss={rec[3]['loss']:.4g} loss_last={rec[3]['loss_last']:.4g}" in line

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    history = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "loss")}
    assert history == pytest.approx({s: rec[s]["loss"] for s in windows})
    last = client.get_metric_history(summary["mlflow_run_id"], "loss_last")
    assert {m.step: m.value for m in last} == pytest.approx({s: per_step[s] for s in windows})


def test_resume_continues_the_open_logging_interval(runs):
    """Checkpoint at step 4 holds step 4's loss: the resumed run logs mean(4, 5, 6) at step 6."""
    base = runs[0]
    want, got = metrics(base / "every3"), metrics(base / "resumed")
    assert sorted(s for s in got if "loss" in got[s]) == [6, 8]
    for step in (6, 8):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step


def test_run_records_its_validation_rows(runs, corpus):
    base, summary, uri = runs
    rec = json.loads((base / "every3" / EVAL_ROWS).read_text())
    assert (
        rec["splits"]["validation"]["row_index"]
        == EvalSample(corpus, "validation", 16).rows.tolist()
    )
    assert rec == json.loads((base / "every1" / EVAL_ROWS).read_text())

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"])
    digest = rec["splits"]["validation"]["rows_sha256"]
    assert run.data.params["eval_sample.validation.rows_sha256"] == digest
    names = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id)}
    assert EVAL_ROWS in names
