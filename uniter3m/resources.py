"""Files the package ships: the configs (`configs/` in a checkout, `uniter3m/configs/` in a wheel).

A config path that does not exist as given but names a shipped config (`configs/model/tiny.json`,
`model/tiny.json`) resolves to the shipped copy, so the README's commands work from an installed
wheel too. A path that exists always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The folder of the shipped configs (model/, pretrain/, downstream/)."""
    installed = _PACKAGE / "configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def config_file(relative: str) -> Path:
    """A shipped config by its path under configs/ (e.g. `pretrain/demo.json`)."""
    return configs_dir() / relative


def resolve_config_path(path: str | os.PathLike) -> Path:
    """`path` when it exists, else the shipped config it names, else `path` unchanged."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = configs_dir().joinpath(*parts) if parts else None
    return shipped if shipped is not None and shipped.is_file() else path
