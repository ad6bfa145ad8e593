"""GLA and linear attention: forms against per-token loops of the paper equations (values and
gradients), and the mixer protocol checks."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import gla
from layers.checks import ConfigError
from layers.gla import GLAConfig, LinearAttentionConfig
from tests.layers import mixer_harness as mh


B, D = 2, 16
# The harness calls module.forward eagerly; a jitted view compiles once per shape instead of
# dispatching op by op (much faster on this CPU).
JIT = types.SimpleNamespace(forward=jax.jit(gla.forward, static_argnames="cfg"), step=gla.step,
                            init_state=gla.init_state)
GLA = GLAConfig(d_model=D, n_heads=2, gate_low_rank_dim=4, chunk_size=4)  # K = 4, V = 8
LA = LinearAttentionConfig(d_model=D, n_heads=2, chunk_size=4)            # K = V = 8
LA_NORM = dataclasses.replace(LA, normalize=True)


def rms(o, w, eps):
    return o / jnp.sqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + eps) * w.reshape(1, 1, 1, -1)


def reference(params, x, cfg, state):
    """Token by token: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = K^-0.5 q_t S_t (g = 0 for
    linear attention, whose normalised variant divides by K^-0.5 q_t . sum_{s<=t} k_s)."""
    scale = cfg.head_dim ** -0.5
    q = jnp.einsum("bld,dhk->blhk", x, params["wq_DHK"])
    k = jnp.einsum("bld,dhk->blhk", x, params["wk_DHK"])
    v = jnp.einsum("bld,dhk->blhk", x, params["wv_DHV"])
    is_gla = isinstance(cfg, GLAConfig)
    if is_gla:
        logits = jnp.einsum("bld,dr,rhk->blhk", x, params["wgk1_DR"], params["wgk2_RHK"]) + params["bgk_HK"][None, None]
        g = jax.nn.log_sigmoid(logits) / cfg.gate_logit_normalizer
    else:
        g = jnp.zeros(q.shape)
        if cfg.feature_map == "elu1":
            q, k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
    normalize = "z_BHK" in state

    def token(carry, inp):  # one step of the recurrence (a scan compiles faster than a Python loop)
        S, z = carry
        q_t, k_t, v_t, g_t = inp
        S = jnp.exp(g_t)[..., None] * S + k_t[..., :, None] * v_t[..., None, :]
        o = scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)
        if normalize:
            z = z + k_t
            o = o / (scale * jnp.sum(q_t * z, axis=-1, keepdims=True) + gla.DENOMINATOR_EPS)
        return (S, z), o

    z0 = state["z_BHK"] if normalize else jnp.zeros(())
    (S, z), o = jax.lax.scan(token, (state["h_BHKV"], z0), tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g)))
    o = jnp.moveaxis(o, 0, 1)
    if "norm" in params:
        o = rms(o, params["norm"]["scale"], cfg.norm_eps)
    if is_gla:
        o = o * jax.nn.silu(jnp.einsum("bld,dhk->blhk", x, params["wg_DHV"]))
    y = jnp.einsum("blhv,hvd->bld", o, params["wo_HVD"])
    new = {"h_BHKV": S, "z_BHK": z} if normalize else {"h_BHKV": S}
    return y, new


def setup(cfg, L, seed=0):
    kp, kx, ks, kb, kn = jax.random.split(jax.random.key(seed), 5)
    params = gla.init(kp, cfg)
    # Zero-initialised biases and unit norm scales would hide mistakes: make them random.
    if "bgk_HK" in params:
        params["bgk_HK"] = jax.random.normal(kb, params["bgk_HK"].shape)
    if "norm" in params:
        params["norm"]["scale"] = 1.0 + 0.5 * jax.random.normal(kn, params["norm"]["scale"].shape)
    x = jax.random.normal(kx, (B, L, cfg.d_model))
    state = mh.random_state(gla, cfg, B, ks)
    if "z_BHK" in state:  # a positive running key sum, as elu1 keys produce
        state["z_BHK"] = jnp.abs(state["z_BHK"]) + 2.0
    return params, x, state


CASES = {
    "gla_chunked": dataclasses.replace(GLA, form="chunked"),
    "gla_recurrent": dataclasses.replace(GLA, form="recurrent"),
    "la_identity_recurrent": dataclasses.replace(LA, feature_map="identity", form="recurrent"),
    "la_elu1_norm_chunked": LA_NORM,
}


def _value_and_grads(f, cfg):
    params, x, state = setup(cfg, 15)
    cot = jax.random.normal(jax.random.key(5), x.shape)
    cot_s = jax.tree.map(lambda a: jax.random.normal(jax.random.key(6), a.shape), state)

    def loss(params, x, state):
        y, s = f(params, x, state)
        dots = [jnp.sum(a * b) for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(cot_s))]
        return jnp.sum(y * cot) + sum(dots), (y, s)

    (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, state)
    return y, s, g


@functools.lru_cache
def _reference_result(cfg):
    """The loop does not depend on the form: compile and run it once per model config."""
    return _value_and_grads(lambda p, x, s: reference(p, x, cfg, s), cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_forms_match_reference_values_and_gradients(name):
    cfg = CASES[name]
    y, s, g = _value_and_grads(lambda p, x, s: JIT.forward(p, x, cfg=cfg, state=s), cfg)
    y_r, s_r, g_r = _reference_result(dataclasses.replace(cfg, form="chunked", chunk_size=4))
    mh.assert_close(y, y_r, what="output")
    mh.assert_trees_close(s, s_r, what="state")
    mh.assert_trees_close(g, g_r, what="grad")


@pytest.mark.parametrize("cfg", [GLA, LA_NORM], ids=["gla", "la_norm"])
def test_forms_agree_and_protocol(cfg):
    """Odd length 63 over several chunks; step-by-step, split and packed runs agree."""
    params, x, state = setup(cfg, 63, seed=1)
    if isinstance(cfg, GLAConfig):  # (linear attention's forms: the reference test and the core's)
        cfg16 = dataclasses.replace(cfg, chunk_size=16)
        y_c, s_c = JIT.forward(params, x, cfg=cfg16, state=state)
        y_r, s_r = JIT.forward(params, x, cfg=dataclasses.replace(cfg16, form="recurrent"), state=state)
        mh.assert_close(y_c, y_r, what="chunked vs recurrent output")
        mh.assert_trees_close(s_c, s_r, what="chunked vs recurrent state")
    assert JIT.forward(params, x[:, :15], cfg=cfg)[1] is None
    x15 = x[:, :15]
    mh.check_step_equivalence(JIT, cfg, params, x15, state)
    mh.check_split_equivalence(JIT, cfg, params, x15, 7, state)
    mh.check_packing(JIT, cfg, params, x[:1, :21], [5, 9, 7])
    mh.check_state_constant(cfg)


@pytest.mark.parametrize("normalizer", [0.1])
def test_gate_temperatures(normalizer):
    """fla's gate recipe logsigmoid(.)/0.1: very fast decays (1 and 10 in the slow tests and in
    test_linear_recurrence)."""
    cfg = dataclasses.replace(GLA, gate_logit_normalizer=normalizer, chunk_size=16)
    params, x, state = setup(cfg, 63, seed=2)
    y_c, s_c = JIT.forward(params, x, cfg=cfg, state=state)
    y_r, s_r = JIT.forward(params, x, cfg=dataclasses.replace(cfg, form="recurrent"), state=state)
    mh.assert_close(y_c, y_r, what="output")
    mh.assert_trees_close(s_c, s_r, what="state")


def test_bf16_inputs_fp32_state():
    params, x, state = setup(GLA, 15, seed=3)
    # Same (bf16-representable) inputs and weights for both runs: this measures the error of the
    # bf16 computation, not of rounding the test's fp32 inputs.
    x, params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), (x, params))
    y32, s32 = JIT.forward(params, x, cfg=GLA, state=state)
    y16, s16 = JIT.forward(params, x.astype(jnp.bfloat16), cfg=GLA, state=state)
    assert y16.dtype == jnp.bfloat16 and s16["h_BHKV"].dtype == jnp.float32
    mh.assert_close(y16, y32, mh.BF16_TOL, "bf16 output")
    mh.assert_close(s16["h_BHKV"], s32["h_BHKV"], mh.BF16_TOL, "bf16 state")


def test_default_dims_follow_fla():
    cfg = GLAConfig(d_model=64, n_heads=4)
    assert (cfg.head_dim, cfg.value_head_dim) == (8, 16)
    la = LinearAttentionConfig(d_model=64, n_heads=4)
    assert (la.head_dim, la.value_head_dim) == (16, 16)
    assert "z_BHK" not in gla.init_state(la, 1, 8) and "z_BHK" in gla.init_state(LA_NORM, 1, 8)


@pytest.mark.parametrize("cls, kwargs, field", [
    (GLAConfig, dict(d_model=16, n_heads=3), "n_heads"),
    (GLAConfig, dict(d_model=16, n_heads=2, form="fused"), "form"),
    (GLAConfig, dict(d_model=16, n_heads=2, gate_logit_normalizer=0.0), "gate_logit_normalizer"),
    (GLAConfig, dict(d_model=16, n_heads=2, clamp_min=1.0), "clamp_min"),
    (GLAConfig, dict(d_model=16, n_heads=2, chunk_size=-1), "chunk_size"),
    (LinearAttentionConfig, dict(d_model=16, n_heads=2, feature_map="relu"), "feature_map"),
    (LinearAttentionConfig, dict(d_model=16, n_heads=2, norm_eps=0.0), "norm_eps"),
])
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
def test_long_odd_lengths(L):
    cfg = dataclasses.replace(GLA, gate_logit_normalizer=1.0)
    params, x, state = setup(cfg, L, seed=4)
    y_r, s_r = JIT.forward(params, x, cfg=dataclasses.replace(cfg, form="recurrent"), state=state)
    for chunk in (16, 32, 64):
        y_c, s_c = JIT.forward(params, x, cfg=dataclasses.replace(cfg, chunk_size=chunk), state=state)
        mh.assert_close(y_c, y_r, what=f"chunk {chunk} output")
        mh.assert_trees_close(s_c, s_r, what=f"chunk {chunk} state")


@pytest.mark.slow
def test_stress_8192_extreme_decays():
    cfg = dataclasses.replace(GLA, gate_logit_normalizer=0.1, chunk_size=64)
    params, x, _ = setup(cfg, 8192, seed=5)
    x = x[:1]

    def loss(params, x):
        return jnp.mean(JIT.forward(params, x, cfg=cfg)[0] ** 2)

    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(grads))
