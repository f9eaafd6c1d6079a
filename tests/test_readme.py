"""The README's example runs as written, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_examples_run_as_written():
    """Every Python block runs, in order, in one namespace (later blocks reuse ``model``).

    Skipped blocks need what a test machine lacks: a checkpoint directory, or 8 devices.
    """
    runnable = [b for b in _blocks("python") if "path/to" not in b and "MeshConfig" not in b]
    assert any("llmjax.build(" in b for b in runnable), "the README lost its usage example"
    assert any("llmjax.generate(" in b for b in runnable)
    namespace = {"__name__": "readme"}
    for code in runnable:
        exec(compile(code, "README.md", "exec"), namespace)


def test_ci_runs_the_readme_test_command():
    commands = [line for b in _blocks("bash") for line in b.splitlines() if "pytest" in line]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text()
    # The README's line, less the venv creation that .ci/run does in its own temporary directory.
    install_and_test = commands[0].split("&& ", 2)[2]
    assert install_and_test in ci
