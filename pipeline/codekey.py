"""What code and libraries enter each build stage's key.

A stage folder is reused whenever its key matches (:mod:`pipeline.build`). Keyed on settings
and package versions alone, a fix to packing, the reader, MinHash or the splitter would leave
every completed stage in place and the *old* corpus published without a word: a checkout's
version is always the same, and a user's local patch changes no version at all. So each
stage's key also holds a fingerprint of the code that writes its bytes:

- each stage names the pipeline modules it runs (:data:`STAGE_MODULES`); the fingerprint
  covers those and every pipeline module they import, found by reading their import
  statements (function-level imports included), so a helper module added later is covered
  without anyone remembering to list it. The config modules are left out: what they decide
  reaches a key as setting values, and editing how configs are loaded changes no bytes;
- a module's part is the sha256 of its source text (universal newlines, so a checkout with
  other line endings agrees), keyed by its dotted name, never its path: two checkouts of the
  same code in different folders or machines, and every Slurm task, compute the same key;
- the versions of the libraries that shape a stage's bytes (:data:`STAGE_LIBRARIES`: xxhash
  for the dedup hashes, numpy where arrays are written, tokenizers for training and encoding,
  pyarrow for reading parquet and writing shards), plus maskscale's and datatrove's for every
  stage (datatrove runs every stage, and its own steps do the dedup).

Keys stay chained (each extends the key of what it reads), so a code change reruns the stage
that runs it and everything after it, nothing before. The manifest records each stage's code
fingerprint and each module's hash (:func:`code_record`), so comparing two manifests shows
which module made a stage rerun.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util

# pipeline modules whose code a stage runs (their pipeline imports are followed)
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    # the raw reader runs inline in every stage that reads documents; its key is the root of
    # the chain, so a reader change reruns everything
    "read": ("pipeline.readers",),
    "exact-signatures": ("pipeline.dedup",),
    "exact-find": ("pipeline.dedup",),
    "minhash-signatures": ("pipeline.dedup", "pipeline.minhash"),
    "minhash-buckets": ("pipeline.dedup",),
    # keyed after the signatures (not the buckets), so it also covers the buckets' code
    "minhash-cluster": ("pipeline.dedup",),
    "split": ("pipeline.temporal", "pipeline.steps", "pipeline.dedup"),
    "tokenizer": ("pipeline.steps", "pipeline.temporal"),
    "pack": ("pipeline.packing", "pipeline.shards"),
    "pack-tails": ("pipeline.packing", "pipeline.shards"),
    "hash": ("pipeline.manifest", "pipeline.shards"),
    "publish": ("pipeline.manifest", "pipeline.shards"),
    # maskscale corpus overlap (pipeline/overlap_run.py), on a built corpus
    "overlap-signatures": ("pipeline.overlap",),
    "overlap-find": ("pipeline.overlap",),
}
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "read": ("pyarrow",),  # parquet decoding: column types, dates, damaged row groups
    "exact-signatures": ("xxhash", "numpy"),
    "exact-find": ("numpy",),
    "minhash-signatures": ("xxhash", "numpy"),
    "minhash-buckets": ("numpy",),
    "minhash-cluster": ("numpy",),
    "split": (),
    "tokenizer": ("tokenizers",),
    "pack": ("tokenizers", "pyarrow", "numpy"),
    "pack-tails": ("tokenizers", "pyarrow", "numpy"),
    "hash": ("pyarrow",),
    "publish": ("tokenizers", "pyarrow"),
    "overlap-signatures": ("xxhash", "numpy"),
    "overlap-find": ("numpy",),
}
EVERY_STAGE = ("maskscale", "datatrove")
# loading configs decides setting values, which enter the keys themselves
NOT_FOLLOWED = frozenset({"pipeline.config", "pipeline.configlib", "pipeline.configdir"})
PACKAGE = "pipeline"


@functools.cache
def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    loader = getattr(spec, "loader", None) if spec else None
    source = loader.get_source(module) if hasattr(loader, "get_source") else None
    if source is None:
        raise RuntimeError(
            f"cannot read the source of {module} to fingerprint the build stages that run it; "
            "install maskscale with its .py files (not bytecode only)"
        )
    return source


@functools.cache
def module_hash(module: str) -> str:
    """sha256 (16 hex digits) of ``module``'s source text."""
    return hashlib.sha256(_source(module).encode()).hexdigest()[:16]


@functools.cache
def _imports(module: str) -> tuple[str, ...]:
    """The pipeline modules ``module`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(_source(module))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == PACKAGE:  # from pipeline import packing
                found |= {f"{PACKAGE}.{a.name}" for a in node.names}
    ours = {m for m in found if m.startswith(f"{PACKAGE}.") and importlib.util.find_spec(m)}
    return tuple(sorted(ours - NOT_FOLLOWED))


@functools.cache
def stage_modules(stage: str) -> tuple[str, ...]:
    """Every pipeline module whose code stage ``stage`` runs (its roots and their imports)."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"stage {stage!r} has no entry in pipeline.codekey.STAGE_MODULES; add "
                       "the modules whose code writes its output")  # fmt: skip
    seen: set[str] = set()
    todo = list(STAGE_MODULES[stage])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(module)
    return tuple(sorted(seen))


@functools.cache
def code_fingerprint(stage: str) -> str:
    """One hash over the sources of every module the stage runs."""
    blob = "\n".join(f"{m} {module_hash(m)}" for m in stage_modules(stage))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.cache
def _version(package: str) -> str:
    return importlib.metadata.version(package)


def stage_versions(stage: str) -> dict[str, str]:
    """What enters ``stage``'s key besides settings: package versions and its code."""
    code = code_fingerprint(stage)  # first: it names a stage missing from the tables
    libs = EVERY_STAGE + STAGE_LIBRARIES[stage]
    return {**{pkg: _version(pkg) for pkg in libs}, "code": code}


def all_versions() -> dict[str, str]:
    """The versions of every package that enters some stage's key (for the manifest)."""
    libs = {lib for libs in STAGE_LIBRARIES.values() for lib in libs}
    return {pkg: _version(pkg) for pkg in (*EVERY_STAGE, *sorted(libs))}


def code_record(stages: list[str]) -> dict:
    """The manifest's ``code``: each stage's fingerprint and the hash of each module used."""
    modules = sorted({m for s in stages for m in stage_modules(s)})
    return {
        "stages": {s: code_fingerprint(s) for s in stages},
        "modules": {m: module_hash(m) for m in modules},
    }
