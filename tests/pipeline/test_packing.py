"""Packing loses nothing at any task count; shard hashes are reused; stage keys carry versions.

A tiny dump (four files, two sources, no dedup) keeps each build to a few seconds. It holds
documents longer and shorter than a row, one with a literal ``<|endoftext|>`` inside, and a
holdout year whose two documents together are shorter than one row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.inputs import discover_inputs, plan_tasks
from pipeline.packing import stream_tokens
from pipeline.shards import open_shard, read_manifest

from .conftest import WORDS, run_build
from .test_build import MARKER, assert_cleaned, decode_split, shard_digests

EOS = "<|endoftext|>"
TINY = ["pack.seq_len=32", "pack.rows_per_shard=2", "dedup.exact=false", "dedup.near=false",
        "split.validation_fraction=0.2"]  # fmt: skip


def make_tiny_dump(root: Path) -> dict[str, tuple[str, str]]:
    """marker -> (text, expected split or '' for train/validation)."""
    rng = random.Random(7)
    docs: dict[str, tuple[str, str]] = {}
    files: list[list[str]] = [[] for _ in range(4)]
    for i in range(28):
        n_words = [3, 12, 40, 90][i % 4] + rng.randrange(5)
        text = f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."
        if i == 9:
            text = f"doc{i} print('{EOS}') splits documents; so does {EOS}! and the end."
        source = "books" if i % 3 == 0 else "web"
        files[i % 4].append(json.dumps({"text": text, "date": "2012-03-04", "source": source}))
        docs[f"doc{i}"] = (text, "")
    for k, f in ((0, 0), (1, 2)):  # two short documents of one source, in two tasks
        text = f"doc{100 + k} a tiny note."
        files[f].append(json.dumps({"text": text, "date": "2022-05-06", "source": "web"}))
        docs[f"doc{100 + k}"] = (text, "holdout_2022")
    root.mkdir(parents=True)
    for f, lines in enumerate(files):
        (root / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return docs


def check_corpus_whole(corpus: Path, docs: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Every document decodes back whole, exactly once, from the right split; returns
    marker -> split."""
    m = read_manifest(corpus)
    placed: dict[str, str] = {}
    eos_id = m["tokenizer"]["eos_id"]
    for split, info in m["splits"].items():
        texts = decode_split(corpus, split)
        streams = stream_tokens(str(corpus), m, split)
        # the only EOS ids in the streams are document separators (padding is in no stream)
        assert sum(int((s == eos_id).sum()) for s in streams.values()) == info["documents"]
        for text in texts:
            marker = MARKER.match(text).group(1)
            assert marker not in placed, f"{marker} decoded twice"
            placed[marker] = split
            want, want_split = docs[marker]
            assert text == want, marker
            assert want_split in ("", split), (marker, split)
    assert set(placed) == set(docs), sorted(set(docs) ^ set(placed))
    return placed


def test_no_document_lost_at_any_task_count(tmp_path):
    docs = make_tiny_dump(tmp_path / "raw")
    assert docs["doc9"][0].count(EOS) == 2
    placements, tokenizer, counts = [], None, []
    files = discover_inputs([str(tmp_path / "raw")])
    total = sum(f.size for f in files)
    for task_bytes in (10**9, total // 2 + 1, total // 3 + 1):  # 1, 2 and 3+ tasks
        counts.append(len(plan_tasks(files, task_bytes)))
        out = tmp_path / f"c{task_bytes}"
        given = ["--tokenizer", str(tokenizer)] if tokenizer else []  # trained, then given
        run_build(tmp_path / "raw", out, *TINY, f"records.task_bytes={task_bytes}", *given)
        tokenizer = tokenizer or out / "tokenizer.json"
        m = read_manifest(out)
        tiny = m["splits"]["holdout_2022"]
        assert tiny["documents"] == 2 and tiny["rows"] == 1 and tiny["pad_tokens"] > 0
        # the two tiny documents come from files 0 and 2: one or two tasks' tails
        assert 1 <= len({s["task"] for s in tiny["tail_segments"] if s["length"]}) <= 2
        placements.append(check_corpus_whole(out, docs))  # doc9 whole, literal EOS included
    assert counts[0] == 1 and counts[1] >= 2 and counts[2] >= 3
    assert placements[0] == placements[1] == placements[2]  # the split is layout-independent


def test_trainer_reads_padded_tails(tmp_path):
    """The trainer accepts the corpus: tails shards are listed, checked and read like others."""
    from trainer.data import CorpusLoader, check_corpus, iter_eval_batches

    docs = make_tiny_dump(tmp_path / "raw")
    out = tmp_path / "c"
    run_build(tmp_path / "raw", out, *TINY, "records.task_bytes=2000", "--clean-work")
    m = check_corpus(out, read_manifest(out)["tokenizer"]["vocab_size"], 32)
    check_corpus_whole(out, docs)
    assert_cleaned(out, m)
    (batch, _, length), *rest = iter_eval_batches(out, "holdout_2022", batch_size=4)
    assert batch.shape == (1, 33) and not rest
    pad = m["splits"]["holdout_2022"]["pad_tokens"]  # two notes shorter than one row
    assert (
        pad > 0
        and length.tolist() == [33 - pad]
        and (batch[0, 33 - pad :] == m["tokenizer"]["eos_id"]).all()
    )
    loader = CorpusLoader(out, "train", micro_batch=2, global_batch=2, weights={"books": 1.0})
    tokens, _, lengths = loader.next_micro_batch()
    tables = [open_shard(out / s["path"])[0] for s in m["splits"]["train"]["shards"]]
    books = sum(t.column("source").to_pylist().count("books") for t in tables)
    assert tokens.shape == (2, 33) and loader.rows == books > 0
    # a rebuild after --clean-work recomputes every stage and gives the same bytes
    before = shard_digests(out)
    run_build(tmp_path / "raw", out, *TINY, "records.task_bytes=2000")
    assert shard_digests(out) == before


def test_hashes_of_unchanged_shards_are_reused(built, tmp_path):
    """The hash stage, rerun with another task count, reads no shard whose sidecar is current."""
    import os

    from pipeline.build import _QuietLocalExecutor
    from pipeline.manifest import HashShards, list_shards
    from pipeline.steps import load_stats

    m = read_manifest(built)
    dirs = [
        str(built / m["stages"]["pack"] / "data"),
        str(built / m["stages"]["pack-tails"] / "data"),
    ]
    shards = list_shards(dirs)
    assert any("tails_" in p for p in shards)
    os.utime(shards[0])  # a rewritten shard (new mtime) must be hashed again

    def run(logs: Path) -> dict[str, float]:
        _QuietLocalExecutor([HashShards(dirs)], tasks=3, workers=1, logging_dir=str(logs)).run()
        return {k.split("|")[1]: v for k, v in load_stats(str(logs)).items()}

    assert run(tmp_path / "a") == {"hashed": 1, "reused": len(shards) - 1}
    assert run(tmp_path / "b") == {"reused": len(shards)}


def test_stage_keys_include_versions(dump, tmp_path, monkeypatch):
    from pipeline import build
    from pipeline.config import CorpusConfig

    cfg = CorpusConfig(input=[str(dump.root)], output=str(tmp_path / "c"))
    before = [s.folder for s in build.plan_stages(cfg)]
    assert before == [s.folder for s in build.plan_stages(cfg)]
    real = build.stage_versions
    monkeypatch.setattr(build, "stage_versions", lambda stage: {**real(stage), "datatrove": "99"})
    after = [s.folder for s in build.plan_stages(cfg)]
    assert not set(before) & set(after)


@pytest.mark.parametrize("length,per_shard", [(5, 10), (0, 10), (25, 10)])
def test_segments_cover_tails_exactly(length, per_shard):
    from pipeline.packing import _segments

    segs = _segments("s", 3, "web", 7, length, per_shard)
    assert sum(s["length"] for s in segs) == length
    for seg in segs:
        if seg["length"]:
            assert 0 <= seg["start_token"] and seg["start_token"] + seg["length"] <= per_shard
    flat = np.arange(100)
    pieces = [flat[int(s["shard"][-11:-6]) * per_shard + s["start_token"] :][: s["length"]]
              for s in segs if s["length"]]  # fmt: skip
    got = np.concatenate(pieces) if pieces else np.empty(0, int)
    np.testing.assert_array_equal(got, flat[7 : 7 + length])
