"""Experiment tracking: MLflow from rank 0, fed from a local metrics.jsonl that is never lost.

Why: a multi-day pretraining run must not die, or even wait, because a team's tracking
server restarted, and its numbers must not vanish either. So ``log_metrics`` only appends a
line to ``run_dir/metrics.jsonl`` and wakes a background sender thread; the training loop
never waits for the network. The sender uploads every line past the last acknowledged byte
offset (kept in ``run_dir/mlflow_synced.json``) and moves that offset only after MLflow
answered. When MLflow fails it warns once per outage (one line), retries with exponential
backoff (1 s doubling up to ``tracking.retry_max_s``), and on recovery sends everything not yet
acknowledged, in order; a resumed run (even after ``kill -9``) sends what its predecessor
could not. A lost answer can make it resend a batch: identical values (same key, step and
timestamp) are stored once by MLflow's SQL stores, so the server ends with no gaps and no
duplicates. HTTP retries inside MLflow are turned off and its timeout shortened (unless the
user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``), so a dead
server costs ``finish`` seconds, not the client's default minutes of backoff per request.

Only rank 0 talks to MLflow (two ranks creating one sqlite DB race and crash); every other rank
gets a tracker whose methods do nothing. The MLflow run id is stored in ``run_dir/mlflow_run_id``
(and the resolved tracking URI in ``run_dir/mlflow_tracking_uri``) so a resumed training run
continues the same MLflow run and ``maskscale eval`` can add its metrics to it. Params are the
flattened resolved config, logged in batches of 100 with values cut to MLflow's 6000-character
limit. Runs are named from ``tracking.run_name``, a template such as the default
``{objective}-{model}-C{flops}`` -> ``mdm-tiny-1M-C3e12``, so runs are told apart in the UI (a
seeded run would otherwise get the same random MLflow name as every other run with that seed).
For a sqlite store, new experiments keep their artifacts in ``mlartifacts/`` next to the DB
file (instead of MLflow's default of the current directory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.configlib import ConfigError, flatten

log = logging.getLogger(__name__)

RETRY_MIN_S = 1.0
"""First wait after a failure; it doubles per failure up to ``TrackingConfig.retry_max_s``."""

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000

RUN_ID_FILE = "mlflow_run_id"
URI_FILE = "mlflow_tracking_uri"
METRICS_FILE = "metrics.jsonl"
SYNCED_FILE = "mlflow_synced.json"
"""{"run_id": ..., "offset": bytes of metrics.jsonl the MLflow run has acknowledged}."""

DEFAULT_RUN_NAME = "{objective}-{model}-C{flops}"
NAME_FIELDS = {
    "objective": "arm",
    "model": "170M",
    "flops": 6e18,
    "tokens": 4.2e9,
    "N": 1.7e8,
    "steps": 1000,
    "seed": 3407,
}
"""Fields a ``tracking.run_name`` template may use (with example values, for validation)."""


@dataclass
class TrackingConfig:
    """Where and how a run is tracked in MLflow."""

    uri: str | None = None
    """MLflow tracking URI, e.g. http://mlflow.lab:5000 for a team server; None -> env
    MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current directory (made absolute)."""
    experiment: str = "maskscale"
    """MLflow experiment name (created if missing)."""
    run_name: str = DEFAULT_RUN_NAME
    """Name of a new MLflow run: a literal, or a template over {objective} {model} {flops}
    {tokens} {N} {steps} {seed}. Numbers print compactly (flops=3e12 -> 3e12) unless given a
    format spec ({flops:.3e}). A resumed run keeps its name."""
    enabled: bool = True
    """False: no MLflow at all (metrics.jsonl is still written)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags of the run, e.g. {sweep: iso1, sweep.C: 1e19} (``maskscale sweep plan``
    sets them); they add to the trainer's own tags (family, model, N, C) and win on a clash."""
    timeout_s: float = 5.0
    """HTTP timeout for one MLflow request (used unless MLFLOW_HTTP_REQUEST_TIMEOUT is set)."""
    retry_max_s: float = 60.0
    """Longest wait between two attempts while MLflow is down (the wait starts at 1 s and
    doubles). Only the background sender waits; training goes on."""

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty (e.g. maskscale)")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"tracking.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if not (self.retry_max_s >= RETRY_MIN_S and math.isfinite(self.retry_max_s)):
            raise ConfigError(
                f"tracking.retry_max_s must be >= {RETRY_MIN_S} seconds, got {self.retry_max_s}"
            )
        if not self.run_name:
            raise ConfigError(f"tracking.run_name must not be empty (e.g. {DEFAULT_RUN_NAME})")
        try:
            format_run_name(self.run_name, NAME_FIELDS)
        except (KeyError, ValueError, IndexError, AttributeError) as e:
            raise ConfigError(
                f"tracking.run_name {self.run_name!r} is not a valid template "
                f"({type(e).__name__}: {e}); use a literal name or the fields "
                + " ".join(f"{{{k}}}" for k in NAME_FIELDS)
            ) from None


class _Compact(float):
    """A number that prints as 3e12 / 1.2e18 / 512 without a format spec."""

    def __format__(self, spec: str) -> str:
        if spec:
            return format(float(self), spec)
        if self == int(self) and abs(self) < 10_000:
            return str(int(self))
        mantissa, _, exponent = f"{float(self):.2g}".partition("e")
        return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def format_run_name(template: str, fields: dict[str, Any]) -> str:
    """``template`` with ``fields`` filled in; flops, tokens and N print compactly."""
    values = {k: _Compact(v) if k in ("flops", "tokens", "N") else v for k, v in fields.items()}
    return template.format(**values)


def _template_fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


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


def _warn(text: str) -> None:
    """A RuntimeWarning (often raised in the sender thread, where no caller line helps)."""
    warnings.warn(text, RuntimeWarning, stacklevel=3)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 240:  # keep the head (what failed) and the tail (the root cause)
        text = f"{text[:130]} ... {text[-100:]}"
    return f"{type(error).__name__}: {text}"


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
        self._run_name: str | None = None
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[Path] = []  # not yet uploaded, oldest first
        self._acked = 0  # bytes of metrics.jsonl the MLflow run has acknowledged
        self._lock = threading.Lock()  # one sync at a time (sender thread or finish)
        self._wake = threading.Event()  # set when there is something to send
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._retry_at = 0.0
        self._delay = RETRY_MIN_S
        self._down_since: float | None = None
        self._finished = False
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    # ------------------------------------------------------------------ public API

    def start(
        self, params: dict, tags: dict | None = None, name_fields: dict | None = None
    ) -> None:
        """Create (or resume) the MLflow run and log the flattened ``params`` and ``tags``.

        ``name_fields`` fill the ``tracking.run_name`` template (see NAME_FIELDS); without
        the fields a template needs, MLflow picks the name. The first attempt runs here (one
        request per item, each bounded by ``timeout_s``); later ones in the sender thread.
        """
        if not self.use_mlflow:
            return
        template = self.cfg.run_name
        if _template_fields(template) <= set(name_fields or {}):
            self._run_name = format_run_name(template, name_fields or {})
        self._params = {k: _param_value(v) for k, v in flatten(params).items()}
        self._tags = {str(k): str(v)[:MAX_TAG_LENGTH] for k, v in (tags or {}).items()}
        with self._lock:
            self._sync()
        self._start_sender()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append to metrics.jsonl; the sender thread uploads it (never blocks on MLflow)."""
        if not self.active:
            return
        values = {str(k): float(v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        if self.use_mlflow:
            self._start_sender()
            self._wake.set()

    def log_artifact(self, path: str | Path) -> None:
        """Upload a file or directory to the run (retried later if MLflow is down)."""
        if not self.use_mlflow:
            return
        self._artifacts.append(Path(path))  # no lock: a sync may be waiting on the network
        self._start_sender()
        self._wake.set()

    def finish(self, status: str = "FINISHED") -> None:
        """Stop the sender, send what is left and close the MLflow run with ``status``.

        If MLflow is still down, warns with what stayed behind: it is sent when this run_dir
        is trained again (resumed).
        """
        if not self.use_mlflow or self._finished:
            return
        self._finished = True
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
        with self._lock:
            if self._sync() and self.run_id:
                try:
                    self._client.set_terminated(self.run_id, status=status)
                except Exception as e:  # tracking must never stop training
                    self._fail(e)
        unsent = self._unsent_lines()
        if unsent or self._artifacts:
            warnings.warn(
                f"MLflow at {self.uri} stayed unreachable: {unsent} lines of {self.metrics_path} "
                f"and {len(self._artifacts)} artifacts were not uploaded; they are sent when "
                "this run_dir is resumed with the server up",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    # ------------------------------------------------------------------ sender thread

    def _start_sender(self) -> None:
        if self._sender is None and not self._finished:
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender")
            self._sender.daemon = True  # a crashed run must still exit; the jsonl keeps all
            self._sender.start()

    def _send_loop(self) -> None:
        """Sync whenever woken, but not before the backoff after a failure has passed."""
        while not self._stop.is_set():
            self._wake.wait()
            wait = self._retry_at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                ok = self._sync()
            if not ok:
                self._wake.set()  # try again after the backoff

    # ------------------------------------------------------------------ MLflow plumbing

    def _sync(self) -> bool:
        """Bring MLflow up to date (caller holds the lock); False (warned) if it failed."""
        try:
            self._ensure_run()
            self._flush_metrics()
            while self._artifacts:
                path = self._artifacts[0]
                if path.is_dir():
                    self._client.log_artifacts(self.run_id, str(path), path.name)
                elif path.exists():
                    self._client.log_artifact(self.run_id, str(path))
                else:
                    _warn(f"artifact {path} vanished before upload; not uploaded")
                self._artifacts.pop(0)
        except Exception as e:  # tracking must never stop training
            self._fail(e)
            return False
        if self._down_since is not None:
            log.warning(
                "MLflow at %s answers again after %.0f s; metrics held back meanwhile are sent",
                self.uri,
                time.monotonic() - self._down_since,
            )
        self._down_since, self._delay = None, RETRY_MIN_S
        return True

    def _fail(self, error: Exception) -> None:
        """Schedule the next attempt; warn (one line) when an outage begins."""
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.cfg.retry_max_s)
        if self._down_since is None:
            self._down_since = time.monotonic()
            warnings.warn(
                f"MLflow at {self.uri} failed at {time.strftime('%H:%M:%S')} ({_one_line(error)}); "
                f"training continues, metrics go to {self.metrics_path} and are sent when "
                f"MLflow answers again (retrying every <= {self.cfg.retry_max_s:g} s)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _flush_metrics(self) -> None:
        """Send every complete line of metrics.jsonl past the acknowledged offset, in order."""
        path = self.metrics_path
        if not path.is_file():
            return
        if path.stat().st_size < self._acked:
            _warn(f"{path} shrank; sending it to MLflow again from the start")
            self._ack(0)
        batch, end = [], self._acked
        with path.open("rb") as f:
            f.seek(self._acked)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a line still being written: next time
                batch.extend(self._parse_line(raw, end))
                end += len(raw)
                if len(batch) >= MAX_METRICS_PER_BATCH:
                    self._send_metrics(batch, end)
                    batch = []
        if end != self._acked:
            self._send_metrics(batch, end)

    def _parse_line(self, raw: bytes, offset: int) -> list:
        from mlflow.entities import Metric

        try:
            rec = json.loads(raw)
            step, stamp = int(rec.pop("step")), int(float(rec.pop("time")) * 1000)
            return [Metric(str(k), float(v), stamp, step) for k, v in rec.items()]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            with self.metrics_path.open("rb") as f:
                line = 1 + f.read(offset).count(b"\n")
            _warn(
                f"{self.metrics_path} line {line}: not a metrics record ({_one_line(e)}); "
                "skipped for MLflow (the file is left as it is)"
            )
            return []

    def _send_metrics(self, metrics: list, end: int) -> None:
        from mlflow.exceptions import MlflowException

        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            try:
                self._client.log_batch(self.run_id, metrics=chunk)
            except MlflowException as e:
                if e.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                # MLflow rejects these values for good: skip them (they stay in the jsonl)
                _warn(f"MLflow rejected metrics: {_one_line(e)}")
        self._ack(end)

    def _ack(self, offset: int) -> None:
        self._acked = offset
        tmp = self.run_dir / (SYNCED_FILE + ".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "offset": offset}) + "\n")
        os.replace(tmp, self.run_dir / SYNCED_FILE)

    def _load_ack(self) -> int:
        """The acknowledged offset of this MLflow run (0 for a new run or another run's)."""
        try:
            saved = json.loads((self.run_dir / SYNCED_FILE).read_text())
            return int(saved["offset"]) if saved.get("run_id") == self.run_id else 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    def _unsent_lines(self) -> int:
        if not self.metrics_path.is_file():
            return 0
        with self.metrics_path.open("rb") as f:
            f.seek(self._acked)
            return f.read().count(b"\n")

    def _ensure_run(self) -> None:
        if self._client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(self.cfg.timeout_s)))
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is None:
            run_id = self._resume_run() or self._create_run()
            (self.run_dir / URI_FILE).write_text(self.uri + "\n")
            self.run_id = run_id
            self._acked = self._load_ack()
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
        run = self._client.create_run(experiment_id, run_name=self._run_name)
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
