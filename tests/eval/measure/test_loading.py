"""``loading`` on runs trained by the real trainer: run dirs, export dirs, checkpoints, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from eval.measure.loading import (
    EvalError,
    load_model,
    open_corpus,
    resolve_device,
    resolve_dtype,
    resolve_splits,
)
from pipeline.shards import MANIFEST, TOKENIZER, file_sha256
from tests.eval.conftest import ROOT, SEQ_LEN, VOCAB, copy_run, files_under, run_cli


def test_load_run_dir_and_export_dir(eval_runs):
    manifest = json.loads((eval_runs.corpus / MANIFEST).read_text())
    for run, family in ((eval_runs.arm, "arm"), (eval_runs.mdm, "mdm")):
        loaded = load_model(run)
        assert loaded.family == family and loaded.causal == (family == "arm")
        assert loaded.model.causal == loaded.causal and not loaded.model.training
        assert (loaded.seq_len, loaded.mask_id, loaded.eos_id) == (SEQ_LEN, VOCAB, 0)
        assert loaded.tokenizer_sha256 == manifest["tokenizer"]["sha256"]
        assert loaded.tokenizer.token_to_id("<|endoftext|>") == 0
        assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
        assert next(loaded.model.parameters()).dtype == torch.float32
        assert loaded.run_dir == run and loaded.export_dir == run / "export"
        assert loaded.step == 20 and loaded.corpus == eval_runs.corpus
        via_export = load_model(run / "export", dtype="bf16")
        assert via_export.run_dir == run and via_export.dtype == torch.bfloat16
        assert next(via_export.model.parameters()).dtype == torch.bfloat16


def test_dtype_and_device_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(EvalError, match="--dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(EvalError, match="CUDA is not available"):
            resolve_device("cuda")


def test_checkpoint_is_exported_once_and_differs_from_final(eval_runs, tmp_path):
    run = copy_run(eval_runs.arm, tmp_path / "arm", checkpoints=True)
    loaded = load_model(run, checkpoint=10)
    assert loaded.export_dir == run / "exports" / "step00000010" and loaded.step == 10
    assert loaded.out_dir == run / "eval" / "step00000010"
    final = load_model(run)
    w10, w20 = (next(m.model.parameters()) for m in (loaded, final))
    assert not torch.equal(w10, w20)
    stamp = (loaded.export_dir / "model.safetensors").stat().st_mtime_ns
    assert load_model(run, checkpoint=10).step == 10
    assert (loaded.export_dir / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    with pytest.raises(
        EvalError, match=r"no complete checkpoint at step 7; available steps: \[10, 20\]"
    ):
        load_model(run, checkpoint=7)


def test_loading_an_export_never_imports_deepspeed(eval_runs):
    code = (
        "import sys; from eval.measure.loading import load_model; "
        f"m = load_model({str(eval_runs.mdm)!r}); assert m.family == 'mdm'; "
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_run_without_export_exits_2_and_writes_nothing(eval_runs, tmp_path, capsys):
    run = copy_run(eval_runs.arm, tmp_path / "arm")
    shutil.rmtree(run / "export")
    before = files_under(run)
    code, out, err = run_cli(capsys, "eval", "ppl", run, "--rows", "8")
    assert code == 2
    assert f"run `maskscale export {run}` or pass --checkpoint STEP" in err
    assert files_under(run) == before and not (run / "eval").exists()


def test_tokenizer_mismatch_exits_2_and_writes_nothing(eval_runs, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(eval_runs.corpus, corpus)
    tok = json.loads((corpus / TOKENIZER).read_text())
    (corpus / TOKENIZER).write_text(json.dumps(tok, indent=1))  # same vocab, other bytes
    manifest = json.loads((corpus / MANIFEST).read_text())
    manifest["tokenizer"]["sha256"] = file_sha256(corpus / TOKENIZER)
    (corpus / MANIFEST).write_text(json.dumps(manifest))
    run = copy_run(eval_runs.mdm, tmp_path / "mdm")
    for command in ("ppl", "temporal"):
        code, _, err = run_cli(capsys, "eval", command, run, "--corpus", corpus)
        assert code == 2
        assert "tokenizer sha256" in err and "use the corpus built with that tokenizer" in err
    assert not (run / "eval").exists() and not (tmp_path / "eval-temporal").exists()


def test_unknown_split_exits_2_naming_the_choices(eval_runs, tmp_path, capsys):
    run = copy_run(eval_runs.arm, tmp_path / "arm")
    code, _, err = run_cli(capsys, "eval", "ppl", run, "--splits", "validation", "holdout_1850")
    assert code == 2 and "no split 'holdout_1850'" in err and "holdout_recent" in err
    assert not (run / "eval").exists()


def test_not_a_run_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "ppl", tmp_path)
    assert code == 2 and "neither a run directory" in err


def test_open_corpus_defaults_to_the_runs_corpus(eval_runs):
    loaded = load_model(eval_runs.arm, weights=False)
    assert loaded.model is None
    corpus, manifest = open_corpus(loaded)
    assert corpus == eval_runs.corpus
    assert resolve_splits(manifest, None, corpus) == [
        "validation", "holdout_2021", "holdout_2023", "holdout_recent",
    ]  # fmt: skip
