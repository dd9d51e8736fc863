"""``RuntimeConfig.ep_strategy='auto'`` (the default): the exchange the mesh needs, decided in one place
(``sharding.expert_parallel.resolve_strategy``) for the trainer, the generator and ``dsv3 plan`` alike —
``ragged_a2a`` on a TPU/GPU mesh whose expert axis has 16 or more devices, ``allgather`` on CPU and on
small expert axes; a strategy named explicitly is kept."""
import jax
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.errors import ConfigError
from dsv3_jax.model.execution import execution
from dsv3_jax.plan import topology_devices
from sharding import make_mesh
from sharding.expert_parallel import RAGGED_MIN_EXPERT_AXIS, ExpertParallel, resolve_strategy


def test_default_is_auto_and_names_are_checked():
    assert dsv3.RuntimeConfig().ep_strategy == "auto"
    with pytest.raises(ConfigError, match="ep_strategy='ragged'.*fix"):
        dsv3.RuntimeConfig().replace(ep_strategy="ragged")


def test_cpu_meshes_gather():
    """On CPU ragged_all_to_all is emulated over a padded all_to_all: auto gathers, whatever the axis."""
    for spec in ("expert=8", "data=2,expert=4"):
        mesh = make_mesh(spec, devices=jax.devices("cpu")[:8])
        assert resolve_strategy("auto", mesh) == "allgather"
        assert resolve_strategy("ragged_a2a", mesh) == "ragged_a2a"       # explicit: kept
    assert resolve_strategy("auto", None) == "allgather"


def test_tpu_meshes_by_expert_axis():
    devs = topology_devices("v5p:2x2x4")                                   # 16 chips, compile-only
    assert RAGGED_MIN_EXPERT_AXIS == 16
    cases = {"expert=16": "ragged_a2a", "data=2,expert=8": "allgather", "fsdp=4,expert=4": "allgather"}
    for spec, want in cases.items():
        mesh = make_mesh(spec, devices=devs)
        assert resolve_strategy("auto", mesh) == want, spec
        assert ExpertParallel.create(mesh, "auto", 32).strategy == want, spec
        assert resolve_strategy("allgather", mesh) == "allgather"
    # the model built for the mesh runs the resolved strategy (what train, generate and plan use)
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1", "n_routed_experts=32", "n_group=16"])
    mesh = make_mesh("expert=16", devices=devs)
    assert execution(cfg, dsv3.RuntimeConfig(), mesh).ep_strategy == "ragged_a2a"
    model = nnx.eval_shape(lambda: dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=mesh))
    assert model.moe_layers.mlp.ep.strategy == "ragged_a2a"
    assert model.runtime.ep_strategy == "auto"                              # as asked: rebuilds re-resolve
