"""Runs the Mosaic GPU (Hopper) kernels on CPU: jax's GPU interpreter, extended where it stops short.

jax 0.10 ships an interpreter for Pallas Mosaic GPU kernels (threads for warpgroups, TMA copies
completing on barriers, barrier phases checked at the end), but it models only wgmma with both
operands in shared memory, untransposed, and no ``run_state``. The flash kernels need the rest:

- ``wgmma`` with a transposed shared-memory operand (``K^T`` in ``S = Q K^T``) or with the A operand
  in registers (``P`` in ``O += P V``);
- ``pl.run_state`` over an accumulator initialised from registers (``plgpu.ACC.init``);
- ``plgpu.load`` (a shared-memory read into a register layout) and ``layout_cast`` (register
  layouts do not exist on a CPU: the identity).

``extended()`` patches those in for its duration. The interpreter orders its callbacks through a
token passed from each to the next, so ``run_state`` is handled between runs of the stock loop,
with the token threaded through it: without that, a barrier arrival after ``O += P V`` could run
before the matmul read V and let the producer overwrite the stage early.

Each warpgroup runs as its own XLA computation blocking on the others' barriers, so XLA's CPU
thread pool must hold all of them at once: at least ``MIN_POOL`` threads (the pool is sized from
the ``NPROC`` environment variable, else the core count; ``tests/conftest.py`` sets it).

This reaches into ``jax._src``; ``available()`` says why it cannot run where the internals differ.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jax._src import callback
    from jax._src import core as jax_core
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu import core as mgpu_core
    from jax._src.pallas.mosaic_gpu import primitives as mgpu_primitives
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as cb
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret as ji
    from jax._src.pallas.mosaic_gpu.interpret import params as ip
    from jax._src.state import discharge
    from jax._src.state import types as state_types

    _MISSING = None
except ImportError as e:  # another jax release: the tests that need this say so
    _MISSING = f"jax {jax.__version__} lacks the Mosaic GPU interpreter internals ({e})"


# Three warpgroups and the kernel call that waits for them.
MIN_POOL = 4


def available() -> str | None:
    """None if the extended interpreter can run here, else why not."""
    if _MISSING:
        return _MISSING
    pool = int(os.environ.get("NPROC", 0)) or os.cpu_count() or 1
    if pool < MIN_POOL:
        return f"XLA's CPU pool has {pool} threads; set NPROC={MIN_POOL} before jax starts"
    needed = ("_interpret_wgmma_ref_p", "_interpret_arithmetic_primitive", "interpret")
    if not all(hasattr(ji.JaxprInterpreter, n) for n in needed):
        return f"jax {jax.__version__}: the Mosaic GPU interpreter's hooks have changed"
    return None


def _logging_info(device_id, grid_point_coords, thread_id):
    return interpret_utils.GPULoggingInfo(
        device_id=device_id,
        grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=thread_id,
        source_info=None,
    )


def _read_operand(mem, key_array, transforms, thread, info):
    """A shared-memory operand's value: index first, then at most one trailing transpose."""
    perm, index = None, []
    for t in cb._remove_noop_transforms(tuple(transforms)):
        if isinstance(t, state_types.TransposeTransform):
            perm = t.permutation
        elif perm is not None:
            raise NotImplementedError("indexing a transposed wgmma operand")
        else:
            index.append(t)
    rng = interpret_utils.to_range(jax.tree.map(int, tuple(index)))
    key = cb.HostAllocationKey.from_array(key_array)
    x, _, _ = mem.get_buffer_content(key, rng, thread, logging_info=info)
    return x if perm is None else np.transpose(x, perm)


def _wgmma_callback(
    *, token, device_id, grid_point_coords, thread_id, acc, acc_transforms, a, a_transforms,
    b, b_transforms, acc_dtype, a_in_registers,
):  # fmt: skip
    device_id, thread_id = int(device_id), int(thread_id)
    mem = cb._get_shared_memory()
    thread = mem.get_global_thread_id(device_id, thread_id)
    info = _logging_info(device_id, grid_point_coords, thread_id)
    a = np.asarray(a) if a_in_registers else _read_operand(mem, a, a_transforms, thread, info)
    b = _read_operand(mem, b, b_transforms, thread, info)
    rng = interpret_utils.to_range(
        jax.tree.map(int, cb._remove_noop_transforms(tuple(acc_transforms)))
    )
    key = cb.HostAllocationKey.from_array(acc)
    value, _, _ = mem.get_buffer_content(key, rng, thread, logging_info=info)
    # The tensor cores multiply exactly and accumulate in fp32: so does this.
    product = np.matmul(a.astype(np.float32), b.astype(np.float32))
    mem.store_buffer_content(key, rng, value + product.astype(acc_dtype), thread, logging_info=info)
    return token


def _wgmma(self, eqn, token, get_invals):
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    trees = [eqn.params[f"{n}_transforms_tree"] or empty for n in ("acc", "a", "b")]
    acc_t, a_t, b_t = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
    fn = functools.partial(
        _wgmma_callback,
        acc_dtype=eqn.invars[0].aval.inner_aval.dtype,
        a_in_registers=not isinstance(eqn.invars[1].aval, state_types.AbstractRef),
    )
    token = callback.io_callback(
        fn, cb.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc,
        acc_transforms=acc_t, a=a, a_transforms=a_t, b=b, b_transforms=b_t, ordered=True,
    )  # fmt: skip
    return token, []


def _run_state(self, eqn, token, invals):
    """Values become register allocations holding them; refs closed over pass through."""
    where = dict(
        device_id=jnp.int32(self.device_info.device_id),
        grid_point_coords=self.grid_point_coords,
        thread_id=self.thread_id,
    )
    refs, fresh = [], []
    for inner, outer, value in zip(eqn.params["jaxpr"].invars, eqn.invars, invals, strict=True):
        if isinstance(outer.aval, state_types.AbstractRef):
            refs.append(value)
            fresh.append(False)
            continue
        token, request = cb.call_make_allocation_request_array(
            token=token, device_id=where["device_id"],
            memory_space_id=cb.get_memory_space_idx(mgpu_core.MemorySpace.REGS),
            thread_id=jnp.int32(self.thread_id), initial_ref_count=1,
        )  # fmt: skip
        token, key = cb.call_allocate_buffer(
            token=token, allocation_request_as_array=request,
            value=jnp.asarray(value, inner.aval.inner_aval.dtype), source_info=eqn.source_info,
            **where,
        )  # fmt: skip
        refs.append(key)
        fresh.append(True)
    token, _ = self.interpret(eqn.params["jaxpr"], token, *refs)
    outs = []
    for inner, key, new in zip(eqn.params["jaxpr"].invars, refs, fresh, strict=True):
        if not new:
            outs.append(key)
            continue
        token, value = callback.io_callback(
            cb.wgmma_accumulator_deref, (cb.TOKEN_SHAPE_DTYPE, inner.aval.inner_aval),
            token=token, acc_allocation_key_as_array=key, wait_n=None, ordered=True,
            device_id=self.device_info.device_id, grid_point_coords=self.grid_point_coords,
            thread_id=self.thread_id,
        )  # fmt: skip
        outs.append(value)
        token = cb.call_deallocate_buffer(
            token=token, allocation_key_as_array=key, source_info=eqn.source_info, **where
        )
    return token, outs


def _load(self, eqn, token, invals):
    """``plgpu.load``: a read of shared memory (the layout it names is dropped with the cast)."""
    ref, *leaves = invals
    return _get(self, eqn, token, ref, jax.tree.unflatten(eqn.params["tree"], leaves))


def _get(self, eqn, token, ref, transforms):
    token, value = cb.call_get(
        token=token, result_shape_and_dtype=eqn.outvars[0].aval,
        device_id=jnp.int32(self.device_info.device_id), grid_point_coords=self.grid_point_coords,
        thread_id=self.thread_id, allocation_key_as_array=ref, transforms=transforms,
        source_info=eqn.source_info,
    )  # fmt: skip
    return token, [value]


def _special():
    """Primitives the stock loop lacks that must be ordered by the token."""
    return {discharge.run_state_p: _run_state, mgpu_primitives.load_p: _load}


def _interpreter(stock_interpret):
    special = _special()

    def interpret(self, jaxpr, token, *args):
        if not any(e.primitive in special for e in jaxpr.eqns):
            return stock_interpret(self, jaxpr, token, *args)
        env = dict(zip([*jaxpr.constvars, *jaxpr.invars], args, strict=True))

        def read(v):
            return v.val if isinstance(v, jax_core.Literal) else env[v]

        def run_stock(eqns, token):
            defined, ins = set(), []
            for e in eqns:
                ins += [v for v in e.invars if isinstance(v, jax_core.Var) and v not in defined]
                defined.update(e.outvars)
            ins = list(dict.fromkeys(ins))
            outs = [v for e in eqns for v in e.outvars if not isinstance(v, jax_core.DropVar)]
            part = types.SimpleNamespace(constvars=[], invars=ins, outvars=outs, eqns=eqns)
            token, values = stock_interpret(self, part, token, *[env[v] for v in ins])
            env.update(zip(outs, values, strict=True))
            return token

        pending = []
        for e in jaxpr.eqns:
            if e.primitive not in special:
                pending.append(e)
                continue
            if pending:
                token, pending = run_stock(pending, token), []
            token, outs = special[e.primitive](self, e, token, [read(v) for v in e.invars])
            env.update(
                (v, o)
                for v, o in zip(e.outvars, outs, strict=True)
                if not isinstance(v, jax_core.DropVar)
            )
        if pending:
            token = run_stock(pending, token)
        return token, [read(v) for v in jaxpr.outvars]

    return interpret


def _arithmetic(stock):
    def arithmetic(self, eqn, get_invals):
        if eqn.primitive is mgpu_core.layout_cast_p:
            return get_invals()[0]
        return stock(self, eqn, get_invals)

    return arithmetic


_installed = False


def _install():
    # Only the GPU interpreter uses these hooks, so they stay in place once set: the per-thread
    # programs are traced while the kernel executes, which may outlive any one ``with`` block.
    global _installed
    if not _installed:
        cls = ji.JaxprInterpreter
        cls.interpret = _interpreter(cls.interpret)
        cls._interpret_wgmma_ref_p = _wgmma
        cls._interpret_arithmetic_primitive = _arithmetic(cls._interpret_arithmetic_primitive)
        _installed = True


@contextlib.contextmanager
def extended():
    """Mosaic GPU kernels traced inside run in the extended interpreter (block on the results
    inside: an exception while interpreting needs the interpreter's state reset)."""
    if why := available():
        raise RuntimeError(why)
    _install()
    try:
        with ip.force_gpu_interpret_mode(ip.InterpretGPUParams()):
            yield
    except Exception:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

        interpret_pallas_call.reset_gpu_interpret_mode_state()
        raise
