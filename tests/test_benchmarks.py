"""The GPU check's harness (benchmarks/gpu_check.sh, benchjson.py, trainer_bench.py,
gpu_table.py): a failure in one variant costs that variant only.

The slow test runs the real CPU dry run with its injected failures (an OOM and a compile error
in the first trainer run, a crash that kills the second one's process, an NCCL error in the
sampling run) and reads back the files the device call would return. The fast ones drive the
recorder in-process: SIGTERM (a section's time limit), --time-limit and --resume.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def by_label(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    return {r["label"]: r for r in data.get("records", data.get("results", []))}


@pytest.mark.slow
def test_dry_run_records_each_injected_failure_and_measures_everything_else(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MASKSCALE_BENCH_FAIL"}
    env.update(OUT=str(tmp_path), PY=sys.executable)
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = (tmp_path / "check.log").read_text()
    assert proc.returncode == 0, log[-4000:]  # every failure was an injected one
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_170m.json",
        "bench_1b.json",
        "check.log",
        "pytest.xml",
        "sampling.json",
        "table.md",
    ]  # the device tool returns at most 8 files

    one = by_label(tmp_path / "bench_1b.json")
    assert [one[f"tiny-0.3M/base/{o}"]["status"] for o in ("arm", "mdm")] == ["ok", "ok"]
    for label, kind in (("tiny-0.3M/eager/arm", "oom"), ("tiny-0.3M/eager/mdm", "compile")):
        assert one[label]["status"] == "failed" and one[label]["error"]["kind"] == kind
        assert one[label]["error"]["injected"] and label in one[label]["error"]["message"]
    assert one["tiny-0.3M/base/arm"]["tokens_per_s"] > 0 and one["tiny-0.3M/base/arm"]["mfu"] > 0

    two = by_label(tmp_path / "bench_170m.json")
    crash = two["tiny-0.3M/plain-loss/mdm"]
    assert crash["status"] == "failed" and crash["error"]["kind"] == "crash"
    assert "exit status 134" in crash["error"]["message"]
    # measured before the crash (kept by --resume) and after it (the resumed process)
    levers = [f"tiny-0.3M/{v}/{o}" for v in ("plain-engine", "math") for o in ("arm", "mdm")]
    for label in ("tiny-0.3M/plain-loss/arm", "tiny-0.3M/cut-rows/mdm", "loader", *levers):
        assert two[label]["status"] == "ok", label
    assert two["tiny-0.3M/cut-rows/mdm"]["fused_over_dense"] > 0

    sampling = json.loads((tmp_path / "sampling.json").read_text())
    assert [b["status"] for b in sampling["results"]] == ["ok", "failed"]
    assert sampling["results"][1]["error"]["kind"] == "nccl"

    for name in ("bench_1b.json", "bench_170m.json", "sampling.json"):
        header = json.loads((tmp_path / name).read_text())["header"]
        assert header["torch"] and header["deepspeed"] and header["gpu"] is None
        assert header["torch_logs"] == "recompiles,graph_breaks" and header["time_utc"]

    table = (tmp_path / "table.md").read_text()
    assert "| tiny-0.3M | 2x2x32 | eager (compile=false) | FAILED (oom) |" in table
    assert "FAILED (crash)" in table and "one cut row" in table and "9 skipped" in table
    assert "| 1 | " in table  # the sampling row of batch 1, measured before batch 2 failed
    not_measured = table.split("## Not measured")[1]
    assert not_measured.count("[injected]") == 4
    # rebuildable from the returned files alone (the log and the table itself are passed over)
    files = ["pytest.xml", "bench_1b.json", "bench_170m.json", "sampling.json", "check.log"]
    again = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_table.py"), *(str(tmp_path / f) for f in files)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and again.stdout.strip() == table.strip()


def record_plan(calls: list[str], raise_in: str | None = None):
    def measure(label):
        def run():
            calls.append(label)
            if label == raise_in:
                signal.raise_signal(signal.SIGTERM)
            return {"step_s": 1.0}

        return run

    return [(label, {"variant": label}, measure(label)) for label in ("a", "b", "c")]


@pytest.fixture
def sigterm_restored():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_records_a_timeout_and_skips_what_did_not_start(tmp_path, sigterm_restored):
    bench = load("benchjson")
    path = tmp_path / "r.json"
    rec = bench.Recorder(path, "trainer", {})
    calls: list[str] = []
    assert rec.run_all(record_plan(calls, raise_in="b")) == bench.TIMEOUT_STATUS
    records = by_label(path)
    assert calls == ["a", "b"] and records["a"]["status"] == "ok"
    assert records["b"]["status"] == "failed" and records["b"]["error"]["kind"] == "timeout"
    assert records["c"]["status"] == "skipped"


def test_resume_keeps_finished_records_marks_the_crash_and_honours_the_time_limit(
    tmp_path, sigterm_restored
):
    bench = load("benchjson")
    path = tmp_path / "r.json"
    old = {"records": [{"label": "a", "status": "ok", "step_s": 2.0}]}
    old["records"].append({"label": "b", "variant": "b", "status": "running"})
    path.write_text(json.dumps(old))
    rec = bench.Recorder(path, "trainer", {}, resume=True)
    rec.crash_status = 139
    calls: list[str] = []
    assert rec.run_all(record_plan(calls)) == 0
    records = by_label(path)
    assert calls == ["c"] and records["a"]["step_s"] == 2.0  # not measured again
    assert records["b"]["error"]["kind"] == "crash" and "139" in records["b"]["error"]["message"]
    assert records["c"]["status"] == "ok"

    late = bench.Recorder(tmp_path / "late.json", "trainer", {})
    assert late.run_all(record_plan(calls), deadline=time.monotonic() - 1) == 0
    assert {r["status"] for r in by_label(tmp_path / "late.json").values()} == {"skipped"}
    assert calls == ["c"]


def test_a_variant_with_an_unknown_config_key_is_a_usage_error(capsys):
    bench = load("trainer_bench")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--tiny", "--variant", "fast:optim.no_such_key=1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "variant 'fast'" in err and "optim.no_such_key" in err
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "base,warp-speed"])
    assert "unknown variant 'warp-speed'" in capsys.readouterr().err
    args = bench.parse_args(
        ["--tiny", "--variants", "base,plain-loss", "--variant", "ac:activation_checkpointing=2"]
    )
    assert args.variants == [
        ("base", []),
        ("plain-loss", ["loss_chunk=0"]),
        ("ac", ["activation_checkpointing=2"]),
    ]


def test_report_check_fails_on_a_real_failure_and_a_missing_file(tmp_path):
    table = load("gpu_table")
    meta = {"model": "m", "micro": 1, "accum": 1, "seq_len": 8, "overrides": []}
    ok = {**meta, "status": "ok", "step_s": 1.0, "tokens_per_s": 8.0, "peak_gb": 1.0}
    error = {"kind": "oom", "type": "torch.OutOfMemoryError", "message": "CUDA out of memory"}
    result = {"benchmark": "trainer", "reference_variant": "base", "records": [
        {**ok, "label": "m/base/arm", "variant": "base", "objective": "arm"},
        {**ok, "label": "m/base/mdm", "variant": "base", "objective": "mdm", "step_s": 1.02},
        {**meta, "label": "m/big/arm", "variant": "big", "objective": "arm", "status": "failed",
         "error": {**error, "injected": False}},
    ]}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    text, clean = table.report([path])
    assert not clean and "| m | 1x1x8 | base | 8 | - | 8 | - | 1.020 | 1.000/1.000 |" in text
    assert "| m | 1x1x8 | big | FAILED (oom) |" in text and "CUDA out of memory" in text
    assert table.main(["--check", str(path)]) == 1
    result["records"][2]["error"]["injected"] = True
    path.write_text(json.dumps(result))
    assert table.main(["--check", str(path)]) == 0
    assert table.main(["--check", str(path), str(tmp_path / "missing.json")]) == 1


def test_a_run_without_deepspeed_leaves_a_json_that_says_so(tmp_path, monkeypatch):
    bench, table = load("trainer_bench"), load("gpu_table")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on an image without the wheels
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["records"] == [] and "deepspeed" in result["error"]["message"]
    text, clean = table.report([out])
    assert not clean and "`trainer setup` (bench.json): FAILED error" in text
