"""Hugging Face models out (``maskscale export --format hf``) and in (``init=hf:DIR``).

Real paths throughout: a byte-level BPE tokenizer trained here (the pipeline's recipe) on real
text, a Llama directory written by ``transformers`` itself, real training runs (DeepSpeed
ZeRO-2 on CPU, fp32) that start from it, and ``transformers`` loading the exports offline.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.configlib import ConfigError
from trainer.checkpoint import load_export
from trainer.cli import load_train_config
from trainer.hf import hf_to_export
from trainer.loop import train
from trainer.sft import resolve_init

from .conftest import EOS, make_corpus

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install .[hf]")

REPO = Path(__file__).resolve().parents[2]
TEXT = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Rain is expected across the northern valleys, with snow on the higher passes.",
    "She opened the old book and found a letter her grandmother had written in 1952.",
    "The new bridge will carry trains and bicycles over the river by next spring.",
    "Researchers measured the temperature of the lake every hour for three months.",
    "A small bakery on the corner sells bread, cakes and coffee from seven o'clock.",
]
SHAPE = ["model_overrides.n_layer=2", "model_overrides.n_head=2", "model_overrides.d_model=32"]
SHAPE.append("model_overrides.ffn_hidden=96")
BASE = [
    "model=tiny-0.3M", *SHAPE, "precision=fp32", "zero_stage=2", "batch.global_batch=4",
    "batch.micro_batch=4", "optim.warmup_min=1", "log.every=1", "eval.every=0",
    "eval.at_end=false", "tracking.enabled=false",
]  # fmt: skip
FROZEN = ["optim.lr=1e-30", "optim.lr_min=0"]
"""An Adam step of 1e-30 is far below fp32 resolution: the weights come out bit-identical."""


def bpe(path: Path, vocab_size: int = 320) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 4, trainer=trainer)
    tok.save(str(path))
    return path


def llama_dir(path: Path, tokenizer: Path, vocab: int, **overrides) -> Path:
    """A tiny LlamaForCausalLM written by transformers' own save_pretrained."""
    fields = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=10000.0,
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token=EOS)
    fast.save_pretrained(path)
    return path


def text_ids(run_dir: Path) -> list[int]:
    """The run's tokenizer on real text, cut to the models' 32 positions."""
    return Tokenizer.from_file(str(run_dir / "tokenizer.json")).encode(" ".join(TEXT[:2])).ids[:32]


def run(corpus: Path, run_dir: Path, *extra: str) -> Path:
    train(load_train_config(None, [*BASE, f"corpus={corpus}", f"run_dir={run_dir}", *extra]))
    return run_dir


def export(run_dir: Path, out: Path) -> Path:
    from pipeline.cli import main

    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, BPE corpus, transformers-written Llama dir, its vocab size)."""
    root = tmp_path_factory.mktemp("hf")
    tok = bpe(root / "bpe.json")
    corpus = make_corpus(root / "corpus", seq_len=32, tokenizer=tok, kind="ramp")
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)
    return root, corpus, llama_dir(root / "llama", tok, vocab), vocab


@pytest.fixture(scope="module")
def arm(world):
    """ARM pretraining started from the transformers Llama (one frozen step), exported."""
    root, corpus, llama, _ = world
    run_dir = run(corpus, root / "arm", f"init=hf:{llama}", "objective=arm", "steps=1", *FROZEN)
    return run_dir, export(run_dir, root / "arm-hf")


@pytest.fixture(scope="module")
def mdm(world):
    """MDM trained from scratch for 2 steps, exported."""
    root, corpus, _, _ = world
    run_dir = run(corpus, root / "mdm", "objective=mdm", "steps=2", "optim.lr=3e-3")
    return run_dir, export(run_dir, root / "mdm-hf")


def test_arm_export_is_a_transformers_llama_equal_to_maskscale(arm, world):
    run_dir, out = arm
    ids = text_ids(run_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(" ".join(TEXT[:2])).input_ids[:32] == ids and tok.eos_token == EOS
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    ours, info = load_export(run_dir / "export")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x).logits - ours(x)).abs().max().item()
    assert diff < 1e-4, diff
    generated = model.generate(x[:, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)
    # init=hf:DIR from a transformers-written Llama, then export: the same tensors
    theirs, mine = (
        load_file(str(world[2] / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    config = json.loads((out / "config.json").read_text())
    assert config["maskscale"]["objective"] == "arm" and config["eos_token_id"] == 0
    assert (out / "generation_config.json").is_file()


def test_mdm_export_loads_with_remote_code_and_round_trips(mdm, world, tmp_path):
    root, corpus = world[0], world[1]
    run_dir, out = mdm
    ours, info = load_export(run_dir / "export")
    model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == info["mask_id"] == ours.cfg.vocab_size
    x = torch.tensor([text_ids(run_dir)])
    x[0, ::3] = info["mask_id"]
    with torch.no_grad():
        diff = (model(x).logits - ours(x)).abs().max().item()
    assert diff < 1e-4, diff
    card = (out / "README.md").read_text()
    assert "maskscale eval ppl" in card and "trust_remote_code=True" in card
    assert config["maskscale"]["corpus_manifest_sha256"] in card
    # back to a maskscale export: identical logits
    back, _ = load_export(hf_to_export(out, tmp_path / "ms"))
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))
    # export -> init=hf:DIR -> export: identical weights
    again = run(corpus, root / "mdm2", f"init=hf:{out}", "objective=mdm", "steps=1", *FROZEN)
    first, second = (
        load_file(str(d / "model.safetensors")) for d in (out, export(again, tmp_path / "e2"))
    )
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_model_card_carries_eval_ppl_losses(mdm, tmp_path):
    from pipeline.cli import main

    run_dir, _ = mdm
    assert main(["eval", "ppl", str(run_dir), "--rows", "8", "--mc-samples", "2"]) == 0
    card = (export(run_dir, tmp_path / "card") / "README.md").read_text()
    ppl = json.loads((run_dir / "eval" / "ppl.json").read_text())
    for split in ("validation",):
        assert f"| {split} | {ppl['splits'][split]['loss']:.4f} |" in card
    assert "FLOPs (6 N D)" in card and "No `maskscale eval ppl`" not in card


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_attention_heads": 4}, "model.n_head"),
        ({"rope_theta": 500000.0}, "model.rope_base"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"vocab": -1}, "model.vocab_size"),
    ],
)
def test_shape_mismatch_is_a_config_error_naming_the_field(world, tmp_path, change, field):
    root, corpus, _, vocab = world
    vocab += change.pop("vocab", 0)
    llama = llama_dir(tmp_path / "llama", root / "bpe.json", vocab, **change)
    cfg = load_train_config(None, [*BASE, f"corpus={corpus}", f"init=hf:{llama}", "steps=1",
                                   f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_forms_refused_or_resolved(world, tmp_path):
    root, corpus, llama, vocab = world
    with pytest.raises(ConfigError, match="init=hf:DIR"):
        load_train_config(None, [*BASE, f"corpus={corpus}", f"init={llama}", "steps=1"])
    with pytest.raises(ConfigError, match="config.json not found"):
        resolve_init(f"hf:{tmp_path}")
    init = resolve_init(f"hf:{llama}")  # what task=sft reads
    assert init.model_cfg.vocab_size == vocab and init.model_cfg.ffn == 96
    assert json.loads((llama / "config.json").read_text())["eos_token_id"] == 2  # LlamaConfig's
    assert init.info["eos_id"] == 0  # the tokenizer's EOS, which SFT rows end and pad with
    state = init.state_dict()
    assert state["embed.weight"].shape == (vocab + 1, 32)  # a mask row was added
    q = load_file(str(llama / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(state["blocks.1.attn.qkv.weight"][:32], q)


def test_sft_from_a_transformers_llama(world, tmp_path):
    root, _, llama, _ = world
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": t[:20], "response": t[20:40]} for t in TEXT * 2]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = [*BASE[:1], *BASE[5:], "task=sft", f"init=hf:{llama}", f"sft.data={data}"]
    args += ["objective=arm", "steps=1", f"run_dir={tmp_path / 'sft'}", *FROZEN]
    train(load_train_config(None, args))
    sft = json.loads((tmp_path / "sft" / "sft_data.json").read_text())
    assert sft["init"] == str(llama.resolve())
    mine = export(tmp_path / "sft", tmp_path / "sft-hf")
    theirs, ours = (load_file(str(d / "model.safetensors")) for d in (llama, mine))
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_only_trainer_hf_imports_transformers():
    importers = set()
    for folder in ("pipeline", "trainer", "eval"):
        for path in (REPO / folder).rglob("*.py"):
            source = path.read_text()
            if "transformers" not in source:
                continue
            for node in ast.walk(ast.parse(source)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n.split(".")[0] == "transformers" for n in names):
                    importers.add(str(path.relative_to(REPO)))
    assert importers == {"trainer/hf.py", "trainer/hf_modeling_mdm.py"}


@pytest.mark.slow
def test_lm_eval_hf_model_runs_a_local_task(arm, tmp_path):
    _, out = arm
    rows = [{"context": t[:30], "choices": [t[30:50], t[40:60]], "label": 0} for t in TEXT]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "hf_mc.yaml").write_text(
        f"task: hf_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},dtype=float32", "--include_path", str(tmp_path), "--tasks",
           "hf_mc", "--device", "cpu", "--batch_size", "2"]  # fmt: skip
    # in-process training left this process's single-rank RANK/MASTER_PORT in the environment;
    # accelerate would take them for a launcher's and rendezvous on a port already in use
    dist_keys = {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
    env = {k: v for k, v in os.environ.items() if k not in dist_keys}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hf_mc" in done.stdout and "acc" in done.stdout
