"""Packing documents into fixed rows without losing any of them.

Rows hold exactly ``seq_len + 1`` ids, so each (task, split, source) token stream of the pack
stage fills a whole number of rows and leaves a *tail*: the end of the document that straddles
its last full row, plus any documents after it. Dropping tails would lose the last document of
every stream -- for small, per-period holdouts a large share of the data. Instead:

1. :class:`TokenizePack` (one task per input task) writes the full rows to
   ``{rank:05d}_{chunk:05d}.arrow`` and saves its tails to ``tails/<split>/{rank:05d}.arrow``;
2. :class:`PackTails` (one task) concatenates the tails of all tasks of a split, per source, in
   task order, packs them into ``tails_{n:05d}.arrow`` shards (rows still never mix sources)
   and pads the one partial row left per (split, source) with EOS, recording the count in
   that row's ``n_pad`` (``pipeline/shards.py``) so no loss scores the padding as text.

Where each stream's tail landed is recorded as *segments* ``{task, source, shard, start_token,
length}`` (flat, row-major token offsets inside that shard; a tail that crosses a shard
boundary has one segment per shard, in order), so a stream is exactly its task's rows of that
source in shard order followed by its segments -- see :func:`stream_tokens`. Padding lies
outside every segment and is counted as ``pad_tokens``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from datatrove.pipeline.base import PipelineStep

from pipeline.shards import ShardMeta, ShardWriter, open_shard, shard_tokens
from pipeline.steps import INTERMEDIATE, read_rank_file, tokenizer_meta

TAIL_SCHEMA = pa.schema([pa.field("source", pa.string()), pa.field("tokens", pa.list_(pa.int64()))])
TAILS_SHARD = "tails_{index:05d}.arrow"
SEGMENTS = "{split}.segments.json"


def load_tokenizer(path: str):
    """A tokenizer that encodes special-token strings found in text as plain text.

    Without this, a literal ``<|endoftext|>`` inside a document (common in code and forum
    dumps) becomes the real EOS id: a fake document boundary. The flag is not saved in
    ``tokenizer.json``, so it is set on every load.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    return tok


def write_tails(path: str, tails: dict[str, np.ndarray]) -> None:
    """Save one task's per-source tails of one split (atomically: a rerun overwrites whole)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table(
        {"source": list(tails), "tokens": [t.tolist() for t in tails.values()]}, TAIL_SCHEMA
    )
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, TAIL_SCHEMA) as writer:
        writer.write_table(table)
    os.replace(path + ".tmp", path)


def read_tails(path: str) -> dict[str, np.ndarray]:
    with pa.memory_map(path, "r") as source:
        table = pa.ipc.open_file(source).read_all()
    return {
        src: np.asarray(toks, dtype=np.int64)
        for src, toks in zip(table.column("source").to_pylist(), table.column("tokens").to_pylist())
    }


class TokenizePack(PipelineStep):
    """Tokenizes each split of one task, joins documents with EOS and packs full rows.

    Rows never mix sources (so the trainer can weight sources). What is left of each
    (task, split, source) stream after its last full row goes to ``tails_folder`` for
    :class:`PackTails`; its size is counted as ``tail_tokens``.
    """

    type = "🔢 - TOKENIZER"
    name = "maskscale tokenize+pack"

    def __init__(self, split_folder: str, out_folder: str, tokenizer_path: str, eos: str,
                 seq_len: int, rows_per_shard: int, batch_docs: int,
                 tails_folder: str | None = None):  # fmt: skip
        super().__init__()
        self.split_folder, self.out_folder = split_folder, out_folder
        self.tokenizer_path, self.eos, self.seq_len = tokenizer_path, eos, seq_len
        self.rows_per_shard, self.batch_docs = rows_per_shard, batch_docs
        self.tails_folder = tails_folder or os.path.join(os.path.dirname(out_folder), "tails")

    def _batches(self, split: str, rank: int) -> Iterator[tuple[str, list[str]]]:
        """(source, texts) batches, grouped by source in arrival order."""
        path = os.path.join(self.split_folder, split, INTERMEDIATE.format(rank=rank))
        pending: dict[str, list[str]] = {}
        for doc in read_rank_file(path):
            bucket = pending.setdefault(doc.metadata["source"], [])
            bucket.append(doc.text)
            if len(bucket) >= self.batch_docs:
                yield doc.metadata["source"], pending.pop(doc.metadata["source"])
        yield from pending.items()

    def pack_split(self, tok, split: str, rank: int) -> None:
        width = self.meta.seq_len + 1
        meta = dataclasses.replace(self.meta, split=split)
        buffers: dict[str, np.ndarray] = {}
        writer, chunk = None, 0
        eos = np.array([self.meta.eos_id], dtype=np.int64)
        for source, texts in self._batches(split, rank):
            with self.track_time():
                encs = tok.encode_batch_fast(texts, add_special_tokens=False)
                parts = [buffers.get(source, np.empty(0, np.int64))]
                for enc in encs:
                    parts.append(np.asarray(enc.ids, dtype=np.int64))
                    parts.append(eos)
                stream = np.concatenate(parts)
                n_rows = len(stream) // width
                buffers[source] = stream[n_rows * width :]
                rows = stream[: n_rows * width].reshape(n_rows, width)
                self.stat_update(f"tokens/{split}/{source}", value=len(stream) - len(parts[0]))
                self.stat_update(f"docs/{split}/{source}", value=len(texts))
                while len(rows):
                    if writer is None:
                        name = f"{rank:05d}_{chunk:05d}.arrow"
                        writer = ShardWriter(os.path.join(self.out_folder, split, name), meta)
                    take = min(len(rows), self.rows_per_shard - writer.rows)
                    writer.write(rows[:take], source)
                    self.stat_update(f"rows/{split}/{source}", value=take)
                    rows = rows[take:]
                    if writer.rows >= self.rows_per_shard:
                        writer.close()
                        writer, chunk = None, chunk + 1
        if writer is not None:
            writer.close()
        if buffers:
            write_tails(os.path.join(self.tails_folder, split, f"{rank:05d}.arrow"), buffers)
        for source, tail in buffers.items():
            self.stat_update(f"tail_tokens/{split}/{source}", value=len(tail))

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tok = load_tokenizer(self.tokenizer_path)
        self.meta = tokenizer_meta(tok, self.tokenizer_path, self.eos, self.seq_len)
        splits = sorted(os.listdir(self.split_folder)) if os.path.isdir(self.split_folder) else []
        for split in splits:
            self.pack_split(tok, split, rank)
        return iter(())


class PackTails(PipelineStep):
    """Single task: packs the tails of every pack task, per split and source, in task order."""

    type = "🔢 - TOKENIZER"
    name = "maskscale pack tails"

    def __init__(self, tails_folder: str, out_folder: str, tasks: int, tokenizer_path: str,
                 eos: str, seq_len: int, rows_per_shard: int):  # fmt: skip
        super().__init__()
        self.tails_folder, self.out_folder, self.tasks = tails_folder, out_folder, tasks
        self.tokenizer_path, self.eos, self.seq_len = tokenizer_path, eos, seq_len
        self.rows_per_shard = rows_per_shard

    def streams(self, split: str) -> dict[str, list[tuple[int, np.ndarray]]]:
        """{source: [(task, tail tokens), ...]} in task order."""
        out: dict[str, list[tuple[int, np.ndarray]]] = {}
        for rank in range(self.tasks):
            path = os.path.join(self.tails_folder, split, f"{rank:05d}.arrow")
            if os.path.exists(path):
                for source, tokens in read_tails(path).items():
                    out.setdefault(source, []).append((rank, tokens))
        return out

    def pack_split(self, split: str, meta: ShardMeta) -> list[dict]:
        width = meta.seq_len + 1
        per_shard = self.rows_per_shard * width  # tokens per full tails shard
        rows_by_source, segments, position = [], [], 0  # position: flat token index in split
        for source, tails in sorted(self.streams(split).items()):
            flat = np.concatenate([t for _, t in tails])
            pad = -len(flat) % width
            offset = position
            for task, tokens in tails:
                segments += _segments(split, task, source, offset, len(tokens), per_shard)
                offset += len(tokens)
            padded = np.concatenate([flat, np.full(pad, meta.eos_id, dtype=np.int64)])
            rows = padded.reshape(-1, width)
            n_pad = np.zeros(len(rows), np.int64)
            n_pad[-1:] = pad  # only the source's last row is partial
            rows_by_source.append((source, rows, n_pad))
            position += len(padded)
            self.stat_update(f"tail_tokens/{split}/{source}", value=len(flat))
            self.stat_update(f"pad_tokens/{split}/{source}", value=pad)
            self.stat_update(f"rows/{split}/{source}", value=len(padded) // width)
        self._write_rows(split, dataclasses.replace(meta, split=split), rows_by_source)
        return segments

    def _write_rows(self, split: str, meta: ShardMeta, rows_by_source) -> None:
        writer, index = None, 0
        for source, rows, n_pad in rows_by_source:
            while len(rows):
                if writer is None:
                    name = TAILS_SHARD.format(index=index)
                    writer = ShardWriter(os.path.join(self.out_folder, split, name), meta)
                take = min(len(rows), self.rows_per_shard - writer.rows)
                writer.write(rows[:take], source, n_pad[:take])
                rows, n_pad = rows[take:], n_pad[take:]
                if writer.rows >= self.rows_per_shard:
                    writer.close()
                    writer, index = None, index + 1
        if writer is not None:
            writer.close()

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tok = load_tokenizer(self.tokenizer_path)
        meta = tokenizer_meta(tok, self.tokenizer_path, self.eos, self.seq_len)
        splits = sorted(os.listdir(self.tails_folder)) if os.path.isdir(self.tails_folder) else []
        os.makedirs(self.out_folder, exist_ok=True)
        for split in splits:
            segments = self.pack_split(split, meta)
            path = os.path.join(self.out_folder, SEGMENTS.format(split=split))
            with open(path + ".tmp", "w") as f:
                json.dump(segments, f)
            os.replace(path + ".tmp", path)
        return iter(())


def _segments(split, task, source, start, length, per_shard) -> list[dict]:
    """Where ``length`` tokens starting at flat position ``start`` of a split's tails lie."""
    if length == 0:  # the stream ended exactly on a row boundary
        return [{"task": task, "source": source, "shard": None, "start_token": 0, "length": 0}]
    out = []
    while length:
        index, offset = divmod(start, per_shard)
        n = min(length, per_shard - offset)
        shard = f"{split}/{TAILS_SHARD.format(index=index)}"
        out.append({"task": task, "source": source, "shard": shard, "start_token": offset,
                    "length": n})  # fmt: skip
        start, length = start + n, length - n
    return out


def read_segments(tails_dir: str, split: str) -> list[dict]:
    path = os.path.join(tails_dir, SEGMENTS.format(split=split))
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def stream_tokens(corpus_dir: str, manifest: dict, split: str) -> dict[tuple[int, str], np.ndarray]:
    """Reassemble every (task, source) token stream of a published split from its manifest.

    A stream is its task's rows of that source (shards ``{task:05d}_*.arrow`` in order)
    followed by its tail segments; padding is in no stream. Each stream is the documents of
    that task and source, each followed by EOS, exactly as they were tokenized.
    """
    info = manifest["splits"][split]
    parts: dict[tuple[int, str], list[np.ndarray]] = {}
    flat_cache: dict[str, np.ndarray] = {}
    for shard in info["shards"]:
        name = os.path.basename(shard["path"])
        table, _ = open_shard(os.path.join(corpus_dir, shard["path"]))
        tokens = shard_tokens(table)
        if name.startswith("tails_"):
            flat_cache[shard["path"]] = tokens.reshape(-1)
            continue
        task, sources = int(name.split("_")[0]), np.array(table.column("source").to_pylist())
        for source in dict.fromkeys(sources.tolist()):
            parts.setdefault((task, source), []).append(tokens[sources == source].reshape(-1))
    for seg in info.get("tail_segments", []):
        piece = parts.setdefault((seg["task"], seg["source"]), [])
        if seg["length"]:
            flat = flat_cache[seg["shard"]]
            piece.append(flat[seg["start_token"] : seg["start_token"] + seg["length"]])
    return {
        key: np.concatenate(p).astype(np.int64) if p else np.empty(0, np.int64)
        for key, p in sorted(parts.items())
    }
