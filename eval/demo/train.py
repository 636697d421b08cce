"""The demo's two training runs, side by side: one ``maskscale train`` process per family.

Why: the demo's models are tiny, so their matrix products gain little from a second intra-op
thread; on the 2-core machines the demo targets, the ARM and the MDM trained at the same time
with one thread each finish in about the time one of them takes alone with two threads. That
halving is what lets the demo give both families enough steps to leave the unigram plateau
within its 15 minutes (benchmarks/mdm_plateau.md).

Each run is an ordinary training subprocess (same recipe, run directory, checkpoints, resume and
MLflow run as ``maskscale train``) whose output goes to ``run_dir/train.log``; this process shows
one progress bar per run, fed from the runs' ``metrics.jsonl``, and a run that fails is reported
with the end of its log. Ctrl-C stops both runs; rerunning the demo resumes them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

POLL_S = 1.0
"""Seconds between two looks at the runs' metrics files."""
LOG_TAIL = 25
"""Lines of a failed run's log shown in the error."""
STEPS_LINE = re.compile(r"\bsteps=(\d+)\b")


class TrainingFailed(RuntimeError):
    """A training subprocess exited with an error."""


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Run:
    """One training subprocess and what the progress display knows about it."""

    family: str
    run_dir: Path
    proc: subprocess.Popen
    total: int | None = None
    step: int = 0
    last: dict = field(default_factory=dict)
    _offset: int = 0

    def poll_metrics(self) -> None:
        """Read the new lines of metrics.jsonl (whole lines only) and of the log's step count."""
        if self.total is None:
            log = self.run_dir / "train.log"
            found = STEPS_LINE.search(log.read_text(errors="replace")) if log.is_file() else None
            self.total = int(found.group(1)) if found else None
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.step = max(self.step, int(record.get("step", 0)))
            self.last.update({k: v for k, v in record.items() if "loss" in k})


def launch(family: str, recipe: Path, overrides: list[str], run_dir: Path, threads: int) -> Run:
    """Start ``python -m pipeline.cli train`` for one family, its output in train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(recipe), *overrides]
    with open(run_dir / "train.log", "ab") as log:  # a resumed run appends to its log
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Run(family, run_dir, proc)


def _postfix(run: Run) -> str:
    parts = [f"loss {run.last['loss']:.3f}"] if "loss" in run.last else []
    val = run.last.get("val/validation/loss")
    return ", ".join(parts + ([f"val {val:.3f}"] if val is not None else []))


def watch(runs: list[Run]) -> None:
    """Progress bars until every run exits; raises TrainingFailed (after stopping the others)
    when one fails, and stops all of them on Ctrl-C."""
    from tqdm import tqdm

    bars = {r.family: tqdm(desc=r.family.upper(), unit="step", position=i, dynamic_ncols=True)
            for i, r in enumerate(runs)}  # fmt: skip
    try:
        while True:
            for run in runs:
                run.poll_metrics()
                bar = bars[run.family]
                if run.total is not None and bar.total != run.total:
                    bar.total = run.total
                bar.n = run.step
                bar.set_postfix_str(_postfix(run), refresh=False)
                bar.refresh()
            failed = [r for r in runs if r.proc.poll() not in (None, 0)]
            if failed:
                raise TrainingFailed(_failure(failed[0]))
            if all(r.proc.poll() == 0 for r in runs):
                return
            time.sleep(POLL_S)
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.terminate()
                run.proc.wait()
        for bar in bars.values():
            bar.close()


def _failure(run: Run) -> str:
    log = run.run_dir / "train.log"
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:] if log.is_file() else []
    return (
        f"{run.family.upper()} training failed (exit {run.proc.returncode}); the end of {log}:\n"
        + "\n".join(f"  {line}" for line in tail)
        + "\nrerunning the demo resumes from the last checkpoint"
    )


def train_side_by_side(jobs: dict[str, tuple[Path, list[str], Path]], cores: int) -> dict:
    """Train every ``family: (recipe, overrides, run_dir)`` at once, ``cores // len(jobs)``
    threads each; returns ``{family: summary}`` read from each run's summary.json."""
    threads = max(1, cores // len(jobs))
    runs = [
        launch(fam, recipe, ov, run_dir, threads) for fam, (recipe, ov, run_dir) in jobs.items()
    ]
    watch(runs)
    return {r.family: json.loads((r.run_dir / "summary.json").read_text()) for r in runs}
