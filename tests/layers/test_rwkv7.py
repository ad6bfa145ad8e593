"""RWKV-7: both forms against a slow per-token recurrence written from the reference equations
(values and gradients, random initial states), the mixer protocol checks, bf16 and stress."""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import rwkv7
from layers.checks import ConfigError
from layers.rwkv7 import RWKV7ChannelMixConfig, RWKV7TimeMixConfig
from tests.layers import mixer_harness as H

B, D, K, F = 2, 16, 8, 40
NH = D // K
BASE = RWKV7TimeMixConfig(d_model=D, head_dim=K, decay_lora=4, a_lora=4, gate_lora=6)
FORMS = {
    "recurrent": BASE,
    "chunked": dataclasses.replace(BASE, form="chunked", chunk_size=16),
    "chunked4": dataclasses.replace(BASE, form="chunked", chunk_size=4),
}
CM = RWKV7ChannelMixConfig(d_model=D, d_ff=F)



class _Jitted:
    """The module with `forward` jitted (cfg static) for the harness, which calls it at several
    lengths: whole-function compiles instead of op-by-op dispatch (this CPU is shared)."""

    def __init__(self, module):
        self.__name__ = module.__name__
        self.forward = jax.jit(module.forward, static_argnames=("cfg", "form"))
        for name in ("param_specs", "init", "init_state", "step"):
            setattr(self, name, getattr(module, name))


JM = _Jitted(rwkv7)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("seed",))
def tm_params(cfg, seed=0, w0_scale=1.5, scale=0.5):
    """Every parameter random (the zero-initialised LoRAs and biases too)."""
    key = jax.random.key(seed)
    p = rwkv7.init(key, cfg)
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    p = treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    ks = jax.random.split(jax.random.fold_in(key, 2), 10)
    for i, n in enumerate("rwkvag"):
        p[f"x_{n}_D"] = jax.random.uniform(ks[i], (D,))
    for i, (n, sh) in enumerate((("receptance_DHK", (D, NH, K)), ("key_DHK", (D, NH, K)),
                                 ("value_DHK", (D, NH, K)))):
        p[n] = jax.random.normal(ks[6 + i], sh) / math.sqrt(D)
    p["w0_HK"] = w0_scale * jax.random.normal(ks[9], (NH, K))
    p["ln_x"]["scale_HK"] = 1.0 + p["ln_x"]["scale_HK"]
    p["k_k_HK"] = 1.0 + p["k_k_HK"]
    return p


@functools.partial(jax.jit, static_argnames=("seed",))
def cm_params(seed=0):
    key = jax.random.key(seed)
    p = rwkv7.init(key, CM)
    p["x_k_D"] = jax.random.uniform(jax.random.fold_in(key, 1), (D,))
    return p


def tm_state(cfg, seed=1, batch=B):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"x_prev_BD": jax.random.normal(k1, (batch, cfg.d_model)),
            "S_BHVK": 0.5 * jax.random.normal(k2, (batch, cfg.n_heads, cfg.head_dim, cfg.head_dim))}


def xs(L, seed=2, batch=B, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), (batch, L, D))


# ----- slow reference: rwkv_v7_numpy.py's time_mixing, one token per step -----

def ref_time_mix(p, cfg, x_BLD, state):
    """S = S * w^T - (S kk)(kk * a)^T + v k^T, y = S r, with w = exp(-sigmoid(.) / sqrt(e))
    taken directly (not in log space); group norm per head; bonus (r . k r_k) v; gate."""
    def token(carry, xt):
        S, prev = carry
        xr, xw, xk, xv, xa, xg = (xt + p[f"x_{n}_D"][None] * (prev - xt) for n in "rwkvag")
        r = jnp.einsum("bd,dhk->bhk", xr, p["receptance_DHK"])
        k = jnp.einsum("bd,dhk->bhk", xk, p["key_DHK"])
        v = jnp.einsum("bd,dhk->bhk", xv, p["value_DHK"])
        w = jnp.exp(-jax.nn.sigmoid(jnp.einsum("br,rhk->bhk", jnp.tanh(xw @ p["w1_DR"]), p["w2_RHK"])
                                    + p["w0_HK"][None]) / math.sqrt(math.e))
        a = jax.nn.sigmoid(jnp.einsum("br,rhk->bhk", xa @ p["a1_DR"], p["a2_RHK"]) + p["a0_HK"][None])
        g = jnp.einsum("br,rhk->bhk", jax.nn.sigmoid(xg @ p["g1_DR"]), p["g2_RHK"])
        kk = k * p["k_k_HK"][None]
        k = k + k * (a - 1) * p["k_a_HK"][None]
        kk = kk / jnp.maximum(jnp.sqrt(jnp.sum(kk * kk, -1, keepdims=True)), 1e-12)
        S = (S * w[:, :, None, :] - jnp.einsum("bhvk,bhk->bhv", S, kk)[..., None] * (kk * a)[:, :, None, :]
             + v[..., None] * k[:, :, None, :])
        y = jnp.einsum("bhvk,bhk->bhv", S, r)
        mu = jnp.mean(y, -1, keepdims=True)
        var = jnp.mean((y - mu) ** 2, -1, keepdims=True)
        y = (y - mu) / jnp.sqrt(var + cfg.norm_eps) * p["ln_x"]["scale_HK"][None] + p["ln_x"]["bias_HK"][None]
        y = y + jnp.sum(r * k * p["r_k_HK"][None], -1, keepdims=True) * v
        return (S, xt), jnp.einsum("bhk,hkd->bd", y * g, p["output_HKD"])

    (S, _), y_LBD = jax.lax.scan(token, (state["S_BHVK"], state["x_prev_BD"]), jnp.moveaxis(x_BLD, 1, 0))
    return jnp.moveaxis(y_LBD, 0, 1), S


def ref_channel_mix(p, x_BLD, prev):
    def token(prev, xt):
        k = (xt + p["x_k_D"][None] * (prev - xt)) @ p["key_DF"]
        return xt, jnp.maximum(k, 0) ** 2 @ p["value_FD"]

    return jnp.moveaxis(jax.lax.scan(token, prev, jnp.moveaxis(x_BLD, 1, 0))[1], 0, 1)


# ----- forms vs reference, values and gradients -----

@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_time_mix_matches_reference(form):
    """L = 63 here (several chunks plus a padded tail); L = 15 in the protocol tests."""
    cfg, L = FORMS[form], 63
    p, s0, x = tm_params(BASE), tm_state(cfg), xs(L)
    cot = jax.random.normal(jax.random.key(3), (B, L, D))
    c_S = jax.random.normal(jax.random.key(4), s0["S_BHVK"].shape)

    def loss_fast(p, x, s0):
        y, s = rwkv7.forward(p, x, cfg=cfg, state=s0)
        return jnp.sum(y * cot) + jnp.sum(s["S_BHVK"] * c_S), (y, s["S_BHVK"])

    def loss_ref(p, x, s0):
        y, S = ref_time_mix(p, cfg, x, s0)
        return jnp.sum(y * cot) + jnp.sum(S * c_S), (y, S)

    g_fast, out_fast = jax.jit(jax.grad(loss_fast, argnums=(0, 1, 2), has_aux=True))(p, x, s0)
    g_ref, out_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2), has_aux=True))(p, x, s0)
    H.assert_close(out_fast[0], out_ref[0], what="y")
    H.assert_close(out_fast[1], out_ref[1], what="S")
    H.assert_trees_close(g_fast, g_ref, what="grad")


def test_channel_mix_matches_reference():
    p, x = cm_params(), xs(15)
    prev = jax.random.normal(jax.random.key(5), (B, D))
    cot = jax.random.normal(jax.random.key(6), (B, 15, D))
    f = lambda p, x, prev: jnp.sum(rwkv7.forward(p, x, cfg=CM, state={"x_prev_BD": prev})[0] * cot)
    r = lambda p, x, prev: jnp.sum(ref_channel_mix(p, x, prev) * cot)
    H.assert_close(rwkv7.forward(p, x, cfg=CM, state={"x_prev_BD": prev})[0], ref_channel_mix(p, x, prev))
    H.assert_trees_close(jax.jit(jax.grad(f, argnums=(0, 1, 2)))(p, x, prev),
                         jax.jit(jax.grad(r, argnums=(0, 1, 2)))(p, x, prev), what="grad")


def test_no_state_in_no_state_out():
    for cfg in (*FORMS.values(), CM):
        p = cm_params() if cfg is CM else tm_params(BASE)
        # eval_shape traces without compiling: the contract is structural.
        y, s = jax.eval_shape(lambda p, x: rwkv7.forward(p, x, cfg=cfg), p, xs(7))
        assert s is None and y.shape == (B, 7, D)


# ----- the mixer protocol -----

@pytest.mark.parametrize("form", list(FORMS))
def test_protocol_time_mix(form):
    cfg = FORMS[form]
    p = tm_params(BASE)
    H.check_step_equivalence(JM, cfg, p, xs(15), tm_state(cfg))
    H.check_split_equivalence(JM, cfg, p, xs(21), 7, tm_state(cfg))
    H.check_packing(JM, cfg, p, xs(21, batch=1), [5, 9, 7])
    H.check_state_constant(cfg)


def test_protocol_channel_mix():
    p = cm_params()
    s0 = {"x_prev_BD": jax.random.normal(jax.random.key(7), (B, D))}
    H.check_step_equivalence(JM, CM, p, xs(15), s0)
    H.check_split_equivalence(JM, CM, p, xs(21), 7, s0)
    H.check_packing(JM, CM, p, xs(21, batch=1), [5, 9, 7])
    H.check_state_constant(CM)


def test_packing_with_carried_state_resets_only_later_documents():
    """With a state, the first document continues it and later documents start from zero;
    chunk 4 puts document starts inside chunks and at chunk boundaries."""
    cfg = FORMS["chunked4"]
    p, x = tm_params(BASE), xs(21, batch=1)
    s0 = tm_state(cfg, batch=1)
    seg = jnp.asarray(np.repeat([1, 2, 3], [5, 7, 9])[None].astype(np.int32))
    y, s = JM.forward(p, x, cfg=cfg, state=s0, segment_ids=seg)
    y1, _ = JM.forward(p, x[:, :5], cfg=cfg, state=s0)
    y2, _ = JM.forward(p, x[:, 5:12], cfg=cfg)
    y3, s3 = JM.forward(p, x[:, 12:], cfg=cfg, state=rwkv7.init_state(cfg, 1, 1))
    H.assert_close(y, jnp.concatenate([y1, y2, y3], 1), what="y")
    H.assert_trees_close(s, s3)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_bf16_inputs_fp32_state(form):
    """bf16 activations against the fp32 layer on the same bf16-representable inputs and
    parameters, so the comparison measures the layer's bf16 arithmetic, not the rounding of its
    inputs: with these random weights, rounding x alone to bf16 moves the fp32 output by
    ~4e-3 relative RMS (six input paths, r/w/k/v/a/g), most of the tolerance."""
    cfg = FORMS[form]
    rnd = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), t)
    p, s0, x = rnd(tm_params(BASE)), tm_state(cfg), rnd(xs(63))
    fwd = jax.jit(lambda p, x, s: JM.forward(p, x, cfg=cfg, state=s))
    y32, s32 = fwd(p, x, s0)
    y16, s16 = fwd(p, x.astype(jnp.bfloat16), s0)
    assert y16.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16))
    H.assert_close(y16, y32, H.BF16_TOL, "bf16 y")
    H.assert_close(s16["S_BHVK"], s32["S_BHVK"], H.BF16_TOL, "bf16 S")
    pc = rnd(cm_params())
    yc, _ = JM.forward(pc, x.astype(jnp.bfloat16), cfg=CM)
    assert yc.dtype == jnp.bfloat16
    H.assert_close(yc, JM.forward(pc, x, cfg=CM)[0], H.BF16_TOL, "bf16 channel mix")


def test_state_and_specs():
    s = rwkv7.init_state(BASE, 3, 100, jnp.bfloat16)
    assert s["S_BHVK"].shape == (3, NH, K, K) and s["x_prev_BD"].shape == (3, D)
    assert all(v.dtype == jnp.float32 for v in s.values())
    specs = rwkv7.param_specs(BASE)
    assert specs["w0_HK"].keep_dtype
    assert specs["key_DHK"].logical_axes == ("embed", "heads", "head_dim")
    cfg = RWKV7TimeMixConfig(d_model=64)  # the reference's LoRA widths
    assert (cfg.decay_lora, cfg.a_lora, cfg.gate_lora, cfg.n_heads) == (32, 32, 32, 1)


def test_default_init_matches_specs_and_runs():
    """The initialisers produce the declared shapes, and a default-initialised layer is finite."""
    from layers import params as P
    for cfg in (BASE, CM):
        specs = rwkv7.param_specs(cfg)
        got = jax.eval_shape(lambda: rwkv7.init(jax.random.key(0), cfg))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(
            lambda a: (a.shape, a.dtype), P.abstract(specs))
        y, _ = JM.forward(rwkv7.init(jax.random.key(0), cfg), xs(7), cfg=cfg)
        assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=48, head_dim=32), "head_dim"),
    (dict(d_model=64, form="parallel"), "form"),
    (dict(d_model=64, chunk_size=256), "chunk_size"),
    (dict(d_model=64, decay_lora=0), "decay_lora"),
    (dict(d_model=64, norm_eps=0.0), "norm_eps"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RWKV7TimeMixConfig(**kwargs)


def test_channel_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="d_ff"):
        RWKV7ChannelMixConfig(d_model=8, d_ff=0)


# ----- long sequences and stress -----

@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_long_chunked_matches_recurrent(L, chunk):
    rec = BASE
    cfg = dataclasses.replace(rec, form="chunked", chunk_size=chunk)
    p, s0, x = tm_params(rec), tm_state(rec), xs(L)
    cot = jax.random.normal(jax.random.key(8), (B, L, D))
    run = lambda c: jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(rwkv7.forward(p, x, cfg=c, state=s0)[0] * cot), argnums=(0, 1)))(p, x)
    (l1, g1), (l2, g2) = run(rec), run(cfg)
    H.assert_close(l2, l1, what="loss")
    H.assert_trees_close(g2, g1, what="grad")
    y1, s1 = rwkv7.forward(p, x, cfg=rec, state=s0)
    y2, s2 = rwkv7.forward(p, x, cfg=cfg, state=s0)
    H.assert_close(y2, y1, what="y")
    H.assert_trees_close(s2, s1)
    if L == 500 and chunk == 16:
        H.assert_close(y1, jax.jit(lambda p, x, s: ref_time_mix(p, rec, x, s))(p, x, s0)[0],
                       what="recurrent vs reference")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_stress_long_extreme_values_stay_finite(form):
    """L=8192, large inputs, decays at both ends of their range (w -> 1 and w -> 0.545),
    large LoRA outputs: finite forward and backward."""
    L = 8192
    cfg = dataclasses.replace(BASE, form=form, chunk_size=64)
    p = tm_params(cfg, w0_scale=20.0)
    p["w2_RHK"] = 10.0 * p["w2_RHK"]
    p["a2_RHK"] = 10.0 * p["a2_RHK"]
    x = xs(L, batch=1, scale=30.0)
    s0 = rwkv7.init_state(cfg, 1, L)

    def loss(p, x):
        y, s = rwkv7.forward(p, x, cfg=cfg, state=s0)
        return jnp.mean(jnp.square(y)) + jnp.mean(s["S_BHVK"])

    t0 = time.time()
    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, x)
    assert np.isfinite(float(val)), "loss"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
    assert time.time() - t0 < 300
