"""benchmarks/sampling_bench.py in smoke mode: a table and crossovers per batch size, the JSON
and its markdown section (benchmarks/gpu_table.py). Structure only: timings are not asserted
(it is a benchmark, not a timed test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_run_reports_every_batch_size_and_writes_json(tmp_path, capsys, restore_threads):
    bench, table = load("sampling_bench"), load("gpu_table")
    out = tmp_path / "sampling.json"
    assert bench.main(["--smoke", "--batch", "1,2", "--no-cache", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("crossover (low-confidence)") == 2 and text.count("crossover (random)") == 2
    assert "batch 1:" in text and "batch 2:" in text and "load average" in text

    result = json.loads(out.read_text())
    assert result["benchmark"] == "sampling" and result["args"]["batch"] == [1, 2]
    length = result["args"]["length"]  # smoke: L = 8, so steps 8, 4, 2, 1
    assert [b["batch"] for b in result["results"]] == [1, 2]
    for b in result["results"]:
        assert b["tokens"] == b["batch"] * length
        names = [r["sampler"] for r in b["rows"]]
        assert names[:2] == ["ARM kv-cache", "ARM no cache"]
        for strategy in ("low-confidence", "random"):
            steps = [r["steps"] for r in b["rows"] if r["strategy"] == strategy]
            assert steps == [8, 4, 2, 1]
            faster = [
                r["steps"] for r in b["rows"] if r["strategy"] == strategy and r["vs_arm"] > 1
            ]
            assert b["crossover"][strategy] == (max(faster) if faster else None)
        arm = b["rows"][0]
        assert arm["vs_arm"] == 1.0 and arm["tokens_per_s"] == pytest.approx(
            b["tokens"] / arm["seconds"]
        )
        assert all(r["seconds"] > 0 for r in b["rows"])

    md = table.sampling_table(result)
    assert md.startswith("## MDM vs ARM sampling")
    body = [line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(body) == 4  # one row per batch size and strategy
    assert all(line.count("|") == 10 for line in body)  # batch, ARM, strategy, 4 steps, 2 more


def test_bad_batch_list_is_a_usage_error(capsys):
    bench = load("sampling_bench")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--batch", "1,x"])
    assert exc.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    assert bench.parse_args(["--batch", "1,8", "--strategy", "random"]).batch == [1, 8]
