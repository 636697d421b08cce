"""The ``maskscale`` console script: one entry point, one subcommand per stage of the flow.

Each package registers its own subcommands through a ``register(subparsers)`` function; the
import happens lazily so that ``maskscale corpus ...`` never pays for importing torch or
DeepSpeed, and ``maskscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (module providing ``register(subparsers)``) in the order they appear in --help.
COMMAND_MODULES = [
    "pipeline.commands",
    "trainer.cli",
    "eval.cli",
    "eval.generation.cli",
    "eval.studies.reversal.study",
    "eval.studies.scaling.cli",
    "eval.demo.run",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskscale",
        description="Pretrain autoregressive (ARM) and masked diffusion (MDM) language models: "
        "raw dumps -> packed Arrow corpus -> DeepSpeed runs tracked in MLflow -> evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that package has no CLI yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    # key=value overrides may come before, between or after options: argparse only collects
    # the ones that follow the options, so we gather the rest here.
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if "=" not in x or x.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pipeline.configlib import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"maskscale: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
