"""maskscale eval ppl: row sampling, exact ARM / ELBO MDM numbers, outputs, MLflow, torchrun."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from eval.measure.loading import load_model
from eval.measure.resample import interval, ratio_samples
from eval.measure.rows import RowReader, SplitLayout, sample_rows
from pipeline.shards import MANIFEST
from tests.eval.conftest import ROOT, ROWS_PER_SHARD, copy_run, run_cli
from trainer.checkpoint import load_export
from trainer.data import EVAL_KEY_SEED, _SplitReader, mix_keys
from trainer.objectives import MDMObjective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(corpus):
    return json.loads((corpus / MANIFEST).read_text())


def _ppl(run, split=None):
    data = json.loads((run / "eval" / "ppl.json").read_text())
    return data if split is None else data["splits"][split]


def _rows_by_hand(corpus, split, index):
    """The rows, read with plain pyarrow (no eval code): file order over manifest shards."""
    rows = []
    for shard in _manifest(corpus)["splits"][split]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(corpus / shard["path"]))).read_all()
        rows += table.column("input_ids").to_pylist()
    return torch.tensor([rows[i] for i in index], dtype=torch.long)


def test_row_sample_is_seeded_spans_shards_and_is_not_a_prefix(eval_runs):
    layout = SplitLayout.from_manifest(eval_runs.corpus, _manifest(eval_runs.corpus), "validation")
    assert layout.rows == 100 and len(layout.shards) == 5
    rows = sample_rows(layout.rows, 24, seed=0, split="validation")
    assert len(set(rows.tolist())) == 24 and list(rows) == sorted(rows)
    assert list(rows) != list(range(24))
    assert len(np.unique(rows // ROWS_PER_SHARD)) >= 4  # spread over the shards
    assert np.array_equal(rows, sample_rows(100, 24, seed=0, split="validation"))
    assert not np.array_equal(rows, sample_rows(100, 24, seed=1, split="validation"))
    assert not np.array_equal(rows, sample_rows(100, 24, seed=0, split="holdout_2021"))
    assert np.array_equal(sample_rows(100, None, 0, "validation"), np.arange(100))
    # the streamed reader returns the rows the trainer's reader (same numbering) returns
    sha = _manifest(eval_runs.corpus)["tokenizer"]["sha256"]
    reader = RowReader(layout, sha)
    got = np.concatenate([reader.gather(rows[:9])[0], reader.gather(rows[9:])[0]])
    reader.close()
    assert np.array_equal(got, _SplitReader(eval_runs.corpus, "validation").gather(rows)[0])


def test_arm_ppl_equals_hand_computation_on_the_sampled_rows(eval_runs, tmp_path, capsys):
    run = copy_run(eval_runs.arm, tmp_path / "arm")
    code, out, _ = run_cli(capsys, "eval", "ppl", run, "--rows", "24", "--batch-size", "5")
    assert code == 0
    for split in ("validation", "holdout_2021", "holdout_2023", "holdout_recent"):
        assert split in out
    res = _ppl(run, "holdout_recent")
    index = res["row_index"]
    assert res["rows"] == 24 and res["shards"] >= 3 and index != list(range(24))
    model, _ = load_export(run / "export")
    tokens = _rows_by_hand(eval_runs.corpus, "holdout_recent", index)
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[:, :-1]).double(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    assert res["row_loss"] == pytest.approx(nll.mean(1).tolist(), rel=1e-5)
    assert res["loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    assert res["ppl"] == pytest.approx(np.exp(nll.mean().item()), rel=1e-6)
    assert res["loss_ci"][0] < res["loss"] < res["loss_ci"][1]
    assert res["ppl_ci"] == pytest.approx(np.exp(res["loss_ci"]).tolist())


def test_mdm_ppl_is_deterministic_and_equals_the_trainers_eval_loss(eval_runs, tmp_path, capsys):
    run = copy_run(eval_runs.mdm, tmp_path / "mdm")
    args = ["eval", "ppl", run, "--rows", "20", "--mc-samples", "6", "--splits", "validation"]
    assert run_cli(capsys, *args)[0] == 0
    first = _ppl(run, "validation")
    assert run_cli(capsys, *args, "--batch-size", "3")[0] == 0
    again = _ppl(run, "validation")
    assert again["row_index"] == first["row_index"]
    assert again["row_loss"] == pytest.approx(first["row_loss"], rel=1e-6)
    assert again["loss_ci"] == pytest.approx(first["loss_ci"], rel=1e-6)
    loaded = load_model(run)
    rows = np.array(first["row_index"])
    tokens = _rows_by_hand(eval_runs.corpus, "validation", rows)
    keys = torch.from_numpy(mix_keys(rows, EVAL_KEY_SEED))
    objective = MDMObjective(loaded.mask_id, eps=loaded.mdm_eps)
    expected = objective.eval_loss(loaded.model, tokens, keys, n_samples=6)
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert run_cli(capsys, *args, "--seed", "1")[0] == 0
    assert _ppl(run, "validation")["row_index"] != first["row_index"]


def test_mdm_ppl_agrees_with_training_time_validation(eval_runs, tmp_path, capsys):
    """The trainer validated a 32-row sample with 4 samples: same rows, same number."""
    run = copy_run(eval_runs.mdm, tmp_path / "mdm")
    argv = ["eval", "ppl", run, "--rows", "32", "--mc-samples", "4", "--splits", "validation"]
    assert run_cli(capsys, *argv)[0] == 0
    res = _ppl(run, "validation")
    validated = json.loads((run / "eval_rows.json").read_text())["splits"]["validation"]
    assert res["row_index"] == validated["row_index"]  # --rows 32 (default seed) = eval.max_rows
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r["val/validation/loss"] for r in records if "val/validation/loss" in r][-1]
    assert res["loss"] == pytest.approx(trained, rel=1e-5)


def test_outputs_csv_json_and_mlflow_metrics(eval_runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run = copy_run(eval_runs.arm, tmp_path / "arm")
    assert run_cli(capsys, "eval", "ppl", run, "--rows", "16", "--splits", "validation")[0] == 0
    assert run_cli(capsys, "eval", "ppl", run, "--rows", "16", "--splits", "holdout_2023")[0] == 0
    data = _ppl(run)
    assert set(data["splits"]) == {"validation", "holdout_2023"}  # same settings: merged
    assert data["family"] == "arm" and data["estimator"] == "exact" and data["step"] == 20
    assert data["settings"]["rows"] == 16 and data["settings"]["mc_samples"] is None
    with open(run / "eval" / "ppl.csv") as f:
        table = {r["split"]: r for r in csv.DictReader(f)}
    assert float(table["holdout_2023"]["loss"]) == pytest.approx(
        data["splits"]["holdout_2023"]["loss"]
    )
    assert not list((run / "eval").glob(".*tmp*"))
    assert (run / "mlflow_tracking_uri").read_text().strip() == eval_runs.mlflow_uri
    client = MlflowClient(eval_runs.mlflow_uri)
    run_id = (run / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "eval/holdout_2023/loss")
    assert history[-1].value == pytest.approx(data["splits"]["holdout_2023"]["loss"])
    assert history[-1].step == 20
    for key in ("ppl", "loss_lo", "loss_hi", "ppl_lo", "ppl_hi"):
        assert client.get_metric_history(run_id, f"eval/validation/{key}")
    assert {a.path for a in client.list_artifacts(run_id, "eval")} >= {
        "eval/ppl.json",
        "eval/ppl.csv",
    }


def test_checkpoint_results_go_to_their_own_folder(eval_runs, tmp_path, capsys):
    run = copy_run(eval_runs.mdm, tmp_path / "mdm", checkpoints=True)
    argv = ["eval", "ppl", run, "--checkpoint", "10", "--rows", "8", "--mc-samples", "2"]
    assert run_cli(capsys, *argv, "--splits", "validation")[0] == 0
    res = json.loads((run / "eval" / "step00000010" / "ppl.json").read_text())
    assert res["step"] == 10 and res["run"] == "mdm@step00000010"
    assert not (run / "eval" / "ppl.json").exists()


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = np.random.default_rng(0).normal(3.0, 1.0, size=400)
    ones = np.ones(400)
    a = interval(ratio_samples(values, ones, 500, [0, 1]))
    assert a == interval(ratio_samples(values, ones, 500, [0, 1]))
    assert a[0] < values.mean() < a[1]
    half = 1.96 * values.std() / np.sqrt(len(values))
    assert (a[1] - a[0]) / 2 == pytest.approx(half, rel=0.15)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(eval_runs, tmp_path, capsys):
    one = copy_run(eval_runs.mdm, tmp_path / "one")
    two = copy_run(eval_runs.mdm, tmp_path / "two")
    args = ["--rows", "22", "--mc-samples", "3", "--batch-size", "4", "--device", "cpu"]
    assert run_cli(capsys, "eval", "ppl", one, *args)[0] == 0
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           f"--master_port={free_port()}", "-m", "pipeline.cli", "eval", "ppl", str(two), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("holdout_recent") == 1  # only rank 0 prints the table
    a, b = _ppl(one)["splits"], _ppl(two)["splits"]
    assert a.keys() == b.keys()
    for split in a:
        assert a[split]["row_index"] == b[split]["row_index"]
        assert a[split]["row_loss"] == b[split]["row_loss"], split  # identical, not just close
        assert a[split]["loss_ci"] == b[split]["loss_ci"]


def _one_document_corpus(eval_runs, tmp_path):
    """The runs' corpus plus ``holdout_one``: one row holding one 24-token document, its EOS
    and 8 ids of EOS padding."""
    import shutil

    from tests.eval.conftest import add_split

    corpus = shutil.copytree(eval_runs.corpus, tmp_path / "corpus")
    eos = _manifest(corpus)["tokenizer"]["eos_id"]
    text = [(3 + 5 * i) % 60 + 2 for i in range(24)]  # ids >= 2: no EOS inside
    assert eos not in text
    return add_split(corpus, "holdout_one", [text + [eos] * 9], [8]), text, eos


def test_a_one_document_holdout_scores_its_real_tokens_only(eval_runs, tmp_path, capsys):
    corpus, text, eos = _one_document_corpus(eval_runs, tmp_path)
    run = copy_run(eval_runs.arm, tmp_path / "arm")
    code, out, _ = run_cli(capsys, "eval", "ppl", run, "--corpus", corpus, "--splits",
                           "holdout_one", "validation")  # fmt: skip
    assert code == 0
    res = _ppl(run, "holdout_one")
    model, _ = load_export(run / "export")
    row = torch.tensor([text + [eos] * 9])
    with torch.no_grad():
        logp = F.log_softmax(model(row[:, :-1]).double(), dim=-1)
    nll = -logp.gather(-1, row[:, 1:, None])[0, :, 0]
    assert res["loss"] == pytest.approx(nll[:24].mean().item(), rel=1e-6)  # 23 words + its EOS
    assert res["loss"] != pytest.approx(nll.mean().item(), rel=1e-3)  # what padding would give
    assert (res["rows"], res["documents"], res["tokens"]) == (1, 1, 24)
    assert res["loss_ci"] is None and res["no_interval"] == "too few documents (1 < 5)"
    assert "(none*)" in out and "too few documents" in out
    val = _ppl(run, "validation")
    assert val["documents"] >= 5 and val["loss_ci"][0] < val["loss"] < val["loss_ci"][1]
    # the interval is the bootstrap over the documents recorded beside it
    from eval.measure.rows import split_seed

    again = interval(ratio_samples(np.array(val["doc_loss_sum"]), np.array(val["doc_tokens"]),
                                   1000, split_seed(0, "validation", "boot")))  # fmt: skip
    assert again == pytest.approx(val["loss_ci"])
    # rows holding several documents are split exactly: the pieces add up
    assert sum(val["doc_loss_sum"]) == pytest.approx(sum(val["row_loss_sum"]), rel=1e-9)
    assert sum(val["doc_tokens"]) == sum(val["row_tokens"]) == val["tokens"]
    assert "bootstrap resamples over documents" in val["interval"]
