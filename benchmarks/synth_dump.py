"""A synthetic SlimPajama-format dump with planted duplicates, cached by its parameters.

Real SlimPajama cannot be downloaded here, and a benchmark on a handful of tiny test documents
says nothing about MinHash, BPE or I/O at scale. This writes text that behaves like the real
corpus where it matters for throughput: the seven SlimPajama sources in their byte shares,
lognormal document lengths per source (books and arXiv long, web and Q&A short), words drawn
with Zipfian frequencies from a seeded vocabulary (so BPE merges and MinHash shingles see a
realistic mix of frequent and rare words), sentences and paragraphs, and a known fraction of
exact and near duplicates spread across files. Layout: ``train/chunkK/example_train_N.jsonl.zst``
with ``{"text", "meta": {"redpajama_set_name"}}`` records, as in SlimPajama-627B.

The dump is written once per parameter set under a cache folder and reused; ``meta.json`` (the
completion marker, written last) records what was planted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
import zstandard

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SourceProfile:
    name: str
    byte_share: float
    """Share of SlimPajama-627B's bytes (SlimPajama-6B dataset card, byte proportions)."""
    median_words: float
    sigma: float
    """Lognormal sigma of the document length in words."""
    max_words: int


SOURCES = (
    SourceProfile("RedPajamaCommonCrawl", 0.522, 500, 0.9, 60_000),
    SourceProfile("RedPajamaC4", 0.267, 300, 0.8, 30_000),
    SourceProfile("RedPajamaGithub", 0.052, 400, 1.2, 60_000),
    SourceProfile("RedPajamaBook", 0.042, 40_000, 0.7, 150_000),
    SourceProfile("RedPajamaArXiv", 0.046, 6_000, 0.6, 60_000),
    SourceProfile("RedPajamaWikipedia", 0.038, 350, 1.0, 30_000),
    SourceProfile("RedPajamaStackExchange", 0.033, 250, 0.9, 30_000),
)


@dataclass(frozen=True)
class DumpParams:
    size_mb: float
    """Uncompressed JSONL bytes to write (MB = 1e6 bytes)."""
    files: int
    exact_dup: float = 0.03
    """Fraction of records that are verbatim copies of an earlier record."""
    near_dup: float = 0.03
    """Fraction of records that are copies of an earlier record with ~2% of words replaced."""
    vocab: int = 50_000
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class TextSampler:
    """Zipfian words (Mandelbrot offset 2.7, exponent 1.0) in capitalised sentences."""

    def __init__(self, vocab: int, seed: int):
        self.rng = np.random.default_rng(seed)
        words = self._make_words(vocab)
        ranks = 1.0 / (np.arange(vocab) + 2.7)
        self.cdf = np.cumsum(ranks / ranks.sum())
        self.vocab = vocab
        # one token = word + separator; 6 variants: {lower, Capitalised} x {" ", ". ", ".\n\n"}
        table = []
        for cap in (False, True):
            for sep in (" ", ". ", ".\n\n"):
                table.extend((w.capitalize() if cap else w) + sep for w in words)
        self.table = np.array(table, dtype=object)

    def _make_words(self, vocab: int) -> list[str]:
        """Pronounceable letter-only words (MinHash maps digits to 0); frequent ones short."""
        onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "pl", "gr"]
        vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
        codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
        seen: set[str] = set()
        words: list[str] = []
        while len(words) < vocab:
            # rank-dependent length: the first ~100 words have 1 syllable, the tail up to 4
            n = 4096
            frac = len(words) / vocab
            n_syl = 1 + np.minimum(3, self.rng.exponential(0.35 + frac * 1.5, n).astype(int))
            on = self.rng.integers(len(onsets), size=(n, 4))
            vo = self.rng.integers(len(vowels), size=(n, 4))
            co = self.rng.integers(len(codas), size=n)
            for k in range(n):
                syl = (onsets[on[k, j]] + vowels[vo[k, j]] for j in range(n_syl[k]))
                w = "".join(syl) + codas[co[k]]
                if w not in seen and len(words) < vocab:
                    seen.add(w)
                    words.append(w)
        return words

    def text(self, n_words: int) -> str:
        ids = np.searchsorted(self.cdf, self.rng.random(n_words))
        ids = np.minimum(ids, self.vocab - 1)
        # sentence ends every ~18 words, paragraph ends after ~1 in 5 sentences
        ends = self.rng.random(n_words) < 1 / 18
        para = ends & (self.rng.random(n_words) < 0.2)
        sep = np.where(para, 2, np.where(ends, 1, 0))
        sep[-1] = 1
        cap = np.zeros(n_words, dtype=np.int64)
        cap[0] = 1
        cap[1:] = ends[:-1]
        return "".join(self.table[ids + self.vocab * (sep + 3 * cap)]).rstrip()

    def perturb(self, text: str, fraction: float = 0.02) -> str:
        """Replace ~fraction of the words (at least one) with random vocabulary words."""
        words = text.split(" ")
        k = max(1, round(fraction * len(words)))
        for pos in self.rng.choice(len(words), size=min(k, len(words)), replace=False):
            words[pos] = str(self.table[int(self.rng.integers(self.vocab))]).strip()
        return " ".join(words)


class _Generator:
    """Streams records: originals, plus copies drawn from a reservoir of earlier originals."""

    POOL = 4000

    def __init__(self, p: DumpParams):
        self.p = p
        self.sampler = TextSampler(p.vocab, p.seed)
        self.rng = self.sampler.rng
        means = np.array([s.median_words * np.exp(s.sigma**2 / 2) for s in SOURCES])
        shares = np.array([s.byte_share for s in SOURCES]) / means
        self.source_p = shares / shares.sum()
        self.pool: list[tuple[str, str]] = []
        self.originals = 0
        self.counts = {"original": 0, "exact_dup": 0, "near_dup": 0}
        self.per_source: dict[str, int] = {}

    def _original(self) -> tuple[str, str]:
        src = SOURCES[int(self.rng.choice(len(SOURCES), p=self.source_p))]
        n = int(np.clip(self.rng.lognormal(np.log(src.median_words), src.sigma), 8, src.max_words))
        text = self.sampler.text(n)
        self.originals += 1
        if len(self.pool) < self.POOL:
            self.pool.append((text, src.name))
        elif (j := int(self.rng.integers(self.originals))) < self.POOL:
            self.pool[j] = (text, src.name)
        return text, src.name

    def record(self) -> bytes:
        u = self.rng.random()
        if self.pool and u < self.p.exact_dup:
            kind, (text, source) = "exact_dup", self.pool[int(self.rng.integers(len(self.pool)))]
        elif self.pool and u < self.p.exact_dup + self.p.near_dup:
            text, source = self.pool[int(self.rng.integers(len(self.pool)))]
            kind, text = "near_dup", self.sampler.perturb(text)
        else:
            kind, (text, source) = "original", self._original()
        self.counts[kind] += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        return orjson.dumps({"text": text, "meta": {"redpajama_set_name": source}})


def _write_files(p: DumpParams, data_dir: Path, progress: bool) -> dict:
    from tqdm import tqdm

    gen = _Generator(p)
    target = p.size_mb * 1e6
    per_file = target / p.files
    raw = comp = docs = 0
    cctx = zstandard.ZstdCompressor(level=3)
    bar = tqdm(total=round(target / 1e6), unit="MB", desc="generating dump", disable=not progress)
    for i in range(p.files):
        lines, size = [], 0
        while size < per_file or not lines:
            line = gen.record() + b"\n"
            lines.append(line)
            size += len(line)
        path = data_dir / "train" / f"chunk{1 + i % 10}" / f"example_train_{i}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = cctx.compress(b"".join(lines))
        path.write_bytes(blob)
        raw, comp, docs = raw + size, comp + len(blob), docs + len(lines)
        bar.update(round(raw / 1e6) - bar.n)
    bar.close()
    return {
        "docs": docs, "bytes_uncompressed": raw, "bytes_compressed": comp, "files": p.files,
        "planted": gen.counts, "per_source_docs": dict(sorted(gen.per_source.items())),
    }  # fmt: skip


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "maskscale" / "bench-dumps"


def ensure_dump(p: DumpParams, cache_dir: Path | None = None, progress: bool = True):
    """(data folder, meta) of the dump for ``p``, generating it unless already cached."""
    root = (cache_dir or default_cache_dir()) / f"slimpajama-synth-{p.key()}"
    meta_path = root / "meta.json"
    if meta_path.is_file():
        return root / "data", json.loads(meta_path.read_text())
    if root.exists():
        shutil.rmtree(root)  # an interrupted earlier generation
    (root / "data").mkdir(parents=True)
    meta = {"params": asdict(p), "version": GENERATOR_VERSION, **_write_files(p, root / "data",
                                                                            progress)}  # fmt: skip
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return root / "data", meta
