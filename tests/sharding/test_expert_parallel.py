"""Expert parallelism (experts split over a mesh axis, tokens exchanged by all_to_all) equals the
single-device MoE: outputs, balance statistics and gradients. A whole train step under the ep
rules against the single-device step: tests/sharding/test_train_step.py (strategy "ep")."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import sharding
from layers import moe
from layers import params as P

CFG = moe.MoEConfig(d_model=16, d_ff=24, n_experts=8, top_k=2, expert_parallel_axis="expert",
                    n_shared_experts=1)


def _loss(params, x_BLD, cfg, w_BLD):
    y_BLD, aux = moe.apply(params, x_BLD, cfg)
    return jnp.sum(y_BLD * w_BLD), (y_BLD, aux)


# XLA's backend optimisation level 0: the partitioned HLO (all-to-all or not) is the same, the
# CPU code generation cheaper.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run(params, x_BLD, cfg, w_BLD):
    """(y, aux, grads, compiled HLO text) of one compiled value-and-grad."""
    compiled = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True),
                       static_argnums=2).lower(params, x_BLD, cfg, w_BLD).compile(FAST_COMPILE)
    (_, (y, aux)), grads = compiled(params, x_BLD, w_BLD)
    return y, aux, grads, compiled.as_text()


@pytest.mark.parametrize("dispatch", ["dropless", pytest.param("capacity", marks=pytest.mark.slow)])
def test_expert_parallel_matches_single_device(dispatch):
    # capacity_factor = E / K: every expert could take every token, so neither side drops.
    cfg = dataclasses.replace(CFG, dispatch=dispatch, capacity_factor=4.0)
    params = P.init(jax.random.key(0), moe.param_specs(cfg))
    x = jax.random.normal(jax.random.key(1), (8, 4, 16), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (8, 4, 16), jnp.float32)
    want_y, want_aux, want_grads, _ = _run(params, x, cfg, w)

    mesh = sharding.make_mesh("data=2,expert=4")
    p_shard = sharding.param_shardings(moe.param_specs(cfg), mesh, "ep")
    assert p_shard["experts"]["up_EDF"].spec == PartitionSpec("expert", None, None)
    params_s = jax.device_put(params, p_shard)
    x_s, w_s = (jax.device_put(a, NamedSharding(mesh, PartitionSpec(("data", "expert")))) for a in (x, w))
    with sharding.use_rules(mesh, "ep"):
        y, aux, grads, hlo = _run(params_s, x_s, cfg, w_s)
    assert "all-to-all" in hlo
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), np.asarray(want_aux["tokens_per_expert"]))
    assert float(aux["drop_fraction"]) == float(want_aux["drop_fraction"]) == 0.0
    np.testing.assert_allclose(float(aux["load_balance_loss"]), float(want_aux["load_balance_loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 grads, want_grads)


def test_expert_parallel_off_without_rules_or_axis():
    # Outside use_rules, or on a mesh without the axis, the layer runs its ordinary dispatch.
    assert moe._expert_parallel_mesh(CFG, 32) is None
    with sharding.use_rules(sharding.make_mesh("data=8"), "ep"):
        assert moe._expert_parallel_mesh(CFG, 32) is None
    with sharding.use_rules(sharding.make_mesh("expert=8"), "ep"):
        assert moe._expert_parallel_mesh(CFG, 32) is not None
        assert moe._expert_parallel_mesh(CFG, 12) is None  # 12 tokens do not split 8 ways
    with pytest.raises(ValueError, match="expert_parallel_axis"):
        dataclasses.replace(CFG, expert_parallel_axis="")
