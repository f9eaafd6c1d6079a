"""Text sources: files, directories and globs of ``.txt``, ``.jsonl`` (one document per line) and
source files, plus the default corpus (the running interpreter's own standard library).

A *document* is the unit packing never lets attention cross: a whole text or source file, or one
JSON line. Documents carry a stable ``key`` so held-out splits and caches do not depend on the
order in which a directory happens to be listed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmjax.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".py", ".md", ".rst", ".text")


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: "path" or "path:line"
    text: str


def resolve_paths(specs: Sequence[str]) -> list[Path]:
    """Expand files, directories (recursively, known text suffixes) and globs into sorted files."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise DataError(f"--data {spec!r}: the pattern matches no files")
            out.extend(files)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not files:
                raise DataError(
                    f"--data {spec!r}: the directory holds no files ending in {TEXT_SUFFIXES}"
                )
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"--data {spec!r}: no such file or directory")
    return out


def read_documents(paths: Iterable[Path], text_field: str = "text") -> list[Document]:
    """Read every file; a ``.jsonl`` file yields one document per line (its ``text_field``)."""
    docs: list[Document] = []
    for path in paths:
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from e
        if path.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or text_field not in rec:
                    raise DataError(
                        f"{path}:{i + 1}: no {text_field!r} field (set data.text_field)"
                    )
                if rec[text_field]:
                    docs.append(Document(f"{path}:{i + 1}", str(rec[text_field])))
        elif raw:
            docs.append(Document(str(path), raw))
    if not any(d.text.strip() for d in docs):
        raise DataError("the corpus is empty: no non-blank text in " + ", ".join(map(str, paths)))
    return docs


def stdlib_files(max_files: int, seed: int = 0) -> list[Path]:
    """A deterministic sample of the running interpreter's standard-library ``.py`` files.

    Tests and vendored third-party trees are left out so the corpus is ordinary library code;
    sampling keeps tokenisation cheap on a small machine (the whole library is ~30 MB).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo")
    files = sorted(
        f for f in root.rglob("*.py") if not set(f.relative_to(root).parts[:-1]) & set(skip)
    )
    if not files:
        raise DataError(f"found no standard-library sources under {root}")
    # Sorting by name, then a seeded sample, gives the same files for the same interpreter.
    rng = random.Random(seed)
    files = rng.sample(files, min(max_files, len(files)))
    return sorted(files)


def _hash_unit(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def split_documents(
    docs: Sequence[Document], heldout_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Deterministic train / held-out split.

    With many documents a document is held out when a hash of its key falls below the fraction,
    so adding files never moves an existing one across the split. With few documents (a single
    book) each document's tail, cut at a line boundary, is held out instead.
    """
    if not 0 < heldout_fraction < 1:
        raise DataError(f"data.heldout_fraction={heldout_fraction}: must be in (0, 1)")
    if len(docs) >= 20:
        held = [d for d in docs if _hash_unit(d.key) < heldout_fraction]
        train = [d for d in docs if _hash_unit(d.key) >= heldout_fraction]
        if held and train:
            return train, held
    train, held = [], []
    for d in docs:
        cut = int(len(d.text) * (1 - heldout_fraction))
        nl = d.text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        if d.text[:cut]:
            train.append(Document(d.key + "#train", d.text[:cut]))
        if d.text[cut:]:
            held.append(Document(d.key + "#heldout", d.text[cut:]))
    if not train or not held:
        raise DataError("the corpus is too small to hold out an evaluation split")
    return train, held


def corpus_hash(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.key.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()
