"""Padding and documents of a real packed corpus: recorded, inferred for old corpora, exact.

The corpus is the pipeline tests' tiny dump (documents longer and shorter than a row, one with
a literal ``<|endoftext|>`` in its text, a holdout of two notes shorter than one row) built by
the real CLI with three pack tasks, so tails of several tasks share tails rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from eval.measure.documents import NO_DOCUMENT, DocumentIndex
from eval.measure.rows import RowReader, SplitLayout
from pipeline.inputs import discover_inputs
from pipeline.shards import PAD_COLUMN, inferred_pads, read_manifest
from tests.pipeline.conftest import run_build
from tests.pipeline.test_packing import TINY, make_tiny_dump
from trainer.data import _SplitReader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("docs")
    docs = make_tiny_dump(root / "raw")
    total = sum(f.size for f in discover_inputs([str(root / "raw")]))
    run_build(root / "raw", root / "corpus", *TINY, f"records.task_bytes={total // 3 + 1}")
    return root / "corpus", docs


def read_all(corpus: Path, manifest: dict, split: str):
    layout = SplitLayout.from_manifest(corpus, manifest, split)
    rows = np.arange(layout.rows)
    reader = RowReader(layout, manifest["tokenizer"]["sha256"])
    tokens, lengths = reader.gather(rows)
    reader.close()
    return layout, rows, tokens, lengths


def strip_pad_column(corpus: Path, manifest: dict) -> None:
    """Rewrite every shard without ``n_pad``: a corpus as manifest format 2 wrote it."""
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = corpus / shard["path"]
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            old = table.drop_columns([PAD_COLUMN])
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, old.schema) as out:
                out.write_table(old)


def test_partial_rows_record_their_padding(tiny):
    corpus, _ = tiny
    manifest = read_manifest(corpus)
    assert manifest["format"] == "maskscale-corpus/3"
    eos = manifest["tokenizer"]["eos_id"]
    for split, info in manifest["splits"].items():
        _, _, tokens, lengths = read_all(corpus, manifest, split)
        pads = tokens.shape[1] - lengths
        assert int(pads.sum()) == info["pad_tokens"] > 0, split
        for row, n in zip(tokens, pads):
            assert (row[len(row) - n :] == eos).all()
        assert np.array_equal(_SplitReader(corpus, split).gather(np.arange(len(tokens)))[1], lengths)  # fmt: skip


def test_every_document_gets_one_id_and_decodes_whole(tiny):
    corpus, docs = tiny
    manifest = read_manifest(corpus)
    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    eos = manifest["tokenizer"]["eos_id"]
    texts = {text for text, _ in docs.values()}
    for split, info in manifest["splits"].items():
        layout, rows, tokens, lengths = read_all(corpus, manifest, split)
        index = DocumentIndex(layout, manifest, eos)
        ids = index.token_ids(rows, tokens)
        assert index.documents == info["documents"]
        padding = np.arange(tokens.shape[1])[None, :] >= lengths[:, None]
        assert np.array_equal(ids == NO_DOCUMENT, padding)
        flat_ids, flat = ids.reshape(-1), tokens.reshape(-1)
        assert sorted(np.unique(flat_ids[flat_ids >= 0]).tolist()) == list(range(index.documents))
        for d in range(index.documents):
            piece = flat[flat_ids == d]
            assert piece[-1] == eos and (piece[:-1] != eos).all()  # one document, its own EOS
            assert tok.decode(piece[:-1].tolist()) in texts, (split, d)


def test_a_format_2_corpus_has_its_padding_inferred_from_the_manifest(tiny, tmp_path):
    corpus, _ = tiny
    manifest = read_manifest(corpus)
    expected = {s: read_all(corpus, manifest, s)[3] for s in manifest["splits"]}
    old = shutil.copytree(corpus, tmp_path / "old")
    strip_pad_column(old, manifest)
    for split in manifest["splits"]:
        assert np.array_equal(read_all(old, manifest, split)[3], expected[split]), split
        assert np.array_equal(_SplitReader(old, split).gather(np.arange(len(expected[split])))[1], expected[split])  # fmt: skip
    broken = dict(manifest, splits={"train": {**manifest["splits"]["train"]}})
    del broken["splits"]["train"]["tail_segments"]
    with pytest.raises(ValueError, match="rebuild the corpus"):
        inferred_pads(broken, "train")
