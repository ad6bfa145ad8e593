"""RetNet retention: the three forms against a per-token loop of the paper's equations, and the
mixer protocol checks."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import retnet
from layers.checks import ConfigError
from layers.retnet import RetNetConfig
from tests.layers import mixer_harness as mh

B, D = 2, 16
# The harness calls module.forward eagerly; a jitted view compiles once per shape instead of
# dispatching op by op (much faster on this CPU).
JIT = types.SimpleNamespace(forward=jax.jit(retnet.forward, static_argnames="cfg"), step=retnet.step,
                            init_state=retnet.init_state)
CFG = RetNetConfig(d_model=D, n_heads=2, chunk_size=4)  # K = 8, V = 16; 4 divides none of the lengths


def reference(params, x, cfg, h0, offset_B):
    """Retention token by token: S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t, then per-head
    RMS norm, swish gate and the output projection (jnp so it can be differentiated)."""
    H, K = cfg.n_heads, cfg.head_dim
    q = jnp.einsum("bld,dhk->blhk", x, params["wq_DHK"])
    k = jnp.einsum("bld,dhk->blhk", x, params["wk_DHK"]) * K ** -0.5
    v = jnp.einsum("bld,dhk->blhk", x, params["wv_DHV"])
    gate = jnp.einsum("bld,dhk->blhk", x, params["wg_DHV"])
    # Rotary on interleaved pairs (2i, 2i+1), angle = position * theta^(-2i/K).
    inv = cfg.rope.theta ** (-2.0 * np.arange(K // 2) / K)
    pos = np.asarray(offset_B)[:, None] + np.arange(x.shape[1])[None]
    ang = jnp.asarray((pos[..., None] * inv).astype(np.float32))[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)

    def rot(a):
        a0, a1 = a[..., 0::2], a[..., 1::2]
        return jnp.stack([a0 * cos - a1 * sin, a1 * cos + a0 * sin], axis=-1).reshape(a.shape)

    q, k = rot(q), rot(k)
    gamma = jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(H)), jnp.float32).reshape(1, H, 1, 1)

    def token(S, qkv_t):  # one step of the recurrence (a scan compiles faster than a Python loop)
        q_t, k_t, v_t = qkv_t
        S = gamma * S + k_t[..., :, None] * v_t[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)

    S, o = jax.lax.scan(token, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v)))
    o = jnp.moveaxis(o, 0, 1)
    o = o / jnp.sqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + cfg.norm_eps)
    y = jnp.einsum("blhv,hvd->bld", jax.nn.silu(gate) * o, params["wo_HVD"])
    return y, S


def setup(cfg, L, seed=0):
    kp, kx, ks = jax.random.split(jax.random.key(seed), 3)
    params = retnet.init(kp, cfg)
    x = jax.random.normal(kx, (B, L, cfg.d_model))
    state = mh.random_state(retnet, cfg, B, ks)
    state = dict(state, index_B=jnp.array([3, 0], jnp.int32))
    return params, x, state


def _value_and_grads(f, cfg):
    params, x, state = setup(cfg, 15)
    cot = jax.random.normal(jax.random.key(5), x.shape)
    cot_h = jax.random.normal(jax.random.key(6), state["h_BHKV"].shape)

    def loss(params, x, h0):
        y, h = f(params, x, h0, state["index_B"])
        return jnp.sum(y * cot) + jnp.sum(h * cot_h), (y, h)

    (_, (y, h)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, state["h_BHKV"])
    return y, h, g


@functools.lru_cache
def _reference_result(cfg):
    """The loop is the same for every form: compile and run it once."""
    return _value_and_grads(lambda p, x, h0, index_B: reference(p, x, cfg, h0, index_B), cfg)


@pytest.mark.parametrize("form", retnet.FORMS)
def test_forms_match_reference_values_and_gradients(form):
    cfg = dataclasses.replace(CFG, form=form)

    def fast(params, x, h0, index_B):
        _, s = y_s = JIT.forward(params, x, cfg=cfg, state={"h_BHKV": h0, "index_B": index_B})
        return y_s[0], s["h_BHKV"]

    y, h, g = _value_and_grads(fast, cfg)
    y_r, h_r, g_r = _reference_result(CFG)
    mh.assert_close(y, y_r, what="output")
    mh.assert_close(h, h_r, what="state")
    mh.assert_trees_close(g, g_r, what="grad")


def test_forms_agree_and_protocol():
    """Odd length 63 over several chunks; step-by-step, split and packed runs agree."""
    params, x, state = setup(CFG, 63, seed=1)
    cfg16 = dataclasses.replace(CFG, chunk_size=16)
    ys = {f: JIT.forward(params, x, cfg=dataclasses.replace(cfg16, form=f), state=state)
          for f in retnet.FORMS}
    for f in ("parallel", "recurrent"):
        mh.assert_close(ys[f][0], ys["chunkwise"][0], what=f"{f} output")
        mh.assert_trees_close(ys[f][1], ys["chunkwise"][1], what=f"{f} state")
    x15 = x[:, :15]
    assert JIT.forward(params, x15, cfg=CFG)[1] is None
    mh.check_step_equivalence(JIT, CFG, params, x15, state)
    mh.check_split_equivalence(JIT, CFG, params, x15, 7, state)
    mh.check_packing(JIT, CFG, params, x[:1, :21], [5, 9, 7])
    mh.check_state_constant(CFG)


def test_bf16_inputs_fp32_state():
    params, x, state = setup(CFG, 15, seed=2)
    # Same (bf16-representable) inputs and weights for both runs: this measures the error of the
    # bf16 computation, not of rounding the test's fp32 inputs.
    x, params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), (x, params))
    y32, s32 = JIT.forward(params, x, cfg=CFG, state=state)
    y16, s16 = JIT.forward(params, x.astype(jnp.bfloat16), cfg=CFG, state=state)
    assert y16.dtype == jnp.bfloat16 and s16["h_BHKV"].dtype == jnp.float32
    mh.assert_close(y16, y32, mh.BF16_TOL, "bf16 output")
    mh.assert_close(s16["h_BHKV"], s32["h_BHKV"], mh.BF16_TOL, "bf16 state")


def test_decays_follow_the_paper():
    np.testing.assert_allclose(np.exp(retnet.log_decays(4).astype(np.float64)),
                               [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], rtol=1e-7)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=16, n_heads=3), "n_heads"),
    (dict(d_model=16, n_heads=2, form="fast"), "form"),
    (dict(d_model=16, n_heads=2, chunk_size=0), "chunk_size"),
    (dict(d_model=16, n_heads=2, head_dim=5), "head_dim"),
    (dict(d_model=16, n_heads=2, norm_eps=-1.0), "norm_eps"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RetNetConfig(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
def test_long_forms_agree(L):
    params, x, state = setup(CFG, L, seed=3)
    y_r, s_r = JIT.forward(params, x, cfg=dataclasses.replace(CFG, form="recurrent"), state=state)
    for chunk in (16, 32, 64):
        y_c, s_c = JIT.forward(params, x, cfg=dataclasses.replace(CFG, chunk_size=chunk), state=state)
        mh.assert_close(y_c, y_r, what=f"chunk {chunk} output")
        mh.assert_trees_close(s_c, s_r, what=f"chunk {chunk} state")


@pytest.mark.slow
def test_stress_8192_finite():
    cfg = RetNetConfig(d_model=32, n_heads=8, form="chunkwise")  # heads down to gamma = 1 - 2^-12
    params, x, _ = setup(cfg, 8192, seed=4)
    x = x[:1]

    def loss(params, x):
        return jnp.mean(JIT.forward(params, x, cfg=cfg)[0] ** 2)

    val, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves((gp, gx)))
