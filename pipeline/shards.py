"""The packed-corpus file format: the contract between the pipeline and the trainer.

A corpus directory holds ``manifest.json``, ``tokenizer.json`` and one folder per split with
Arrow IPC *file* shards (random access, memory-mappable, readable by ``pyarrow`` and
``datasets.load_dataset("arrow", ...)``). Each row is exactly ``seq_len + 1`` token ids
(``input_ids``, a fixed-size list) plus the ``source`` it came from (rows never mix sources,
so the trainer can weight sources) and ``n_pad``, how many of its last ids are EOS *padding*
rather than text. The schema metadata carries everything the trainer must check before it
trusts a shard: tokenizer sha256, vocab size, eos id, mask id and seq_len.

Padding: the packer fills the one partial row left per (split, source) with EOS. Those ids are
not text (EOS after EOS), so no loss may count them -- on a small per-period holdout they are
1-2% of its tokens, the order of the degradations measured. Corpora of manifest format 2 have no
``n_pad`` column; their pads are recovered exactly from the manifest's ``tail_segments`` (every
tails-shard token outside a segment is padding, see :func:`inferred_pads`).
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


PAD_COLUMN = "n_pad"
"""Per row: how many trailing ids are EOS padding (0 for all but a split's partial rows)."""


def shard_schema(meta: ShardMeta) -> pa.Schema:
    value_type = pa.uint16() if meta.dtype == np.uint16 else pa.uint32()
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(value_type, meta.seq_len + 1), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field(PAD_COLUMN, pa.uint32(), nullable=False),
        ],
        metadata=meta.to_arrow(),
    )


def rows_to_batch(
    rows: np.ndarray, source: str, meta: ShardMeta, n_pad: np.ndarray | None = None
) -> pa.RecordBatch:
    """A (n, seq_len+1) integer array -> RecordBatch matching ``shard_schema(meta)``;
    ``n_pad``: trailing pad ids per row (default none)."""
    width = meta.seq_len + 1
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"rows must have shape (n, {width}), got {rows.shape}")
    pads = np.zeros(len(rows), np.uint32) if n_pad is None else np.asarray(n_pad, np.uint32)
    if pads.shape != (len(rows),) or (pads > width - 1).any():
        raise ValueError(f"n_pad must be {len(rows)} counts in [0, {width - 1}], got {n_pad}")
    schema = shard_schema(meta)
    flat = pa.array(np.ascontiguousarray(rows, dtype=meta.dtype).reshape(-1))
    ids = pa.FixedSizeListArray.from_arrays(flat, width)
    src = pa.array([source] * len(rows), type=pa.string())
    return pa.RecordBatch.from_arrays([ids, src, pa.array(pads)], schema=schema)


def batch_pads(batch: pa.RecordBatch | pa.Table) -> np.ndarray | None:
    """int64[rows]: the ``n_pad`` column, or None for a shard written before it existed."""
    if PAD_COLUMN not in batch.schema.names:
        return None
    column = batch.column(PAD_COLUMN)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy(zero_copy_only=False).astype(np.int64)


def inferred_pads(manifest: dict, split: str) -> dict[str, np.ndarray]:
    """{shard path as in the manifest: int64[rows] pad counts} for a format-2 corpus.

    Tails shards hold every (task, source) tail of the split back to back, each recorded as
    segments (flat token offsets); the EOS that fill a source's last row lie outside every
    segment. So a tails-shard token no segment covers is padding, and it must sit at the end
    of its row. Shards that are not tails shards hold no padding (absent from the result).
    """
    info = manifest["splits"][split]
    tails = {s["path"]: int(s["rows"]) for s in info.get("shards", [])
             if Path(s["path"]).name.startswith("tails_")}  # fmt: skip
    if tails and "tail_segments" not in info:
        raise ValueError(
            f"manifest of split {split!r} has tails shards but no tail_segments, so its padding "
            "cannot be told from text; rebuild the corpus with `maskscale corpus build`"
        )
    width = int(manifest["seq_len"]) + 1
    covered = {path: np.zeros(rows * width, bool) for path, rows in tails.items()}
    for seg in info.get("tail_segments", []):
        if seg["length"] and seg["shard"] in covered:
            covered[seg["shard"]][seg["start_token"] : seg["start_token"] + seg["length"]] = True
    out = {}
    for path, flags in covered.items():
        rows = flags.reshape(-1, width)
        pads = (~rows).sum(axis=1)
        at_end = np.arange(width)[None, :] >= width - pads[:, None]
        if not np.array_equal(~rows, at_end) or (pads == width).any():
            raise ValueError(
                f"{path}: tail segments leave gaps inside rows, not only at their ends; the "
                "manifest does not match the shards: rebuild the corpus"
            )
        out[path] = pads.astype(np.int64)
    return out


class ShardWriter:
    """Writes record batches to one Arrow IPC file; call ``close()`` (or use ``with``)."""

    def __init__(self, path: str | Path, meta: ShardMeta):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.rows = 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, shard_schema(meta))

    def write(self, rows: np.ndarray, source: str, n_pad: np.ndarray | None = None) -> None:
        if len(rows):
            self._writer.write_batch(rows_to_batch(rows, source, self.meta, n_pad))
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
