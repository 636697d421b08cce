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
    corpus.set_defaults(func=lambda a: corpus.print_help() or 2)


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
