"""Proof that a checkpoint is damaged: per-array checksums and a manifest of its files.

Two checks, because damage shows in two ways (measured with orbax 0.12.8): a flipped bit inside
an array's data restores silently with a wrong value, while a truncated, deleted or corrupted
file makes the restore raise, as do problems that have nothing to do with the files (a relative
path, a tree of another shape, too little memory).

Both live in the step's ``manifest.json``, written by the primary process on orbax's save thread
before orbax commits the step, so it is part of the atomic save and costs the training thread
only the dispatch of one jitted reduction.

- **Array checksums**: a position-weighted sum of each array's bits modulo 2^32, computed on
  device, so it detects any single flipped bit and depends only on the logical values (a
  checkpoint restored onto another mesh verifies the same). Every restore recomputes them.
- **File sizes and CRC32s**, read only when a restore fails: if every file matches, the files
  are exactly as written and the failure is an error to report, not damage to set aside.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import CheckpointDamaged

MANIFEST = "manifest.json"
_ITEMS = ("state", "meta")  # orbax rewrites the step's own metadata at commit, so it is not listed


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 vector (one word per element up to 32 bits)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if bits is None:  # 64-bit values become two words each
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, bits).reshape(-1).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    w = _words(x)
    odd = jnp.arange(w.shape[0], dtype=jnp.uint32) * 2 + 1  # odd weights: any one bit flip shows
    return jnp.sum(w * odd, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


_summaries = jax.jit(lambda tree: (jax.tree.map(_checksum, tree), jax.tree.map(_finite, tree)))


def _flat(tree) -> dict[str, object]:
    return {
        "/".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        ): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def start_checksums(tree):
    """Dispatch the checksum computation of ``tree`` (returns at once; arrays stay on device)."""
    return _summaries(tree)[0]


def fetch_checksums(sums) -> dict[str, str]:
    """``{"params/embed": "9f0c31a2", ...}`` from ``start_checksums``' result (blocks)."""
    return {k: f"{int(s):08x}" for k, s in _flat(jax.device_get(sums)).items()}


def array_checksums(tree) -> dict[str, str]:
    """One hex checksum per array of ``tree``."""
    return fetch_checksums(start_checksums(tree))


def verify_arrays(tree, expected: dict[str, str] | None, where: Path) -> None:
    """Raise ``CheckpointDamaged`` if an array of a restored ``tree`` fails its saved checksum or
    holds NaN/inf (a checkpoint is only ever saved after a finite loss). ``expected`` is None
    without a manifest (a step saved before manifests existed, or a process killed between the
    save and the commit): then only finiteness is checked."""
    sums, finite = (_flat(t) for t in jax.device_get(_summaries(tree)))
    for key, s in sums.items():
        if expected is not None and key in expected and f"{int(s):08x}" != expected[key]:
            raise CheckpointDamaged(
                f"{where}: array {key} fails its checksum (saved {expected[key]}, read "
                f"{int(s):08x}): its data changed on disk"
            )
        if not bool(finite[key]):
            raise CheckpointDamaged(f"{where}: array {key} holds NaN or inf values")


# Files ------------------------------------------------------------------------------------------
def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(
        p for item in _ITEMS if (step_dir / item).is_dir() for p in (step_dir / item).rglob("*")
        if p.is_file()
    )  # fmt: skip


def write_manifest(step_dir: Path, checksums: dict[str, str]) -> None:
    """Record the array checksums, and size and CRC32 of every file, of a finished (not yet
    committed) step directory."""
    files = {
        str(p.relative_to(step_dir)): [p.stat().st_size, f"{_crc32(p):08x}"]
        for p in _files(step_dir)
    }
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "arrays": checksums, "files": files}, indent=1))
    os.replace(tmp, step_dir / MANIFEST)


def saved_checksums(step_dir: Path) -> dict[str, str] | None:
    """The array checksums recorded at save time; None without a readable manifest."""
    try:
        return json.loads((step_dir / MANIFEST).read_text())["arrays"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_files(step_dir: Path, contents: bool = True) -> str | None:
    """What is damaged in ``step_dir`` according to its manifest; None if every file matches.

    ``contents=False`` compares only which files exist and their sizes (no file is read).

    Raises ``FileNotFoundError`` when there is no manifest (a step saved by an older version, or a
    process killed between the save and its manifest): nothing can be proven then.
    """
    text = (step_dir / MANIFEST).read_text()
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is not readable JSON"
    for name, (size, crc) in files.items():
        p = step_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
        if contents and f"{_crc32(p):08x}" != crc:
            return f"{name} fails its CRC32 (its bytes changed on disk)"
    return None


def state_bytes(tree) -> int:
    """Bytes the arrays of ``tree`` take (what a checkpoint of it needs on disk, uncompressed)."""
    return int(
        sum(np.prod(x.shape, dtype=np.int64) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    )
