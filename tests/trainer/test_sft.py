"""Fine-tuning (task=sft): the JSONL readers, the answer-only objectives, and real runs.

The unit tests use a real word-level tokenizer.json and the real Transformer; the end-to-end
tests fine-tune tiny pretraining runs (DeepSpeed ZeRO-2 on CPU, fp32) on a memorisable set of
16 prompt -> answer pairs, resume one of them from a mid-run checkpoint, and read the export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from pipeline.configlib import ConfigError
from trainer.checkpoint import CKPT_DIR, LATEST, CheckpointManager, load_export, tag_for
from trainer.cli import load_train_config
from trainer.loop import train
from trainer.model import ModelConfig, Transformer
from trainer.sft import resolve_init
from trainer.sft_config import SFTConfig
from trainer.sft_data import (
    SFTDataWarning,
    SFTLoader,
    build_row,
    iter_sft_eval_batches,
    parse_record,
    read_sft_file,
)
from trainer.sft_objectives import SFTARMObjective, SFTMDMObjective, split_batch

from .conftest import make_corpus, write_tokenizer

VOCAB, SEQ_LEN, EOS = 64, 16, 0
BASE = [
    "model=tiny-0.3M", "model_overrides.n_layer=2", "model_overrides.n_head=2",
    "model_overrides.d_model=32", "precision=fp32", "zero_stage=2", "batch.global_batch=8",
    "batch.micro_batch=4", "optim.lr=3e-3", "optim.lr_min=3e-4", "optim.warmup_min=2",
    "log.every=1", "eval.n_samples=4", "eval.max_rows=16", "tracking.enabled=false",
]  # fmt: skip


def tokenizer(tmp_path: Path) -> Tokenizer:
    write_tokenizer(tmp_path / "tokenizer.json", VOCAB)
    return Tokenizer.from_file(str(tmp_path / "tokenizer.json"))


def memorisable(n: int = 16) -> list[str]:
    """n prompt -> answer pairs a tiny model can only learn by heart."""
    rng = np.random.default_rng(0)
    answers = rng.integers(2, VOCAB, size=(n, 3))
    return [
        json.dumps({"prompt": f"w{2 + i} w{3 + i}", "response": " ".join(f"w{a}" for a in ans)})
        for i, ans in enumerate(answers)
    ]


# ----------------------------------------------------------------------------- parsing


def test_each_record_format_parses():
    assert parse_record('{"prompt": "a b", "response": "c"}') == [("a b", False), ("c", True)]
    assert parse_record('{"prompt": "a", "completion": " c d"}') == [("a", False), (" c d", True)]
    conv = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
            {"from": "human", "value": "unanswered"},
        ]
    }
    line = json.dumps(conv)
    assert parse_record(line, "first") == [("s", False), ("q1", False), ("a1", True)]
    assert parse_record(line, "all", "Q: {prompt} A:") == [
        ("s", False), ("Q: q1 A:", False), ("a1", True), ("Q: q2 A:", False), ("a2", True),
    ]  # fmt: skip
    openai = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                   "content": "a"}]}  # fmt: skip
    assert parse_record(json.dumps(openai)) == [("q", False), ("a", True)]


def test_rows_pad_with_eos_and_train_on_answer_eos_and_padding():
    tokens, targets, cut, text = build_row([([5, 6, 7], False), ([9, 10], True)], EOS, 8, "answer")
    assert tokens.tolist() == [5, 6, 7, 9, 10, EOS, EOS, EOS, EOS] and not cut
    assert targets.tolist() == [False] * 3 + [True] * 6
    assert text == 6  # prompt, answer and its EOS; the three EOS after it are padding
    _, all_targets, _, _ = build_row([([5, 6, 7], False), ([9], True)], EOS, 8, "all")
    assert all_targets.all()
    tokens, targets, cut, text = build_row([([5] * 4, False), ([9] * 9, True)], EOS, 8, "answer")
    assert cut and len(tokens) == 9 and targets.tolist() == [False] * 4 + [True] * 5
    assert text == 9
    assert build_row([([5] * 8, False), ([9], True)], EOS, 8, "answer") is None  # no answer in T
    multi = [([5], False), ([9], True), ([6], False), ([8], True)]
    tokens, targets, _, _ = build_row(multi, EOS, 8, "answer")
    assert tokens.tolist()[:6] == [5, 9, EOS, 6, 8, EOS]
    assert targets.tolist()[:6] == [False, True, True, False, True, True]


def test_malformed_records_are_counted_with_file_and_line(tmp_path):
    lines = [
        '{"prompt": "w2", "response": "w3"}',
        "{not json",
        "",
        '{"prompt": "w2"}',
        '["a list"]',
        '{"prompt": "w2", "response": ""}',
        '{"conversations": [{"from": "cat", "value": "w2"}, {"from": "gpt", "value": "w3"}]}',
        '{"conversations": [{"from": "gpt", "value": "w2"}, {"from": "human", "value": "w3"}]}',
        '{"prompt": 3, "response": "w3"}',
        json.dumps({"prompt": " ".join(["w5"] * 20), "response": "w3"}),
        json.dumps({"prompt": "w2", "response": " ".join(["w7"] * 30)}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(SFTDataWarning) as caught:
        rows, report = read_sft_file(path, tokenizer(tmp_path), EOS, SEQ_LEN, SFTConfig(data="x"))
    assert len(caught) == 1  # one summary, not one warning per record
    assert report.records == 10 and report.kept == 2 and len(rows) == 2 and report.cut == 1
    assert dict(report.skipped) == {
        "bad_json": 1, "missing_field": 1, "not_object": 1, "empty_answer": 1, "bad_role": 1,
        "bad_turn_order": 1, "not_string": 1, "prompt_too_long": 1,
    }  # fmt: skip
    message = str(caught[0].message)
    for number in (2, 4, 5, 6, 7, 8, 9, 10):
        assert f"{path}:{number}:" in message
    assert rows.lines.tolist() == [1, 11]


def test_a_file_without_valid_records_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "w2"}\n{oops\n')
    with pytest.warns(SFTDataWarning), pytest.raises(ConfigError, match="no valid record"):
        read_sft_file(path, tokenizer(tmp_path), EOS, SEQ_LEN, SFTConfig(data="x"))


# ----------------------------------------------------------------------------- objectives


def sft_batch(tmp_path, n: int = 6, lengths: bool = False):
    """A batch of ``n`` SFT rows (with their text lengths when ``lengths``)."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(memorisable(n)) + "\n")
    rows, _ = read_sft_file(path, tokenizer(tmp_path), EOS, SEQ_LEN, SFTConfig(data="x"))
    batch, _, text = next(iter_sft_eval_batches(rows, n))
    return (batch, text) if lengths else batch


class Recorder(torch.nn.Module):
    """Wraps the real model and keeps the ids it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.causal, self.inputs = model, model.causal, []

    def forward(self, ids):
        self.inputs.append(ids.clone())
        return self.model(ids)


def tiny_model(causal: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=VOCAB, seq_len=SEQ_LEN)
    return Transformer(cfg, causal=causal)


def test_mdm_sft_never_masks_the_prompt_and_weighs_only_answers(tmp_path):
    batch = sft_batch(tmp_path)
    tokens, answer = split_batch(batch)
    x, answer = tokens[:, :-1], answer[:, :-1]
    objective = SFTMDMObjective(mask_id=VOCAB)
    model = Recorder(tiny_model(causal=False))
    for seed in range(10):  # several draws of t per row: the prompt stays clean in every one
        keys = torch.arange(len(batch)) + 1000 * seed
        weight, masked = objective.train_draws(keys, answer)
        assert not masked[~answer].any() and not weight[~answer].any()
        assert torch.equal(masked, weight > 0)
        objective.train_loss(model, batch, keys)
        seen = model.inputs[-1]
        assert torch.equal(seen[~answer], x[~answer])
        assert torch.equal(seen == VOCAB, masked)
    # a masked answer token weighs 1 / (p * answer tokens of the row), the same in a row, so
    # the expected row weight sum is 1 (the loss is a mean over answer tokens)
    many = answer[:1].expand(4000, -1)
    weight, masked = objective.train_draws(torch.arange(4000), many)
    n_answer = int(answer[0].sum())
    p = 1 / (weight.max(dim=1).values[masked.any(1)] * n_answer)
    assert ((p >= objective.eps - 1e-6) & (p <= 1)).all()
    assert (weight.max(dim=1).values == torch.where(masked, weight, 1e9).min(dim=1).values)[
        masked.any(1)
    ].all()
    assert abs(float(weight.sum(dim=1).mean()) - 1) < 0.08


def test_mdm_sft_masked_mean_weighs_every_masked_answer_token_alike(tmp_path):
    """mdm.loss_weighting=masked_mean in SFT: the same masks as the 1/p loss, the loss the mean
    CE over the batch's masked answer tokens; the prompt stays clean."""
    batch = sft_batch(tmp_path)
    tokens, answer = split_batch(batch)
    x, answer = tokens[:, :-1], answer[:, :-1]
    keys = torch.arange(len(batch)) + 7
    elbo, mean = SFTMDMObjective(VOCAB), SFTMDMObjective(VOCAB, loss_weighting="masked_mean")
    w_elbo, m_elbo = elbo.train_draws(keys, answer)
    w_mean, m_mean = mean.train_draws(keys, answer)
    assert torch.equal(m_elbo, m_mean) and torch.equal(w_mean > 0, w_elbo > 0)
    model = tiny_model(causal=False)
    with torch.no_grad():
        logits = model(torch.where(m_mean, VOCAB, x))
        ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
        expected = float(ce[w_mean > 0].mean())
        assert float(mean.train_loss(model, batch, keys)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="elbo or masked_mean"):
        SFTMDMObjective(VOCAB, loss_weighting="row_mean")


def test_mdm_prompt_drop_masks_the_whole_prompt_without_loss_on_it(tmp_path):
    batch = sft_batch(tmp_path)
    _, answer = split_batch(batch)
    answer = answer[:, :-1]
    keys = torch.arange(len(batch))
    weight, masked = SFTMDMObjective(mask_id=VOCAB, cfg_prompt_drop=1.0).train_draws(keys, answer)
    assert masked[~answer].all() and not weight[~answer].any()
    _, some = SFTMDMObjective(VOCAB, cfg_prompt_drop=0.5).train_draws(torch.arange(400),
                                                                       answer[:1].expand(400, -1))  # fmt: skip
    dropped = some[:, 0].float().mean()  # the first token is a prompt token
    assert 0.4 < dropped < 0.6


def test_arm_sft_gradient_reaches_only_answer_positions(tmp_path):
    batch, lengths = sft_batch(tmp_path, lengths=True)
    tokens, answer = split_batch(batch)
    assert (lengths < SEQ_LEN + 1).all()  # every row is padded

    class Logits(torch.nn.Module):  # a model whose logits are a leaf we can inspect
        causal = True

        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(len(batch), SEQ_LEN, VOCAB))

        def forward(self, ids):
            return self.logits

    model = Logits()
    SFTARMObjective().train_loss(model, batch, torch.arange(len(batch)), lengths).backward()
    touched = model.logits.grad.abs().sum(dim=-1) > 0  # [B, T]: position i predicts i+1
    text = torch.arange(SEQ_LEN)[None, :] < (lengths - 1)[:, None]  # target i+1 is not padding
    assert torch.equal(touched, answer[:, 1:] & text)  # the answer and its EOS, no padding
    assert not torch.equal(touched, answer[:, 1:])
    # and the loss is the per-row mean over answer targets, then the mean over rows
    logp = torch.log_softmax(model.logits.detach(), -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    w = (answer[:, 1:] & text).float()
    expected = ((nll * w).sum(1) / w.sum(1)).mean()
    loss = SFTARMObjective().eval_loss(model, batch, torch.arange(len(batch)), 1, lengths)
    assert torch.allclose(loss, expected)


def test_sft_loader_resumes_its_stream(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(memorisable(10)) + "\n")
    rows, _ = read_sft_file(path, tokenizer(tmp_path), EOS, SEQ_LEN, SFTConfig(data="x"))
    loader = SFTLoader(rows, micro_batch=2, global_batch=4, seed=1)
    for _ in range(6):
        loader.next_micro_batch()
    state = loader.state_dict()
    expected = [loader.next_micro_batch() for _ in range(4)]
    again = SFTLoader(rows, micro_batch=2, global_batch=4, seed=1)
    again.load_state_dict(state)
    for (b1, k1, n1), (b2, k2, n2) in zip(expected, (again.next_micro_batch() for _ in range(4))):
        assert b1.shape == (2, 2, SEQ_LEN + 1) and torch.equal(b1, b2) and torch.equal(k1, k2)
        assert torch.equal(n1, n2) and (n1 <= SEQ_LEN + 1).all()
    assert loader.epoch == 2  # 10 rows, 20 drawn


def test_sft_config_is_validated():
    with pytest.raises(ConfigError, match="init: required"):
        load_train_config(None, ["task=sft", "sft.data=x.jsonl", "steps=3"])
    with pytest.raises(ConfigError, match="sft.data: required"):
        load_train_config(None, ["task=sft", "init=run", "steps=3"])
    with pytest.raises(ConfigError, match="both set the length"):
        load_train_config(None, ["task=sft", "init=r", "sft.data=x", "sft.epochs=2", "steps=3"])
    with pytest.raises(ConfigError, match="corpus: not used"):
        load_train_config(None, ["task=sft", "init=r", "sft.data=x", "steps=3", "corpus=c"])
    cfg = load_train_config(None, ["task=sft", "init=r", "sft.data=x", "sft.epochs=2"])
    assert cfg.budget.steps is None and cfg.sft.epochs == 2


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A corpus, 6-step ARM and MDM pretraining runs, and the SFT data file."""
    root = tmp_path_factory.mktemp("sft")
    corpus = make_corpus(root / "corpus", vocab_size=VOCAB, seq_len=SEQ_LEN, kind="ramp")
    for obj in ("arm", "mdm"):
        extra = [f"corpus={corpus}", f"run_dir={root / obj}", "steps=6", f"objective={obj}"]
        train(load_train_config(None, [*BASE, *extra, "checkpoint.every=3"]))
    data = root / "train.jsonl"
    data.write_text("\n".join(memorisable()) + "\n{broken\n")
    return root


def sft_config(root: Path, objective: str, run_dir: Path, *extra: str):
    args = [f"objective={objective}", "task=sft", f"init={root / objective}",
            f"sft.data={root / 'train.jsonl'}", "sft.val_fraction=0", f"run_dir={run_dir}"]  # fmt: skip
    return load_train_config(None, [*BASE, *args, *extra])


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def answer_loss(export: Path, root: Path, objective) -> float:
    model, _ = load_export(export)
    cfg = SFTConfig(data="x")
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    with pytest.warns(SFTDataWarning):
        rows, _ = read_sft_file(root / "train.jsonl", tok, EOS, SEQ_LEN, cfg)
    batch, keys, lengths = next(iter_sft_eval_batches(rows, len(rows)))
    return float(objective.eval_loss(model, batch, keys, 16, lengths))


def test_arm_sft_learns_resumes_and_exports(runs, tmp_path):
    run_dir = tmp_path / "arm-sft"
    with pytest.warns(SFTDataWarning, match="train.jsonl:17"):
        summary = train(sft_config(runs, "arm", run_dir, "steps=20", "checkpoint.every=10"))
    curve = losses(run_dir)
    assert np.mean([curve[s] for s in (1, 2, 3)]) > 2 * np.mean([curve[s] for s in (18, 19, 20)])
    recorded = json.loads((run_dir / "sft_data.json").read_text())
    assert recorded["train"]["skipped"] == {"bad_json": 1} and recorded["train_rows"] == 16
    assert summary["export"] and (run_dir / "export" / "model.safetensors").is_file()
    init_loss = answer_loss(runs / "arm" / "export", runs, SFTARMObjective())
    tuned_loss = answer_loss(run_dir / "export", runs, SFTARMObjective())
    assert tuned_loss < 0.5 * init_loss

    # resume: the run as if killed after the save of step 10 must redo steps 11-20 exactly
    resumed = tmp_path / "arm-resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "export")
    shutil.rmtree(resumed / CKPT_DIR / tag_for(20))
    (resumed / CKPT_DIR / LATEST).write_text(tag_for(10))
    (resumed / "metrics.jsonl").unlink()
    with pytest.warns(SFTDataWarning):
        train(sft_config(runs, "arm", resumed, "steps=20", "checkpoint.every=10"))
    again = losses(resumed)
    assert sorted(again) == list(range(11, 21))
    assert all(again[s] == curve[s] for s in again)
    assert CheckpointManager(resumed, 1).latest().step == 20


def test_mdm_sft_with_prompt_drop_learns(runs, tmp_path):
    run_dir = tmp_path / "mdm-sft"
    extra = ["sft.epochs=12", "sft.cfg_prompt_drop=0.1", "checkpoint.every=0", "log.every=1"]
    with pytest.warns(SFTDataWarning):
        summary = train(sft_config(runs, "mdm", run_dir, *extra))
    assert summary["steps"] == 24  # ceil(12 epochs * 16 rows / 8 rows per step)
    init_loss = answer_loss(runs / "mdm" / "export", runs, SFTMDMObjective(VOCAB))
    tuned_loss = answer_loss(run_dir / "export", runs, SFTMDMObjective(VOCAB))
    assert tuned_loss < 0.6 * init_loss
    info = json.loads((run_dir / "export" / "config.json").read_text())
    assert info["objective"] == "mdm" and info["causal"] is False


def test_short_rows_auto_width_and_a_width_beyond_the_model(runs, tmp_path):
    """sft.seq_len=auto narrows rows to the longest record (rounded up to 8): the step holds
    fewer tokens, the targets are the same, and the MDM still learns the answers."""
    run_dir = tmp_path / "mdm-short"
    extra = ["sft.epochs=12", "sft.seq_len=auto", "checkpoint.every=0"]
    with pytest.warns(SFTDataWarning):
        summary = train(sft_config(runs, "mdm", run_dir, *extra))
    recorded = json.loads((run_dir / "sft_data.json").read_text())
    longest = recorded["train"]["longest"]  # 2 prompt words + 3 answer words + EOS
    assert longest == 6 and recorded["seq_len"] == 8 < SEQ_LEN
    assert summary["tokens"] == summary["steps"] * 8 * 8  # global_batch 8 x 8 positions
    init_loss = answer_loss(runs / "mdm" / "export", runs, SFTMDMObjective(VOCAB))
    assert answer_loss(run_dir / "export", runs, SFTMDMObjective(VOCAB)) < 0.6 * init_loss
    with pytest.raises(ConfigError, match="sft.seq_len=32 exceeds the init model's seq_len 16"):
        train(sft_config(runs, "mdm", tmp_path / "x", "steps=2", "sft.seq_len=32"))
    with pytest.raises(ConfigError, match="sft.seq_len: an integer"):
        sft_config(runs, "mdm", tmp_path / "x", "steps=2", "sft.seq_len=0")


def test_init_from_a_checkpoint_and_objective_mismatch(runs, tmp_path):
    ckpt = runs / "arm" / CKPT_DIR / tag_for(6)
    from_ckpt, from_run = resolve_init(str(ckpt)), resolve_init(str(runs / "arm"))
    assert from_ckpt.checkpoint is not None and from_run.path == runs / "arm" / "export"
    a, b = from_ckpt.state_dict(), from_run.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ConfigError, match="is an arm model but objective=mdm"):
        cfg = sft_config(runs, "mdm", tmp_path / "x", "steps=2")
        cfg.init = str(runs / "arm")
        train(cfg)
