"""``maskscale corpus ...`` subcommands: build a corpus, write the default dump, inspect one."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.configlib import load_config

SHORTCUTS = {
    "output": "output",
    "cutoff": "split.cutoff",
    "seq_len": "pack.seq_len",
    "vocab_size": "tokenizer.vocab_size",
    "tokenizer": "tokenizer.path",
    "workers": "executor.workers",
    "executor": "executor.kind",
}


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="build and inspect packed corpora")
    csub = corpus.add_subparsers(dest="corpus_command", metavar="ACTION")

    b = csub.add_parser(
        "build",
        help="raw dumps -> deduplicated, temporally split, packed Arrow shards",
        description="Build a corpus. Settings come from --config (YAML, see configs/corpus/), "
        "then the shortcuts below, then key=value overrides (e.g. dedup.near=false).",
    )
    b.add_argument("--config", help="YAML config (configs/corpus/*.yaml)")
    b.add_argument("--input", action="append", help="input dir, file or glob (repeatable)")
    b.add_argument("--output", help="corpus directory to write")
    b.add_argument("--cutoff", help="YYYY-MM-DD temporal cutoff: later documents are held out")
    b.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per row (+1 stored)")
    b.add_argument("--vocab-size", type=int, dest="vocab_size", help="vocab of the trained BPE")
    b.add_argument("--tokenizer", help="local tokenizer.json to use instead of training one")
    b.add_argument("--workers", type=int, help="parallel worker processes")
    b.add_argument("--executor", choices=["local", "slurm", "ray"], help="datatrove executor")
    b.add_argument("--strict", action="store_true", help="stop at the first bad record")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument(
        "--clean-work",
        action="store_true",
        dest="clean_work",
        help="after publishing, delete the work files (OUTPUT/.work) the corpus no longer needs "
        "(keeps logs and rejects; a later build then recomputes every stage)",
    )
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.set_defaults(func=cmd_build)

    d = csub.add_parser("default-dump", help="write the embedded default corpus as a raw dump")
    d.add_argument("out", help="directory to write (SlimPajama layout)")
    d.set_defaults(func=cmd_default_dump)

    i = csub.add_parser("inspect", help="print a built corpus's summary (and a decoded row)")
    i.add_argument("corpus", help="corpus directory")
    i.add_argument("--split", default=None, help="decode the first row of this split")
    i.set_defaults(func=cmd_inspect)
    _register_overlap(csub)
    corpus.set_defaults(func=lambda a: corpus.print_help() or 2)


def _register_overlap(csub) -> None:
    o = csub.add_parser(
        "overlap",
        help="contamination report: holdout documents and task items sharing n-grams with train",
        description="Per split other than train, the fraction of documents (and words) sharing "
        "a word n-gram with train; per task (--tasks), the fraction of items. Writes "
        "overlap.json and overlap.md (default: CORPUS/overlap/). Reads the split stage's "
        "documents under CORPUS/.work (gone after --clean-work: rebuild without it).",
    )
    o.add_argument("corpus", help="corpus directory (built by `maskscale corpus build`)")
    o.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                   help="local TASK.jsonl ({context, choices, label} or {text}) or lm-eval "
                   "task names, loaded offline")  # fmt: skip
    o.add_argument("--include-path", dest="include_path", help="folder of lm-eval task YAMLs")
    o.add_argument("--ngram", type=int, default=13, help="n-gram length in words (default 13)")
    o.add_argument(
        "--finder-workers",
        type=int,
        default=1,
        dest="finder_workers",
        help="hash-range slices: find tasks, each holding 1/N of the query n-grams",
    )
    o.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    o.add_argument("--out", help="report folder (default CORPUS/overlap)")
    o.add_argument(
        "--run",
        help="log the fractions as metrics to this MLflow run: a run "
        "directory (its mlflow_run_id file) or a run id; tracking URI from "
        "--tracking-uri, the run's mlflow_tracking_uri or MLFLOW_TRACKING_URI",
    )
    o.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.set_defaults(func=cmd_overlap)


def corpus_config_from_args(args: argparse.Namespace):
    from pipeline.config import CorpusConfig

    overrides = []
    if args.input:
        overrides.append(f"input={json.dumps(args.input)}")
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.strict:
        overrides.append("records.strict=true")
    return load_config(CorpusConfig, args.config, overrides + list(args.overrides))


def cmd_build(args: argparse.Namespace) -> int:
    import os

    # datatrove logs every task at INFO through loguru; keep the terminal to progress bars,
    # warnings and the summary (full logs stay in each stage's logs/ folder).
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    from pipeline.build import build_corpus
    from pipeline.inputs import InputReadError, NoInputError
    from pipeline.manifest import summary_table
    from pipeline.readers import BadInputError

    cfg = corpus_config_from_args(args)
    try:
        manifest = build_corpus(cfg, progress=not args.quiet, clean=args.clean_work)
    except BadInputError as e:
        print(f"maskscale: bad input: {e}")
        return 1
    except InputReadError as e:
        print(f"maskscale: cannot read input: {e}")
        return 1
    except NoInputError as e:  # a usage error, like a bad config value
        print(f"maskscale: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        print("submitted the build to Slurm; the manifest appears when the last job ends")
        if args.clean_work:
            print("--clean-work: rerun this command with --clean-work once the jobs have ended")
        return 0
    print()
    print(summary_table(manifest))
    if "cleaned" in manifest:
        c = manifest["cleaned"]
        print(f"\n--clean-work: removed {c['removed_stages']} old stage folders, freed "
              f"{c['freed_bytes'] / 2**20:,.1f} MiB of work files")  # fmt: skip
    print(f"\ncorpus written to {cfg.output} ({manifest['elapsed_s']} s)")
    return 0


def cmd_default_dump(args: argparse.Namespace) -> int:
    from pipeline.default_dump import write_default_dump

    paths = write_default_dump(args.out)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import os

    from pipeline.manifest import summary_table
    from pipeline.shards import open_shard, read_manifest, shard_tokens

    manifest = read_manifest(args.corpus)
    print(summary_table(manifest))
    if args.split:
        from tokenizers import Tokenizer

        shard = manifest["splits"][args.split]["shards"][0]["path"]
        table, meta = open_shard(os.path.join(args.corpus, shard))
        tok = Tokenizer.from_file(os.path.join(args.corpus, "tokenizer.json"))
        print(f"\nfirst row of {shard}:\n{tok.decode(shard_tokens(table)[0].tolist())[:2000]}")
    return 0


def cmd_overlap(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.ngrams import TaskLoadError, load_tasks
    from pipeline.overlap import OverlapError, log_overlap_mlflow, write_report
    from pipeline.overlap_run import run_overlap

    if not os.path.isfile(os.path.join(args.corpus, "manifest.json")):
        print(f"maskscale: {args.corpus} is not a built corpus (no manifest.json)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        tasks = load_tasks(args.tasks, args.include_path)
        report = run_overlap(args.corpus, tasks, args.ngram, args.finder_workers, args.workers,
                             progress=not args.quiet)  # fmt: skip
    except (TaskLoadError, OverlapError) as e:
        print(f"maskscale: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out or os.path.join(args.corpus, "overlap"))
    print(paths[1].read_text())
    print(f"written {paths[0]} and {paths[1]}")
    if args.run:
        run_id = log_overlap_mlflow(report, args.run, args.tracking_uri, list(paths))
        if run_id:
            print(f"logged to MLflow run {run_id}")
    return 0
