"""Every benchmark script builds its command line: ``--help`` exits 0 (a clashing flag once kept
one from starting at all, unnoticed until it was run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_bench_script_parses_its_flags(script, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit:
        module.main(["--help"])
    assert exit.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_script_is_checked():
    assert len(SCRIPTS) >= 15
