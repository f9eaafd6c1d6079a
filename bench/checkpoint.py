"""Checkpoint benchmark: what the integrity checks cost next to the save and restore they guard.

Builds the training state of a preset (parameters plus AdamW's two moments, float32 unless told
otherwise), then times, best of ``--reps``:

- ``checksums``: the per-array checksums of every save (one jitted pass on device, dispatched by
  the training thread and read on orbax's save thread);
- ``save``: a blocking save through ``llmjax.checkpoint.Checkpointer`` (orbax async save, waited
  for), which includes the checksums and the file manifest;
- ``manifest``: size + CRC32 of every file of the step (on orbax's save thread);
- ``restore``: ``llmjax.checkpoint.restore`` of the whole state, which includes ``verify``;
- ``verify``: recomputing and comparing the checksums of the restored arrays;
- ``orbax_save`` / ``orbax_restore``: orbax alone (``StandardCheckpointer``), the same state,
  the floor the integrity checks add to.

    python bench/checkpoint.py --preset gpt2-124m --reps 3 --dir /tmp/ckpt-bench

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmjax  # noqa: E402
from llmjax.checkpoint import Checkpointer, integrity, restore  # noqa: E402
from llmjax.train import OptimizerConfig, make_optimizer  # noqa: E402
from llmjax.train.step import init_state  # noqa: E402


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)

    model = llmjax.build(args.preset, param_dtype=args.param_dtype)
    tx = make_optimizer(OptimizerConfig(), 100)
    state = jax.jit(lambda: init_state(model, tx, 0))()
    jax.block_until_ready(state)
    nbytes = integrity.state_bytes(state)
    root = Path(args.dir or tempfile.mkdtemp(prefix="llmjax-ckpt-bench-")).absolute()
    shutil.rmtree(root / "ckpt", ignore_errors=True)
    ckpt = Checkpointer(root / "ckpt", keep_last=2, keep_best=False, async_save=False)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )

    integrity.array_checksums(state)  # compile once
    step = iter(range(1, 10_000))
    last = [0]

    def save():
        last[0] = next(step)
        ckpt.save(last[0], state, {"step": last[0]})

    t_checksums = best(lambda: integrity.array_checksums(state), args.reps)
    t_save = best(save, args.reps)
    step_dir = root / "ckpt" / str(last[0])
    sums = integrity.array_checksums(state)
    t_manifest = best(lambda: integrity.write_manifest(step_dir, sums), args.reps)
    restored = {}

    def load():
        restored["state"], restored["meta"] = restore(step_dir, abstract)

    t_restore = best(load, args.reps)
    checksums = integrity.saved_checksums(step_dir)
    t_verify = best(
        lambda: integrity.verify_arrays(restored["state"], checksums, step_dir), args.reps
    )
    ckpt.close()
    plain = ocp.StandardCheckpointer()
    n_plain = iter(range(10_000))

    def orbax_save():
        plain.save(root / f"plain-{next(n_plain)}", state)
        plain.wait_until_finished()

    t_orbax_save = best(orbax_save, args.reps)
    t_orbax_restore = best(lambda: plain.restore(root / "plain-0", abstract), args.reps)
    plain.close()
    disk = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    gb = nbytes / 1e9
    result = {
        "preset": args.preset,
        "device": jax.devices()[0].device_kind,
        "state_bytes": nbytes,
        "disk_bytes": disk,
        "checksums_s": t_checksums,
        "save_s": t_save,
        "manifest_s": t_manifest,
        "restore_s": t_restore,
        "verify_s": t_verify,
        "orbax_save_s": t_orbax_save,
        "orbax_restore_s": t_orbax_restore,
    }
    print(
        f"{args.preset}: state {gb:.2f} GB (params + 2 Adam moments), {disk / 1e9:.2f} GB on disk"
    )
    for name in (
        "checksums",
        "save",
        "manifest",
        "restore",
        "verify",
        "orbax_save",
        "orbax_restore",
    ):
        t = result[f"{name}_s"]
        print(f"  {name:13s} {t * 1e3:9.1f} ms  {gb / t:6.2f} GB/s")
    print(
        f"  llmjax over orbax alone: save {t_save / t_orbax_save:.2f}x, "
        f"restore {t_restore / t_orbax_restore:.2f}x"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
