"""Where maskscale's shipped configs live: a source checkout, an installed wheel, or your own.

Why: model presets (``model/*.yaml``), corpus and train recipes (``corpus/``, ``train/``), the
demo's settings (``demo.yaml``) and the paper's task protocol (``eval/``) are YAML files in the
repository's top-level ``configs/`` folder. A source checkout (or an editable install) reads
them there; ``pip install .`` copies the same folder into the wheel as the data-only package
``maskscale_configs`` (see ``[tool.setuptools.package-dir]`` in pyproject.toml), because
``configs/`` itself is not next to the installed packages. The lookup order is:

1. ``$MASKSCALE_CONFIG_DIR`` when set (your own folder with the same layout);
2. ``<checkout>/configs`` when this code runs from a source checkout (a ``pyproject.toml`` next
   to it: an unrelated ``configs`` folder in site-packages never counts);
3. the installed ``maskscale_configs`` package.

A relative ``--config`` path that does not exist from the current directory is looked up in
the config folder too (``configs/train/tiny-cpu.yaml`` or ``train/tiny-cpu.yaml``), so the
README's commands also work from an installed package outside the repository.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CONFIG_DIR_ENV = "MASKSCALE_CONFIG_DIR"
PACKAGE = "maskscale_configs"
"""The installed name of the repository's ``configs/`` folder."""
_CHECKOUT = Path(__file__).resolve().parents[1]


def _installed_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def config_dir() -> Path:
    """The config folder (see the module docstring for the order). Never raises: when nothing
    is found it returns the checkout's path, and reading a file there names what is missing."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    checkout = _CHECKOUT / "configs"
    if (_CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    return _installed_dir() or checkout


def config_path(relative: str | Path) -> Path:
    """``relative`` (e.g. ``"corpus/sotu.yaml"``) inside the config folder."""
    return config_dir() / relative


def resolve_config_file(path: str | Path) -> Path:
    """``path`` if it exists; else, for a relative path, the same file in the config folder
    (a leading ``configs/`` is dropped); else ``path`` unchanged (the caller reports it)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    shipped = config_dir().joinpath(*parts) if parts else None
    return shipped if shipped is not None and shipped.is_file() else p


def describe() -> str:
    """One line for error messages: where configs are read from and how to change it."""
    return f"config folder {config_dir()} (set {CONFIG_DIR_ENV} to use another)"
