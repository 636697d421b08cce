"""Experiment tracking: MLflow from rank 0, with a local metrics.jsonl that is never lost.

Why: a multi-day pretraining run must not die because a tracking server restarted, and its
numbers must not vanish either. So every metric is first appended to ``run_dir/metrics.jsonl``
and only then sent to MLflow. If MLflow fails, the tracker warns once, keeps the unsent
metrics (and artifacts) in a backlog, retries at most every ``RETRY_INTERVAL_S`` seconds and
flushes the backlog when MLflow answers again (and once more in ``finish``). HTTP retries
inside MLflow are turned off and its timeout shortened (unless the user set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``) so a dead server costs
milliseconds, not minutes of exponential backoff per step.

Only rank 0 talks to MLflow (two ranks creating one sqlite DB race and crash); every other rank
gets a tracker whose methods do nothing. The MLflow run id is stored in ``run_dir/mlflow_run_id``
(and the resolved tracking URI in ``run_dir/mlflow_tracking_uri``) so a resumed training run
continues the same MLflow run and ``maskscale eval`` can add its metrics to it. Params are the flattened resolved
config, logged in batches of 100 with values cut to MLflow's 6000-character limit. For a
sqlite store, new experiments keep their artifacts in ``mlartifacts/`` next to the DB file
(instead of MLflow's default of the current directory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.configlib import ConfigError, flatten

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 60.0
"""After a failure, MLflow is retried at most this often (metrics keep going to the jsonl)."""

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_BACKLOG = 200_000
"""Unsent metric values kept in memory while MLflow is down (the jsonl keeps all of them)."""

RUN_ID_FILE = "mlflow_run_id"
URI_FILE = "mlflow_tracking_uri"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrackingConfig:
    """Where and how a run is tracked in MLflow."""

    uri: str | None = None
    """MLflow tracking URI; None -> env MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the
    current directory (made absolute)."""
    experiment: str = "maskscale"
    """MLflow experiment name (created if missing)."""
    run_name: str | None = None
    """MLflow run name; None lets MLflow pick one."""
    enabled: bool = True
    """False: no MLflow at all (metrics.jsonl is still written)."""
    timeout_s: float = 5.0
    """HTTP timeout for one MLflow request (used unless MLFLOW_HTTP_REQUEST_TIMEOUT is set)."""

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty (e.g. maskscale)")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"tracking.timeout_s must be > 0 seconds, got {self.timeout_s}")


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI the run will use; relative sqlite paths become absolute."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            uri = f"sqlite:///{path.resolve()}"
    return uri


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - 3] + "..."
    return text


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Tracker:
    """Logs params, metrics and artifacts of one training run (see the module docstring)."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, rank: int = 0):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self.use_mlflow = self.active and cfg.enabled
        self.uri = resolve_uri(cfg) if self.use_mlflow else None
        self.run_id: str | None = None
        self._client = None
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._backlog: list = []  # mlflow.entities.Metric not yet sent
        self._artifacts: list[Path] = []
        self._retry_at = 0.0
        self._failing = False
        self._warned = False
        self._finished = False
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    # ------------------------------------------------------------------ public API

    def start(self, params: dict, tags: dict | None = None) -> None:
        """Create (or resume) the MLflow run and log the flattened ``params`` and ``tags``."""
        if not self.use_mlflow:
            return
        self._params = {k: _param_value(v) for k, v in flatten(params).items()}
        self._tags = {str(k): str(v)[:MAX_TAG_LENGTH] for k, v in (tags or {}).items()}
        self._sync()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append to metrics.jsonl, then send to MLflow (or keep for later if it is down)."""
        if not self.active:
            return
        now = time.time()
        values = {str(k): float(v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": now, **values}) + "\n")
        if not self.use_mlflow:
            return
        from mlflow.entities import Metric

        stamp = int(now * 1000)
        self._backlog.extend(Metric(k, v, stamp, int(step)) for k, v in values.items())
        del self._backlog[:-MAX_BACKLOG]
        self._sync_if_due()

    def log_artifact(self, path: str | Path) -> None:
        """Upload a file or directory to the run (retried later if MLflow is down)."""
        if not self.use_mlflow:
            return
        self._artifacts.append(Path(path))
        self._sync_if_due()

    def finish(self, status: str = "FINISHED") -> None:
        """Flush the backlog and close the MLflow run with ``status`` (FINISHED/FAILED/KILLED)."""
        if not self.use_mlflow or self._finished:
            return
        self._finished = True
        if self._sync() and self.run_id:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:  # tracking must never stop training
                self._fail(e)
        if self._backlog or self._artifacts:
            warnings.warn(
                f"MLflow at {self.uri} stayed unreachable: {len(self._backlog)} metric values "
                f"and {len(self._artifacts)} artifacts were not uploaded; all metrics are in "
                f"{self.metrics_path}",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    # ------------------------------------------------------------------ MLflow plumbing

    def _sync_if_due(self) -> None:
        if time.monotonic() >= self._retry_at:
            self._sync()

    def _sync(self) -> bool:
        """Bring MLflow up to date; False (after a warning) if it failed."""
        try:
            self._ensure_run()
            self._flush_metrics()
            while self._artifacts:
                path = self._artifacts[0]
                if path.is_dir():
                    self._client.log_artifacts(self.run_id, str(path), path.name)
                else:
                    self._client.log_artifact(self.run_id, str(path))
                self._artifacts.pop(0)
        except Exception as e:  # tracking must never stop training
            self._fail(e)
            return False
        if self._failing:
            log.warning("MLflow at %s is reachable again; backlog synced", self.uri)
        self._failing = False
        return True

    def _flush_metrics(self) -> None:
        from mlflow.exceptions import MlflowException

        for chunk in _chunks(list(self._backlog), MAX_METRICS_PER_BATCH):
            try:
                self._client.log_batch(self.run_id, metrics=chunk)
            except MlflowException as e:
                if e.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                # MLflow rejects these values for good: drop them (they stay in the jsonl)
                warnings.warn(f"MLflow rejected metrics: {e}", RuntimeWarning, stacklevel=5)
            del self._backlog[: len(chunk)]

    def _fail(self, error: Exception) -> None:
        self._failing = True
        self._retry_at = time.monotonic() + RETRY_INTERVAL_S
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"MLflow at {self.uri} failed ({type(error).__name__}: {str(error)[:300]}); "
                f"training continues, metrics go to {self.metrics_path} and are sent to MLflow "
                f"when it answers again",
                RuntimeWarning,
                stacklevel=4,
            )

    def _ensure_run(self) -> None:
        if self._client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(self.cfg.timeout_s)))
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is None:
            self.run_id = self._resume_run() or self._create_run()
            (self.run_dir / URI_FILE).write_text(self.uri + "\n")
        if self._params:
            self._log_params()
        if self._tags:
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in self._tags.items()]
            for chunk in _chunks(tags, MAX_PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=chunk)
            self._tags = {}

    def _resume_run(self) -> str | None:
        id_file = self.run_dir / RUN_ID_FILE
        if not id_file.is_file():
            return None
        from mlflow.exceptions import MlflowException

        run_id = id_file.read_text().strip()
        try:
            self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            warnings.warn(
                f"{id_file} names MLflow run {run_id}, which {self.uri} does not know; "
                "starting a new MLflow run",
                RuntimeWarning,
                stacklevel=5,
            )
            return None
        self._client.update_run(run_id, status="RUNNING")
        return run_id

    def _create_run(self) -> str:
        experiment = self._client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
            experiment_id = self._client.create_experiment(self.cfg.experiment, location)
        run = self._client.create_run(experiment_id, run_name=self.cfg.run_name)
        (self.run_dir / RUN_ID_FILE).write_text(run.info.run_id + "\n")
        return run.info.run_id

    def _log_params(self) -> None:
        """Log params not yet on the run; a resumed run keeps its original values."""
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in self._params.items() if k in existing and existing[k] != v)
        if changed:
            warnings.warn(
                f"resumed MLflow run {self.run_id} keeps its original values of {changed} "
                "(MLflow params cannot change)",
                RuntimeWarning,
                stacklevel=5,
            )
        new = [Param(k, v) for k, v in self._params.items() if k not in existing]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
        self._params = {}
