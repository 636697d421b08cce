"""Listing inputs and planning work units: reads that stay linear, the plan cache, and the
build's own output never taken for input."""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import inputs
from pipeline.build import plan_stages
from pipeline.cli import main
from pipeline.config import CorpusConfig
from pipeline.configlib import load_config
from pipeline.inputs import PLAN_CACHE, discover_inputs, plan_tasks
from pipeline.readers import RawDumpReader


def _jsonl(path, n: int, seed: int = 0, trailing_newline: bool = True) -> None:
    """Records of varied length, with bad lines, blank lines and one line longer than a unit."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(1, 60)))
        lines.append(json.dumps({"text": f"doc{i} {words}"}))
    for i in range(7, n, 97):
        lines[i] = "{broken"
    for i in range(11, n, 131):
        lines[i] = ""
    lines[n // 2] = json.dumps({"text": f"doc{n // 2} " + "x" * 20_000})
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))


def _read_all(tasks, rejects) -> tuple[list, list]:
    reader = RawDumpReader(tasks, str(rejects), corrupt_folder=str(rejects) + "-bad")
    n = len(tasks)
    docs = [(d.id, d.metadata["origin"], d.text)
            for rank in range(n) for d in reader.run(None, rank=rank, world_size=n)]  # fmt: skip
    rows = [
        json.loads(x) for f in sorted(rejects.glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    return docs, sorted((r["file"], r["line"], r["reason"]) for r in rows)


@pytest.fixture
def bytes_read(monkeypatch) -> Counter:
    """Bytes returned by every read of an opened input, per url."""
    counts: Counter = Counter()
    real = inputs._Guarded.read

    def read(self, n=-1):
        data = real(self, n)
        counts[self.url] += len(data)
        return data

    monkeypatch.setattr(inputs._Guarded, "read", read)
    return counts


def test_ranges_of_a_plain_file_read_it_about_once(tmp_path, bytes_read):
    """Numbering lines must not reread the file's head: n ranges read ~1x the file, not n/2x."""
    path = tmp_path / "big.jsonl"
    _jsonl(path, 3000)
    size = path.stat().st_size
    files = discover_inputs([str(path)])
    whole = _read_all(plan_tasks(files, 1 << 30), tmp_path / "rej-whole")
    bytes_read.clear()
    tasks = plan_tasks(files, 16384)
    assert len(tasks) > 30
    assert bytes_read[str(path)] <= 1.05 * size  # the newlines, counted once at planning
    bytes_read.clear()
    split = _read_all(tasks, tmp_path / "rej-split")
    assert bytes_read[str(path)] <= 1.5 * size, bytes_read[str(path)] / size
    print(f"read {bytes_read[str(path)] / size:.3f}x the file in {len(tasks)} ranges")
    # file:line in rejects and document ids/origins exactly as when read in one piece
    assert split == whole
    assert len(whole[0]) > 2900 and {r[2] for r in whole[1]} == {"malformed_json"}
    assert len(whole[1]) > 25
    assert whole[0][0][:2] == ("big.jsonl:1", f"{path}:1")


@pytest.mark.parametrize("task_bytes", [97, 333, 4096])
def test_line_numbers_of_ranges_match_one_piece(tmp_path, task_bytes):
    """Tiny ranges: ranges inside one long line, bounds on newlines, no final newline."""
    path = tmp_path / "small.jsonl"
    _jsonl(path, 150, seed=task_bytes, trailing_newline=False)
    files = discover_inputs([str(path)])
    whole = _read_all(plan_tasks(files, 1 << 30), tmp_path / "rej-whole")
    assert _read_all(plan_tasks(files, task_bytes), tmp_path / "rej-split") == whole


def _inputs(raw) -> None:
    raw.mkdir()
    _jsonl(raw / "a.jsonl", 600)
    table = pa.table({"text": [f"row {i} " + "y" * (i % 50) for i in range(4000)]})
    pq.write_table(table, raw / "b.parquet", row_group_size=500)
    (raw / "c.jsonl.zst").write_bytes(zstandard.compress(b'{"text": "z"}\n' * 50))


def test_plan_cache_reuses_what_planning_read_until_inputs_change(tmp_path, monkeypatch):
    raw, cache = tmp_path / "raw", tmp_path / "out" / ".work" / PLAN_CACHE
    _inputs(raw)
    calls: Counter = Counter()
    for name in ("_lines_before", "_row_group_bytes"):
        real = getattr(inputs, name)
        monkeypatch.setattr(inputs, name, lambda *a, _r=real, _n=name: calls.update([_n]) or _r(*a))

    def plan(task_bytes):
        return plan_tasks(discover_inputs([str(raw)]), task_bytes, cache=str(cache))

    first = plan(4000)
    assert calls == {"_lines_before": 1, "_row_group_bytes": 1} and cache.is_file()
    assert any(u.lines_before for t in first for u in t)
    assert sum(u.file.codec == "parquet" for t in first for u in t) > 1  # cut by row groups
    calls.clear()
    assert plan(4000) == first and not calls  # a resume reads nothing again
    # other ranges of the plain file: recounted; row groups do not depend on task_bytes
    fresh = plan_tasks(discover_inputs([str(raw)]), 3000)
    calls.clear()
    assert plan(3000) == fresh and calls == {"_lines_before": 1}
    calls.clear()
    assert plan(4000) == first and not calls
    with (raw / "a.jsonl").open("a") as f:  # rewritten input: size and mtime change
        f.write(json.dumps({"text": "appended"}) + "\n")
    changed = plan(4000)
    assert calls == {"_lines_before": 1} and changed != first
    assert changed == plan_tasks(discover_inputs([str(raw)]), 4000)
    cache.write_text("{not json")  # a damaged cache is rebuilt, never trusted
    assert plan(4000) == changed
    data = json.loads(cache.read_text())
    for entry in data["files"].values():
        entry["facts"] = {
            k: v[:1] if k.startswith("lines") else v for k, v in entry["facts"].items()
        }
    cache.write_text(json.dumps(data))
    calls.clear()
    assert plan(4000) == changed and calls == {"_lines_before": 1}  # wrong count: recounted


def test_plan_stages_use_the_cache_and_skip_the_output_folder(tmp_path, monkeypatch):
    """The output inside the input folder: its .work/ JSONL (intermediates, rejects, the plan
    cache) is never an input, on the first build or any later one."""
    raw = tmp_path / "raw"
    _inputs(raw)
    out = raw / "corpus"
    junk = out / ".work" / "03-split-abc" / "data" / "train"
    junk.mkdir(parents=True)
    (junk / "00000.jsonl.zst").write_bytes(zstandard.compress(b'{"text": "again"}\n'))
    (out / ".work" / "x-rejects.jsonl").write_text('{"text": "rejected"}\n')
    cfg = load_config(CorpusConfig, None, [f"input=[{raw}]", f"output={out}",
                                           "records.task_bytes=4000"])  # fmt: skip

    def planned_files():
        reader = plan_stages(cfg)[0].pipeline[0]
        return sorted({u.file.name for t in reader.tasks for u in t})

    assert planned_files() == ["a.jsonl", "b.parquet", "c.jsonl.zst"]
    assert (out / ".work" / PLAN_CACHE).is_file()
    monkeypatch.setattr(inputs, "_lines_before", lambda *a: pytest.fail("reread a.jsonl"))
    monkeypatch.setattr(inputs, "_row_group_bytes", lambda *a: pytest.fail("reread b.parquet"))
    assert planned_files() == ["a.jsonl", "b.parquet", "c.jsonl.zst"]
    only_output = load_config(CorpusConfig, None, [f"input=[{out}]", f"output={out}"])
    with pytest.raises(inputs.NoInputError, match="only files under the output folder"):
        plan_stages(only_output)


def test_cli_refuses_url_outputs_and_inputs_matching_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a URL taken for a path would have become a folder
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text('{"text": "x"}\n')
    build = ["corpus", "build", "--quiet", "--input", str(raw)]
    assert main([*build, "--output", "s3://bucket/x"]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "'s3://bucket/x' is a URL" in err and "aws s3 sync" in err
    config = tmp_path / "c.yaml"
    config.write_text("output: gs://bucket/corpus\n")
    assert main([*build, "--config", str(config)]) == 2
    assert "'gs://bucket/corpus' is a URL" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()
    out = str(tmp_path / "c")
    missing = str(tmp_path / "nope" / "*.jsonl")
    assert main([*build, "--input", missing, "--output", out]) == 2
    err = capsys.readouterr().err
    assert f"input {missing!r} matches no file" in err and "--input" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an input")
    assert main([*build, "--input", str(tmp_path / "empty"), "--output", out]) == 2
    assert "matches no file with extension .jsonl.zst" in capsys.readouterr().err
