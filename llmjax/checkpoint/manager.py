"""Orbax checkpoints of the train state, with proof of damage before anything is set aside.

Layout: ``<dir>/<step>/state`` (the pytree), ``<dir>/<step>/meta`` (JSON: data-iterator state,
configs, tokenizer hash, eval loss) and ``<dir>/<step>/manifest.json`` (a checksum per array, and
size and CRC32 of every file; see ``integrity``). Orbax writes a step into a temporary directory and
renames it when complete, so a save killed midway leaves the earlier steps as they were.

A checkpoint is *damaged* only when that is proven: files missing or incomplete, metadata that is
not JSON, a file that differs from the manifest, an array that fails its checksum or holds NaN.
``restore_latest`` then falls back to the previous step and moves the damaged one aside (never
deletes it). Any other failure (a tree of another shape, too little memory, a permission error)
is an error: it propagates with the reason and nothing is moved.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from llmjax.checkpoint import integrity
from llmjax.errors import CheckpointDamaged, CheckpointError, CheckpointMismatch, one_line

log = logging.getLogger("llmjax")

__all__ = ["CheckpointDamaged", "CheckpointError", "CheckpointMismatch"]


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute against the working directory (orbax refuses relative paths), with
    ``..`` folded away but symbolic links kept as the user named them."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def step_dirs(directory: str | Path) -> list[int]:
    """Integer-named step directories, newest first (complete or not)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(
        (int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )


def looks_complete(step_dir: Path) -> str | None:
    """None if ``step_dir`` has every file a finished save writes, else what is missing."""
    if not (step_dir / "_CHECKPOINT_METADATA").is_file():
        return "no _CHECKPOINT_METADATA (the save never finished)"
    for item in ("state", "meta"):
        if not (step_dir / item).is_dir():
            return f"no {item}/ item"
    if not (step_dir / "state" / "_METADATA").is_file():
        return "no state/_METADATA"
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _no_space(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpointer:
    """Saves every step it is asked to; keeps the newest ``keep_last`` plus the best eval loss.

    Each save is checked for disk space before anything is written and gets a manifest (array
    checksums, file sizes and CRC32s) inside the same atomic commit, computed off the training
    thread: the checksums are dispatched with the save and fetched on orbax's save thread. A failed save
    removes its partial directory and raises ``CheckpointError`` naming the directory and what it
    needs; the steps saved before are untouched.
    """

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        keep_best: bool = True,
        async_save: bool = True,
    ):
        self.directory = absolute(directory)
        self.async_save = async_save
        self._pending: int | None = None  # the step whose save may still be in flight
        self._sums = None  # its array checksums, possibly still being computed on device
        self._bytes = 0
        policies = [cm.LatestN(keep_last)]
        if keep_best:
            policies.append(
                cm.BestN(
                    get_metric_fn=lambda m: m["eval_loss"],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            # Always orbax's async path: only it runs the manifest callback inside the commit.
            # A synchronous save waits for it below.
            enable_async_checkpointing=True,
            async_options=ocp.options.AsyncOptions(post_finalization_callback=self._manifest),
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _manifest(self) -> None:
        """Runs on orbax's save thread after the files are final and before the commit rename."""
        if jax.process_index() != 0 or self._pending is None:
            return
        step = self._pending
        tmp = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        step_dir = tmp[0] if tmp else self.directory / str(step)
        integrity.write_manifest(step_dir, integrity.fetch_checksums(self._sums))

    def _failure(self, e: BaseException, step: int | None) -> CheckpointError:
        """The one error a failed save becomes, after its partial directory is removed."""
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        kept = step_dirs(self.directory)
        intact = f"steps {', '.join(map(str, kept))} are intact" if kept else "no step was saved"
        if _no_space(e):
            free = shutil.disk_usage(self.directory).free
            return CheckpointError(
                f"no space left on the device of {self.directory} while saving step {step}: a "
                f"checkpoint needs about {_size(self._bytes)} ({self._bytes} bytes) and "
                f"{_size(free)} are free; free space or use another --out ({intact})"
            )
        return CheckpointError(
            f"saving step {step} to {self.directory} failed: {one_line(e)} ({intact})"
        )

    def wait(self) -> None:
        """Block until the save in flight is committed; raise ``CheckpointError`` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._failure(e, step) from e
        self._pending = None

    def save(self, step: int, state, meta: dict, eval_loss: float | None = None) -> None:
        """Start saving ``state`` as ``step``; returns once arrays are copied (async)."""
        self.wait()  # orbax waits for the previous save anyway; its failure is reported here
        self._bytes = integrity.state_bytes(state)
        free = shutil.disk_usage(self.directory).free
        if free < self._bytes:
            raise self._failure(OSError(errno.ENOSPC, "No space left on device"), step)
        self._sums = integrity.start_checksums(state)  # dispatched; read on the save thread
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        self._pending = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                metrics=metrics,
                force=True,
            )
        except Exception as e:
            self._pending = None
            raise self._failure(e, step) from e
        if not self.async_save:
            self.wait()

    def close(self) -> None:
        """Wait for the last save (raising if it failed), then release orbax's threads."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):
                self._manager.close()


def read_meta(step_dir: str | Path) -> dict:
    """The JSON metadata of one checkpoint, without touching its arrays.

    Raises ``CheckpointDamaged`` when the file is missing or not JSON.
    """
    path = absolute(step_dir) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(
            f"{path.parent.parent}: its meta/metadata file is missing"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{path}: expected a JSON object")
    return meta


def _orphaned(unraisable) -> bool:
    """A report from an abandoned orbax read (see ``_quiet_orphaned_reads``)."""
    exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        code is not None and "orbax" in code.co_filename
    )


_LATE_S = 60.0  # how long after a failed restore its stragglers may still report
_late_until = [0.0]


def _late_filter(previous):
    """``previous``, except for stragglers of a failed restore that arrive after it returned."""
    if getattr(previous, "llmjax_late_filter", False):
        return previous

    def hook(unraisable):
        if not (_orphaned(unraisable) and time.monotonic() < _late_until[0]):
            previous(unraisable)

    hook.llmjax_late_filter = True
    return hook


@contextlib.contextmanager
def _quiet_orphaned_reads(settle_s: float = 0.25, max_wait_s: float = 5.0):
    """Keep a failed restore from printing a traceback per array still being read.

    Orbax runs a restore on a fresh asyncio loop and closes it as soon as one read fails. The
    other tensorstore reads finish afterwards and try to wake that closed loop; each raises
    "Event loop is closed" on a tensorstore thread, which Python reports through
    ``sys.unraisablehook``: dozens of interleaved tracebacks after the one real error. The
    abandoned read coroutines report their own failure the same way when they are collected.
    Only those two kinds are swallowed (anything else goes to the previous hook). After a
    success the hook is the caller's again; after a failure it is the caller's behind a filter
    that drops only such stragglers, for a minute, since a slow read can outlive the wait here.
    """
    previous = sys.unraisablehook
    last = [0.0]

    def hook(unraisable):
        if _orphaned(unraisable):
            last[0] = time.monotonic()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        start = last[0] = time.monotonic()
        while (now := time.monotonic()) - last[0] < settle_s and now - start < max_wait_s:
            time.sleep(settle_s / 5)
        gc.collect()
        _late_until[0] = time.monotonic() + _LATE_S
        previous = _late_filter(previous)
        raise
    finally:
        sys.unraisablehook = previous


def _read_state(state_dir: Path, abstract_state, partial: bool):
    """Orbax's item reader, without a manager (a read-only manager logs six warnings a read)."""
    if partial:
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_state
        )
        args = ocp.args.PyTreeRestore(
            abstract_state, restore_args=restore_args, partial_restore=True
        )
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(state_dir, args=args)
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(state_dir, abstract_state)


def _explain(step_dir: Path, e: Exception) -> CheckpointError:
    """A failed read is damage only if the files differ from what was written."""
    try:
        problem = integrity.verify_files(step_dir)
    except FileNotFoundError:
        return CheckpointError(
            f"{step_dir} cannot be restored ({one_line(e)}), and it has no "
            f"{integrity.MANIFEST} to tell damage from another cause; if its files are damaged, "
            f"rename it to {step_dir.name}.invalid to resume from the previous step"
        )
    except OSError as oe:
        return CheckpointError(f"{step_dir} cannot be read: {one_line(oe)}")
    if problem:
        return CheckpointDamaged(f"{step_dir} is damaged: {problem}")
    return CheckpointError(
        f"{step_dir} cannot be restored although its files are intact: {one_line(e)}"
    )


def restore(
    step_dir: str | Path, abstract_state, partial: bool = False, check=None, adapt=None
) -> tuple[dict, dict]:
    """``(state, meta)`` of one checkpoint, arrays placed as ``abstract_state``'s shardings say.

    With ``partial``, ``abstract_state`` may name a subset of the saved tree (e.g. only
    ``{"params": ...}``) and only those arrays are read: sampling from an 8B checkpoint then
    never allocates its two Adam moments. ``check(meta)`` runs before any array is read (it may
    raise ``CheckpointMismatch``). ``adapt(meta)`` gives ``(abstract, convert)`` for a checkpoint
    stored in another layout of the same state (scanned or unrolled layers): it is read as
    ``abstract`` and returned as ``convert(state)``; ``convert`` None reads ``abstract_state``.
    Raises ``CheckpointDamaged`` for proven damage and ``CheckpointError`` for any other failure.
    """
    step_dir = absolute(step_dir)
    problem = looks_complete(step_dir)
    if problem:
        raise CheckpointDamaged(f"{step_dir} is incomplete: {problem}")
    meta = read_meta(step_dir)
    if check is not None:
        check(meta)
    convert = None
    if adapt is not None:
        saved_state, convert = adapt(meta)
        abstract_state = saved_state if convert is not None else abstract_state
    try:
        with _quiet_orphaned_reads():
            state = _read_state(step_dir / "state", abstract_state, partial)
    except Exception as e:
        raise _explain(step_dir, e) from e
    integrity.verify_arrays(state, integrity.saved_checksums(step_dir), step_dir)
    return (convert(state) if convert is not None else state), meta


def _quarantine(path: Path) -> Path:
    dest = path.with_name(f"{path.name}.invalid-{int(time.time())}")
    shutil.move(str(path), str(dest))
    return dest


def restore_latest(
    directory: str | Path,
    abstract_state,
    check=None,
    quarantine: bool = True,
    notify=None,
    adapt=None,
):
    """``(step, state, meta)`` of the newest checkpoint that restores, or None if there is none.

    Damaged steps (``CheckpointDamaged``) are skipped, reported in one line each through
    ``notify`` (default: the ``llmjax`` logger) and, with ``quarantine``, moved to
    ``<step>.invalid-<time>`` (never deleted) so the resumed run can save those step numbers
    again. Every other error propagates and nothing is moved: a checkpoint of another
    configuration (``CheckpointMismatch`` from ``check``) or one that fails for a reason other
    than its files must not silently restart a run the user meant to continue.
    """
    notify = notify or log.warning
    directory = absolute(directory)
    damaged: list[tuple[Path, CheckpointDamaged]] = []
    result = None
    for step in step_dirs(directory):
        path = directory / str(step)
        try:
            state, meta = restore(path, abstract_state, check=check, adapt=adapt)
        except CheckpointDamaged as e:
            damaged.append((path, e))
            continue
        result = (step, state, meta)
        break
    if jax.process_count() > 1:  # every process has finished reading before anything moves
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llmjax: checkpoints verified")
    fallback = f"resuming from step {result[0]}" if result else "no usable checkpoint is left"
    for path, e in damaged:
        moved = ""
        if quarantine and jax.process_index() == 0:
            moved = f"; moved it to {_quarantine(path).name}"
        notify(f"{one_line(e)}{moved}; {fallback}")
    return result


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """Step directories to load from ``path``, newest first.

    ``path`` is a run directory, its ``checkpoints`` directory, or one step directory (which is
    then the only candidate: an explicit step never falls back to another).
    """
    p = absolute(path)
    if not p.exists():
        raise CheckpointError(
            f"{path}: no such directory; pass a run directory written by `llmjax pretrain --out`"
        )
    if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists():
        return [p]
    for cand in (p / "checkpoints", p):
        steps = step_dirs(cand)
        if steps:
            return [cand / str(s) for s in steps]
    raise CheckpointError(
        f"{path}: no checkpoint in it (expected <run>/checkpoints/<step>/ from `llmjax pretrain`)"
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """The newest complete step directory under ``path`` (see ``checkpoint_candidates``)."""
    for cand in checkpoint_candidates(path):
        if looks_complete(cand) is None:
            return cand
    raise CheckpointError(f"{path}: no complete checkpoint in it")
