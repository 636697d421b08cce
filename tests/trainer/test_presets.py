"""Model presets: the paper's size grid and tiny CPU sizes, with names that match their N."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.configlib import ConfigError
from trainer.model import Transformer, non_embedding_params
from trainer.presets import list_presets, load_preset

# (layers, heads, d_model) of the paper grid, from paper-notes.md.
PAPER_GRID = {
    "6M": (6, 4, 256), "19M": (8, 6, 384), "34M": (8, 8, 512), "48M": (9, 9, 576),
    "66M": (10, 10, 640), "85M": (13, 10, 640), "113M": (12, 12, 768), "142M": (15, 12, 768),
    "170M": (18, 12, 768), "180M": (14, 14, 896), "206M": (16, 14, 896), "231M": (18, 14, 896),
    "268M": (16, 16, 1024), "302M": (18, 16, 1024), "336M": (20, 16, 1024),
    "472M": (18, 10, 1280), "551M": (21, 10, 1280), "571M": (18, 11, 1408),
    "629M": (24, 10, 1280), "666M": (21, 11, 1408), "717M": (19, 12, 1536),
    "761M": (24, 11, 1408), "831M": (22, 12, 1536), "944M": (25, 12, 1536),
    "1028M": (20, 14, 1792), "1233M": (24, 14, 1792), "1476M": (22, 16, 2048),
    "1678M": (25, 16, 2048), "2121M": (28, 17, 2176),
}  # fmt: skip
TINY = ["tiny-0.3M", "tiny-1M", "tiny-3M"]


def test_all_presets_listed_smallest_first():
    names = list_presets()
    assert set(names) == set(PAPER_GRID) | set(TINY)
    assert names[:3] == TINY
    assert names[3:] == list(PAPER_GRID)  # the grid is listed in increasing size


@pytest.mark.parametrize("name", TINY + list(PAPER_GRID))
def test_preset_size_matches_formula_model_and_name(name):
    cfg = load_preset(name)
    if name in PAPER_GRID:
        assert (cfg.n_layer, cfg.n_head, cfg.d_model) == PAPER_GRID[name]
    assert cfg.ffn == 4 * cfg.d_model and cfg.vocab_size == 32000 and cfg.seq_len == 2048
    L, d, f = cfg.n_layer, cfg.d_model, cfg.ffn
    n = L * (4 * d * d + 3 * d * f + 2 * d) + d
    assert non_embedding_params(cfg) == n
    with torch.device("meta"):  # no memory, even for 2121M
        model = Transformer(cfg, causal=False)
    assert model.count_non_embedding_params() == n
    assert model.embed.weight.shape == (32001, d)
    # The name is N in millions, rounded to the name's precision (6M has N = 6.29M).
    millions = re.search(r"(\d+(?:\.(\d+))?)M$", name)
    decimals = len(millions.group(2) or "")
    assert round(n / 1e6, decimals) == float(millions.group(1))
    assert abs(n / 1e6 / float(millions.group(1)) - 1) < (0.05 if n < 1e7 else 0.015)


def test_paper_notes_explicit_ffn_sizes():
    assert load_preset("6M").ffn == 1024
    assert load_preset("1028M").ffn == 7168


def test_overrides_and_bad_override():
    cfg = load_preset("tiny-1M", vocab_size=300, seq_len=64)
    assert (cfg.vocab_size, cfg.seq_len, cfg.d_model) == (300, 64, 128)
    with pytest.raises(ConfigError, match="model.d_modle"):
        load_preset("tiny-1M", d_modle=64)
    with pytest.raises(ConfigError, match="n_head"):
        load_preset("tiny-1M", n_head=3)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_preset("7M")
    assert "7M" in str(err.value) and "tiny-1M" in str(err.value) and "2121M" in str(err.value)
    with pytest.raises(ConfigError):
        load_preset("../model/6M")


def test_config_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("n_layer: 1\nn_head: 1\nd_model: 8\n")
    (tmp_path / "model" / "broken.yaml").write_text("n_layer: 1\nn_head: 3\nd_model: 8\n")
    monkeypatch.setenv("MASKSCALE_CONFIG_DIR", str(tmp_path))
    assert list_presets() == ["broken", "mine"]
    assert load_preset("mine").d_model == 8
    with pytest.raises(ConfigError, match="broken"):
        load_preset("broken")
