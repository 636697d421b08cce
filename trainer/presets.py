"""Named model sizes: the paper's grid ("6M" ... "2121M") and tiny CPU sizes ("tiny-1M", ...).

A run names its model by preset so that configs, MLflow params and scaling plots all speak the
same vocabulary as the paper. Each preset is a small YAML file under ``configs/model/`` holding
ModelConfig fields (usually just n_layer / n_head / d_model); vocab_size and seq_len keep their
defaults there because the trainer sets them from the corpus. The config folder is
``<repo>/configs`` in a checkout, the installed ``maskscale_configs`` package after
``pip install .``, or ``$MASKSCALE_CONFIG_DIR`` when set (pipeline/configdir.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.configdir import CONFIG_DIR_ENV, config_dir  # noqa: F401 (re-exported)
from pipeline.configlib import ConfigError, from_dict, read_yaml
from trainer.model import ModelConfig


def preset_dir() -> Path:
    """Folder holding ``<name>.yaml`` model presets."""
    return config_dir() / "model"


def _sort_key(name: str) -> tuple[int, float, str]:
    """Tiny presets first, then by the number of millions in the name, then alphabetically."""
    match = re.search(r"(\d+(?:\.\d+)?)", name)
    size = float(match.group(1)) if match else float("inf")
    return (0 if name.startswith("tiny") else 1, size, name)


def list_presets() -> list[str]:
    """Preset names available in the config folder, smallest first."""
    folder = preset_dir()
    names = [p.stem for p in folder.glob("*.yaml")] if folder.is_dir() else []
    return sorted(names, key=_sort_key)


def load_preset(name: str, **overrides: Any) -> ModelConfig:
    """The validated ModelConfig of preset ``name``; ``overrides`` replace fields (e.g. vocab_size).

    Raises ConfigError listing the valid names when ``name`` is unknown, or naming the key when
    a field or override is invalid.
    """
    names = list_presets()
    if name not in names:
        raise ConfigError(
            f"unknown model preset {name!r}; valid presets: {', '.join(names) or '(none)'} "
            f"(YAML files in {preset_dir()})"
        )
    path = preset_dir() / f"{name}.yaml"
    data = {**read_yaml(path), **overrides}
    try:
        cfg = from_dict(ModelConfig, data, prefix="model.")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"model preset {name!r} ({path}): {e}") from None
    return cfg
