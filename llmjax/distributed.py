"""Multi-host start-up: one call on every host, before any other JAX work.

``initialize()`` wraps ``jax.distributed.initialize``. The coordinator, process count and process id
come from the arguments, else from ``LLMJAX_COORDINATOR``, ``LLMJAX_NUM_PROCESSES`` and
``LLMJAX_PROCESS_ID``, else from the cluster itself (Cloud TPU, SLURM, Open MPI are detected by JAX).
With none of these it does nothing: one process needs no coordination.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_CLUSTER_ENV = (
    "TPU_WORKER_HOSTNAMES",
    "CLOUD_TPU_TASK_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
) -> bool:
    """Join the job's processes; returns True when JAX runs distributed after the call."""
    if _initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("LLMJAX_COORDINATOR")
    if num_processes is None and "LLMJAX_NUM_PROCESSES" in env:
        num_processes = int(env["LLMJAX_NUM_PROCESSES"])
    if process_id is None and "LLMJAX_PROCESS_ID" in env:
        process_id = int(env["LLMJAX_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None
    if explicit:
        missing = [
            n
            for n, v in [
                ("coordinator_address", coordinator_address),
                ("num_processes", num_processes),
                ("process_id", process_id),
            ]
            if v is None
        ]
        if missing:
            raise ValueError(
                f"distributed.initialize: {missing} missing; give all three (or set "
                "LLMJAX_COORDINATOR, LLMJAX_NUM_PROCESSES, LLMJAX_PROCESS_ID)"
            )
        if num_processes == 1:
            return False
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    elif any(k in env for k in _CLUSTER_ENV):
        jax.distributed.initialize()  # JAX reads the cluster's own environment
    else:
        return False
    log.info(
        "process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _initialized() -> bool:
    is_init = getattr(jax.distributed, "is_initialized", None)
    return bool(is_init()) if is_init is not None else False


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and checkpoint metadata."""
    return jax.process_index() == 0


def process_rows(global_batch_size: int) -> slice:
    """The rows of each global batch that this process loads (contiguous, equal shares)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n} processes"
        )
    share = global_batch_size // n
    return slice(i * share, (i + 1) * share)


def main_process_first(fn):
    """Run ``fn`` on process 0, then on the others (which find what process 0 cached on disk)."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if is_main_process() else None
    multihost_utils.sync_global_devices("llmjax: process 0 first")
    return result if is_main_process() else fn()
