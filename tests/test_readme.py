"""The README's example runs as written, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_example_runs_as_written():
    examples = [b for b in _blocks("python") if "llmjax.build(" in b]
    assert examples, "the README lost its usage example"
    for code in examples:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command():
    commands = [line for b in _blocks("bash") for line in b.splitlines() if "pytest" in line]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text()
    # The README's line, less the venv creation that .ci/run does in its own temporary directory.
    install_and_test = commands[0].split("&& ", 2)[2]
    assert install_and_test in ci
