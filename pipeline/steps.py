"""Custom datatrove steps of the corpus build (besides the raw reader).

Every step works on one task's own files (``{rank:05d}``), never on a shared listing, so that a
stage that reads the output of an earlier one sees exactly the same document stream in the same
order. datatrove's dedup filters address documents by their index in that stream, and a
missing (empty) file would otherwise shift every later task onto the wrong input.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import orjson
import zstandard
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer
from fsspec.compression import compr, register_compression

from pipeline.readers import open_lines
from pipeline.shards import ShardMeta, file_sha256

INTERMEDIATE = "{rank:05d}.jsonl.zst"
PRE_CUTOFF_CHARS = "chars/pre_cutoff"  # counted by the split stage, sized the BPE sample


# Intermediate files are read back once or twice and deleted by --clean-work: fsspec's own zstd
# writer compresses at level 10, which made writing them ~85% of the (former) ingest stage's CPU.
FAST_ZSTD, FAST_ZSTD_LEVEL = "maskscale-zstd-fast", 3


def _fast_zstd(infile, mode: str = "rb", **_):
    if "r" in mode:
        return zstandard.ZstdDecompressor().stream_reader(infile)
    return zstandard.ZstdCompressor(level=FAST_ZSTD_LEVEL).stream_writer(infile)


if FAST_ZSTD not in compr:  # registered in every process that unpickles IntermediateWriter
    register_compression(FAST_ZSTD, _fast_zstd, [])


class IntermediateWriter(JsonlWriter):
    """datatrove's JsonlWriter with zstd at a fast level, for stage-to-stage files."""

    def __init__(self, output_folder: str, output_filename: str = "${rank}.jsonl.zst"):
        super().__init__(output_folder, output_filename=output_filename, compression=FAST_ZSTD)


def read_rank_file(path: str) -> Iterator[Document]:
    """Documents of one intermediate file written by datatrove's JsonlWriter (zstd)."""
    if not os.path.exists(path):
        return
    for raw in open_lines(path):
        if raw.strip():
            rec = orjson.loads(raw)
            yield Document(text=rec["text"], id=rec["id"], metadata=rec.get("metadata") or {})


class RankFileReader(PipelineStep):
    """Reads ``folder/{rank:05d}.jsonl.zst`` (the same task's output of an earlier stage)."""

    type = "📖 - READER"
    name = "maskscale rank-file reader"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for doc in read_rank_file(os.path.join(self.folder, INTERMEDIATE.format(rank=rank))):
            self.stat_update("read")
            yield doc


class SpaceWordTokenizer(WordTokenizer):
    """Whitespace word splitter for MinHash shingles: language-agnostic, no spaCy, ~10x faster."""

    def __init__(self):
        super().__init__("whitespace")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in text.split("\n") if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, pos = [], 0
        for word in text.split():
            start = text.index(word, pos)
            spans.append((start, start + len(word)))
            pos = start + len(word)
        return spans


def text_hash01(text: str, seed: int) -> float:
    """A uniform number in [0, 1) determined by the text and the seed (layout-independent)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


class TokenizerTrainer(PipelineStep):
    """Trains a byte-level BPE (single task) and saves ``tokenizer.json``.

    The training text is a sample of every pre-cutoff document (train and validation, all
    tasks and sources): a document is taken when a seeded hash of its text falls below
    ``sample_chars / pre-cutoff chars``, and the sample is fed in hash order. So the sample
    does not depend on the file layout or on the validation fraction, and neither does the
    tokenizer (its stage key leaves the validation fraction out).
    """

    type = "🔢 - TOKENIZER"
    name = "maskscale BPE trainer"

    def __init__(self, split_folder: str, tasks: int, out_path: str, vocab_size: int, eos: str,
                 sample_chars: int, seed: int):  # fmt: skip
        """``split_folder``: the split stage's folder (``data/<split>/`` and ``logs/``)."""
        super().__init__()
        self.split_folder, self.tasks, self.out_path = split_folder, tasks, out_path
        self.vocab_size, self.eos = vocab_size, eos
        self.sample_chars, self.seed = sample_chars, seed

    def sample(self) -> list[str]:
        stats = load_stats(os.path.join(self.split_folder, "logs"))
        total = sum(v for k, v in stats.items() if k.endswith("|" + PRE_CUTOFF_CHARS))
        rate = min(1.0, self.sample_chars / total) if total else 1.0
        picked: list[tuple[float, str]] = []
        for rank in range(self.tasks):
            taken = 0
            for split in ("train", "validation"):
                name = os.path.join("data", split, INTERMEDIATE.format(rank=rank))
                path = os.path.join(self.split_folder, name)
                for doc in read_rank_file(path):
                    h = text_hash01(doc.text, self.seed)
                    if h < rate:
                        picked.append((h, doc.text))
                        taken += 1
                        self.stat_update("sample_docs", f"sample_source/{doc.metadata['source']}")
                        self.stat_update("sample_chars", value=len(doc.text))
            if taken:
                self.stat_update("sample_tasks")
        picked.sort()
        return [text for _, text in picked]

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            special_tokens=[self.eos],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(self.sample(), trainer=trainer)
        os.makedirs(os.path.dirname(self.out_path), exist_ok=True)
        tmp = self.out_path + ".tmp"
        tok.save(tmp)
        os.replace(tmp, self.out_path)
        return iter(())


class TokenizerInstall(PipelineStep):
    """Validates a user-given ``tokenizer.json`` (EOS present) and copies it into the corpus."""

    type = "🔢 - TOKENIZER"
    name = "maskscale tokenizer install"

    def __init__(self, src: str, out_path: str, eos: str):
        super().__init__()
        self.src, self.out_path, self.eos = src, out_path, eos

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import shutil

        from tokenizers import Tokenizer

        tokenizer_meta(Tokenizer.from_file(self.src), self.src, self.eos, 1)
        os.makedirs(os.path.dirname(self.out_path), exist_ok=True)
        shutil.copyfile(self.src, self.out_path + ".tmp")
        os.replace(self.out_path + ".tmp", self.out_path)
        return iter(())


def tokenizer_meta(tok, path: str, eos: str, seq_len: int) -> ShardMeta:
    """Shard metadata of a tokenizer; the MDM mask id is reserved as the vocab size."""
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ValueError(
            f"{path}: EOS token {eos!r} is not in the vocabulary; set tokenizer.eos_token to "
            "the tokenizer's end-of-text token (e.g. '</s>')"
        )
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return ShardMeta(file_sha256(path), vocab, eos_id, vocab, seq_len)


def load_stats(logging_dir: str) -> dict[str, float]:
    """Sum every counter of every finished task of a stage: {"<step name>|<label>": total}."""
    totals: dict[str, float] = {}
    stats_dir = os.path.join(logging_dir, "stats")
    if not os.path.isdir(stats_dir):
        return totals
    for fname in sorted(os.listdir(stats_dir)):
        with open(os.path.join(stats_dir, fname)) as f:
            steps = json.load(f)
        for step in steps:
            for label, value in step.get("stats", {}).items():
                total = value.get("total", 0) if isinstance(value, dict) else value
                key = f"{step['name']}|{label}"
                totals[key] = totals.get(key, 0) + total
    return totals
