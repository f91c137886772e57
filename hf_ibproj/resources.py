"""Where the model-card templates and the training presets are, however hf_ibproj was installed.

The repository keeps them in its top-level model_cards/ and configs/ folders; a wheel or a
non-editable install ships those same folders as package data inside hf_ibproj/ (pyproject.toml maps them there),
so a source checkout and an installed package each find the one copy they have.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """hf_ibproj/<name> in an installed package, else <repository>/<name> in a source checkout."""
    installed = _PACKAGE_DIR / name
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / name


TEMPLATE_DIR = data_dir("model_cards")
CONFIG_DIR = data_dir("configs")
