"""The benchmarks' record keeping: every number survives a failure.

Why: the first GPU check gets one call of a few minutes on a lent machine; a 1B model that runs
out of memory, an NCCL hiccup or a compile error in one variant must not cost the numbers of the
variants before it, nor stop the ones after it. So a benchmark built on this module

* writes its whole JSON after every variant, by atomic replace (a kill mid-write leaves the
  previous complete file, never half of one);
* marks a variant ``running`` in the JSON before it starts, so a process that dies outright
  (segfault, abort, SIGKILL) leaves a record of where it died, and ``--resume`` turns that
  record into a ``crash`` failure and goes on with the rest;
* records an exception in a variant (``kind``: oom, nccl, compile, timeout, error) with its type,
  message and label, frees the GPU memory the failed variant held, and runs the next;
* turns SIGTERM (what ``timeout`` sends at a section's cap) into a ``timeout`` record for the
  variant in progress and ``skipped`` records for those not started, then exits with status 124;
* carries a header: GPU name, driver, torch, CUDA, cuDNN, DeepSpeed, Triton and Python versions,
  host, time, the command line and TORCH_LOGS.

Failures can be injected, so a CPU dry run walks every branch: ``MASKSCALE_BENCH_FAIL`` holds
comma-separated ``PATTERN:KIND`` pairs (fnmatch on a record's label, e.g. ``*/eager/mdm:oom``);
KIND is one of :data:`INJECTABLE`. Records of injected failures say ``"injected": true``.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

FAIL_ENV = "MASKSCALE_BENCH_FAIL"
INJECTABLE = ("oom", "nccl", "compile", "error", "crash", "hang")
"""oom/nccl/compile/error raise the exception such a failure raises; crash ends the process at
once (exit status 134, as an abort) and hang sleeps until the section's time limit kills it."""
CRASH_STATUS = 134
TIMEOUT_STATUS = 124


class SectionTimeout(BaseException):
    """SIGTERM arrived (the section's ``timeout`` cap): not an ``Exception``, so a variant's
    failure handler does not swallow it and the benchmark stops after recording it."""


def on_sigterm() -> None:
    """Turn SIGTERM into :class:`SectionTimeout` in the main thread."""

    def handler(signum, frame):
        raise SectionTimeout(f"signal {signum}: the section's time limit was reached")

    signal.signal(signal.SIGTERM, handler)


def without_mlflow() -> None:
    """Make ``import mlflow`` fail in this benchmark process: DeepSpeed's autotuner imports it
    when installed (10 s of a loaded 2-core machine's startup, for nothing the benchmarks use),
    and the device image lacks it, so the dry run here then imports what the device imports.
    Call it in a script's ``__main__`` only: a test process may still need mlflow."""
    if "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None


def write_atomic(path: str | Path | None, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def environment(device=None) -> dict:
    """The header every benchmark JSON carries: what ran where, when, with which versions."""
    import torch

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    gpu = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
    return {
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "gpu": gpu,
        "driver": _driver() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "deepspeed": _version("deepspeed"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "torch_logs": os.environ.get("TORCH_LOGS"),
        "injected_failures": os.environ.get(FAIL_ENV) or None,
    }


def _fake_failure(kind: str, label: str) -> BaseException:
    """The exception a real failure of this kind raises (built on any device)."""
    import torch

    msg = f"injected by {FAIL_ENV} in {label}"
    if kind == "oom":
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({msg})")
    if kind == "nccl":
        return torch.distributed.DistBackendError(f"NCCL error: unhandled system error ({msg})")
    if kind == "compile":
        from torch._dynamo.exc import TorchDynamoException

        return TorchDynamoException(f"backend='inductor' raised: CompilationError ({msg})")
    return RuntimeError(msg)


def injected_kind(label: str) -> str | None:
    """The failure ``MASKSCALE_BENCH_FAIL`` plants in this label, if any."""
    for item in filter(None, (s.strip() for s in os.environ.get(FAIL_ENV, "").split(","))):
        pattern, _, kind = item.rpartition(":")
        if kind not in INJECTABLE or not pattern:
            raise ValueError(
                f"{FAIL_ENV}={os.environ[FAIL_ENV]!r}: each item must be PATTERN:KIND with KIND "
                f"in {INJECTABLE}, got {item!r}"
            )
        if fnmatch.fnmatchcase(label, pattern):
            return kind
    return None


def maybe_fail(label: str) -> None:
    """Raise (or crash, or hang) here if a failure is injected into ``label``."""
    kind = injected_kind(label)
    if kind is None:
        return
    print(f"  [{label}] injecting a {kind} failure ({FAIL_ENV})", file=sys.stderr, flush=True)
    if kind == "crash":
        os._exit(CRASH_STATUS)
    if kind == "hang":
        while True:
            time.sleep(1)
    raise _fake_failure(kind, label)


def classify(exc: BaseException) -> str:
    """oom, nccl, compile, timeout or error: what the table says failed."""
    import torch

    if isinstance(exc, SectionTimeout):
        return "timeout"
    text = f"{type(exc).__module__}.{type(exc).__name__} {exc}"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "oom"
    if isinstance(exc, torch.distributed.DistError) or "nccl" in text.lower():
        return "nccl"
    if any(k in text for k in ("torch._dynamo", "torch._inductor", "triton", "Compil")):
        return "compile"
    return "error"


def failure(exc: BaseException, label: str) -> dict:
    """The record of a failed variant (the traceback goes to stderr: the raw log keeps it)."""
    print(f"  [{label}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    traceback.print_exception(exc, file=sys.stderr)
    return {
        "status": "failed",
        "error": {
            "kind": classify(exc),
            "type": f"{type(exc).__module__}.{type(exc).__name__}",
            "message": str(exc)[:2000],
            "injected": f"injected by {FAIL_ENV}" in str(exc),
        },
    }


def free_memory() -> None:
    """Give back what a failed variant held (the caller dropped its references first)."""
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Recorder:
    """The JSON of one benchmark run: ``header``, ``args``, ``records`` (one per variant, each
    with a unique ``label``) and anything else the benchmark puts in :attr:`data`."""

    def __init__(self, path, benchmark: str, args: dict, device=None, resume: bool = False):
        self.path = path
        self.on_record: Callable[[dict], None] = lambda record: None
        """Called with each finished (measured, failed or skipped) record: the printout."""
        self.data: dict = {"benchmark": benchmark, "header": environment(device), "args": args}
        self.data["records"] = []
        self.previous: dict[str, dict] = {}
        if resume and path and Path(path).is_file():
            old = json.loads(Path(path).read_text())
            self.data["header"]["resumed_from"] = old.get("header")
            self.previous = {r["label"]: r for r in old.get("records", [])}
        self.crash_status = None

    def done_before(self, label: str) -> dict | None:
        """A resumed run's finished record of ``label`` (a ``running`` one becomes a crash)."""
        old = self.previous.get(label)
        if old is None or old["status"] == "skipped":
            return None
        if old["status"] == "running":
            status = self.crash_status if self.crash_status is not None else "unknown"
            old = {k: v for k, v in old.items() if k != "status"}
            old.update(status="failed")
            old["error"] = {
                "kind": "crash",
                "type": "process exit",
                "message": f"the process died while running this variant (exit status "
                f"{status}); the raw log has its last words",
                "injected": injected_kind(label) == "crash",
            }
        return old

    def save(self) -> None:
        write_atomic(self.path, self.data)

    def run(self, label: str, meta: dict, measure: Callable[[], dict]) -> dict:
        """One variant: record it running, measure, record the result or the failure."""
        old = self.done_before(label)
        if old is not None:
            self.data["records"].append(old)
            self.save()
            self.on_record(old)
            return old
        record = {"label": label, **meta, "status": "running"}
        self.data["records"].append(record)
        self.save()
        failed = False
        try:
            maybe_fail(label)
            record.update(measure(), status="ok")
        except Exception as exc:  # recorded; the next variant runs
            record.update(failure(exc, label))
            failed = True
        except SectionTimeout as exc:
            record.update(failure(exc, label))
            self.save()
            self.on_record(record)
            raise
        if failed:  # outside the handler: the traceback's frames (engine, model) are gone
            free_memory()
        self.save()
        self.on_record(record)
        return record

    def run_all(self, plan: list[tuple[str, dict, Callable[[], dict]]], deadline=None) -> int:
        """Run ``plan`` ((label, meta, measure) each) in order; 0, or 124 after SIGTERM. Past
        ``deadline`` (time.monotonic()) a variant not yet measured is skipped, not started."""
        on_sigterm()
        for i, (label, meta, measure) in enumerate(plan):
            late = deadline is not None and time.monotonic() > deadline
            if late and self.done_before(label) is None:
                self.skip(label, meta, "--time-limit reached before it started")
                continue
            try:
                self.run(label, meta, measure)
            except SectionTimeout:
                for later, later_meta, _ in plan[i + 1 :]:
                    self.skip(later, later_meta, "the section's time limit ended the run first")
                return TIMEOUT_STATUS
        return 0

    def skip(self, label: str, meta: dict, reason: str) -> None:
        record = {"label": label, **meta, "status": "skipped", "reason": reason}
        self.data["records"].append(record)
        self.save()
        self.on_record(record)
