"""Where eval results go: atomic files on disk first, then the run's MLflow run.

Why: an evaluation interrupted halfway must not leave a truncated JSON that a later
``maskscale eval temporal`` would trust, so every file is written to a temporary name and
renamed into place. MLflow is a copy for browsing: the run's id and tracking URI are read
from the files the trainer's tracker writes into the run directory (``mlflow_run_id``,
``mlflow_tracking_uri``; older runs: the URI of their ``config.yaml`` or
``MLFLOW_TRACKING_URI``), and an unreachable server only costs a warning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from pathlib import Path

import yaml

from trainer.tracking import RUN_ID_FILE, URI_FILE


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_csv_atomic(path: Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def save_figure_atomic(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def mlflow_target(run_dir: Path | None) -> tuple[str, str] | None:
    """(tracking URI, run id) of a training run's MLflow run, or None when it has none."""
    if run_dir is None or not (run_dir / RUN_ID_FILE).is_file():
        return None
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    uri = None
    if (run_dir / URI_FILE).is_file():
        uri = (run_dir / URI_FILE).read_text().strip()
    elif (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        uri = (cfg.get("tracking") or {}).get("uri")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return (uri, run_id) if uri and run_id else None


def log_to_mlflow(
    run_dir: Path | None, metrics: dict[str, float], step: int, artifacts: list[Path] = ()
) -> str | None:
    """Log metrics (and files, under ``eval/``) to the run's MLflow run; returns the run id
    when logged, None when the run has no MLflow run or MLflow failed (with a warning)."""
    target = mlflow_target(run_dir)
    if target is None:
        return None
    uri, run_id = target
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        stamp = int(time.time() * 1000)
        values = [
            Metric(k, float(v), stamp, int(step)) for k, v in metrics.items() if math.isfinite(v)
        ]
        for i in range(0, len(values), 1000):
            client.log_batch(run_id, metrics=values[i : i + 1000])
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="eval")
    except Exception as e:  # results are on disk already; MLflow is a copy
        warnings.warn(
            f"could not log to MLflow run {run_id} at {uri} ({type(e).__name__}: "
            f"{str(e)[:300]}); the results are in {run_dir}/eval",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return run_id
