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

from llmjax.data.text import read_text
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
                raise DataError(
                    f"--data {spec!r}: the pattern matches no files; check the pattern and its "
                    "directory"
                )
            out.extend(files)
        elif p.is_dir():
            try:
                files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
            except OSError as e:
                raise DataError(
                    f"--data {spec!r}: cannot list the directory ({e}); make it readable"
                ) from e
            if not files:
                raise DataError(
                    f"--data {spec!r}: the directory holds no files ending in "
                    f"{', '.join(TEXT_SUFFIXES)}; pass other files by name or with a glob "
                    f"such as '{p / '*.json'}'"
                )
            out.extend(files)
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise DataError(f"--data {spec!r}: not a regular file or directory; pass text files")
        else:
            raise DataError(f"--data {spec!r}: no such file or directory; check the path")
    return out


_JSON_TYPES = {list: "an array", dict: "an object", str: "a string", bool: "a boolean"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), "a number" if isinstance(value, int | float) else "null")


def _jsonl_documents(path: Path, raw: str, text_field: str) -> Iterable[Document]:
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg}); a .jsonl file holds one JSON object per "
                "line (rename the file if it is plain text)"
            ) from e
        if not isinstance(rec, dict):
            raise DataError(
                f"{where}: {_json_type(rec)} where a JSON object belongs; write each "
                f'line as an object such as {{"{text_field}": "..."}}'
            )
        if text_field not in rec:
            keys = ", ".join(map(repr, list(rec)[:8])) or "none"
            raise DataError(
                f"{where}: no {text_field!r} field (its fields: {keys}); set data.text_field "
                "to the field that holds the text"
            )
        text = rec[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {text_field!r} is {_json_type(text)}, not a string; "
                "set data.text_field to a field that holds text"
            )
        if text:
            yield Document(where, text)


def read_documents(paths: Iterable[Path], text_field: str = "text") -> list[Document]:
    """Read every file; a ``.jsonl`` file yields one document per line (its ``text_field``).

    Binary files and unreadable files raise ``DataError``; bytes that are not UTF-8 are replaced
    by U+FFFD with a logged warning (see ``llmjax.data.text``).
    """
    paths = [Path(p) for p in paths]
    docs: list[Document] = []
    for path in paths:
        raw = read_text(path)
        if path.suffix == ".jsonl":
            docs.extend(_jsonl_documents(path, raw, text_field))
        elif raw:
            docs.append(Document(str(path), raw))
    if not any(d.text.strip() for d in docs):
        names = ", ".join(map(str, paths[:3])) + (
            f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        )
        raise DataError(
            f"the corpus is empty: no non-blank text in {names or 'no files'}; pass files that "
            "hold text"
        )
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
