"""A run's output directory: created on first use, refused when it is a file, and held by one
training process at a time.

The hold is an advisory ``flock`` on ``<out>/.lock``: the kernel releases it when the holder
exits, however it exits, so a killed run never leaves a stale lock, and a second run on the same
directory learns at once who holds it. Holds nest within one process (a recipe holds the
directory while it builds data, then the loop holds it again). In a multi-process job only
process 0 takes the lock; the others write only what orbax coordinates.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from llmjax import distributed
from llmjax.checkpoint.manager import absolute
from llmjax.errors import ConfigError, RunInUse

LOCK = ".lock"
_held: dict[Path, int] = {}  # directory -> nesting depth, for this process


def prepare(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as an absolute path, created if needed; a clear error if it cannot be one."""
    out = absolute(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out_dir} is a file, not a directory; pass a directory (a new one starts a "
            "run, an existing run's directory resumes it)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"--out {out_dir}: a parent of it is a file, not a directory; pass another path"
        ) from None
    return out


@contextlib.contextmanager
def hold(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out_dir`` for this process; raises ``RunInUse`` if another process holds it."""
    out = prepare(out_dir)
    if out in _held or not distributed.is_main_process():
        _held[out] = _held.get(out, 0) + 1
        try:
            yield out
        finally:
            _held[out] -= 1
            if not _held[out]:
                del _held[out]
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            raise RunInUse(
                f"{out_dir} is in use by another llmjax run ({holder}); wait for it to finish, "
                "stop it, or use another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # A file system without locks (some network mounts): run unguarded, and say so.
            logging.getLogger("llmjax").warning(
                "%s cannot be locked (%s); make sure no other run writes to it", out_dir, e
            )
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
        _held[out] = 1
        try:
            yield out
        finally:
            del _held[out]
    finally:
        os.close(fd)  # closing the descriptor releases the lock
