"""The edgevirt version, from its one place: pyproject.toml's `[project] version`.

An installed edgevirt (wheel or editable) reads it from the distribution's metadata; a bare checkout
on PYTHONPATH (no metadata) reads pyproject.toml beside the package.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "edgevirt"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def edgevirt_version() -> str:
    """The version of the edgevirt distribution ("0+unknown" when neither source has one)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


VERSION = edgevirt_version()
