"""Which document every token of a split belongs to, recovered exactly from the packed rows.

Why: rows are consecutive slices of documents (a speech fills ten rows), so rows are not
independent samples; an interval that resamples rows treats one long document as ten and comes
out too narrow. The unit of resampling is the document (``eval/measure/resample.py``), and
this module says which tokens belong to which.

How: the packer (``pipeline/packing.py``) writes every (task, source) *stream* -- that task's
documents of that source, each followed by EOS -- as full rows in the task's shards
(``{task:05d}_{chunk:05d}.arrow``, in order), and the stream's unfinished end as *segments* of
the split's tails shards (``tail_segments`` in the manifest). Inside a stream a token's document
is the number of EOS before it (an EOS belongs to the document it ends). Streams get disjoint
id ranges, so a document cut between a task's last full row and its tail segment keeps one id,
while two tasks' tails that share a tails row keep theirs apart. Padding (EOS after a source's
last document) belongs to no document: id -1.

Cost: one pass over the split counting EOS per row (memory-mapped; the tokens are not kept),
plus per-token ids of the (small) tails shards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from eval.measure.rows import SplitLayout

TASK_SHARD = re.compile(r"^(\d+)_\d+\.arrow$")
NO_DOCUMENT = -1
"""The id of padding tokens."""


def _read_shard(path: Path) -> tuple[np.ndarray, list[str]]:
    """(zero-copy (rows, width) token view, per-row sources) of a memory-mapped shard."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    ids = table.column("input_ids").combine_chunks()
    view = ids.values.to_numpy(zero_copy_only=True).reshape(-1, ids.type.list_size)
    return view, table.column("source").to_pylist()


@dataclass
class _Rows:
    """A run of one stream's full rows: global row indices, EOS per row, last token EOS?"""

    rows: np.ndarray
    eos: np.ndarray
    ends_with_eos: bool


class DocumentIndex:
    """Document ids of a split's tokens (see the module docstring)."""

    def __init__(self, layout: SplitLayout, manifest: dict, eos_id: int):
        self.layout, self.eos = layout, int(eos_id)
        self.width = int(manifest["seq_len"]) + 1
        self.row_start = np.full(layout.rows, NO_DOCUMENT, dtype=np.int64)
        self.tails: dict[int, np.ndarray] = {}  # shard index -> flat int64 ids (-1: padding)
        tokens: dict[str, tuple[int, np.ndarray]] = {}  # tails shard path -> (index, flat ids)
        streams: dict[tuple[int, str], list] = {}
        for index, path in enumerate(layout.shards):
            view, sources = _read_shard(path)
            if path.name.startswith("tails_"):
                self.tails[index] = np.full(view.size, NO_DOCUMENT, dtype=np.int64)
                tokens[f"{layout.split}/{path.name}"] = (index, view.reshape(-1))
                continue
            match = TASK_SHARD.match(path.name)
            task = int(match.group(1)) if match else 0
            eos_per_row = (view == self.eos).sum(axis=1)
            sources = np.asarray(sources)
            for source in dict.fromkeys(sources.tolist()):
                local = np.flatnonzero(sources == source)
                piece = _Rows(
                    int(layout.starts[index]) + local,
                    eos_per_row[local],
                    bool(view[local[-1], -1] == self.eos),
                )
                streams.setdefault((task, source), []).append(piece)
        segments = manifest["splits"][layout.split].get("tail_segments", [])
        for seg in segments:
            if seg["length"] and seg["shard"] in tokens:
                streams.setdefault((seg["task"], seg["source"]), []).append(seg)
        base = 0
        for key in sorted(streams):
            base = self._number(streams[key], base, tokens)
        self.documents = base
        """Documents in the split (ids 0 .. documents - 1)."""

    def _number(self, pieces: list, base: int, tokens: dict) -> int:
        """Give one stream's tokens ids from ``base`` on; returns the next free id."""
        seen, ends_with_eos = 0, True  # EOS of this stream so far; does it end a document?
        for piece in pieces:
            if isinstance(piece, _Rows):
                before = np.cumsum(piece.eos) - piece.eos
                self.row_start[piece.rows] = base + seen + before
                seen += int(piece.eos.sum())
                ends_with_eos = piece.ends_with_eos
                continue
            index, flat = tokens[piece["shard"]]
            lo, hi = piece["start_token"], piece["start_token"] + piece["length"]
            is_eos = flat[lo:hi] == self.eos
            self.tails[index][lo:hi] = base + seen + np.cumsum(is_eos) - is_eos
            seen += int(is_eos.sum())
            ends_with_eos = bool(is_eos[-1])
        return base + seen + (0 if ends_with_eos else 1)

    def token_ids(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """int64[len(rows), width]: the document of each token of the given rows (``tokens``:
        those rows as read), -1 on padding."""
        is_eos = tokens == self.eos
        out = self.row_start[rows][:, None] + np.cumsum(is_eos, axis=1) - is_eos
        shard = self.layout.shard_of(rows)
        for i in np.flatnonzero(np.isin(shard, list(self.tails))):
            local = int(rows[i] - self.layout.starts[shard[i]])
            out[i] = self.tails[int(shard[i])][local * self.width : (local + 1) * self.width]
        return out
