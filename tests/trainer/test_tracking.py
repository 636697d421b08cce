"""trainer.tracking against a real MLflow sqlite store, a dead server and non-zero ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from pipeline.configlib import ConfigError
from trainer import tracking
from trainer.tracking import Tracker, TrackingConfig

PARAMS = {
    "model": {"n_layer": 2, "d_model": 64, "notes": "x" * 7000},
    "optim": {"lr": 2e-4, "betas": [0.9, 0.95]},
    "extra": {f"p{i}": i for i in range(150)},  # more than one 100-param batch
}


METRICS = "metrics.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the tests that can share it (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a healthy store must not warn
def test_sqlite_params_metrics_artifacts_and_resume(tmp_path, store):
    from mlflow.tracking import MlflowClient

    uri = store
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
    assert (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").is_dir()  # not in cwd

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
    assert all("\n" not in m for m in messages)  # one line each
    assert any("5 lines of" in m and "1 artifacts were not uploaded" in m for m in messages)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["train/loss"], r["tokens"]) for r in rows] == [
        (s, 1.0 / s, s * 64.0) for s in range(1, 6)
    ]


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_backlog_is_synced_mid_run_when_the_store_comes_back(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    db_dir = tmp_path / "later"
    db_dir.write_text("")  # a file where the DB's directory should be: the store is "down"
    uri = f"sqlite:///{db_dir}/mlflow.db"
    tr = Tracker(TrackingConfig(uri=uri, retry_max_s=1), tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="failed"):
        tr.start({"seed": 1})
    started = time.monotonic()
    for step in range(1, 4):
        tr.log_metrics({"loss": 4.0 - step}, step=step)
    assert time.monotonic() - started < 0.5  # logging never waits for the store
    assert tr.run_id is None
    db_dir.unlink()  # the store comes back; the sender notices within the backoff
    wait_for(lambda: (tmp_path / "run" / "mlflow_synced.json").is_file())
    client = MlflowClient(tracking_uri=uri)
    assert [m.value for m in client.get_metric_history(tr.run_id, "loss")] == [3.0, 2.0, 1.0]
    assert "answers again" in caplog.text
    tr.log_metrics({"loss": 0.5}, step=4)
    tr.finish()
    assert [m.step for m in client.get_metric_history(tr.run_id, "loss")] == [1, 2, 3, 4]
    assert client.get_run(tr.run_id).data.params == {"seed": "1"}
    synced = json.loads((tmp_path / "run" / "mlflow_synced.json").read_text())
    assert synced == {"run_id": tr.run_id, "offset": (tmp_path / "run" / METRICS).stat().st_size}


def test_resumed_run_sends_what_its_predecessor_could_not(tmp_path):
    from mlflow.tracking import MlflowClient

    db_dir = tmp_path / "later"
    db_dir.write_text("")
    uri = f"sqlite:///{db_dir}/mlflow.db"
    cfg = TrackingConfig(uri=uri, run_name="lost-and-found")
    first = Tracker(cfg, tmp_path / "run")
    with pytest.warns(RuntimeWarning) as caught:
        first.start({"seed": 1})
        for step in (1, 2):
            first.log_metrics({"loss": 1.0 / step}, step=step)
        (tmp_path / "run" / METRICS).open("a").write("{not json\n")  # a torn line
        first.finish("FAILED")
    assert "2 lines of" not in str(caught[-1].message) and "3 lines of" in str(caught[-1].message)
    db_dir.unlink()
    second = Tracker(cfg, tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="line 3: not a metrics record"):
        second.start({"seed": 1})
    second.log_metrics({"loss": 0.25}, step=3)
    second.finish()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(second.run_id).info.run_name == "lost-and-found"
    history = client.get_metric_history(second.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_run_name_template_and_validation():
    fields = {"objective": "mdm", "model": "tiny-1M", "flops": 2.98e12, "tokens": 5e8}
    fields |= {"N": 1_049_728, "steps": 122, "seed": 3407}
    assert tracking.format_run_name(tracking.DEFAULT_RUN_NAME, fields) == "mdm-tiny-1M-C3e12"
    template = "{objective}-N{N}-D{tokens}-{steps}x-s{seed}-C{flops:.3e}"
    name = tracking.format_run_name(template, fields)
    assert name == "mdm-N1e6-D5e8-122x-s3407-C2.980e+12"
    assert tracking.format_run_name("baseline", fields) == "baseline"
    TrackingConfig(run_name="baseline").validate()
    for bad in ("{family}", "{steps:.2q}", "{model.x}", ""):
        with pytest.raises(ConfigError, match="tracking.run_name"):
            TrackingConfig(run_name=bad).validate()
    with pytest.raises(ConfigError, match="retry_max_s"):
        TrackingConfig(retry_max_s=0.1).validate()


def test_runs_are_named_by_what_they_are_not_by_the_seed(tiny_corpus, tmp_path, store):
    """Two objectives, same seed: distinct, descriptive names from the loop's fields."""
    from mlflow.tracking import MlflowClient

    from trainer.cli import load_train_config
    from trainer.engine import DistInfo
    from trainer.loop import prepare, tracking_params

    uri = store
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    names = {}
    for objective, extra in (("arm", []), ("mdm", []), ("arm", ["tracking.run_name=x-{seed}"])):
        run_dir = tmp_path / f"{objective}{len(extra)}"
        base = [f"corpus={tiny_corpus}", f"run_dir={run_dir}", f"objective={objective}"]
        base += ["model=tiny-1M", "flops=3e12", f"tracking.uri={uri}", "tracking.experiment=names"]
        cfg = load_train_config(None, [*base, *extra])
        with Tracker(cfg.tracking, run_dir) as tr:
            tr.start(*tracking_params(prepare(cfg, dist, None)))
        names[run_dir.name] = MlflowClient(tracking_uri=uri).get_run(tr.run_id).info.run_name
    assert names == {"arm0": "arm-tiny-1M-C3e12", "mdm0": "mdm-tiny-1M-C3e12", "arm1": "x-3407"}


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


# ---------------------------------------------------------------- a real `mlflow server`

REPO = Path(__file__).resolve().parents[2]
SERVER_RUN = [
    "model=tiny-0.3M",
    "model_overrides.n_layer=1",
    "model_overrides.n_head=2",
    "model_overrides.d_model=32",
    "precision=fp32",
    "batch.global_batch=8",
    "batch.micro_batch=8",
    "steps=40",
    "optim.warmup_min=5",
    "log.every=1",
    "eval.every=0",
    "checkpoint.every=0",
    "checkpoint.export=false",
    "tracking.experiment=server",
    "tracking.timeout_s=2",
    "tracking.retry_max_s=1",
]


def last_step(metrics_path: Path) -> int:
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    return max((json.loads(line)["step"] for line in lines), default=0)


def wait_for_step(trainer, metrics_path: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while last_step(metrics_path) < step:
        assert trainer.poll() is None, f"trainer exited early:\n{trainer.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {metrics_path}"
        time.sleep(0.02)


@pytest.mark.slow
def test_training_against_a_server_that_restarts_mid_run(mlflow_server, tmp_path):
    """Train over HTTP; the server stops at step 5 and comes back: nothing lost, nothing twice.

    Training runs on with the server down (5 more steps). While the replacement server
    stops and while the replacement boots (~10 s here) the trainer is paused (SIGSTOP), only
    so that a fast machine cannot finish the run before the server is back; it then resyncs
    while it trains on.
    """
    from mlflow.tracking import MlflowClient

    from .conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus", seq_len=32, splits={"train": 512, "validation": 16})
    run_dir = tmp_path / "run"
    args = [*SERVER_RUN, f"corpus={corpus}", f"run_dir={run_dir}"]
    args.append(f"tracking.uri={mlflow_server.uri}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    cmd = [sys.executable, "-m", "pipeline.cli", "train", *args]
    trainer = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        metrics_path = run_dir / METRICS
        wait_for_step(trainer, metrics_path, 5)
        trainer.send_signal(signal.SIGSTOP)  # stopping the server takes seconds on a busy box
        mlflow_server.stop()
        down_at = last_step(metrics_path)
        trainer.send_signal(signal.SIGCONT)
        wait_for_step(trainer, metrics_path, down_at + 5)  # trains on while the server is down
        trainer.send_signal(signal.SIGSTOP)
        mlflow_server.start()
        trainer.send_signal(signal.SIGCONT)
        out, err = trainer.communicate(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == 0, err[-3000:]
    assert err.count("failed at") == 1 and "answers again" in err  # one warning per outage
    assert "were not uploaded" not in err

    records = read_jsonl(metrics_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("arm-tiny-0.3M-C")
    assert run.data.params["resolved.steps"] == "40" and run.data.tags["family"] == "arm"
    keys = {k for r in records for k in r} - {"step", "time"}
    assert {"loss", "lr", "tokens_per_s", "val/validation/loss"} <= keys
    for key in sorted(keys):
        sent = [(r["step"], r[key]) for r in records if key in r]
        stored = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(stored) == sent, key  # every step once: no gaps, no duplicates
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "eval_rows.json", "loss_curve.png", "summary.json"}
