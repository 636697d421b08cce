"""`maskscale sweep run`: real tiny training runs through the local, Slurm and Ray launchers.

Every run is the real trainer in a subprocess (DeepSpeed on CPU, tiny-0.3M, a few steps) on a
real Arrow corpus, tracked in a real MLflow sqlite store. Slurm goes through the sbatch/srun
test doubles of tests/pipeline/fake_slurm (they run the job array right away).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.eval.conftest import ROOT, run_cli
from tests.trainer.conftest import make_corpus

TINY_03M_N = 295_392
FAKE_SLURM = ROOT / "tests/pipeline/fake_slurm"
FAST = ["checkpoint.every=2", "eval.every=0", "eval.max_rows=16", "eval.n_samples=2",
        "log.every=1", "optim.warmup_min=1", "batch.global_batch=8", "batch.micro_batch=8",
        "checkpoint.export=false"]  # fmt: skip


def plan(
    tmp_path: Path, capsys, families: str, steps: int | tuple[int, ...] = 4
) -> tuple[Path, dict, str]:
    corpus = make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=16, kind="ramp",
                         splits={"train": 64, "validation": 16})  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = (steps,) if isinstance(steps, int) else steps
    budgets = ",".join(f"{s * 6 * TINY_03M_N * 8 * 16:.8e}" for s in steps)
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        capsys, "sweep", "plan", "--budgets", budgets, "--sizes", "tiny-0.3M",
        "--families", families, "--corpus", corpus, "--out", out, "--config",
        ROOT / "configs/train/tiny-cpu.yaml", f"tracking.uri={uri}", *FAST,
    )  # fmt: skip
    assert code == 0, err
    return out, json.loads((out / "sweep.json").read_text()), uri


def launches(run_dir: Path) -> int:
    return (run_dir / "train.log").read_text().count("\n$ ")


@pytest.mark.slow
def test_local_runs_skips_finished_resumes_interrupted_and_tags(tmp_path, capsys):
    out, sweep, uri = plan(tmp_path, capsys, "arm,mdm")
    code, stdout, err = run_cli(capsys, "sweep", "run", out, "--launcher", "local")
    assert code == 0, err + stdout
    assert "2 runs, 0 finished (skipped), 0 to resume, 2 to start" in stdout
    for p in sweep["points"]:
        summary = json.loads((Path(p["run_dir"]) / "summary.json").read_text())
        assert summary["steps"] == 4 and "val/validation/loss" in summary["val"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.sweep = 'sweep'")
    tags = sorted((r.data.tags["family"], r.data.tags["N"], r.data.tags["sweep.C"],
                   r.data.tags["sweep.point"]) for r in runs)  # fmt: skip
    c = sweep["points"][0]["name"].rsplit("-C", 1)[1]
    assert tags == [("arm", str(TINY_03M_N), c, f"arm-tiny-0.3M-C{c}"),
                    ("mdm", str(TINY_03M_N), c, f"mdm-tiny-0.3M-C{c}")]  # fmt: skip
    assert all(r.data.tags["C"] for r in runs)

    # finished runs are skipped; an interrupted one (checkpoints, no summary) resumes
    arm = Path(sweep["points"][0]["run_dir"])
    (arm / "summary.json").unlink()
    code, stdout, err = run_cli(capsys, "sweep", "run", out)
    assert code == 0, err
    assert "1 finished (skipped), 1 to resume, 0 to start" in stdout
    assert launches(arm) == 1 and launches(Path(sweep["points"][1]["run_dir"])) == 0
    assert "resum" in (arm / "train.log").read_text().lower()
    assert json.loads((arm / "summary.json").read_text())["steps"] == 4
    code, stdout, _ = run_cli(capsys, "sweep", "run", out)
    assert code == 0 and "2 finished (skipped)" in stdout

    # fit from MLflow: one point per budget -> not fittable, and said so
    code, stdout, err = run_cli(capsys, "sweep", "fit", out, "--mlflow-experiment", "sweep")
    assert code == 0, err
    fit = json.loads((out / "fit/fit.json").read_text())
    assert [p["status"] for p in fit["points"]] == ["finished", "finished"]
    assert "not fittable: 1 finished points (< 3)" in stdout
    fits = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.fit` = '1'")
    assert len(fits) == 1
    names = {a.path for a in client.list_artifacts(fits[0].info.run_id)}
    assert {"report.md", "fit.json", "isoflop.png", "scaling.png"} <= names
    # MLflow alone (no sweep folder): the tagged runs are the grid; the fit run is not a point
    args = ["--mlflow-experiment", "sweep", "--tracking-uri", uri, "--out", tmp_path / "fit2"]
    code, stdout, err = run_cli(capsys, "sweep", "fit", *args, "--no-mlflow")
    assert code == 0, err
    fit = json.loads((tmp_path / "fit2/fit.json").read_text())
    assert sorted(p["name"] for p in fit["points"]) == sorted(p["name"] for p in sweep["points"])
    assert all(p["loss"] > 0 for p in fit["points"])
    # the unigram baseline from the runs' MLflow params (corpus, run_dir -> eval_rows.json)
    from eval.measure.unigram import unigram_baseline

    expected = unigram_baseline(tmp_path / "corpus", ["validation"])["validation"]  # all 16 rows
    assert fit["unigram"]["value"] == pytest.approx(expected, abs=1e-12)
    assert fit["unigram"]["groups"][0]["rows_source"] == "every row, per eval_rows.json"


@pytest.mark.slow
def test_local_failure_is_recorded_and_listed_by_fit(tmp_path, capsys):
    out, sweep, _ = plan(tmp_path, capsys, "arm")
    shutil.rmtree(tmp_path / "corpus")  # the configs still load; the trainer fails
    code, stdout, err = run_cli(capsys, "sweep", "run", out)
    assert code == 1 and f"FAILED {sweep['points'][0]['name']}" in stdout
    assert "1 of 1 runs failed" in err
    run_dir = Path(sweep["points"][0]["run_dir"])
    assert json.loads((run_dir / "failed.json").read_text())["returncode"] != 0
    code, stdout, _ = run_cli(capsys, "sweep", "fit", out, "--no-mlflow")
    assert code == 0 and f"| {sweep['points'][0]['name']} | failed |" in stdout


def test_run_validates_every_config_first(tmp_path, capsys):
    out, sweep, _ = plan(tmp_path, capsys, "arm,mdm")
    bad = Path(sweep["points"][1]["config"])
    bad.write_text(bad.read_text().replace("zero_stage: 2", "zero_stage: 7"))
    code, _, err = run_cli(capsys, "sweep", "run", out)
    assert code == 2 and "zero_stage: 7 is not one of 0, 1, 2, 3" in err
    assert not any((out / "runs" / p["name"] / "train.log").exists() for p in sweep["points"])


@pytest.mark.slow
def test_slurm_job_array(tmp_path, capsys, monkeypatch):
    out, sweep, _ = plan(tmp_path, capsys, "arm", steps=2)
    log = tmp_path / "slurm.log"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    code, stdout, err = run_cli(
        capsys, "sweep", "run", out, "--launcher", "slurm", "--partition", "gpu",
        "--time", "01:00:00", "--cpus-per-run", "2", "--max-parallel", "4",
    )  # fmt: skip
    assert code == 0, err
    script = (out / "slurm/sweep.sbatch").read_text()
    for line in ("#SBATCH --array=0-0%4", "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --nodes=1"):  # fmt: skip
        assert line in script
    assert "torch.distributed.run --standalone --nproc_per_node=1" in script
    assert "submitted Slurm job array" in stdout
    assert (Path(sweep["points"][0]["run_dir"]) / "summary.json").is_file(), log.read_text()
    assert not (Path(sweep["points"][0]["run_dir"]) / "failed.json").exists()
    sub = json.loads((out / "slurm/submissions.jsonl").read_text())
    assert sub["runs"] == [sweep["points"][0]["name"]]


def test_slurm_multi_node_script(tmp_path, capsys):
    from eval.studies.scaling.run import Resources, sbatch_script

    points = [{"config": f"/s/runs/r{i}/config.yaml"} for i in range(3)]
    script = sbatch_script(tmp_path, points, Resources(gpus_per_run=8, nodes=4))
    assert "#SBATCH --array=0-2\n" in script and "#SBATCH --gpus-per-node=8" in script
    assert "--nnodes=4" in script and "--rdzv_backend=c10d" in script
    assert "--nproc_per_node=8" in script and "srun --nodes=4 --ntasks=4" in script


def test_slurm_task_failure_is_recorded_and_the_packages_are_on_the_path(tmp_path):
    """An array task whose training fails writes runs/<name>/failed.json (as the local and Ray
    launchers do) and exits with the trainer's status; PYTHONPATH names the folder holding the
    packages (it pointed at eval/studies after eval/ moved into rooms)."""
    import subprocess

    from eval.studies.scaling.run import Resources, sbatch_script

    run_dir = tmp_path / "runs" / "arm-x"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yaml"
    config.write_text("objective: arm\nzero_stage: 7\n")  # refused: the trainer exits non-zero
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm/runs.txt").write_text(f"{config}\n")
    script = sbatch_script(tmp_path, [{"config": str(config)}], Resources())
    root = script.split("export PYTHONPATH=")[1].split("$")[0]
    assert (Path(root) / "pipeline" / "cli.py").is_file() and Path(root) == ROOT
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_ARRAY_JOB_ID": "77", "SLURM_NODELIST": "localhost"}  # fmt: skip
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    record = json.loads((run_dir / "failed.json").read_text())
    assert record["returncode"] == proc.returncode and record["slurm_job"] == "77"
    assert record["log"] == f"{tmp_path}/slurm/logs/77_0.out"
    assert "array task 0 failed" in proc.stdout


@pytest.mark.slow
def test_ray_local_cluster(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    out, sweep, _ = plan(tmp_path, capsys, "mdm", steps=2)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        code, stdout, err = run_cli(capsys, "sweep", "run", out, "--launcher", "ray")
    finally:
        ray.shutdown()
    assert code == 0, err + stdout
    assert (Path(sweep["points"][0]["run_dir"]) / "summary.json").is_file()


class ChildWatch:
    """Polls this process's child processes (the sweep's trainers) for their environment."""

    def __init__(self):
        import threading

        self.env: dict[int, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        import psutil

        while not self._stop.is_set():
            for child in psutil.Process().children():
                try:
                    if "pipeline.cli" in child.cmdline() and child.pid not in self.env:
                        self.env[child.pid] = child.environ().get("OMP_NUM_THREADS")
                except psutil.Error:  # exited between listing and reading
                    pass
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def launch_records(point: dict) -> list[dict]:
    path = Path(point["run_dir"]) / "launches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_local_parallel_overlaps_sets_threads_and_survives_a_failure(tmp_path, capsys):
    out, sweep, _ = plan(tmp_path, capsys, "arm,mdm", steps=(2, 4))
    by_name = {p["name"]: p for p in sweep["points"]}
    arm2, arm4, mdm2, mdm4 = (p["name"] for p in sweep["points"])
    broken = Path(by_name[arm4]["config"])  # loads, but its trainer fails on a missing corpus
    broken.write_text(broken.read_text().replace(str(tmp_path / "corpus"), "/nonexistent/c"))
    only = ",".join((arm2, arm4, mdm2))
    with ChildWatch() as watch:
        code, stdout, err = run_cli(capsys, "sweep", "run", out, "--parallel", "2", "--only", only)
    assert code == 1 and "1 of 3 runs failed" in err, err
    assert "up to 2 run(s) at once, 1 thread(s) each" in stdout
    assert f"FAILED {arm4} (exit 1)" in stdout and "nonexistent" in stdout  # with its log tail
    assert (Path(by_name[arm4]["run_dir"]) / "failed.json").is_file()
    for name in (arm2, mdm2):  # the failure stopped neither of the others
        assert json.loads((Path(by_name[name]["run_dir"]) / "summary.json").read_text())
    assert not (Path(by_name[mdm4]["run_dir"]) / "train.log").exists()  # not in --only

    spans = {n: launch_records(by_name[n])[0] for n in (arm2, arm4, mdm2)}
    assert all(s["threads"] == 1 for s in spans.values())
    assert spans[arm2]["started"] < spans[arm4]["ended"]  # the first two started together
    assert spans[arm4]["started"] < spans[arm2]["ended"]
    # the failed run's slot went to the next planned run while the first still trained
    assert spans[arm4]["ended"] <= spans[mdm2]["started"] < spans[arm2]["ended"]
    assert "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " in (out / "runs" / arm2 / "train.log").read_text()
    assert set(watch.env.values()) == {"1"} and len(watch.env) >= 2, watch.env  # as the OS saw it


@pytest.mark.slow
def test_local_ctrl_c_stops_the_running_subprocesses(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out, sweep, _ = plan(tmp_path, capsys, "arm,mdm", steps=400)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", "run", str(out), "--parallel", "2"]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parent = psutil.Process(launcher.pid)
    deadline = time.monotonic() + 120
    while len(parent.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    trainers = parent.children()
    assert len(trainers) == 2, launcher.communicate()[0].decode()
    launcher.send_signal(signal.SIGINT)  # to the launcher alone: it must stop its runs itself
    output = launcher.communicate(timeout=90)[0].decode()
    assert launcher.returncode == 130, output
    assert "interrupted: stopping 2 running run(s)" in output
    assert not any(t.is_running() and t.status() != psutil.STATUS_ZOMBIE for t in trainers)
    for p in sweep["points"]:
        record = launch_records(p)[0]
        assert record["interrupted"] and not (Path(p["run_dir"]) / "failed.json").exists()
