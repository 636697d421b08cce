"""A small raw dump with planted duplicates and every kind of bad input, and a built corpus.

Every good document carries a unique marker ``doc<N>`` so tests can decode the shards and say
exactly which documents ended up in which split.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.readers import parse_date

ROOT = Path(__file__).resolve().parents[2]
CUTOFF = "2020-01-01"
MAX_CHARS = 6000
_letters = random.Random(42)
# letters only: MinHash normalisation maps every digit to 0, so "w1" and "w2" would collide
WORDS = ["".join(_letters.choices("abcdefghijklmnopqrstuvwxyz", k=6)) for _ in range(2000)]
WORDS += ["the", "of", "and"]


@dataclass
class Dump:
    root: Path
    texts: dict[str, str] = field(default_factory=dict)  # marker -> text of kept documents
    dates: dict[str, str | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)  # reason -> count planted
    exact_dups: int = 0
    near_dups: int = 0
    read: int = 0
    extra_pieces: int = 0  # documents added by splitting over-long records
    truncated: list[str] = field(default_factory=list)


def _text(rng: random.Random, marker: str, n_words: int = 120) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return f"{marker} " + " ".join(words) + "."


def _zst(path: Path, lines: list[bytes]) -> bytes:
    data = zstandard.ZstdCompressor().compress(b"".join(line + b"\n" for line in lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def make_dump(root: Path, n_docs: int = 90, seed: int = 0) -> Dump:
    """SlimPajama chunks, a FineWeb parquet, a plain jsonl, and broken files."""
    rng = random.Random(seed)
    dump = Dump(root)
    records: list[dict] = []
    for i in range(n_docs):
        marker = f"doc{i}"
        year = 2005 + i % 20  # 2005..2024: a quarter of them after the cutoff
        date = f"{year}-0{1 + i % 9}-1{i % 10}"
        source = "RedPajamaCommonCrawl" if i % 3 else "RedPajamaWikipedia"
        text = _text(rng, marker)
        records.append({"text": text, "meta": {"redpajama_set_name": source, "date": date}})
        dump.texts[marker], dump.dates[marker], dump.sources[marker] = text, date, source
    # planted duplicates: an exact copy and a one-word edit of two documents
    records.append(dict(records[5]))
    dump.exact_dups += 1
    near = dict(records[7])
    words = near["text"].split(" ")
    words[10] = "changed"
    near["text"] = " ".join(words)
    records.append(near)
    dump.near_dups += 1
    lines = [json.dumps(r).encode() for r in records]
    rng.shuffle(lines)
    half = len(lines) // 2
    book = json.dumps(_book(random.Random(seed + 1), dump)).encode()
    _zst(root / "chunk1" / "example_train_0.jsonl.zst", lines[:half] + [book])
    bad_lines = [
        (b'{"text": "unterminated', "malformed_json"),
        (b'{"meta": {"redpajama_set_name": "X"}}', "missing_text"),
        (b'{"text": 12345}', "non_string_text"),
        (b'{"text": "   \\n\\t "}', "empty_text"),
        (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
        (json.dumps({"text": "dated badly", "date": "someday"}).encode(), "invalid_date"),
        (
            json.dumps({"text": "x", "meta": {"redpajama_set_name": ["A", "B"]}}).encode(),
            "invalid_metadata",
        ),
        (json.dumps({"text": "y", "date": {"year": 2001}}).encode(), "invalid_metadata"),
    ]
    for _line, reason in bad_lines:
        dump.bad[reason] = dump.bad.get(reason, 0) + 1
    mixed = lines[half:]
    for k, (line, _reason) in enumerate(bad_lines):
        mixed.insert(3 * k, line)
    _zst(root / "chunk2" / "example_train_1.jsonl.zst", mixed)
    dump.read = len(lines) + 1 + len(bad_lines)
    _add_fineweb_and_jsonl(root, rng, dump)
    _add_broken_files(root, rng, dump)
    return dump


def _book(rng: random.Random, dump: Dump) -> dict:
    """An over-long record: split (records.too_long=split) into one piece per paragraph."""
    paragraphs = [_text(rng, f"bk{k}", n_words=MAX_CHARS // 10) for k in range(3)]
    for k, paragraph in enumerate(paragraphs):
        piece = paragraph + ("\n\n" if k < len(paragraphs) - 1 else "")
        marker = f"bk{k}"
        dump.texts[marker], dump.dates[marker], dump.sources[marker] = (
            piece,
            "2012-03-04",
            "RedPajamaBook",
        )
    dump.extra_pieces += len(paragraphs) - 1
    meta = {"redpajama_set_name": "RedPajamaBook", "date": "2012-03-04"}
    return {"text": "\n\n".join(paragraphs), "meta": meta}


def _add_fineweb_and_jsonl(root: Path, rng: random.Random, dump: Dump) -> None:
    rows = []
    for i in range(12):
        marker = f"fw{i}"
        text = _text(rng, marker)
        dump_id = f"CC-MAIN-{2018 + i % 6}-{10 + i:02d}"  # dated by dump id only
        rows.append({"text": text, "id": f"<urn:{i}>", "dump": dump_id, "date": None})
        dump.texts[marker] = text
        dump.dates[marker] = parse_date(None, dump_id).isoformat()
        dump.sources[marker] = "fineweb"
    (root / "fineweb").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "fineweb" / "000.parquet")
    plain = []
    for i in range(6):
        marker = f"pl{i}"
        text = _text(rng, marker)
        plain.append(json.dumps({"text": text, "date": f"201{i}-06-01", "source": "plain"}))
        dump.texts[marker], dump.dates[marker], dump.sources[marker] = (
            text,
            f"201{i}-06-01",
            "plain",
        )
    (root / "plain").mkdir(parents=True, exist_ok=True)
    (root / "plain" / "docs.jsonl").write_text("\n".join(plain) + "\n")
    dump.read += len(rows) + len(plain)


def _add_broken_files(root: Path, rng: random.Random, dump: Dump) -> None:
    # a truncated zst: whole documents before the cut survive, the rest is one corrupt_file
    lines = []
    for i in range(8):
        marker = f"tr{i}"
        text = _text(rng, marker, n_words=400)
        lines.append(json.dumps({"text": text, "meta": {"date": "2010-01-01"}}).encode())
        dump.texts[marker], dump.dates[marker], dump.sources[marker] = text, "2010-01-01", "web"
    data = zstandard.ZstdCompressor().compress(b"".join(line + b"\n" for line in lines))
    path = root / "chunk3" / "truncated.jsonl.zst"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    (root / "fineweb" / "001.parquet").write_bytes(b"PAR1 this is not really parquet")
    dump.bad["corrupt_file"] = 2
    dump.truncated = [f"tr{i}" for i in range(8)]


def build_cmd(inputs: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "corpus", "build", "--input", str(inputs),
        "--output", str(output), "--cutoff", CUTOFF, "--seq-len", "64", "--vocab-size", "600",
        "--workers", "2", "--quiet", f"records.max_chars={MAX_CHARS}",
        "split.validation_fraction=0.1", "pack.rows_per_shard=20",
        # ~4 KB of input per task: six tasks, and docs.jsonl split into two byte ranges
        "records.task_bytes=4000", *extra,
    ]  # fmt: skip


def run_build(inputs: Path, output: Path, *extra: str, check: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        build_cmd(inputs, output, *extra), cwd=ROOT, env=env, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def dump(tmp_path_factory) -> Dump:
    return make_dump(tmp_path_factory.mktemp("dump"))


@pytest.fixture(scope="session")
def built(dump, tmp_path_factory) -> Path:
    """The fixture dump built once through the real CLI and datatrove executors."""
    out = tmp_path_factory.mktemp("corpus") / "c"
    run_build(dump.root, out)
    return out
