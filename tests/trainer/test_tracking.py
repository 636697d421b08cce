"""trainer.tracking against a real MLflow sqlite store, a dead server and non-zero ranks."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest

from trainer import tracking
from trainer.tracking import Tracker, TrackingConfig

PARAMS = {
    "model": {"n_layer": 2, "d_model": 64, "notes": "x" * 7000},
    "optim": {"lr": 2e-4, "betas": [0.9, 0.95]},
    "extra": {f"p{i}": i for i in range(150)},  # more than one 100-param batch
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a healthy store must not warn
def test_sqlite_params_metrics_artifacts_and_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(uri=uri, experiment="unit", run_name="arm-tiny")
    run_dir = tmp_path / "run"
    artifact = tmp_path / "config.yaml"
    artifact.write_text("seed: 3407\n")
    with Tracker(cfg, run_dir) as tr:
        tr.start(PARAMS, tags={"objective": "arm"})
        tr.log_metrics({"train/loss": 2.5, "lr": 1e-4}, step=1)
        tr.log_metrics({"train/loss": 2.0}, step=2)
        tr.log_artifact(artifact)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert (run_dir / "mlflow_tracking_uri").read_text().strip() == uri  # for maskscale eval
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "arm-tiny"
    assert run.data.params["model.n_layer"] == "2" and run.data.params["optim.lr"] == "0.0002"
    assert len(run.data.params["model.notes"]) == 6000 and "extra.p149" in run.data.params
    assert run.data.tags["objective"] == "arm"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 2.5),
        (2, 2.0),
    ]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts live next to the DB, not in cwd

    # resume: same MLflow run, original params kept, new metrics appended
    with pytest.warns(RuntimeWarning, match=r"keeps its original values of \['optim.lr'\]"):
        tr = Tracker(cfg, run_dir)
        tr.start({**PARAMS, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}}, tags={"resumed": 1})
    tr.log_metrics({"train/loss": 1.5}, step=3)
    tr.finish("KILLED")
    assert tr.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.params["optim.lr"] == "0.0002"
    assert run.data.tags["resumed"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


@pytest.fixture
def fresh_http_env(monkeypatch):
    """Unset MLflow's HTTP env vars for the test and restore them afterwards."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "placeholder")  # records the original state for teardown
        monkeypatch.delenv(name)


def test_dead_server_never_raises_and_keeps_every_metric(tmp_path, fresh_http_env):
    import os

    cfg = TrackingConfig(uri="http://127.0.0.1:9", timeout_s=2)  # nothing listens on port 9
    tr = Tracker(cfg, tmp_path / "run")
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.start(PARAMS, tags={"objective": "mdm"})
        for step in range(1, 6):
            tr.log_metrics({"train/loss": 1.0 / step, "tokens": step * 64}, step=step)
        tr.log_artifact(tmp_path)
        tr.finish("FAILED")
    assert time.monotonic() - started < 10
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"
    messages = [str(w.message) for w in caught]
    assert sum("127.0.0.1:9 failed" in m for m in messages) == 1  # warned once
    assert any("10 metric values and 1 artifacts were not uploaded" in m for m in messages)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["train/loss"], r["tokens"]) for r in rows] == [
        (s, 1.0 / s, s * 64.0) for s in range(1, 6)
    ]


def test_backlog_is_synced_when_the_store_comes_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    db_dir = tmp_path / "later"
    db_dir.write_text("")  # a file where the DB's directory should be: the store is "down"
    uri = f"sqlite:///{db_dir}/mlflow.db"
    tr = Tracker(TrackingConfig(uri=uri), tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="failed"):
        tr.start({"seed": 1})
    tr.log_metrics({"loss": 3.0}, step=1)  # within the retry interval: not even attempted
    assert tr.run_id is None and len(tr._backlog) == 1
    db_dir.unlink()
    monkeypatch.setattr(tracking, "RETRY_INTERVAL_S", 0.0)
    tr._retry_at = 0.0
    tr.log_metrics({"loss": 2.0}, step=2)
    tr.finish()
    client = MlflowClient(tracking_uri=uri)
    assert [m.value for m in client.get_metric_history(tr.run_id, "loss")] == [3.0, 2.0]
    assert client.get_run(tr.run_id).data.params == {"seed": "1"}


def test_other_ranks_and_disabled_tracking_touch_no_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    worker = Tracker(TrackingConfig(), tmp_path / "rank1", rank=1)
    worker.start(PARAMS, tags={})
    worker.log_metrics({"loss": 1.0}, step=1)
    worker.log_artifact(tmp_path)
    worker.finish()
    off = Tracker(TrackingConfig(enabled=False), tmp_path / "off")
    off.start(PARAMS)
    off.log_metrics({"loss": 1.0}, step=1)
    off.finish()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "rank1").exists()
    assert read_jsonl(tmp_path / "off" / "metrics.jsonl")[0]["loss"] == 1.0
    assert not (tmp_path / "off" / "mlflow_run_id").exists()
