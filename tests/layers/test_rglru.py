"""RG-LRU (Griffin's recurrent block): a per-token reference of the paper's equations, the mixer
protocol (forward == step, split sequences, packing), and config validation."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mixers, rglru
from layers.checks import ConfigError
from layers.rglru import RGLRUConfig
from tests.layers import mixer_harness as H

CFG = RGLRUConfig(d_model=8, width=12, n_heads=3, conv_width=4)
# The module with forward jitted (cfg static): eager dispatch of the many small ops is slow on CPU.
JIT = types.SimpleNamespace(forward=jax.jit(rglru.forward, static_argnames="cfg"), step=rglru.step,
                            init_state=rglru.init_state)


def random_params(cfg, key):
    """init, then every leaf perturbed so no gate or bias sits at its default."""
    params = rglru.init(key, cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def state_at(cfg, batch, key, t=5):
    """A random non-empty state at position t (position 0 would reset it)."""
    s = H.random_state(rglru, cfg, batch, key)
    return {**s, "t_B": jnp.full((batch,), t, jnp.int32)}


def reference(params, x_BLD, cfg):
    """Token by token in NumPy, float64, from an empty state at position 0."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x_BLD, np.float64)
    B, L, _ = x.shape
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    y = gelu(x @ p["wy_DE"] + p["by_E"])
    u = x @ p["wx_DE"] + p["bx_E"]
    W = cfg.conv_width
    up = np.concatenate([np.zeros((B, W - 1, cfg.width)), u], 1)
    u = sum(up[:, k:k + L] * p["conv"]["w_WC"][k] for k in range(W)) + p["conv"]["b_C"]
    uh = u.reshape(B, L, cfg.n_heads, cfg.block_width)
    i = sig(np.einsum("blhk,hkj->blhj", uh, p["wi_HKK"]) + p["bi_HK"]).reshape(B, L, -1)
    r = sig(np.einsum("blhk,hkj->blhj", uh, p["wr_HKK"]) + p["br_HK"]).reshape(B, L, -1)
    a = np.exp(-cfg.c * r * np.log1p(np.exp(p["lambda_E"])))
    h = np.zeros((B, cfg.width))
    out = []
    for t in range(L):
        if t == 0:
            h = i[:, t] * u[:, t]  # reset: no decay, no normalisation
        else:
            h = a[:, t] * h + np.sqrt(1 - a[:, t] ** 2) * i[:, t] * u[:, t]
        out.append(h)
    hs = np.stack(out, 1)
    return (hs * y) @ p["wout_ED"] + p["bout_D"]


def test_forward_matches_the_per_token_reference():
    key = jax.random.PRNGKey(0)
    params = random_params(CFG, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 7, CFG.d_model))
    y, state = JIT.forward(params, x, cfg=CFG)
    assert state is None
    H.assert_close(y, reference(params, x, CFG), 1e-5, "forward vs reference")


@pytest.mark.slow
def test_step_split_and_packing_agree():
    key = jax.random.PRNGKey(1)
    params = random_params(CFG, key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 6, CFG.d_model))
    s0 = state_at(CFG, 2, jax.random.fold_in(key, 3))
    H.check_step_equivalence(JIT, CFG, params, x, s0)
    H.check_split_equivalence(JIT, CFG, params, x, 4, s0)
    H.check_packing(JIT, CFG, params, x[:1], [2, 4])
    H.check_state_constant(CFG)
    assert mixers.module_for(CFG) is rglru
    # From an empty state the first token is position 0: the same as a fresh forward.
    y_fresh, _ = JIT.forward(params, x, cfg=CFG)
    y_state, _ = JIT.forward(params, x, cfg=CFG, state=rglru.init_state(CFG, 2, 16))
    H.assert_close(y_state, y_fresh, 1e-6, "empty state vs no state")


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="n_heads"):
        RGLRUConfig(d_model=8, width=12, n_heads=5)
    with pytest.raises(ConfigError, match="a_min"):
        RGLRUConfig(d_model=8, a_min=0.99, a_max=0.9)
    with pytest.raises(ConfigError, match="activation"):
        RGLRUConfig(d_model=8, activation="tanh")
