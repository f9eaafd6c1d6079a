"""Damage is told apart from error: flipped, truncated and missing files are proven damaged and
skipped; every other failure propagates and nothing is moved. Saves check disk space first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.checkpoint import (
    CheckpointDamaged,
    Checkpointer,
    CheckpointError,
    restore,
    restore_latest,
    step_dirs,
)
from llmjax.checkpoint import manager as manager_lib
from tests.train.helpers import REPO

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "params": {"w": jax.random.normal(k1, (128, 96)), "b": jnp.zeros((96,), jnp.bfloat16)},
        "opt_state": (jax.random.normal(k2, (128, 96)), {"count": jnp.int32(7)}),
        "rng": jax.random.PRNGKey(seed),
    }


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=DEVICE), state)


def _save(directory, steps=(1, 2, 3), async_save=True):
    ckpt = Checkpointer(directory, keep_last=5, keep_best=False, async_save=async_save)
    for s in steps:
        ckpt.save(s, _state(s), {"step": s})
    ckpt.close()


def _data_file(step_dir: Path) -> Path:
    """The largest array data file of a step (the weights and moments live there)."""
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _flip(path: Path, at: float = 0.5, bit: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_save_writes_checksums_and_a_manifest_and_restores_bitwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative directory, as users type it
    _save(Path("ckpts"))
    step = tmp_path / "ckpts" / "3"
    manifest = json.loads((step / "manifest.json").read_text())
    assert set(manifest["arrays"]) == {
        "params/w",
        "params/b",
        "opt_state/0",
        "opt_state/1/count",
        "rng",
    }
    files = manifest["files"]
    assert any(name.startswith("state/") for name in files) and "meta/metadata" in files
    state, _ = restore(Path("ckpts/3"), _abstract(_state()))
    assert _equal(state, _state(3))


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda s: _flip(_data_file(s)), "fails its checksum"),  # restores, with a wrong value
        (lambda s: _flip(_data_file(s), at=0.0), "fails its CRC32"),  # the read itself fails
        (lambda s: _data_file(s).write_bytes(_data_file(s).read_bytes()[:100]), "bytes, "),
        (lambda s: _data_file(s).unlink(), "is missing"),
        (lambda s: (s / "meta" / "metadata").write_text('{"step": 3, "da'), "not valid JSON"),
        (lambda s: (s / "_CHECKPOINT_METADATA").unlink(), "incomplete"),
    ],
    ids=["bit flip in data", "bit flip in a header", "truncated", "deleted", "torn meta", "bare"],
)
def test_damage_is_proven_then_skipped_and_set_aside(tmp_path, damage, says):
    _save(tmp_path)
    damage(tmp_path / "3")
    with pytest.raises(CheckpointDamaged, match=says):
        restore(tmp_path / "3", _abstract(_state()))
    notes = []
    step, state, _ = restore_latest(tmp_path, _abstract(_state()), notify=notes.append)
    assert step == 2 and _equal(state, _state(2))
    assert len(notes) == 1 and says in notes[0] and "resuming from step 2" in notes[0]
    assert step_dirs(tmp_path) == [2, 1]
    assert [p.name.split("-")[0] for p in tmp_path.glob("3.invalid-*")] == ["3.invalid"]


def test_nan_params_are_damage_not_divergence(tmp_path):
    state = _state()
    state["params"]["w"] = state["params"]["w"].at[3, 4].set(jnp.nan)
    ckpt = Checkpointer(tmp_path, keep_best=False)
    ckpt.save(1, state, {"step": 1})
    ckpt.close()
    (tmp_path / "1" / "manifest.json").unlink()  # as a step saved without a manifest
    with pytest.raises(CheckpointDamaged, match="params/w holds NaN"):
        restore(tmp_path / "1", _abstract(state))


def test_an_error_that_is_not_damage_propagates_and_moves_nothing(tmp_path):
    _save(tmp_path)
    other = _abstract(_state())
    other["params"]["w"] = jax.ShapeDtypeStruct((64, 96), jnp.float32, sharding=DEVICE)
    with pytest.raises(CheckpointError, match="files are intact") as info:
        restore_latest(tmp_path, other, notify=pytest.fail)
    assert not isinstance(info.value, CheckpointDamaged)
    assert step_dirs(tmp_path) == [3, 2, 1] and not list(tmp_path.glob("*.invalid*"))


def test_without_a_manifest_a_failed_read_is_reported_not_moved(tmp_path):
    _save(tmp_path)
    (tmp_path / "3" / "manifest.json").unlink()
    _data_file(tmp_path / "3").unlink()
    with pytest.raises(CheckpointError, match="rename it to 3.invalid") as info:
        restore_latest(tmp_path, _abstract(_state()), notify=pytest.fail)
    assert not isinstance(info.value, CheckpointDamaged)
    assert step_dirs(tmp_path) == [3, 2, 1]


def test_synchronous_saves_get_a_manifest_too(tmp_path):
    _save(tmp_path, steps=(1,), async_save=False)
    assert (tmp_path / "1" / "manifest.json").is_file()


def test_too_little_space_refuses_before_writing(tmp_path, monkeypatch):
    _save(tmp_path, steps=(1,))
    before = sorted(p.name for p in tmp_path.iterdir())
    real = shutil.disk_usage
    monkeypatch.setattr(manager_lib.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    ckpt = Checkpointer(tmp_path, keep_best=False)
    with pytest.raises(CheckpointError, match="no space left") as info:
        ckpt.save(2, _state(), {"step": 2})
    ckpt.close()
    msg = str(info.value)
    assert str(tmp_path) in msg and "1000 bytes are free" in msg and "steps 1 are intact" in msg
    assert f"({sum(x.nbytes for x in jax.tree.leaves(_state()))} bytes)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before


FILL_DISK = """
import shutil, sys
import jax
from llmjax.checkpoint import Checkpointer, restore, CheckpointError
from llmjax.checkpoint import manager
from tests.train.test_checkpoint_damage import _state, _abstract, _equal
# Let the pre-check pass, so the write itself runs out of space.
real = shutil.disk_usage
manager.shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)
ckpt = Checkpointer(sys.argv[1], keep_last=10, keep_best=False)
try:
    for step in range(1, 20):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
except CheckpointError as e:
    print("ERROR", e)
state, _ = restore(sys.argv[1] + "/1", _abstract(_state()))
print("STEP1", _equal(state, _state(1)))
"""


def on_small_tmpfs(tmp_path, size: str, commands: str, timeout: int = 300):
    """Run shell ``commands`` with a ``size`` tmpfs mounted at ``tmp_path/small`` (named MNT in
    them), in a private mount namespace; skips where the system allows no such mount (the
    in-process pre-check test above still runs there)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99; " + commands.replace(
        "MNT", str(mnt)
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode == 99:
        pytest.skip(f"this system does not allow a private tmpfs mount: {proc.stderr.strip()}")
    return proc


def test_a_full_disk_gives_one_error_and_keeps_earlier_checkpoints(tmp_path):
    """A real full file system: a 1 MiB tmpfs, written until a save does not fit."""
    script = tmp_path / "fill.py"
    script.write_text(FILL_DISK)
    proc = on_small_tmpfs(
        tmp_path, "1m", f"{sys.executable} {script} MNT/ckpt; echo EXIT $?; ls MNT/ckpt"
    )
    out = proc.stdout
    assert "ERROR no space left on the device of" in out, out + proc.stderr
    assert "STEP1 True" in out and "EXIT 0" in out, out + proc.stderr
    assert "orbax-checkpoint-tmp" not in out.split("EXIT 0")[1]  # the partial step is gone
