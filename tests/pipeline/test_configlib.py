from dataclasses import dataclass, field

import pytest

from pipeline.config import CorpusConfig
from pipeline.configlib import ConfigError, apply_overrides, flatten, load_config, to_dict


@dataclass
class Inner:
    n: int = 1
    rate: float = 0.5
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    label: str | None = None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  n: 3\n  names: [a, b]\nflag: true\n")
    cfg = load_config(Outer, path, ["inner.rate=1e-3", "label=x", "inner.n=7"])
    assert cfg.inner.n == 7 and cfg.inner.rate == 1e-3 and cfg.inner.names == ["a", "b"]
    assert cfg.flag is True and cfg.label == "x"
    assert flatten(to_dict(cfg))["inner.n"] == 7
    assert load_config(Outer, None, ["label=24:00:00"]).label == "24:00:00"  # not base-60 86400


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) inner.m"):
        load_config(Outer, None, ["inner.m=1"])
    with pytest.raises(ConfigError, match="inner.n: expected an integer"):
        load_config(Outer, None, ["inner.n=abc"])
    with pytest.raises(ConfigError, match="flag: expected true/false"):
        load_config(Outer, None, ["flag=maybe"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, ["nokey"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_corpus_config_validation():
    ok = ["input=[x]", "output=o"]
    cfg = load_config(CorpusConfig, "configs/corpus/sotu.yaml", ok)
    assert cfg.split.cutoff == "1990-01-01" and "holdout_2020s" in cfg.split.holdout_ranges
    with pytest.raises(ConfigError, match="split.cutoff: '1990-13-01' is not a YYYY-MM-DD"):
        load_config(CorpusConfig, None, ok + ["split.cutoff=1990-13-01"])
    with pytest.raises(ConfigError, match="no input given"):
        load_config(CorpusConfig, None, ["output=o"])
    with pytest.raises(ConfigError, match="executor.kind: 'spark' is not one of"):
        load_config(CorpusConfig, None, ok + ["executor.kind=spark"])
    for name in ("default", "sotu", "slurm-example"):
        load_config(CorpusConfig, f"configs/corpus/{name}.yaml", ok)
