"""MoE shared-expert sigmoid gate (Qwen2-MoE's shared_expert_gate): values and gradients against
a hand-written reference, the parameter's spec, and the config check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import moe
from layers import params as P
from layers.checks import ConfigError
from layers.moe import MoEConfig

D, F = 16, 12
CFG = MoEConfig(d_model=D, d_ff=F, n_experts=4, top_k=2, renormalize=False, n_shared_experts=2, shared_gate=True)


def _reference(params, x_TD):
    """Routed part from the ungated layer (tested in test_moe.py), the gated shared part by hand:
    silu(x Wg) * (x Wu) Wd scaled by sigmoid(x . w)."""
    routed = {k: v for k, v in params.items() if k not in ("shared", "shared_gate_D")}
    y_routed_TD = moe.apply_dense_reference(routed, x_TD, dataclasses.replace(CFG, n_shared_experts=0,
                                                                               shared_gate=False))
    s = params["shared"]
    h_TF = jax.nn.silu(x_TD @ s["gate"]["w"]) * (x_TD @ s["up"]["w"])
    gate_T1 = 1.0 / (1.0 + jnp.exp(-(x_TD @ params["shared_gate_D"][:, None])))
    return y_routed_TD + gate_T1 * (h_TF @ s["down"]["w"])


def test_gated_shared_experts_match_reference_values_and_gradients():
    params = moe.init(jax.random.key(0), CFG)
    # A large gate vector, so that sigmoid(x . w) spreads over (0, 1) and a missing gate shows.
    params["shared_gate_D"] = 2.0 * jax.random.normal(jax.random.key(1), (D,))
    x_TD = jax.random.normal(jax.random.key(2), (10, D))
    gate_T = jax.nn.sigmoid(x_TD @ params["shared_gate_D"])
    assert float(gate_T.min()) < 0.2 and float(gate_T.max()) > 0.8

    # Jitted: on a shared CPU one compile costs far less than eager dispatch of every small op.
    np.testing.assert_allclose(jax.jit(lambda p, x: moe.apply(p, x, CFG)[0])(params, x_TD),
                               jax.jit(_reference)(params, x_TD), rtol=1e-5, atol=1e-5)

    # Weighted sum of the outputs; gradients with respect to the parameters and the input.
    w_TD = jax.random.normal(jax.random.key(3), (10, D))
    got = jax.jit(jax.grad(lambda p, x: jnp.sum(w_TD * moe.apply(p, x, CFG)[0]), argnums=(0, 1)))(params, x_TD)
    want = jax.jit(jax.grad(lambda p, x: jnp.sum(w_TD * _reference(p, x)), argnums=(0, 1)))(params, x_TD)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    assert float(jnp.abs(got[0]["shared_gate_D"]).max()) > 1e-3


def test_shared_gate_spec_and_config_check():
    spec = moe.param_specs(CFG)["shared_gate_D"]
    assert spec.shape == (D,) and spec.logical_axes == ("embed",) and not P.decays(spec)
    assert "shared_gate_D" not in moe.param_specs(dataclasses.replace(CFG, shared_gate=False))
    with pytest.raises(ConfigError, match="shared_gate"):
        MoEConfig(d_model=D, d_ff=F, n_experts=4, shared_gate=True)
