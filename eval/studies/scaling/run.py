"""``maskscale sweep run``: train a planned sweep's runs on this machine, Slurm or Ray.

Why: an IsoFLOP study is dozens of ordinary training runs, and it gets interrupted (a node
fails, a job hits its time limit, a laptop sleeps). Each run is a plain ``maskscale train
--config runs/<name>/config.yaml`` whose run directory is that folder, so re-launching a sweep
is always safe: a run with ``summary.json`` is finished and skipped, a run with checkpoints
resumes from its newest one (the trainer does that by itself, ``checkpoint.resume=auto``), and
the rest start fresh. Before anything is launched, every config is loaded and validated, so a
typo fails in seconds rather than hours into a job array.

Launchers:
- ``local``: each run a subprocess (``torchrun --standalone`` when a run has more than one GPU),
  one after another, or ``--parallel K`` at once in the planned order (the cheap runs of the
  smallest budget first; a run that ends makes room for the next). With K > 1 each run gets
  ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--cpus-per-run`` (default 1): tiny models gain
  little from a second intra-op thread, so two one-thread runs on two cores finish in about the
  time of one two-thread run. Each launch is appended to ``runs/<name>/launches.jsonl`` (start,
  end, exit status, threads). A failed run is recorded in ``runs/<name>/failed.json``, shown
  with its log tail, and the others go on; exit status 1 if any failed. Ctrl-C stops the
  running subprocesses (rerunning the sweep resumes them from their checkpoints).
- ``slurm``: one ``sbatch`` job array (``slurm/sweep.sbatch``, one array index per unfinished
  run, each a ``srun torchrun`` over ``--nodes`` x ``--gpus-per-run``), submitted with sbatch.
- ``ray``: each run is a Ray task asking for its GPUs (``--gpus-per-run``) and CPUs, on the
  cluster at ``--ray-address`` (or a local one); waits for all of them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

import pipeline
from eval.measure.outputs import write_json_atomic, write_text_atomic
from eval.studies.scaling.plan import RUNS_DIR, SWEEP_FILE
from pipeline.configlib import ConfigError

FAILED_FILE = "failed.json"
LOG_FILE = "train.log"
LAUNCHES_FILE = "launches.jsonl"
"""One line per local launch of a run: start and end (unix seconds), exit status, threads."""
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLL_S = 0.5
"""Seconds between two looks at the running subprocesses (local launcher)."""
STOP_S = 30.0
"""Seconds a stopped run gets to exit after SIGTERM before it is killed."""
PROJECT_ROOT = Path(pipeline.__file__).resolve().parent.parent
"""The folder holding the eval/trainer/pipeline packages (put on the runs' PYTHONPATH, so a
node without maskscale installed still runs ``-m pipeline.cli``). Found from the package, not
from this file's depth, which changed when eval/ moved into rooms."""


@dataclass
class Resources:
    """What one run asks of a launcher."""

    gpus_per_run: int = 0
    """GPUs per node per run (0 = the trainer's default device, one process)."""
    nodes: int = 1
    """Nodes per run (slurm)."""
    cpus_per_run: int = 1
    """CPU cores per run (slurm: per node; ray: per task)."""
    partition: str | None = None
    """Slurm partition."""
    time: str | None = None
    """Slurm time limit, e.g. 24:00:00."""
    max_parallel: int | None = None
    """Slurm: at most this many array tasks at once."""
    parallel: int = 1
    """Local: runs at once (1 = one after another)."""
    threads: int | None = None
    """Local: OMP_NUM_THREADS / MKL_NUM_THREADS of each run (None = inherited)."""

    def validate(self) -> None:
        if self.gpus_per_run < 0 or self.nodes < 1 or self.cpus_per_run < 1:
            raise ConfigError("--gpus-per-run >= 0, --nodes >= 1, --cpus-per-run >= 1")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ConfigError("--max-parallel: >= 1")
        if self.parallel < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError("--parallel >= 1 and --cpus-per-run >= 1")


def load_sweep(path: str | Path) -> tuple[Path, dict]:
    """(sweep folder, sweep.json) from the folder or the file itself."""
    path = Path(path)
    file = path if path.name == SWEEP_FILE else path / SWEEP_FILE
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; create the sweep with `maskscale sweep plan`")
    return file.parent.resolve(), json.loads(file.read_text())


def run_state(point: dict) -> str:
    """finished (summary.json), interrupted (checkpoints, no summary) or pending."""
    run_dir = Path(point["run_dir"])
    if (run_dir / "summary.json").is_file():
        return "finished"
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return "interrupted"
    return "pending"


def check_configs(points: list[dict]) -> None:
    """Load and validate every run's config before launching any; all errors in one message."""
    from trainer.cli import load_train_config

    errors = []
    for p in points:
        try:
            cfg = load_train_config(p["config"], [])
            if Path(cfg.run_dir).resolve() != Path(p["run_dir"]).resolve():
                errors.append(f"{p['config']}: run_dir {cfg.run_dir} is not {p['run_dir']}")
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("sweep configs do not load:\n  " + "\n  ".join(errors))


def train_command(config: str, gpus: int, python: str = sys.executable) -> list[str]:
    """The command training one run on one node."""
    if gpus > 1:
        launch = [python, "-m", "torch.distributed.run", "--standalone"]
        return [*launch, f"--nproc_per_node={gpus}", "-m", "pipeline.cli", "train",
                "--config", config]  # fmt: skip
    return [python, "-m", "pipeline.cli", "train", "--config", config]


def run_env(threads: int | None = None) -> dict[str, str]:
    """The runs' environment: this project first on PYTHONPATH, offline HF, and (when
    ``threads`` is given) the intra-op thread count."""
    path = os.environ.get("PYTHONPATH")
    pythonpath = f"{PROJECT_ROOT}:{path}" if path else str(PROJECT_ROOT)
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1")
    if threads is not None:
        env.update({var: str(threads) for var in THREAD_VARS})
    return env


@dataclass
class LocalRun:
    """One training subprocess of the local launcher."""

    point: dict
    proc: subprocess.Popen
    log: IO[str]
    threads: int | None
    started: float


def start_run(point: dict, gpus: int, threads: int | None = None) -> LocalRun:
    """Start training (or resuming) one run, its output appended to runs/<name>/train.log."""
    run_dir = Path(point["run_dir"])
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    cmd = train_command(point["config"], gpus)
    env_prefix = "" if threads is None else "".join(f"{v}={threads} " for v in THREAD_VARS)
    log = open(run_dir / LOG_FILE, "a")
    log.write(f"$ {env_prefix}{shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env(threads))
    return LocalRun(point, proc, log, threads, time.time())


def finish_run(run: LocalRun, interrupted: bool = False) -> int:
    """Record an exited run: launches.jsonl always, failed.json when it failed (not when it
    was stopped by Ctrl-C: that run is interrupted and resumes)."""
    run.log.close()
    run_dir, rc = Path(run.point["run_dir"]), run.proc.returncode
    record = {"started": run.started, "ended": time.time(), "returncode": rc,
              "threads": run.threads, "pid": run.proc.pid, "interrupted": interrupted}  # fmt: skip
    with open(run_dir / LAUNCHES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    if rc != 0 and not interrupted:
        write_json_atomic(run_dir / FAILED_FILE, {"returncode": rc, "log": str(run_dir / LOG_FILE)})
    return rc


def train_one(point: dict, gpus: int, threads: int | None = None) -> int:
    """Train (or resume) one run in a subprocess and wait for it; its exit status."""
    run = start_run(point, gpus, threads)
    run.proc.wait()
    return finish_run(run)


def log_tail(point: dict, lines: int = 15) -> str:
    path = Path(point["run_dir"]) / LOG_FILE
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + x for x in text[-lines:])


def stop_runs(running: list[LocalRun]) -> None:
    """SIGTERM every running subprocess, wait up to STOP_S for each, then SIGKILL."""
    for run in running:
        if run.proc.poll() is None:
            run.proc.terminate()
    deadline = time.monotonic() + STOP_S
    for run in running:
        try:
            run.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
        finish_run(run, interrupted=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_local(points: list[dict], res: Resources) -> int:
    """Up to ``res.parallel`` runs at once, started in the planned order; the bar counts
    finished runs. A failure is reported and the others go on; Ctrl-C or SIGTERM stops them
    all (130). Both signals are handled explicitly: a launcher started in the background by a
    non-interactive shell inherits SIGINT ignored, and a scheduler stops jobs with SIGTERM."""
    queue, running, failed = list(points), [], []
    bar = tqdm(total=len(points), desc="sweep", unit="run", file=sys.stdout)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            if queue and len(running) < res.parallel:
                while queue and len(running) < res.parallel:
                    running.append(start_run(queue.pop(0), res.gpus_per_run, res.threads))
                bar.set_postfix_str(", ".join(r.point["name"] for r in running))
            ended = [r for r in running if r.proc.poll() is not None]
            if not ended:
                time.sleep(POLL_S)
            for run in ended:
                running.remove(run)
                rc = finish_run(run)
                if rc != 0:
                    failed.append(run.point["name"])
                    tqdm.write(f"FAILED {run.point['name']} (exit {rc}); last lines of its "
                               "train.log:")  # fmt: skip
                    tqdm.write(log_tail(run.point))
                bar.update(1)
    except KeyboardInterrupt:
        names = ", ".join(r.point["name"] for r in running)
        tqdm.write(f"interrupted: stopping {len(running)} running run(s) {names}")
        stop_runs(running)
        print("stopped; rerun `maskscale sweep run` to resume", file=sys.stderr)
        return 130
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        print(f"{len(failed)} of {len(points)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def sbatch_script(sweep_dir: Path, points: list[dict], res: Resources) -> str:
    """One job array: index i trains the i-th line of slurm/runs.txt with srun + torchrun."""
    nproc = max(res.gpus_per_run, 1)
    opts = [
        f"--job-name=sweep-{sweep_dir.name}",
        f"--array=0-{len(points) - 1}" + (f"%{res.max_parallel}" if res.max_parallel else ""),
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={res.cpus_per_run}",
        f"--output={sweep_dir / 'slurm' / 'logs' / '%A_%a.out'}",
    ]
    if res.gpus_per_run:
        opts.append(f"--gpus-per-node={res.gpus_per_run}")
    if res.partition:
        opts.append(f"--partition={res.partition}")
    if res.time:
        opts.append(f"--time={res.time}")
    rdzv = (
        "--standalone"
        if res.nodes == 1
        else f"--nnodes={res.nodes} --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d "
        '--rdzv_endpoint="$HEAD:29500"'
    )
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts), "set -euo pipefail"]
    lines += [
        f"cd {shlex.quote(os.getcwd())}",
        f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export HF_HUB_OFFLINE=1",
        f'CONFIG=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {sweep_dir / "slurm" / "runs.txt"})',
        'HEAD=$(scontrol show hostnames "$SLURM_NODELIST" | head -n 1)',
        'echo "array task $SLURM_ARRAY_TASK_ID: $CONFIG on $SLURM_NODELIST"',
        'RUN_DIR=$(dirname "$CONFIG")',
        f'rm -f "$RUN_DIR/{FAILED_FILE}"',
        "rc=0",
        f"srun --nodes={res.nodes} --ntasks={res.nodes} {shlex.quote(sys.executable)} "
        f"-m torch.distributed.run {rdzv} --nproc_per_node={nproc} "
        '-m pipeline.cli train --config "$CONFIG" || rc=$?',
        *failed_record_lines(sweep_dir),
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def failed_record_lines(sweep_dir: Path) -> list[str]:
    """Bash that writes runs/<name>/failed.json when the task's training exits non-zero, as
    the local and Ray launchers do, so `sweep fit` lists the run as failed (with the array
    task's log) instead of as not run."""
    log = f"{sweep_dir / 'slurm' / 'logs'}/${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}.out"
    record = '{"returncode": %d, "log": "%s", "slurm_job": "%s", "array_task": "%s"}\\n'
    return [
        'if [ "$rc" -ne 0 ]; then',
        f'  printf \'{record}\' "$rc" "{log}" "$SLURM_ARRAY_JOB_ID" '
        f'"$SLURM_ARRAY_TASK_ID" > "$RUN_DIR/{FAILED_FILE}.tmp"',
        f'  mv "$RUN_DIR/{FAILED_FILE}.tmp" "$RUN_DIR/{FAILED_FILE}"',
        f'  echo "array task $SLURM_ARRAY_TASK_ID failed ($rc): $RUN_DIR/{FAILED_FILE}"',
        "fi",
    ]


def run_slurm(sweep_dir: Path, points: list[dict], res: Resources) -> int:
    slurm = sweep_dir / "slurm"
    (slurm / "logs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(slurm / "runs.txt", "".join(p["config"] + "\n" for p in points))
    script = write_text_atomic(slurm / "sweep.sbatch", sbatch_script(sweep_dir, points, res))
    print(f"job array of {len(points)} runs: {script}")
    try:
        proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"sbatch not found; submit it yourself: sbatch {script}", file=sys.stderr)
        return 1
    if proc.returncode != 0:
        print(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return 1
    match = re.search(r"Submitted batch job (\d+)", proc.stdout)
    job = match.group(1) if match else proc.stdout.strip()
    with open(slurm / "submissions.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "runs": [p["name"] for p in points]}) + "\n")
    print(f"submitted Slurm job array {job}; logs in {slurm / 'logs'}")
    return 0


def run_ray(points: list[dict], res: Resources, address: str | None) -> int:
    try:
        import ray
    except ModuleNotFoundError:
        print("ray is not installed: pip install 'maskscale[ray]'", file=sys.stderr)
        return 1
    if not ray.is_initialized():
        ray.init(address=address) if address else ray.init()
    remote = ray.remote(num_gpus=res.gpus_per_run, num_cpus=res.cpus_per_run)(train_one)
    futures = {p["name"]: remote.remote(p, res.gpus_per_run) for p in points}
    failed = []
    with tqdm(total=len(futures), desc="sweep (ray)", unit="run", file=sys.stdout) as bar:
        pending = {f: name for name, f in futures.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            if ray.get(done[0]) != 0:
                failed.append(name)
                tqdm.write(f"FAILED {name}; see {RUNS_DIR}/{name}/{LOG_FILE}")
            bar.update(1)
    if failed:
        print(f"{len(failed)} of {len(points)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def local_threads(cpus_per_run: int | None, parallel: int) -> int | None:
    """Threads per local run: --cpus-per-run if given, else 1 with --parallel > 1, else the
    inherited setting (None)."""
    if cpus_per_run is not None:
        return cpus_per_run
    return 1 if parallel > 1 else None


def cmd_run(args) -> int:
    sweep_dir, sweep = load_sweep(args.sweep)
    res = Resources(
        gpus_per_run=args.gpus_per_run, nodes=args.nodes, cpus_per_run=args.cpus_per_run or 1,
        partition=args.partition, time=args.time, max_parallel=args.max_parallel,
        parallel=args.parallel, threads=local_threads(args.cpus_per_run, args.parallel),
    )  # fmt: skip
    res.validate()
    if args.parallel > 1 and args.launcher != "local":
        raise ConfigError("--parallel is for --launcher local (slurm: --max-parallel)")
    points = sweep["points"]
    if args.only:
        wanted = set(args.only.split(","))
        points = [p for p in points if p["name"] in wanted]
    states = {p["name"]: run_state(p) for p in points}
    todo = [p for p in points if states[p["name"]] != "finished"]
    resumed = [p["name"] for p in todo if states[p["name"]] == "interrupted"]
    print(
        f"sweep {sweep['name']}: {len(points)} runs, {len(points) - len(todo)} finished "
        f"(skipped), {len(resumed)} to resume, {len(todo) - len(resumed)} to start"
    )
    if not todo:
        return 0
    check_configs(todo)
    if args.launcher == "local":
        if res.parallel > 1 or res.threads is not None:
            print(f"local: up to {res.parallel} run(s) at once, {res.threads or 'default'} "
                  f"thread(s) each")  # fmt: skip
        return run_local(todo, res)
    if args.launcher == "slurm":
        return run_slurm(sweep_dir, todo, res)
    return run_ray(todo, res, args.ray_address)
