"""``maskscale train`` and ``maskscale export``: the trainer's command line.

Train (one process; CPU or one GPU)::

    maskscale train --config configs/train/tiny-cpu.yaml corpus=data/corpus objective=mdm \\
        steps=200 run_dir=runs/mdm-tiny

Shortcuts after the config: ``corpus=DIR objective=arm|mdm model=PRESET run_dir=DIR seed=N``
and exactly one budget ``flops=C`` | ``tokens=D`` | ``steps=S`` (it replaces the YAML's
budget). Any other key uses dots: ``optim.lr=1e-3 batch.micro_batch=8 zero_stage=3``.
Rerunning the same command resumes from the newest checkpoint (``checkpoint.resume=auto``).

Many GPUs on one node (the launcher sets RANK/WORLD_SIZE/LOCAL_RANK; the global batch is
fixed, accumulation = global_batch / (micro_batch x GPUs))::

    torchrun --nproc_per_node 8 -m pipeline.cli train --config configs/train/paper.yaml \\
        corpus=/data/slimpajama objective=arm model=1028M flops=1e20 batch.micro_batch=8 \\
        run_dir=runs/arm-1028M-1e20
    # or: deepspeed --num_gpus 8 --module pipeline.cli train --config ... (same arguments)

Many nodes (run on every node; run_dir must be on a shared filesystem)::

    torchrun --nnodes 4 --nproc_per_node 8 --node_rank $NODE_RANK \\
        --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500 \\
        -m pipeline.cli train --config configs/train/paper.yaml corpus=... run_dir=...
    # or: deepspeed --hostfile hostfile --module pipeline.cli train --config ...

A run resumes on any number of processes: ZeRO shards saved by another world size are
converted once to DeepSpeed's universal format (run_dir/checkpoints/universal/).

Export the newest checkpoint to plain fp32 safetensors + config.json + tokenizer.json
(training does this automatically at the end, into RUN_DIR/export), or with ``--format hf`` to
a Hugging Face directory (ARM: LlamaForCausalLM; MDM: the same weights + a modelling file for
trust_remote_code; both with tokenizer files and a model card; needs ``pip install .[hf]``)::

    maskscale export runs/mdm-tiny [--checkpoint STEP] [--out DIR]
    maskscale export runs/arm-tiny --format hf --out hf/arm-tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_train_config(config: str | None, overrides: list[str]):
    """YAML (optional; defaults = paper recipe) + shortcuts/overrides -> validated TrainConfig."""
    from pipeline.configlib import ConfigError, apply_overrides, from_dict, read_yaml
    from trainer.config import TrainConfig, apply_shortcuts

    data = read_yaml(config) if config else {}
    rest = apply_shortcuts(data, overrides)
    data = apply_overrides(data, rest)
    try:
        cfg = from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}" if config else str(e)) from None
    cfg.validate()
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.data import CorpusMismatchError
    from trainer.engine import TrainingDiverged
    from trainer.loop import train

    cfg = load_train_config(args.config, args.overrides)
    try:
        train(cfg)
    except (CorpusMismatchError, TrainingDiverged, FileExistsError, FileNotFoundError) as e:
        print(f"maskscale train: {e}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.configlib import ConfigError
    from trainer.checkpoint import (
        CKPT_DIR,
        CheckpointManager,
        export_checkpoint,
        read_checkpoint,
        tag_for,
    )

    run_dir = Path(args.run_dir)
    if args.checkpoint:
        tag = tag_for(int(args.checkpoint)) if args.checkpoint.isdigit() else args.checkpoint
        ref = read_checkpoint(run_dir / CKPT_DIR / tag)
    else:
        ref = CheckpointManager(run_dir, keep=1).latest()
    if ref is None:
        what = f"checkpoint {args.checkpoint}" if args.checkpoint else "complete checkpoint"
        print(f"maskscale export: no {what} in {run_dir / CKPT_DIR}", file=sys.stderr)
        return 1
    tokenizer = run_dir / "tokenizer.json"
    if args.format == "hf":
        from trainer.hf import export_hf

        try:
            out = export_hf(ref, args.out or run_dir / "export-hf", tokenizer, run_dir)
        except (ConfigError, FileNotFoundError) as e:
            print(f"maskscale export: {e}", file=sys.stderr)
            return 1
    else:
        out = export_checkpoint(ref, args.out or run_dir / "export", tokenizer)
    print(f"exported {ref.path} -> {out}")
    return 0


def register(subparsers) -> None:
    doc = __doc__.split("\n\n")[0]
    train = subparsers.add_parser(
        "train",
        help="train an ARM or MDM with DeepSpeed (resumes automatically)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML under configs/train/ (default: paper recipe)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="corpus=DIR objective=arm|mdm model=PRESET flops=|tokens=|steps= run_dir=DIR "
        "seed=N, or any dotted config key",
    )
    # the `deepspeed` launcher appends --local_rank=N; the rank is read from the environment
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    train.set_defaults(func=cmd_train)
    export = subparsers.add_parser(
        "export",
        help="consolidate a checkpoint to fp32 safetensors or a Hugging Face directory",
        description=doc,
    )
    export.add_argument("run_dir", help="a training run directory")
    export.add_argument(
        "--checkpoint",
        "--tag",
        metavar="STEP",
        help="checkpoint step or tag such as step00000200 (default: newest)",
    )
    export.add_argument(
        "--format",
        choices=("maskscale", "hf"),
        default="maskscale",
        help="maskscale: fp32 safetensors + config.json + tokenizer.json; hf: a Hugging Face "
        "directory (transformers Llama; MDM with trust_remote_code) with a model card",
    )
    export.add_argument(
        "--out", help="output directory (default: RUN_DIR/export, or RUN_DIR/export-hf)"
    )
    export.set_defaults(func=cmd_export)
