"""Process-wide settings that must be in place before jax creates its CPU backend."""

import os

# The Mosaic GPU kernels run on CPU in jax's GPU interpreter (tests/kernels/mgpu_interpret.py),
# one XLA computation per warpgroup, each blocking on the others' barriers. Three warpgroups and
# the kernel's own call can hold XLA's CPU thread pool at once; a pool sized to a 2-core machine
# leaves a warpgroup unscheduled and the kernel waits forever. XLA sizes the pool from NPROC.
os.environ.setdefault("NPROC", str(max(4, os.cpu_count() or 1)))
