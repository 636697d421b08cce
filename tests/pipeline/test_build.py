"""End-to-end corpus builds through the real CLI, datatrove executors and Arrow files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from pipeline.packing import stream_tokens
from pipeline.shards import ShardMeta, file_sha256, open_shard, read_manifest, shard_tokens

from .conftest import CUTOFF, ROOT, build_cmd, run_build

MARKER = re.compile(r"^((?:doc|fw|pl|tr|bk)\d+) ")


def decode_split(corpus: Path, split: str) -> list[str]:
    """Every document of a split, reassembled from the manifest (task rows + tail segments).

    Asserts what makes the corpus trustworthy: each stream ends with a whole document (EOS),
    the segments and padding fill the tails shards exactly, and padding is EOS only.
    """
    manifest = read_manifest(corpus)
    info = manifest["splits"][split]
    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    eos, width = manifest["tokenizer"]["eos_id"], manifest["seq_len"] + 1
    docs = []
    for key, stream in stream_tokens(str(corpus), manifest, split).items():
        assert len(stream) and stream[-1] == eos, f"{split} stream {key} ends inside a document"
        cuts = np.flatnonzero(stream == eos)
        docs += [tok.decode(p[:-1].tolist()) for p in np.split(stream, cuts + 1)[:-1]]
    tails_rows = sum(s["rows"] for s in info["shards"] if "/tails_" in s["path"])
    covered = sum(seg["length"] for seg in info["tail_segments"])
    assert covered + info["pad_tokens"] == tails_rows * width
    assert info["tokens"] + info["pad_tokens"] == info["rows"] * width
    return docs


def shard_digests(corpus: Path) -> dict[str, str]:
    out = {}
    for split in sorted(p for p in corpus.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for shard in sorted(split.glob("*.arrow")):
            out[f"{split.name}/{shard.name}"] = file_sha256(shard)
    out["tokenizer.json"] = file_sha256(corpus / "tokenizer.json")
    return out


def test_accounting_closes_and_bad_input_is_counted(built, dump):
    m = read_manifest(built)
    dropped = sum(m["dropped"].values())
    dups = m["duplicates"]["exact"] + m["duplicates"]["near"]
    d = m["documents"]
    assert d["read"] + d["extra_pieces"] == d["kept"] + dropped + dups
    # each damaged region counts as one record read and dropped (corrupt_file)
    assert d["read"] == dump.read + dump.bad["corrupt_file"]
    assert d["extra_pieces"] == dump.extra_pieces
    assert m["long_documents"] == {"policy": "split", "split": 1, "pieces": 3}
    assert m["dropped"] == dump.bad  # every planted bad record, by reason
    assert m["dates"]["from_dump"] == 12  # the FineWeb rows carry only a dump id
    corrupt = {Path(c["file"]).name: c for c in m["corrupt_files"]}
    assert corrupt["truncated.jsonl.zst"]["reason"] == "truncated_stream"
    size = (dump.root / "chunk3" / "truncated.jsonl.zst").stat().st_size
    assert 0 < corrupt["truncated.jsonl.zst"]["lost_bytes"] <= size
    assert corrupt["001.parquet"]["reason"] == "unreadable_parquet"
    assert m["documents"]["kept"] == sum(s["documents"] for s in m["splits"].values())
    rejects = list((built / m["stages"]["split"] / "rejects").glob("*.jsonl"))
    lines = [json.loads(x) for f in rejects for x in f.read_text().splitlines()]
    assert {r["reason"] for r in lines} == set(dump.bad)
    assert all(r["file"] and r["line"] >= 1 for r in lines)


def test_every_valid_document_is_kept_whole_once(built, dump):
    m = read_manifest(built)
    seen: dict[str, int] = {}
    for split in m["splits"]:
        for text in decode_split(built, split):
            marker = MARKER.match(text).group(1)
            seen[marker] = seen.get(marker, 0) + 1
            assert text == dump.texts[marker], marker  # whole: no document is cut by packing
    expected = {k for k in dump.texts if k not in dump.truncated}
    # the exact copy and the near copy are gone, the originals stay: one of each marker
    assert expected == set(seen), sorted(expected ^ set(seen))
    assert all(n == 1 for n in seen.values()), {k: n for k, n in seen.items() if n > 1}
    assert m["duplicates"] == {"exact": dump.exact_dups, "near": dump.near_dups}


def test_dates_respected(built, dump):
    m = read_manifest(built)
    for split in m["splits"]:
        for text in decode_split(built, split):
            date = dump.dates[MARKER.match(text).group(1)]
            if split in ("train", "validation"):
                assert date < CUTOFF, (split, date)
            else:
                assert date >= CUTOFF and split == f"holdout_{date[:4]}", (split, date)
    assert {"train", "validation"} <= set(m["splits"])
    assert any(s.startswith("holdout_") for s in m["splits"])


def test_shards_schema_pyarrow_and_datasets(built):
    import datasets

    m = read_manifest(built)
    shard = built / m["splits"]["train"]["shards"][0]["path"]
    table, meta = open_shard(shard)
    assert isinstance(meta, ShardMeta) and meta.seq_len == 64 and meta.split == "train"
    assert meta.mask_id == meta.vocab_size == m["tokenizer"]["vocab_size"]
    assert meta.tokenizer_sha256 == file_sha256(built / "tokenizer.json")
    assert table.schema.field("input_ids").type == pa.list_(pa.uint16(), 65)
    assert shard_tokens(table).max() < meta.vocab_size
    rows = sum(s["rows"] for s in m["splits"]["train"]["shards"])
    assert rows == m["splits"]["train"]["rows"]
    for s in m["splits"]["train"]["shards"]:
        assert file_sha256(built / s["path"]) == s["sha256"]
    ds = datasets.load_dataset(
        "arrow", data_files=str(built / "train" / "*.arrow"), split="train", cache_dir=None
    )
    assert len(ds) == rows and len(ds[0]["input_ids"]) == 65
    per_split = m["splits"]["train"]
    assert per_split["tokens"] + per_split["pad_tokens"] == per_split["rows"] * 65


def test_strict_mode_names_file_and_line(dump, tmp_path):
    # one worker: tasks run in file order, so the first bad record met is deterministic
    proc = run_build(dump.root, tmp_path / "c", "--strict", "--workers", "1", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"example_train_1\.jsonl\.zst:1: malformed_json", out), out[-2000:]
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.slow
def test_kill_and_resume_gives_identical_shards(built, dump, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(build_cmd(dump.root, out), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list(out.glob(".work/*minhash-signatures*/logs/completions/*"))
        if done:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "build finished before it could be killed"
    run_build(dump.root, out)
    assert shard_digests(out) == shard_digests(built)


def test_changed_settings_rebuild_instead_of_reusing(built, dump, tmp_path):
    out = tmp_path / "c"
    run_build(dump.root, out)
    first = read_manifest(out)
    run_build(dump.root, out, "pack.seq_len=32")
    second = read_manifest(out)
    assert second["seq_len"] == 32
    _, meta = open_shard(out / second["splits"]["train"]["shards"][0]["path"])
    assert meta.seq_len == 32
    assert second["stages"]["pack"] != first["stages"]["pack"]
    assert second["stages"]["split"] == first["stages"]["split"]  # upstream reused
    # back to A: its stages (publish included) are all complete, yet OUTPUT must be A again
    run_build(dump.root, out)
    again = read_manifest(out)
    assert again["seq_len"] == 64 and again["build_key"] == first["build_key"]
    assert again["splits"] == first["splits"]  # shard paths, rows and sha256s
    assert shard_digests(out) == shard_digests(built)
    # a different cutoff re-splits and removes splits that no longer exist; --clean-work then
    # drops the stage folders of A and B and the bulk data of this build's stages
    run_build(dump.root, out, "split.cutoff=2030-01-01", "--clean-work")
    third = read_manifest(out)
    assert set(third["splits"]) == {"train", "validation"}
    assert not any(p.name.startswith("holdout_") for p in out.iterdir())
    assert_cleaned(out, third)


def assert_cleaned(out: Path, m: dict) -> None:
    """Only this build's stage folders are left, holding logs (and rejects) only."""
    work = out / ".work"
    expected = {Path(v).name for v in m["stages"].values()}
    expected |= {p.name for p in work.glob(f"*-publish-{m['build_key']}")}
    assert {p.name for p in work.iterdir()} == expected and len(expected) == len(m["stages"]) + 1
    for folder in work.iterdir():
        assert {p.name for p in folder.iterdir()} <= {"logs", "rejects"}, folder
        assert not (folder / "logs" / "completions").exists()
    assert list((out / m["stages"]["split"] / "rejects").glob("*.jsonl"))
    for info in m["splits"].values():
        for shard in info["shards"]:
            assert file_sha256(out / shard["path"]) == shard["sha256"]


def test_given_tokenizer_is_used_and_checked(built, dump, tmp_path):
    tok = built / "tokenizer.json"
    out = tmp_path / "c"
    run_build(dump.root, out, "--tokenizer", str(tok))
    m = read_manifest(out)
    assert m["tokenizer"]["sha256"] == file_sha256(tok) and not m["tokenizer"]["trained"]
    bad = run_build(dump.root, tmp_path / "d", "--tokenizer", str(tok), "tokenizer.eos_token=</s>",
                    check=False)  # fmt: skip
    assert bad.returncode != 0 and "'</s>' is not in the vocabulary" in bad.stdout + bad.stderr
    missing = run_build(dump.root, tmp_path / "e", "--tokenizer", str(tmp_path), check=False)
    assert "is a directory" in missing.stdout + missing.stderr


def test_edited_input_is_reread(dump, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(dump.root, raw)
    out = tmp_path / "c"
    run_build(raw, out)
    before = read_manifest(out)["documents"]
    with open(raw / "plain" / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "pl99 a fresh document about rivers", "date": "2011-01-01"}))
        f.write("\n")
    run_build(raw, out)
    after = read_manifest(out)["documents"]
    assert after["read"] == before["read"] + 1 and after["kept"] == before["kept"] + 1


def test_large_vocab_gives_uint32_shards(tmp_path):
    """vocab + 1 > 65536: ids (and the MDM mask id) need uint32."""
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = [" ".join(f"w{69_999 - i * 101 - j}" for j in range(50)) for i in range(6)]
    lines = [json.dumps({"text": d, "date": "2001-01-01"}) for d in docs]
    (raw / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "c"
    run_build(raw, out, "--tokenizer", str(tmp_path / "tokenizer.json"), "dedup.near=false")
    m = read_manifest(out)
    assert m["dtype"] == "uint32" and m["tokenizer"]["mask_id"] == 70_002
    table, meta = open_shard(out / m["splits"]["train"]["shards"][0]["path"])
    assert table.schema.field("input_ids").type == pa.list_(pa.uint32(), 65)
    assert shard_tokens(table).max() > 65_535


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


def test_other_worker_counts_recompute_nothing(built, dump):
    """The partition follows the data and records.task_bytes: no stage key sees the executor."""
    before = _snapshot(built)
    for workers in ("1", "3"):
        run_build(dump.root, built, "--workers", workers)
        assert _snapshot(built) == before


def test_stage_keys_ignore_the_executor_and_tasks_is_gone(dump, tmp_path):
    from pipeline.build import plan_stages
    from pipeline.config import CorpusConfig
    from pipeline.configlib import ConfigError, load_config

    base = [f"input=[{dump.root}]", f"output={tmp_path}", "records.task_bytes=4000"]
    folders = [[s.folder for s in plan_stages(load_config(CorpusConfig, None, base + extra))]
               for extra in ([], ["executor.workers=9", "executor.kind=ray"])]  # fmt: skip
    assert folders[0] == folders[1]  # publish included
    first = plan_stages(load_config(CorpusConfig, None, base))[0]
    assert first.tasks == 6  # 4 compressed/parquet files, docs.jsonl in two ranges + 001.parquet
    with pytest.raises(ConfigError, match="executor.tasks is no longer a setting: .*task_bytes"):
        load_config(CorpusConfig, None, base + ["executor.tasks=8"])


def test_unreadable_input_fails_the_build_naming_the_file(tmp_path):
    """A storage error (here a real one from the kernel) is not bad data: the build stops."""
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux /proc/self/mem to produce a read error")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ok.jsonl").write_text(json.dumps({"text": "fine", "date": "2001-01-01"}) + "\n")
    (raw / "bad.jsonl").symlink_to("/proc/self/mem")  # a regular file whose reads fail
    out = tmp_path / "c"
    proc = run_build(f"file://{raw}", out, check=False)  # inputs may be fsspec URLs
    assert proc.returncode == 1
    assert re.search(r"cannot read input: .*bad\.jsonl: reading failed", proc.stdout), proc.stdout
    assert not (out / "manifest.json").exists()
