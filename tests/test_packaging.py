"""What installing llmjax puts on the import path: only ``llmjax`` and its subpackages."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_llmjax_name_is_installed():
    """Generic top-level names (``kernels``, ``recipes``) belong to other packages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(str(ROOT), include=config["packages"]["find"]["include"])
    assert {p.split(".")[0] for p in found} == {"llmjax"}, found
    assert {"llmjax.kernels", "llmjax.recipes"} <= set(found)
