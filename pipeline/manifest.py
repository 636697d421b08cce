"""Publishing a built corpus: shards into ``OUTPUT/<split>/`` and an exact ``manifest.json``.

The manifest is assembled only from the per-task stats that datatrove saved for each stage,
so it counts what really happened, including tasks finished before a kill. It must balance:
``read + extra_pieces == kept + sum(dropped) + duplicates.exact + duplicates.near`` (records
read, plus the extra documents made by splitting over-long ones), every kept document must
have been tokenized, every token a pack task left as a tail must have been packed by the tails
stage, and per split ``tokens + pad_tokens == rows * (seq_len + 1)``; a build whose numbers do
not close fails loudly instead of publishing a corpus that silently lost data.

Shard sha256s are computed by the parallel ``hash`` stage (:class:`HashShards`) and kept in a
sidecar next to each work shard, keyed by its size and mtime, so publishing only assembles and
an unchanged shard is never hashed twice. The manifest records the build key (the publish
stage's key); the build reruns publish whenever the published key differs, so OUTPUT always
matches the config (and code) that was asked for last. It also records what entered the keys
besides settings (:mod:`pipeline.codekey`): the library ``versions`` and under ``code`` each
stage's code fingerprint and each pipeline module's source hash, so comparing the manifests of
two builds shows which module's change made a stage rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict

from datatrove.pipeline.base import PipelineStep
from tokenizers import Tokenizer

from pipeline.filters import CHECKED, REMOVED, filter_report, filter_table
from pipeline.packing import read_segments
from pipeline.readers import read_corrupt_files
from pipeline.shards import MANIFEST, TOKENIZER, file_sha256, open_shard
from pipeline.steps import load_stats, tokenizer_meta

FORMAT = "maskscale-corpus/3"
"""3: shards carry ``n_pad`` per row (2: pads only inferable from ``tail_segments``)."""
HASH_SIDECAR = ".sha256.json"


class AccountingError(RuntimeError):
    """The stage counts do not balance: a bug, never a user error; nothing is published."""


def _counter(stats: dict[str, float], prefix: str) -> dict[str, int]:
    """{"<rest of label>": total} for every label that starts with ``prefix``."""
    out: dict[str, int] = {}
    for key, total in stats.items():
        label = key.split("|", 1)[1]
        if label.startswith(prefix):
            out[label[len(prefix) :]] = out.get(label[len(prefix) :], 0) + int(total)
    return out


def _dropped_by(stats: dict[str, float], step_marker: str) -> int:
    return int(sum(v for k, v in stats.items() if step_marker in k and k.endswith("|dropped")))


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def collect_counts(stage_dirs: dict[str, str]) -> dict:
    """Document/duplicate/split/token counts from every stage's saved stats."""
    stats = {name: load_stats(os.path.join(d, "logs")) for name, d in stage_dirs.items()}
    # the split stage's raw reader is the one that counts records (and writes rejects); the
    # dedup stages before it read the same stream without recording anything
    split, pack = stats["split"], stats["pack"]
    tails = stats.get("pack-tails", {})
    long_docs = _counter(split, "long/")
    counts = {
        "read": sum(_counter(split, "read").values()),
        # an over-long record split into k pieces continues as k documents
        "extra_pieces": long_docs.get("pieces", 0) - long_docs.get("split", 0),
        "long_documents": long_docs,
        "date_from_dump": sum(_counter(split, "date_from_dump").values()),
        "date_invalid_used_dump": sum(_counter(split, "date_invalid_used_dump").values()),
        "corrupt_files": read_corrupt_files(os.path.join(stage_dirs["split"], "corrupt")),
        # the reader drops bad records, the splitter undated ones (split.undated=drop)
        "dropped": _counter(split, "dropped/"),
        # per task a decontaminated document contained (it is dropped once, as above)
        "decontaminated": _counter(split, "decontaminated/"),
        # the exact and MinHash filters run inline in the split stage
        "exact": _dropped_by(split, "exact-deduplication"),
        "near": _dropped_by(split, "MinHash"),
        "split_docs": _counter(split, "split/"),
        "undated": sum(_counter(split, "undated_kept").values()),
        "undated_sources": _counter(split, "undated/"),
        "undated_after_cutoff": _counter(split, "undated_after_cutoff/"),
        "tokens": _counter(pack, "tokens/"),
        "rows": _add(_counter(pack, "rows/"), _counter(tails, "rows/")),
        "docs": _counter(pack, "docs/"),
        "tail_out": _counter(pack, "tail_tokens/"),
        "tail_in": _counter(tails, "tail_tokens/"),
        "pad": _counter(tails, "pad_tokens/"),
        # quality filters run in the split stage's reader: {split/source}, {split/name/source}
        "filter_checked": _counter(split, CHECKED),
        "filter_removed": _counter(split, REMOVED),
    }
    return counts


def _per_split(counter: dict[str, int]) -> dict[str, dict[str, int]]:
    """{"split/source": n} -> {split: {source: n}}."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for key, n in counter.items():
        split, source = key.split("/", 1)
        out[split][source] = out[split].get(source, 0) + n
    return out


def check_accounting(counts: dict, seq_len: int) -> int:
    kept = sum(counts["split_docs"].values())
    balance = kept + sum(counts["dropped"].values()) + counts["exact"] + counts["near"]
    if balance != counts["read"] + counts["extra_pieces"]:
        raise AccountingError(
            f"documents do not balance: read {counts['read']} + extra pieces of split "
            f"documents {counts['extra_pieces']} != kept {kept} + dropped "
            f"{sum(counts['dropped'].values())} + duplicates {counts['exact']}+{counts['near']}"
        )
    tokenized = sum(counts["docs"].values())
    if tokenized != kept:
        raise AccountingError(f"{kept} documents kept but {tokenized} tokenized")
    lost = {k: v - counts["tail_in"].get(k, 0) for k, v in counts["tail_out"].items()}
    if any(lost.values()) or set(counts["tail_in"]) - set(counts["tail_out"]):
        raise AccountingError(
            f"stream tails left by pack {counts['tail_out']} != tails packed {counts['tail_in']}"
        )
    tokens, pad, rows = (_per_split(counts[k]) for k in ("tokens", "pad", "rows"))
    for split in tokens:
        t, p, r = (sum(c.get(split, {}).values()) for c in (tokens, pad, rows))
        if t + p != r * (seq_len + 1):
            raise AccountingError(
                f"split {split}: {t} tokens + {p} padding != {r} rows x {seq_len + 1}"
            )
    return kept


def list_shards(shard_dirs: list[str]) -> list[str]:
    """Every ``<dir>/<split>/*.arrow`` of the given stage data folders, in a fixed order."""
    paths = []
    for folder in shard_dirs:
        if not os.path.isdir(folder):
            continue
        for split in sorted(os.listdir(folder)):
            sub = os.path.join(folder, split)
            if os.path.isdir(sub):
                paths += [
                    os.path.join(sub, n) for n in sorted(os.listdir(sub)) if n.endswith(".arrow")
                ]
    return paths


def shard_digest(path: str) -> tuple[dict, bool]:
    """({sha256, rows, size, mtime_ns}, reused) of a work shard, from its sidecar if current."""
    st = os.stat(path)
    sidecar = path + HASH_SIDECAR
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            rec = json.load(f)
        if (rec.get("size"), rec.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
            return rec, True
    rows = open_shard(path)[0].num_rows
    rec = {
        "sha256": file_sha256(path),
        "rows": rows,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }
    with open(sidecar + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(sidecar + ".tmp", sidecar)
    return rec, False


class HashShards(PipelineStep):
    """Parallel stage: sha256 and row count of every shard (task ``r`` takes every n-th one).

    Digests go to a sidecar next to each shard, keyed by its size and mtime; a shard whose
    sidecar is current is not read again (``reused``), e.g. when only publishing settings or
    the number of tasks changed.
    """

    type = "📦 - PUBLISH"
    name = "maskscale shard hashes"

    def __init__(self, shard_dirs: list[str]):
        super().__init__()
        self.shard_dirs = shard_dirs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for path in list_shards(self.shard_dirs)[rank::world_size]:
            with self.track_time():
                _, reused = shard_digest(path)
            self.stat_update("reused" if reused else "hashed")
        return iter(())


def publish_shards(output: str, shard_dirs: list[str], splits: list[str]) -> dict[str, list[dict]]:
    """Hard-link (or copy) shards into OUTPUT/<split>/, removing shards of older builds."""
    by_split: dict[str, list[str]] = defaultdict(list)
    for path in list_shards(shard_dirs):
        by_split[os.path.basename(os.path.dirname(path))].append(path)
    published: dict[str, list[dict]] = {}
    for split in splits:
        srcs = sorted(by_split.get(split, []), key=os.path.basename)
        names = [os.path.basename(p) for p in srcs]
        dst_dir = os.path.join(output, split)
        os.makedirs(dst_dir, exist_ok=True)
        for stale in set(os.listdir(dst_dir)) - set(names):
            if stale.endswith(".arrow"):
                os.remove(os.path.join(dst_dir, stale))
        shards = []
        for src, name in zip(srcs, names):
            dst = os.path.join(dst_dir, name)
            if os.path.exists(dst):
                os.remove(dst)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            rec, _ = shard_digest(src)
            shards.append({"path": f"{split}/{name}", "sha256": rec["sha256"], "rows": rec["rows"]})
        published[split] = shards
    return published


class PublishCorpus(PipelineStep):
    """Final single-task stage: publish shards + tokenizer and write the manifest atomically."""

    type = "📦 - PUBLISH"
    name = "maskscale publish"

    def __init__(self, output, stage_dirs, shard_dirs, tails_dir, tokenizer_path, config,
                 build_key: str = "", versions: dict | None = None,
                 code: dict | None = None):  # fmt: skip
        super().__init__()
        self.output, self.stage_dirs = os.path.abspath(output), stage_dirs
        self.shard_dirs, self.tails_dir = shard_dirs, tails_dir
        self.tokenizer_path, self.config = tokenizer_path, config
        self.build_key, self.versions = build_key, versions or {}
        self.code = code or {}

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        manifest_path = os.path.join(self.output, MANIFEST)
        old = {}
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                old = json.load(f)
            os.remove(manifest_path)  # a half-published corpus must not look complete
        counts = collect_counts(self.stage_dirs)
        kept = check_accounting(counts, self.config["pack"]["seq_len"])
        splits = sorted(counts["split_docs"])
        for split in set(old.get("splits", {})) - set(splits):
            shutil.rmtree(os.path.join(self.output, split), ignore_errors=True)
        shards = publish_shards(self.output, self.shard_dirs, splits)
        tok_dst = os.path.join(self.output, TOKENIZER)
        shutil.copyfile(self.tokenizer_path, tok_dst)
        manifest = self.manifest(counts, kept, splits, shards, tok_dst)
        with open(manifest_path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
        os.replace(manifest_path + ".tmp", manifest_path)
        self.stat_update("published_splits", value=len(splits))
        return iter(())

    def manifest(self, counts, kept, splits, shards, tok_dst) -> dict:
        seq_len = self.config["pack"]["seq_len"]
        eos = self.config["tokenizer"]["eos_token"]
        meta = tokenizer_meta(Tokenizer.from_file(tok_dst), tok_dst, eos, seq_len)
        tokens, rows, docs, pad = (_per_split(counts[k]) for k in ("tokens", "rows", "docs", "pad"))
        sources: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0})
        for split in splits:
            for src, n in docs.get(split, {}).items():
                sources[src]["documents"] += n
                sources[src]["tokens"] += tokens[split].get(src, 0)
        return {
            "format": FORMAT,
            "build_key": self.build_key,
            "versions": self.versions,
            "code": self.code,
            "documents": {
                "read": counts["read"],
                "extra_pieces": counts["extra_pieces"],
                "kept": kept,
                "undated_kept": counts["undated"],
            },
            "dropped": counts["dropped"],
            "decontaminated": dict(sorted(counts["decontaminated"].items())),
            "corrupt_files": counts["corrupt_files"],
            "long_documents": {
                "policy": self.config["records"]["too_long"],
                **counts["long_documents"],
            },
            "dates": {
                "from_dump": counts["date_from_dump"],
                "invalid_date_used_dump": counts["date_invalid_used_dump"],
            },
            "undated": {
                "policy": self.config["split"]["undated"],
                "kept": dict(sorted(counts["undated_sources"].items())),
                "after_cutoff": dict(sorted(counts["undated_after_cutoff"].items())),
            },
            "duplicates": {"exact": counts["exact"], "near": counts["near"]},
            "filters": filter_report(
                self.config["filters"], counts["filter_checked"], counts["filter_removed"]
            ),  # fmt: skip
            "splits": {
                s: {
                    "documents": counts["split_docs"][s],
                    "tokens": sum(tokens.get(s, {}).values()),
                    "rows": sum(rows.get(s, {}).values()),
                    "pad_tokens": sum(pad.get(s, {}).values()),
                    "shards": shards[s],
                    "tail_segments": read_segments(self.tails_dir, s),
                }
                for s in splits
            },
            "sources": dict(sorted(sources.items())),
            "tokenizer": {
                "path": TOKENIZER,
                "sha256": meta.tokenizer_sha256,
                "vocab_size": meta.vocab_size,
                "eos_id": meta.eos_id,
                "mask_id": meta.mask_id,
                "trained": not self.config["tokenizer"]["path"],
            },
            "seq_len": seq_len,
            "dtype": str(meta.dtype),
            "stages": {k: os.path.relpath(v, self.output) for k, v in self.stage_dirs.items()},
            "config": self.config,
        }


def summary_table(manifest: dict) -> str:
    """A plain-text summary of a manifest for the terminal."""
    lines = []
    d, dup = manifest["documents"], manifest["duplicates"]
    lines.append(f"documents read {d['read']:,}  kept {d['kept']:,}  "
                 f"exact dups {dup['exact']:,}  near dups {dup['near']:,}")  # fmt: skip
    for reason, n in manifest["dropped"].items():
        lines.append(f"  dropped {reason:<18} {n:>10,}")
    for c in manifest.get("corrupt_files", []):
        lost = (f"{c['lost_bytes']:,} bytes" if "lost_bytes" in c
                else f"row groups {c['lost_row_groups']}")  # fmt: skip
        lines.append(f"  corrupt {c['file']} ({c['reason']}): lost {lost}")
    header = f"{'split':<16}{'docs':>10}{'tokens':>14}{'rows':>10}{'pad tok':>10}{'shards':>8}"
    lines += ["", header, "-" * len(header)]
    for name, s in manifest["splits"].items():
        lines.append(
            f"{name:<16}{s['documents']:>10,}{s['tokens']:>14,}{s['rows']:>10,}"
            f"{s.get('pad_tokens', 0):>10,}{len(s['shards']):>8}"
        )
    lines += filter_table(manifest.get("filters", {}))
    t = manifest["tokenizer"]
    lines.append("")
    lines.append(f"tokenizer vocab {t['vocab_size']} eos {t['eos_id']} mask {t['mask_id']} "
                 f"seq_len {manifest['seq_len']} dtype {manifest['dtype']}")  # fmt: skip
    return "\n".join(lines)
