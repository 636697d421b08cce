"""MinHash signatures (dedup stage 1) at several times datatrove's speed, with identical bytes.

datatrove's ``MinhashDedupSignature`` was about a third of the whole build's CPU time. Profiled
per document, it spends it on three things that do not need Python-speed loops:

- the last step of ``simplify_text`` (dropping diacritics) visits every character of the
  NFD-normalised text in a generator: half of the stage. Here only the combining marks (Unicode
  category Mn) that actually occur are looked up, over the set of the text's distinct
  characters, and deleted with one ``str.translate``; pure ASCII text skips the step.
- one bytecode-level join + hash call per n-gram. Here ``map`` chains the same C functions
  (``" ".join`` and xxhash/sha1 of the joined n-gram) so no Python frame runs per n-gram.
- the ``N x H`` universal-hash products: datatrove materialises several ``N x H`` uint64
  temporaries per document (fresh pages each time). Here they run in place in one reused
  block buffer, and the Mersenne modulus is reduced with shifts and masks.

Bucket files are written in batches, then each is sorted once in memory, exactly like
datatrove's (same record layout, same lexicographic order), so datatrove's buckets stage
and our cluster stage read them unchanged. ``tests/pipeline/test_minhash.py`` checks the files
are byte-identical to datatrove's on text with digits, diacritics, scripts without spaces and
documents shorter than one n-gram.

Only the whitespace word splitter (``str.split``, what the build configures) is supported.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.text import simplify_text

from pipeline.steps import SpaceWordTokenizer

_P = np.uint64((1 << 61) - 1)  # datatrove's Mersenne prime modulus
_S61 = np.uint64(61)
BLOCK_ROWS = 1024  # n-grams per block of the N x H products (~0.9 MB of uint64 at H=112)
BATCH_DOCS = 256  # signatures buffered per bucket before one write


def _hash_function(config: MinhashConfig):
    """The C function datatrove's wrapper calls (a Python-level wrapper costs a frame each)."""
    hc = config.hash_config
    if hc.hash_fc == "xxhash":
        import xxhash

        return xxhash.xxh32_intdigest if hc.precision == 32 else xxhash.xxh64_intdigest
    from datatrove.utils.hashing import create_hash_func

    return create_hash_func(hc)


def strip_marks(text: str) -> str:
    """NFD, then every nonspacing mark (category Mn) removed: datatrove's diacritics step."""
    if text.isascii():
        return text  # NFD leaves ASCII unchanged and ASCII has no marks
    text = unicodedata.normalize("NFD", text)
    marks = [c for c in set(text) if unicodedata.category(c) == "Mn"]
    return text.translate(dict.fromkeys(map(ord, marks))) if marks else text


class FastMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 (same files, same order), computed in bulk."""

    name = "🎯 MinHash stage 1 (fast)"

    def __init__(self, output_folder, config: MinhashConfig):
        super().__init__(output_folder, config, language=SpaceWordTokenizer())
        norm = self.config.norm_config
        self._norm = type(norm)(**{**vars(norm), "norm_unicode_diacritics": False})
        self._strip = norm.norm_unicode_diacritics
        self._hash = _hash_function(self.config)
        self._block: np.ndarray | None = None

    def get_shingles(self, text: str) -> np.ndarray:
        """The hashes of the n-grams of the simplified text (datatrove's, shape (N,))."""
        text = simplify_text(text, self._norm)
        words = (strip_marks(text) if self._strip else text).split()
        n = len(words) - self.config.n_grams + 1
        if n <= 0:
            return np.empty(0, dtype=np.uint64)
        grams = zip(*(words[i:] for i in range(self.config.n_grams)))
        return np.fromiter(map(self._hash, map(" ".join, grams)), dtype=np.uint64, count=n)

    def min_hashes(self, shingles: np.ndarray) -> np.ndarray:
        """min over the n-grams of ``(a*s + b) mod 2^64 mod p`` for each of the H functions
        (taken mod 2^32 before the min with 32-bit hashes)."""
        a, b = self.parameters
        low32 = self.config.hash_config.precision == 32  # masked before the min, as datatrove
        if self._block is None:
            self._block = np.empty((2, BLOCK_ROWS, a.shape[1]), dtype=np.uint64)
        out = np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), BLOCK_ROWS):
            part = shingles[start : start + BLOCK_ROWS, None]
            block, high = self._block[:, : len(part)]
            np.multiply(part, a, out=block)
            np.add(block, b, out=block)
            # x mod (2^61 - 1) == (x & p) + (x >> 61), up to one subtraction of p (shifts and
            # masks are ~3x cheaper than numpy's uint64 remainder); values >= p are rare enough
            # that a block holding one is just taken mod p again
            np.right_shift(block, _S61, out=high)
            np.bitwise_and(block, _P, out=block)
            np.add(block, high, out=block)
            if block.max() >= _P:
                np.remainder(block, _P, out=block)
            if low32:
                np.bitwise_and(block, np.uint64(0xFFFFFFFF), out=block)
            np.minimum(out, block.min(axis=0), out=out)
        return out.astype(self.config.hash_config.np_dtype)

    def record_dtype(self) -> np.dtype:
        """One bucket record: hashes_per_bucket hashes, then the document index (as datatrove)."""
        fmt = f"<{self.config.hash_config.struct_format}"
        fields = [(f"field{i + 1}", fmt) for i in range(self.config.hashes_per_bucket)]
        return np.dtype([*fields, (f"field{self.config.hashes_per_bucket + 1}", "<I")])

    def _flush(self, files, sigs: list[np.ndarray], idx: list[int]) -> None:
        if not idx:
            return
        hashes = np.stack(sigs).reshape(len(idx), self.config.num_buckets, -1)
        records = np.empty(len(idx), dtype=self.record_dtype())
        names = records.dtype.names
        records[names[-1]] = idx
        for bucket, f in enumerate(files):
            for j, name in enumerate(names[:-1]):
                records[name] = hashes[:, bucket, j]
            f.write(records.tobytes())
        sigs.clear()
        idx.clear()

    def _sort_bucket(self, path: str) -> None:
        with self.output_folder.open(path, "rb") as f:
            records = np.frombuffer(f.read(), dtype=self.record_dtype())
        names = records.dtype.names
        order = np.lexsort([records[n] for n in reversed(names)])  # field1 first, index last
        with self.output_folder.open(path, "wb") as f:
            f.write(records[order].tobytes())

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1):
        paths = [f"bucket_{b:03d}/{rank:05d}.minhash.sig" for b in range(self.config.num_buckets)]
        with self.track_time():
            files = [self.output_folder.open(p, mode="wb") for p in paths]
            sigs: list[np.ndarray] = []
            idx: list[int] = []
            total = 0
            for total, doc in enumerate(data, start=1):
                shingles = self.get_shingles(doc.text)
                if shingles.size:
                    sigs.append(self.min_hashes(shingles))
                    idx.append(total - 1)
                    if len(idx) == BATCH_DOCS:
                        self._flush(files, sigs, idx)
            self._flush(files, sigs, idx)
            for f in files:
                f.close()
            if total:
                self.stat_update("total", value=total)
            for p in paths:
                self._sort_bucket(p)
