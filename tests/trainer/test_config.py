"""TrainConfig: paper-recipe defaults, validation messages, CLI shortcuts, shipped YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.configlib import ConfigError, from_dict, to_dict
from trainer.cli import load_train_config
from trainer.config import TrainConfig, apply_shortcuts

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def make(**data) -> TrainConfig:
    cfg = from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 10}, **data})
    cfg.validate()
    return cfg


def test_defaults_are_the_paper_recipe():
    cfg = make()
    o = cfg.optim
    assert (o.lr, o.lr_min, tuple(o.betas), o.weight_decay, o.grad_clip) == (
        2e-4,
        2e-5,
        (0.9, 0.95),
        0.1,
        1.0,
    )
    assert (o.warmup_frac, o.warmup_min) == (0.01, 100)
    assert cfg.batch.global_batch == 256 and cfg.precision == "auto" and cfg.seed == 3407
    assert (cfg.mdm.eps, cfg.mdm.random_length_prob) == (1e-3, 0.01)
    assert cfg.eval.n_samples == 128


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"budget": {}}, "exactly one of budget.flops"),
        ({"budget": {"steps": 5, "flops": 1e18}}, "exactly one"),
        ({"budget": {"tokens": -1}}, "budget.tokens"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"batch": {"global_batch": 10, "micro_batch": 4}}, "batch.micro_batch=4 must divide"),
        ({"optim": {"lr": 1e-4, "lr_min": 1e-3}}, "optim.lr_min"),
        ({"objective": "gpt"}, "objective"),
        ({"corpus": ""}, "corpus: required"),
        ({"precision": "fp16"}, "precision"),
    ],
)
def test_invalid_configs_name_the_key(data, needle):
    base = {"corpus": "c", "budget": {"steps": 10}}
    base.update(data)
    with pytest.raises(ConfigError, match=needle):
        cfg = from_dict(TrainConfig, base)
        cfg.validate()


def test_budget_shortcut_replaces_the_yaml_budget(tmp_path):
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("corpus: c\nbudget:\n  flops: 6.0e+18\n")
    cfg = load_train_config(str(yaml_file), ["steps=50", "objective=mdm", "optim.lr=1e-3"])
    assert (cfg.budget.steps, cfg.budget.flops, cfg.budget.tokens) == (50, None, None)
    assert cfg.objective == "mdm" and cfg.optim.lr == 1e-3
    cfg = load_train_config(str(yaml_file), ["tokens=1e9"])
    assert cfg.budget.tokens == 10**9 and cfg.budget.flops is None
    with pytest.raises(ConfigError, match="exactly one"):
        load_train_config(str(yaml_file), ["tokens=1e9", "steps=3"])


def test_shortcuts_pass_other_overrides_through():
    data: dict = {}
    assert apply_shortcuts(data, ["corpus=x", "seed=1", "flops=1e19"]) == [
        "corpus=x",
        "seed=1",
        "budget.flops=1e19",
    ]
    assert data == {"budget": {}}


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_train_config(None, ["corpus=c", "steps=1", "optim.learning_rate=1"])


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_shipped_train_configs_load(path):
    cfg = load_train_config(str(path), ["corpus=somewhere"])
    assert to_dict(cfg)["corpus"] == "somewhere"


def test_paper_yaml_matches_defaults_and_shipped_configs_exist():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"paper.yaml", "tiny-cpu.yaml"} <= names
    paper = load_train_config(str(REPO / "configs/train/paper.yaml"), ["corpus=c"])
    default = make()
    for section in ("optim", "batch", "mdm"):
        assert to_dict(getattr(paper, section)) == to_dict(getattr(default, section))
    assert (paper.precision, paper.seed, paper.budget.flops) == ("bf16", 3407, 6e18)
