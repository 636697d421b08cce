"""The paper's setup end to end: undated SlimPajama for training, FineWeb 2024 dumps held out.

The fixture plants duplicates across the cutoff in both stream orders (the pre-cutoff copy
first, and the 2024 copy first): dedup must keep the SlimPajama copy every time. A source whose
date bound is after the cutoff exercises ``split.undated=error|drop|train``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.shards import file_sha256, read_manifest
from pipeline.steps import load_stats, read_rank_file

from .conftest import ROOT, _text, _zst, run_build

SOURCES = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
           "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange"]  # fmt: skip
HOLDOUTS = {"CC-MAIN-2024-10": "holdout_cc_2024_10", "CC-MAIN-2024-18": "holdout_cc_2024_18"}
PLANTED = ["sp0", "sp9", "sp14", "sp20"]  # SlimPajama docs with a 2024 copy


@dataclass
class PaperDump:
    slimpajama: Path
    fineweb: Path
    sources: dict[str, str] = field(default_factory=dict)  # marker -> source of kept docs
    holdout: dict[str, str] = field(default_factory=dict)  # marker -> expected holdout split


def _near(text: str) -> str:
    words = text.split(" ")
    words[20] = "changed"
    return " ".join(words)


def make_paper_dump(root: Path) -> PaperDump:
    """SlimPajama chunks (no dates, no ids, 7 sources) and two FineWeb 2024 parquet dumps."""
    rng = random.Random(7)
    dump = PaperDump(root / "slimpajama" / "train", root / "fineweb" / "data")
    sp = []
    for i in range(28):
        marker, source = f"sp{i}", SOURCES[i % 7]
        sp.append({"text": _text(rng, marker), "meta": {"redpajama_set_name": source}})
        dump.sources[marker] = source
    texts = {f"sp{i}": r["text"] for i, r in enumerate(sp)}
    for n, chunk in enumerate((sp[:14], sp[14:])):
        path = dump.slimpajama / f"chunk{n + 1}" / f"example_train_{n}.jsonl.zst"
        _zst(path, [json.dumps(r).encode() for r in chunk])
    # planted copies: exact of sp0 (first in its chunk) last in 2024-10; exact of sp20 first
    # in 2024-18; near copies of sp9 first in 2024-10 and of sp14 last in 2024-18
    planted = {
        "CC-MAIN-2024-10": ([_near(texts["sp9"])], [texts["sp0"]]),
        "CC-MAIN-2024-18": ([texts["sp20"]], [_near(texts["sp14"])]),
    }
    for d, (dump_id, split) in enumerate(HOLDOUTS.items()):
        first, last = planted[dump_id]
        own = []
        for i in range(6):
            marker = f"fw{d}x{i}"
            own.append(_text(rng, marker))
            dump.sources[marker], dump.holdout[marker] = "FineWeb", split
        rows = []
        for i, text in enumerate(first + own + last):
            # 2024-10 rows carry a crawl date; 2024-18 rows only their dump id
            date = f"2024-02-{20 + i % 8}T08:15:00Z" if d == 0 else None
            rows.append({"text": text, "id": f"<urn:uuid:{d}-{i}>", "dump": dump_id,
                         "url": f"https://example.com/{d}/{i}", "date": date,
                         "language": "en"})  # fmt: skip
        path = dump.fineweb / dump_id / "000_00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return dump


def paper_build(dump: PaperDump, out: Path, *extra: str, check: bool = True):
    """The documented one-command setup, shrunk to fixture size."""
    return run_build(
        dump.slimpajama, out, "--config", str(ROOT / "configs/corpus/slimpajama.yaml"),
        "--input", str(dump.fineweb), "--cutoff", "2024-01-01", "--workers", "2",
        "split.validation_fraction=0.15", "tokenizer.train_sample_chars=15000", *extra,
        check=check,
    )  # fmt: skip


def split_docs(corpus: Path) -> dict[str, list]:
    """{split: documents} from the split stage's own files (exact placement, no packing)."""
    folder = corpus / read_manifest(corpus)["stages"]["split"] / "data"
    return {
        split.name: [
            doc for f in sorted(split.glob("*.jsonl.zst")) for doc in read_rank_file(str(f))
        ]
        for split in sorted(folder.iterdir())
    }


def marker(doc) -> str:
    return doc.text.split(" ", 1)[0]


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> tuple[PaperDump, Path]:
    dump = make_paper_dump(tmp_path_factory.mktemp("paper"))
    out = tmp_path_factory.mktemp("paper_corpus") / "c"
    # sharded exact finding and two workers per MinHash bucket: results must not change
    paper_build(dump, out, "dedup.exact_finder_workers=2", "dedup.workers_per_bucket=2")
    return dump, out


def test_paper_setup_trains_on_slimpajama_and_holds_out_2024(paper):
    dump, out = paper
    m = read_manifest(out)
    docs = split_docs(out)
    assert set(docs) == {"train", "validation", *HOLDOUTS.values()}
    for split in ("train", "validation"):
        assert {d.metadata["source"] for d in docs[split]} <= set(SOURCES)
    for split in HOLDOUTS.values():
        got = sorted(marker(d) for d in docs[split])
        assert got == sorted(k for k, v in dump.holdout.items() if v == split), split
    pre = [marker(d) for s in ("train", "validation") for d in docs[s]]
    assert sorted(pre) == sorted(k for k in dump.sources if k.startswith("sp"))
    # undated SlimPajama documents are counted per source, none possibly post-cutoff
    assert m["undated"]["kept"] == {s: 4 for s in SOURCES}
    assert m["undated"]["after_cutoff"] == {} and m["undated"]["policy"] == "error"
    assert m["documents"]["undated_kept"] == 28


def test_cross_cutoff_duplicates_keep_the_earliest_copy(paper):
    dump, out = paper
    m = read_manifest(out)
    assert m["duplicates"] == {"exact": 2, "near": 2}
    docs = split_docs(out)
    kept = {marker(d): (split, d.metadata["source"]) for split, ds in docs.items() for d in ds}
    for planted in PLANTED:  # in both input orders the SlimPajama copy survives
        split, source = kept[planted]
        assert split in ("train", "validation") and source == dump.sources[planted], planted
    holdout_texts = [d.text for s in HOLDOUTS.values() for d in docs[s]]
    assert not any(t.split(" ", 1)[0] in PLANTED for t in holdout_texts)


def test_bpe_sample_spans_files_and_sources(paper):
    _, out = paper
    m = read_manifest(out)
    stats = load_stats(str(out / m["stages"]["tokenizer"] / "logs"))
    split_stats = load_stats(str(out / m["stages"]["split"] / "logs"))
    sample = {k.split("|", 1)[1]: v for k, v in stats.items()}
    total = sum(v for k, v in split_stats.items() if k.endswith("|chars/pre_cutoff"))
    assert 0 < sample["sample_chars"] < total  # a sample, not everything
    assert sample["sample_tasks"] >= 2  # both SlimPajama chunks
    assert len([k for k in sample if k.startswith("sample_source/")]) >= 4


def test_tokenizer_ignores_validation_fraction(paper, tmp_path):
    dump, built = paper
    out = tmp_path / "c"
    shutil.copytree(built, out)
    tok_dir = out / read_manifest(built)["stages"]["tokenizer"]
    before = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    paper_build(dump, out, "dedup.exact_finder_workers=2", "dedup.workers_per_bucket=2",
                "split.validation_fraction=0.3")  # fmt: skip
    m = read_manifest(out)
    assert m["stages"]["split"] != read_manifest(built)["stages"]["split"]  # re-split
    assert m["stages"]["tokenizer"] == read_manifest(built)["stages"]["tokenizer"]
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == before  # not retrained
    assert file_sha256(out / "tokenizer.json") == file_sha256(built / "tokenizer.json")


def test_undated_after_cutoff_error_drop_train(paper, tmp_path):
    dump, _ = paper
    extra = tmp_path / "extra"  # an undated document of a source without any bound
    extra.mkdir()
    (extra / "misc.jsonl").write_text(json.dumps({"text": _text(random.Random(1), "mys0"),
                                                  "source": "Mystery"}) + "\n")  # fmt: skip
    out = tmp_path / "c"
    late = ("--input", str(extra), "source_dates.RedPajamaBook=2024-06-01", "dedup.near=false")
    proc = paper_build(dump, out, *late, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (out / "manifest.json").exists()
    assert "RedPajamaBook (bound 2024-06-01): 4" in text, text[-3000:]
    assert "Mystery (no source_dates entry): 1" in text and "split.undated=drop" in text
    assert not any(out.glob(".work/*-tokenizer-*/data/tokenizer.json"))  # nothing tokenized

    paper_build(dump, out, *late, "split.undated=drop")
    m = read_manifest(out)
    assert m["dropped"]["undated_after_cutoff"] == 4 and m["dropped"]["undated"] == 1
    assert m["undated"]["after_cutoff"] == {"Mystery": 1, "RedPajamaBook": 4}
    sources = {d.metadata["source"] for ds in split_docs(out).values() for d in ds}
    assert "RedPajamaBook" not in sources and "Mystery" not in sources

    proc = paper_build(dump, out, *late, "split.undated=train")
    assert "warning: 5 undated documents may date from on or after the cutoff" in proc.stdout
    train = split_docs(out)["train"] + split_docs(out).get("validation", [])
    assert sum(d.metadata["source"] == "RedPajamaBook" for d in train) == 4
    assert "undated_after_cutoff" not in read_manifest(out)["dropped"]
    assert os.path.exists(out / "manifest.json")


def test_slurm_guard_fails_the_tokenizer_job(tmp_path):
    """On Slurm the check is the tokenizer stage's first step, reading the split's stats."""
    from pipeline.temporal import UndatedAfterCutoffError, UndatedGuard

    stats = tmp_path / "split" / "logs" / "stats"
    stats.mkdir(parents=True)
    counters = {"undated_after_cutoff/RedPajamaBook": {"total": 3}, "undated_kept": {"total": 9}}
    for rank in range(2):
        step = [{"name": "🔀 - SPLIT: maskscale temporal split", "stats": counters}]
        (stats / f"{rank:05d}.json").write_text(json.dumps(step))
    bounds = {"RedPajamaBook": "2024-06-01"}
    guard = UndatedGuard(str(tmp_path / "split"), "2024-01-01", bounds, "error")
    with pytest.raises(UndatedAfterCutoffError, match=r"RedPajamaBook \(bound 2024-06-01\): 6"):
        guard.run()
    assert UndatedGuard(str(tmp_path / "split"), "2024-01-01", bounds, "drop").run() is None
