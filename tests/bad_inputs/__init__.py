"""The bad-input table, one module of rows per area (cli, data, interop, inference), run by
tests/test_bad_inputs.py; this module defines what a row is and what it may use.

A ``Cli`` row is what a user types: it must exit with code 2 and print exactly one line on
stderr, an error that contains ``expect``, and no traceback. An ``Api`` row is a
Python call: it must raise ``error`` (a typed llmjax exception) whose message contains ``expect``.
``after`` (optional) checks that nothing was lost or written, e.g. that a file is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Env:
    """Shared, read-only inputs plus a fresh directory per case.

    ``run``: a finished 8-step pretraining run of llama3-tiny (checkpoints at steps 3, 4, 6, 8,
    its tokenizer and metrics). ``hf``: that run exported with ``llmjax export`` (config.json,
    model.safetensors, tokenizer.model). ``model``/``params``: llama3-tiny with random params.
    ``corpus``: the small real text files the training tests use. ``tmp``: empty, per case.
    Cases must not modify ``run`` or ``hf``: copy them into ``tmp`` first (``copy``).
    """

    run: Path
    hf: Path
    model: object
    params: dict
    corpus: tuple[str, ...]
    tmp: Path = field(default=None)

    def write(self, name: str, content: bytes | str) -> str:
        """Write a file under ``tmp`` and return its path."""
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return str(p)

    def copy(self, src: Path, name: str) -> Path:
        """A private copy of a directory (``run`` or ``hf``) under ``tmp``."""
        import shutil

        dest = self.tmp / name
        shutil.copytree(src, dest)
        return dest


@dataclass(frozen=True)
class Cli:
    name: str
    argv: Callable[[Env], list[str]]
    expect: str
    after: Callable[[Env], None] | None = None


@dataclass(frozen=True)
class Api:
    name: str
    call: Callable[[Env], object]
    error: type[BaseException]
    expect: str
    after: Callable[[Env], None] | None = None
