"""The config folder lookup (pipeline/configdir.py) from a checkout; the installed case is
tests/test_install.py."""

from pathlib import Path

import pytest

from pipeline.config import CorpusConfig
from pipeline.configdir import config_dir, resolve_config_file
from pipeline.configlib import ConfigError, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_checkout_configs_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKSCALE_CONFIG_DIR", raising=False)
    assert config_dir() == ROOT / "configs"
    monkeypatch.setenv("MASKSCALE_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path


def test_relative_config_paths_fall_back_to_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKSCALE_CONFIG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no configs/ here
    shipped = ROOT / "configs" / "corpus" / "sotu.yaml"
    assert resolve_config_file("configs/corpus/sotu.yaml") == shipped
    assert resolve_config_file("corpus/sotu.yaml") == shipped
    cfg = load_config(CorpusConfig, "configs/corpus/sotu.yaml", ["input=[x]", "output=y"])
    assert cfg.split.cutoff == "1990-01-01"
    # a file in the current directory wins over the shipped one
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "sotu.yaml").write_text("default_source: Mine\n")
    assert read_yaml("corpus/sotu.yaml") == {"default_source": "Mine"}
    with pytest.raises(ConfigError, match="does not exist.*MASKSCALE_CONFIG_DIR"):
        read_yaml("configs/corpus/nope.yaml")
