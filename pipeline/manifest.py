"""Publishing a built corpus: shards into ``OUTPUT/<split>/`` and an exact ``manifest.json``.

The manifest is assembled only from the per-task stats that datatrove saved for each stage,
so it counts what really happened, including tasks finished before a kill. It must balance:
``read + extra_pieces == kept + sum(dropped) + duplicates.exact + duplicates.near`` (records
read, plus the extra documents made by splitting over-long ones), and every kept document
must have been tokenized; a build whose numbers do not close fails loudly instead of
publishing a corpus that silently lost data.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict

from datatrove.pipeline.base import PipelineStep
from tokenizers import Tokenizer

from pipeline.readers import read_corrupt_files
from pipeline.shards import MANIFEST, TOKENIZER, file_sha256, open_shard
from pipeline.steps import load_stats, tokenizer_meta


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


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def _dropped_by(stats: dict[str, float], step_marker: str) -> int:
    return int(sum(v for k, v in stats.items() if step_marker in k and k.endswith("|dropped")))


def collect_counts(stage_dirs: dict[str, str]) -> dict:
    """Document/duplicate/split/token counts from every stage's saved stats."""
    stats = {name: load_stats(os.path.join(d, "logs")) for name, d in stage_dirs.items()}
    ingest = stats["ingest"]
    split = stats["split"]
    pack = stats["pack"]
    long_docs = _counter(ingest, "long/")
    counts = {
        "read": sum(_counter(ingest, "read").values()),
        # an over-long record split into k pieces continues as k documents
        "extra_pieces": long_docs.get("pieces", 0) - long_docs.get("split", 0),
        "long_documents": long_docs,
        "date_from_dump": sum(_counter(ingest, "date_from_dump").values()),
        "date_invalid_used_dump": sum(_counter(ingest, "date_invalid_used_dump").values()),
        "corrupt_files": read_corrupt_files(os.path.join(stage_dirs["ingest"], "corrupt")),
        # ingest drops bad records; the split drops undated documents (split.undated=drop)
        "dropped": _merge(_counter(ingest, "dropped/"), _counter(split, "dropped/")),
        # the exact and MinHash filters run inline in the split stage
        "exact": _dropped_by(split, "exact-deduplication"),
        "near": _dropped_by(split, "MinHash"),
        "split_docs": _counter(split, "split/"),
        "undated": sum(_counter(split, "undated_kept").values()),
        "undated_sources": _counter(split, "undated/"),
        "undated_after_cutoff": _counter(split, "undated_after_cutoff/"),
        "tokens": _counter(pack, "tokens/"),
        "rows": _counter(pack, "rows/"),
        "docs": _counter(pack, "docs/"),
        "tail": _counter(pack, "tail_tokens/"),
    }
    return counts


def _per_split(counter: dict[str, int]) -> dict[str, dict[str, int]]:
    """{"split/source": n} -> {split: {source: n}}."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for key, n in counter.items():
        split, source = key.split("/", 1)
        out[split][source] = out[split].get(source, 0) + n
    return out


def check_accounting(counts: dict) -> int:
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
    return kept


def publish_shards(output: str, pack_dir: str, splits: list[str]) -> dict[str, list[dict]]:
    """Hard-link (or copy) shards into OUTPUT/<split>/, removing shards of older builds."""
    published: dict[str, list[dict]] = {}
    for split in splits:
        src_dir, dst_dir = os.path.join(pack_dir, split), os.path.join(output, split)
        # a split whose documents add up to less than one row has no shard: all of it is tail
        listing = os.listdir(src_dir) if os.path.isdir(src_dir) else []
        names = sorted(n for n in listing if n.endswith(".arrow"))
        os.makedirs(dst_dir, exist_ok=True)
        for stale in set(os.listdir(dst_dir)) - set(names):
            if stale.endswith(".arrow"):
                os.remove(os.path.join(dst_dir, stale))
        shards = []
        for name in names:
            src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
            if os.path.exists(dst):
                os.remove(dst)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            rows = open_shard(dst)[0].num_rows
            shards.append({"path": f"{split}/{name}", "sha256": file_sha256(dst), "rows": rows})
        published[split] = shards
    return published


class PublishCorpus(PipelineStep):
    """Final single-task stage: publish shards + tokenizer and write the manifest atomically."""

    type = "📦 - PUBLISH"
    name = "maskscale publish"

    def __init__(self, output, stage_dirs, pack_dir, tokenizer_path, config):  # fmt: skip
        super().__init__()
        self.output, self.stage_dirs, self.pack_dir = os.path.abspath(output), stage_dirs, pack_dir
        self.tokenizer_path, self.config = tokenizer_path, config

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        manifest_path = os.path.join(self.output, MANIFEST)
        old = {}
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                old = json.load(f)
            os.remove(manifest_path)  # a half-published corpus must not look complete
        counts = collect_counts(self.stage_dirs)
        kept = check_accounting(counts)
        splits = sorted(counts["split_docs"])
        for split in set(old.get("splits", {})) - set(splits):
            shutil.rmtree(os.path.join(self.output, split), ignore_errors=True)
        shards = publish_shards(self.output, self.pack_dir, splits)
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
        meta = tokenizer_meta(Tokenizer.from_file(tok_dst), tok_dst, self.config["tokenizer"]["eos_token"], seq_len)  # fmt: skip
        tokens, rows, docs = (_per_split(counts[k]) for k in ("tokens", "rows", "docs"))
        tail = _per_split(counts["tail"])
        sources: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0})
        for split in splits:
            for src, n in docs.get(split, {}).items():
                sources[src]["documents"] += n
                sources[src]["tokens"] += tokens[split].get(src, 0)
        return {
            "format": "maskscale-corpus/1",
            "documents": {
                "read": counts["read"],
                "extra_pieces": counts["extra_pieces"],
                "kept": kept,
                "undated_kept": counts["undated"],
            },
            "dropped": counts["dropped"],
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
            "splits": {
                s: {
                    "documents": counts["split_docs"][s],
                    "tokens": sum(tokens.get(s, {}).values()),
                    "rows": sum(rows.get(s, {}).values()),
                    "tail_tokens": sum(tail.get(s, {}).values()),
                    "shards": shards[s],
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
    header = f"{'split':<16}{'docs':>10}{'tokens':>14}{'rows':>10}{'tail tok':>10}{'shards':>8}"
    lines += ["", header, "-" * len(header)]
    for name, s in manifest["splits"].items():
        lines.append(
            f"{name:<16}{s['documents']:>10,}{s['tokens']:>14,}{s['rows']:>10,}"
            f"{s['tail_tokens']:>10,}{len(s['shards']):>8}"
        )
    t = manifest["tokenizer"]
    lines.append("")
    lines.append(f"tokenizer vocab {t['vocab_size']} eos {t['eos_id']} mask {t['mask_id']} "
                 f"seq_len {manifest['seq_len']} dtype {manifest['dtype']}")  # fmt: skip
    return "\n".join(lines)
