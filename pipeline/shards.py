"""The packed-corpus file format: the contract between the pipeline and the trainer.

A corpus directory holds ``manifest.json``, ``tokenizer.json`` and one folder per split with
Arrow IPC *file* shards (random access, memory-mappable, readable by ``pyarrow`` and
``datasets.load_dataset("arrow", ...)``). Each row is exactly ``seq_len + 1`` token ids
(``input_ids``, a fixed-size list) plus the ``source`` it came from (rows never mix sources,
so the trainer can weight sources). The schema metadata carries everything the trainer must
check before it trusts a shard: tokenizer sha256, vocab size, eos id, mask id and seq_len.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

META_PREFIX = "maskscale."
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class ShardMeta:
    """What a shard promises about its tokens (stored in the Arrow schema metadata)."""

    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    mask_id: int
    seq_len: int
    split: str = ""

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def to_arrow(self) -> dict[bytes, bytes]:
        return {(META_PREFIX + k).encode(): str(v).encode() for k, v in asdict(self).items()}

    @classmethod
    def from_arrow(cls, meta: dict[bytes, bytes] | None, path: str | Path = "?") -> ShardMeta:
        meta = meta or {}
        raw = {k.decode(): v.decode() for k, v in meta.items()}
        try:
            return cls(
                tokenizer_sha256=raw[META_PREFIX + "tokenizer_sha256"],
                vocab_size=int(raw[META_PREFIX + "vocab_size"]),
                eos_id=int(raw[META_PREFIX + "eos_id"]),
                mask_id=int(raw[META_PREFIX + "mask_id"]),
                seq_len=int(raw[META_PREFIX + "seq_len"]),
                split=raw.get(META_PREFIX + "split", ""),
            )
        except KeyError as e:
            raise ValueError(
                f"{path}: not a maskscale shard (schema metadata lacks {e.args[0]}); "
                "rebuild it with `maskscale corpus build`"
            ) from None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id including the MDM mask id (= vocab_size) fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size + 1 <= 2**16 else np.dtype(np.uint32)


def shard_schema(meta: ShardMeta) -> pa.Schema:
    value_type = pa.uint16() if meta.dtype == np.uint16 else pa.uint32()
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(value_type, meta.seq_len + 1), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ],
        metadata=meta.to_arrow(),
    )


def rows_to_batch(rows: np.ndarray, source: str, meta: ShardMeta) -> pa.RecordBatch:
    """A (n, seq_len+1) integer array -> RecordBatch matching ``shard_schema(meta)``."""
    width = meta.seq_len + 1
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"rows must have shape (n, {width}), got {rows.shape}")
    schema = shard_schema(meta)
    flat = pa.array(np.ascontiguousarray(rows, dtype=meta.dtype).reshape(-1))
    ids = pa.FixedSizeListArray.from_arrays(flat, width)
    src = pa.array([source] * len(rows), type=pa.string())
    return pa.RecordBatch.from_arrays([ids, src], schema=schema)


class ShardWriter:
    """Writes record batches to one Arrow IPC file; call ``close()`` (or use ``with``)."""

    def __init__(self, path: str | Path, meta: ShardMeta):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.rows = 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, shard_schema(meta))

    def write(self, rows: np.ndarray, source: str) -> None:
        if len(rows):
            self._writer.write_batch(rows_to_batch(rows, source, self.meta))
            self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(path: str | Path) -> tuple[pa.Table, ShardMeta]:
    """Memory-map a shard; returns the (zero-copy) table and its metadata."""
    source = pa.memory_map(str(path), "r")
    reader = pa.ipc.open_file(source)
    table = reader.read_all()
    return table, ShardMeta.from_arrow(reader.schema.metadata, path)


def shard_tokens(table: pa.Table) -> np.ndarray:
    """Zero-copy (n, seq_len+1) numpy view of a shard table's ``input_ids``."""
    col = table.column("input_ids").combine_chunks()
    width = col.type.list_size
    return col.values.to_numpy(zero_copy_only=True).reshape(-1, width)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {corpus_dir} is not a built corpus "
            "(run `maskscale corpus build --output DIR ...` first)"
        )
    return json.loads(path.read_text())
