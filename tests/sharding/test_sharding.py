"""Sharding rules, meshes, sharded training equivalence and a two-process run on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import llmjax
from llmjax import sharding
from llmjax.sharding.planner import abstract_mesh
from llmjax.sharding.rules import MESH_AXES, ShardingError, param_spec
from tests.sharding.util import run_module

ROOT = Path(__file__).resolve().parents[2]
FULL = [n for n in llmjax.PRESETS if not n.endswith("-tiny")]
# Each parallelism preset on an 8-device mesh it is meant for.
MESHES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "tp": {"data": 2, "tensor": 4},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "ep": {"fsdp": 4, "expert": 2},
    "ep_tp": {"fsdp": 2, "expert": 2, "tensor": 2},
}


def _sizes(d):
    return {a: d.get(a, 1) for a in MESH_AXES}


@pytest.mark.parametrize("rules", sorted(MESHES))
def test_every_full_preset_gets_specs_that_divide(rules):
    mesh = abstract_mesh(_sizes(MESHES[rules]))
    for name in FULL:
        model = llmjax.build(name)
        specs = sharding.param_specs(model, mesh, rules)
        sharded = 0
        for shape, spec in zip(
            jax.tree.leaves(model.abstract_params()),
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            strict=True,
        ):
            assert len(spec) == len(shape.shape)
            for dim, axis in zip(shape.shape, spec, strict=True):
                group = (axis,) if isinstance(axis, str) else tuple(axis or ())
                ways = int(np.prod([mesh.shape[a] for a in group]))
                assert dim % ways == 0, (name, shape.shape, spec)
                sharded += ways > 1
        assert sharded > 0 or rules == "dp", f"{name} under {rules} shards nothing"


def test_indivisible_dimension_names_parameter_shape_and_axis():
    model = llmjax.build("llama3-tiny", d_model=36, n_heads=2, n_kv_heads=2)
    with pytest.raises(
        ShardingError,
        # Scanned: the first parameter checked is a stack, its leading axis the 2 layers.
        match=r"parameter blocks/0/attn/wk of shape \(2, 36, 2, 18\): dimension "
        r"'embed' \(36\) is not divisible by mesh axis fsdp of size 8",
    ):
        sharding.param_specs(model, abstract_mesh(_sizes({"fsdp": 8})), "fsdp")
    # One KV head under tensor parallelism is replicated, the standard fallback.
    spec = param_spec(
        "wk",
        ("embed", "kv_heads", "head_dim"),
        (64, 1, 16),
        abstract_mesh(_sizes({"tensor": 2})),
        sharding.get_rules("tp"),
    )
    assert tuple(spec) == (None, None, None)


def test_mesh_config_errors():
    assert sharding.MeshConfig.parse("data=2,fsdp=-1").sizes(8) == {
        "data": 2,
        "fsdp": 4,
        "expert": 1,
        "sequence": 1,
        "tensor": 1,
    }
    with pytest.raises(ShardingError, match="has 6 devices but there are 8"):
        sharding.MeshConfig.parse("data=2,tensor=3").sizes(8)
    with pytest.raises(ShardingError, match="at most one axis may be -1"):
        sharding.MeshConfig.parse("data=-1,fsdp=-1").sizes(8)
    with pytest.raises(ShardingError, match="unknown axis 'model'"):
        sharding.MeshConfig.parse("model=2")
    with pytest.raises(ShardingError, match="'fsdp' is not axis=size"):
        sharding.MeshConfig.parse("fsdp")
    with pytest.raises(ShardingError, match="unknown parallelism preset 'zero3'"):
        sharding.get_rules("zero3")


def test_describe_reports_bytes_per_device():
    model = llmjax.build("llama3-tiny")
    params = model.init(jax.random.key(0))
    text = sharding.describe(params, print_table=False)
    assert "blocks/0/attn/wq" in text and "(2, 64, 4, 16)" in text  # both layers, stacked
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert f"total: {total:,} bytes; per device: {total:,} bytes" in text


def _run(args):
    return run_module("tests.sharding.run_meshes", args)


MESH_RUNS = [
    "data=1:dp",
    "data=8:dp",
    "fsdp=8:fsdp",
    "data=2,fsdp=2,tensor=2:fsdp_tp",
    "fsdp=4,tensor=2:fsdp_tp",
]


@pytest.fixture(scope="module")
def mesh_results():
    return _run(["--devices", "8", *sum((["--mesh", m] for m in MESH_RUNS), [])])


def test_sharded_training_matches_one_device(mesh_results):
    ref = mesh_results["data=1:dp"]["losses"]
    assert ref[-1] < ref[0]  # the steps train
    for run in MESH_RUNS[1:]:
        # Sharded reductions sum in another order: fp32 rounding only.
        np.testing.assert_allclose(mesh_results[run]["losses"], ref, rtol=2e-6, err_msg=run)
    assert mesh_results["fsdp=8:fsdp"]["wq_spec"] == "('fsdp', None, None)"
    assert mesh_results["fsdp=4,tensor=2:fsdp_tp"]["wq_spec"] == "('fsdp', 'tensor', None)"
    # Adam's moments are sharded like their parameters.
    assert mesh_results["fsdp=4,tensor=2:fsdp_tp"]["mu_spec"] != "(None, None)"


MOE_RUNS = [
    "data=1:dp",
    "expert=8:ep",
    "fsdp=2,expert=4:ep",
    "data=2,expert=2,tensor=2:ep_tp",
]


def test_expert_parallel_training_matches_one_device():
    """8 experts over an ``expert`` axis (alone, with FSDP, with tensor parallelism): the
    shard_map dispatch trains like one device."""
    args = ["--devices", "8", "--preset", "mixtral-tiny", "--experts", "8"]
    results = _run([*args, *sum((["--mesh", m] for m in MOE_RUNS), [])])
    ref = results["data=1:dp"]
    assert ref["losses"][-1] < ref["losses"][0] and not ref["expert_parallel"]
    for run in MOE_RUNS[1:]:
        assert results[run]["expert_parallel"], run
        np.testing.assert_allclose(results[run]["losses"], ref["losses"], rtol=2e-6, err_msg=run)
    assert results["expert=8:ep"]["gate_spec"] == "('expert', None, None)"
    assert results["fsdp=2,expert=4:ep"]["gate_spec"] == "('expert', 'fsdp', None)"
    assert results["data=2,expert=2,tensor=2:ep_tp"]["gate_spec"] == "('expert', None, 'tensor')"


def test_two_processes_match_one_process(mesh_results):
    """Two processes on localhost, 2 CPU devices each, data x fsdp over all 4."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--devices", "2", "--mesh", "data=2,fsdp=2:fsdp"]
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LLMJAX_COORDINATOR": f"127.0.0.1:{port}",
            "LLMJAX_NUM_PROCESSES": "2",
            "LLMJAX_PROCESS_ID": str(i),
        }
        env.pop("XLA_FLAGS", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.sharding.run_meshes", *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(
        next(line for line in outs[0][0].splitlines() if line.startswith("RESULT "))[
            len("RESULT ") :
        ]
    )
    np.testing.assert_allclose(
        result["data=2,fsdp=2:fsdp"]["losses"], mesh_results["data=1:dp"]["losses"], rtol=2e-6
    )
