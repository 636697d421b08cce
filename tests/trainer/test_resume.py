"""Resume with changed settings: refused by default, rescheduled on request (real tiny runs).

One module fixture trains 12 steps (checkpoints at 6 and 12); the tests resume its step-12
checkpoint into fresh run directories with a changed budget or recipe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.configlib import ConfigError
from trainer.engine import lr_at, warmup_steps
from trainer.loop import train
from trainer.resume import schedule_record

from .conftest import make_corpus
from .test_train import config, losses, metrics

FIRST = 12
MORE = 20
LR, LR_MIN, WARMUP_MIN = 3e-3, 3e-4, 5  # test_train.BASE
QUIET = ("eval.every=0", "eval.at_end=false", "checkpoint.export=false", "log.row_keys=false")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_corpus") / "corpus"
    return make_corpus(root, vocab_size=64, seq_len=32, splits={"train": 256, "validation": 16})


@pytest.fixture(scope="module")
def first(corpus, tmp_path_factory) -> Path:
    """The step-12 checkpoint of a 12-step run (lr 3e-3 -> 3e-4, warmup 5)."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    train(config(corpus, run_dir, f"steps={FIRST}", "checkpoint.every=6", *QUIET))
    return run_dir / "checkpoints" / f"step{FIRST:08d}"


def resume(corpus, first, run_dir, *extra):
    return config(corpus, run_dir, f"checkpoint.resume={first}", *QUIET, *extra)


def test_changed_budget_or_recipe_is_refused_naming_each_key(corpus, first, tmp_path):
    run_dir = tmp_path / "more"
    with pytest.raises(ConfigError) as err:
        train(resume(corpus, first, run_dir, f"steps={MORE}"))
    text = str(err.value)
    assert f"steps {FIRST} -> {MORE}" in text and "budget.steps" in text
    assert "checkpoint.reschedule=true" in text and str(first) in text
    assert not run_dir.exists()  # refused before anything was built or written
    with pytest.raises(ConfigError) as err:
        extra = ("optim.lr=1e-3", "optim.betas=[0.8,0.9]", "optim.grad_clip=0.5")
        train(resume(corpus, first, run_dir, f"steps={FIRST}", *extra))
    text = str(err.value)
    assert "optim.lr 0.003 -> 0.001" in text and "optim.betas [0.9, 0.95] -> [0.8, 0.9]" in text
    assert "optim.grad_clip 1.0 -> 0.5" in text and "steps" not in text.split("(")[1]
    with pytest.raises(ConfigError, match="at step 12, beyond the budget of 8 steps"):
        train(resume(corpus, first, run_dir, "steps=8", "checkpoint.reschedule=true"))


def test_checkpoint_without_record_is_checked_against_what_it_restores(corpus, first, tmp_path):
    """A checkpoint from before the schedule record: the check runs after the load, on the
    restored scheduler and AdamW param groups."""
    legacy = tmp_path / "legacy" / first.name
    shutil.copytree(first, legacy)
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["schedule"], meta["reschedules"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    cfg = resume(corpus, legacy, tmp_path / "run", f"steps={FIRST}", "optim.weight_decay=0.05")
    with pytest.raises(ConfigError, match=r"optim.weight_decay 0.1 -> 0.05"):
        train(cfg)
    cfg = resume(corpus, legacy, tmp_path / "run2", f"steps={MORE}")
    with pytest.raises(ConfigError, match=rf"steps {FIRST} -> {MORE}; set by budget"):
        train(cfg)


def test_reschedule_follows_the_new_schedule_and_records_it(corpus, first, tmp_path):
    run_dir = tmp_path / "longer"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    new_lr, betas = 2e-3, [0.8, 0.9]
    extra = [f"steps={MORE}", f"optim.lr={new_lr}", "optim.betas=[0.8,0.9]"]
    extra += ["optim.weight_decay=0.05", "optim.grad_clip=0.5", "checkpoint.every=6"]
    track = ["tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=resume"]
    cfg = resume(corpus, first, run_dir, *extra, *track, "checkpoint.reschedule=true")
    summary = train(cfg)

    # the LR of every step after the resume is that of the new 20-step schedule
    rec = metrics(run_dir)
    assert sorted(rec) == list(range(FIRST + 1, MORE + 1))
    warm = warmup_steps(MORE, 0.01, WARMUP_MIN)
    for step in range(FIRST + 1, MORE + 1):
        want = lr_at(step - 1, MORE, warm, new_lr, LR_MIN)
        assert rec[step]["lr"] == pytest.approx(want, rel=1e-12), step
    assert rec[MORE]["lr"] == pytest.approx(LR_MIN, rel=1e-12)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(run_dir).values())

    # recorded: checkpoint meta, AdamW state in the checkpoint, summary, MLflow params
    final = run_dir / "checkpoints" / f"step{MORE:08d}"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["schedule"] == schedule_record(cfg, MORE)
    (entry,) = meta["reschedules"]
    assert entry["step"] == FIRST and entry["changes"]["steps"] == [FIRST, MORE]
    assert set(entry["changes"]) == {
        "steps",
        "optim.lr",
        "optim.betas",
        "optim.weight_decay",
        "optim.grad_clip",
    }
    assert entry["next_lr"][1] == pytest.approx(lr_at(FIRST, MORE, warm, new_lr, LR_MIN))
    optim = torch.load(final / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    state = optim["optimizer_state_dict"]
    (group,) = state["base_optimizer_state"]["param_groups"]
    assert list(group["betas"]) == betas and group["weight_decay"] == 0.05
    assert state["clip_grad"] == 0.5
    assert summary["reschedules"] == meta["reschedules"]
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"]).data.params
    assert params[f"rescheduled.step{FIRST}.steps"] == f"{FIRST} -> {MORE}"
    assert params[f"rescheduled.step{FIRST}.optim.lr"] == f"{LR} -> {new_lr}"

    # the new schedule is now the run's own: an unchanged resume from step 18 accepts it and
    # reproduces steps 19-20 exactly, keeping the history
    again = tmp_path / "again"
    step18 = run_dir / "checkpoints" / "step00000018"
    summary2 = train(resume(corpus, step18, again, *extra))
    got, want = metrics(again), rec
    assert sorted(got) == [19, 20]
    for step in (19, 20):
        assert got[step]["loss"] == want[step]["loss"] and got[step]["lr"] == want[step]["lr"]
    assert summary2["reschedules"] == meta["reschedules"]


def test_warmup_cosine_reschedule_after_restoring_the_old_state():
    """The scheduler alone: a restored 12-step schedule replaced by a 20-step one at step 12."""
    from trainer.engine import WarmupCosine

    p = torch.nn.Parameter(torch.zeros(1))
    old = WarmupCosine(torch.optim.AdamW([p], lr=1.0), FIRST, 5, LR, LR_MIN)
    for _ in range(FIRST):
        old.optimizer.step()
        old.step()
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = WarmupCosine(opt, MORE, 5, 2e-3, LR_MIN)
    sched.load_state_dict(old.state_dict())  # what DeepSpeed does on resume
    assert (sched.total_steps, sched.peak) == (FIRST, LR)  # the old schedule is back
    assert sched.reschedule(MORE, 5, 2e-3, LR_MIN) == lr_at(FIRST, MORE, 5, 2e-3, LR_MIN)
    seen = []
    for _ in range(FIRST, MORE):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(s, MORE, 5, 2e-3, LR_MIN) for s in range(FIRST, MORE)]
    assert sched.state_dict()["total_steps"] == MORE  # the next checkpoint keeps the new one
