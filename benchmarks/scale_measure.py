"""Measuring datatrove stages: wall time, CPU time, peak memory and per-task times.

Shared by the maskscale build and the datatrove reference in ``pipeline_scale.py`` so that both
are measured the same way. A stage is timed from outside (around its executor run), its CPU
time and memory are sampled from the process tree with psutil (datatrove runs multi-worker
stages in a forkserver pool, single-worker stages in this process), and the wall time of each
task comes from datatrove's own per-task log (launch and "Processing done" timestamps).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import threading
import time
from dataclasses import dataclass, field

import psutil
from datatrove.executor import LocalPipelineExecutor

_TS_LEN = len("2026-01-01 00:00:00.000")


@dataclass
class StageResult:
    name: str
    folder: str
    tasks: int
    workers: int
    wall_s: float
    cpu_s: float
    peak_rss: int
    """Peak of the summed RSS of this process and all its descendants (bytes)."""
    peak_proc_rss: int
    """Peak RSS of the largest single process (bytes)."""
    task_s: list[float] = field(default_factory=list)

    @property
    def max_task_s(self) -> float:
        return max(self.task_s, default=0.0)

    def work_s(self, overhead: StageResult | None = None) -> float:
        """Core-seconds of work: CPU time net of the executor's start-up (pool, manager and
        worker imports, measured with an empty stage) for pooled stages; the tasks' summed
        wall time if no CPU time was seen."""
        cpu = self.cpu_s
        if overhead is not None and self.workers > 1:
            cpu -= overhead.cpu_s
        return max(cpu, 0.0) if self.cpu_s > 0 else sum(self.task_s)


def best_of(runs: list[list[StageResult]]) -> list[StageResult]:
    """Per stage, the repeat with the shortest wall time (the least disturbed by other load)."""
    return [min(same, key=lambda r: r.wall_s) for same in zip(*runs, strict=True)]


class TreeMonitor:
    """Samples RSS and CPU time of this process and its descendants in a background thread."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process()
        self.base_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.peak_rss = self.peak_proc_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            return [self.me]

    def _sample(self) -> None:
        total = 0
        for proc in self._procs():
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                total += rss
                self.peak_proc_rss = max(self.peak_proc_rss, rss)
                self.last_cpu[proc.pid] = cpu.user + cpu.system
        self.peak_rss = max(self.peak_rss, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeMonitor:
        self._sample()
        self.base_cpu = dict(self.last_cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(cpu - self.base_cpu.get(pid, 0.0) for pid, cpu in self.last_cpu.items())


def _log_time(line: str) -> dt.datetime | None:
    with contextlib.suppress(ValueError):
        return dt.datetime.strptime(line[:_TS_LEN], "%Y-%m-%d %H:%M:%S.%f")
    return None


def task_times(logging_dir: str) -> list[float]:
    """Wall seconds of each finished task, from datatrove's ``logs/task_NNNNN.log`` files."""
    times = []
    for path in sorted(glob.glob(os.path.join(logging_dir, "logs", "task_*.log"))):
        start = end = None
        with open(path, errors="replace") as f:
            for line in f:
                if start is None and "Launching pipeline" in line:
                    start = _log_time(line)
                elif "Processing done" in line:
                    end = _log_time(line)
        if start and end:
            times.append((end - start).total_seconds())
    return times


def stage_stats(logging_dir: str) -> dict[str, float]:
    """Every counter of a stage summed over its tasks: {"<step name>|<label>": total}."""
    totals: dict[str, float] = {}
    for path in sorted(glob.glob(os.path.join(logging_dir, "stats", "*.json"))):
        with open(path) as f:
            for step in json.load(f):
                for label, value in step.get("stats", {}).items():
                    total = value.get("total", 0) if isinstance(value, dict) else value
                    key = f"{step['name']}|{label}"
                    totals[key] = totals.get(key, 0) + total
    return totals


def measure(name: str, folder: str, logging_dir: str, tasks: int, workers: int, run) -> StageResult:
    """Run ``run()`` (one stage) and measure it."""
    start = time.perf_counter()
    with TreeMonitor() as mon:
        run()
    wall = time.perf_counter() - start
    return StageResult(name, folder, tasks, workers, wall, mon.cpu_s, mon.peak_rss,
                       mon.peak_proc_rss, task_times(logging_dir))  # fmt: skip


class QuietExecutor(LocalPipelineExecutor):
    """Local executor whose tasks log to their files only (the console stays readable)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)


def _nothing(data, rank: int = 0, world_size: int = 1):
    return iter(())


def executor_overhead(workers: int, folder: str) -> StageResult:
    """An empty stage with ``workers`` pooled workers: the fixed cost of every pooled stage."""
    logdir = os.path.join(folder, "logs")
    return measure("empty stage", folder, logdir, workers, workers,
                   lambda: run_pipeline([_nothing], workers, workers, logdir))  # fmt: skip


def run_pipeline(pipeline: list, tasks: int, workers: int, logging_dir: str) -> None:
    QuietExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir,
                  start_method="forkserver").run()  # fmt: skip
