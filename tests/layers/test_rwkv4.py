"""RWKV-4: every form against a slow per-token recurrence written from the paper's equations
(values and gradients, random initial states), the mixer protocol checks, bf16 and stress."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import rwkv4
from layers.checks import ConfigError
from layers.rwkv4 import RWKV4ChannelMixConfig, RWKV4TimeMixConfig
from tests.layers import mixer_harness as H

B, D, A, F = 2, 16, 24, 40
FORMS = {
    "recurrent": RWKV4TimeMixConfig(d_model=D, d_att=A, form="recurrent"),
    "parallel": RWKV4TimeMixConfig(d_model=D, d_att=A, form="parallel"),
    "chunked": RWKV4TimeMixConfig(d_model=D, d_att=A, form="chunked", chunk_size=16),
}
CM = RWKV4ChannelMixConfig(d_model=D, d_ff=F)



class _Jitted:
    """The module with `forward` jitted (cfg static) for the harness, which calls it at several
    lengths: whole-function compiles instead of op-by-op dispatch (this CPU is shared)."""

    def __init__(self, module):
        self.__name__ = module.__name__
        self.forward = jax.jit(module.forward, static_argnames=("cfg", "form"))
        for name in ("param_specs", "init", "init_state", "step"):
            setattr(self, name, getattr(module, name))


JM = _Jitted(rwkv4)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("seed",))
def tm_params(cfg, seed=0, decay_scale=1.0, first_scale=1.0):
    key = jax.random.key(seed)
    p = rwkv4.init(key, cfg)
    ks = jax.random.split(jax.random.fold_in(key, 1), 5)
    # Random decays / bonuses / mixes so that every channel behaves differently.
    p["time_decay_A"] = decay_scale * jax.random.normal(ks[0], (cfg.d_att,))
    p["time_first_A"] = first_scale * jax.random.normal(ks[1], (cfg.d_att,))
    for i, n in enumerate(("time_mix_k_D", "time_mix_v_D", "time_mix_r_D")):
        p[n] = jax.random.uniform(ks[2 + i], (cfg.d_model,))
    return p


@functools.partial(jax.jit, static_argnames=("seed",))
def cm_params(seed=0):
    key = jax.random.key(seed)
    p = rwkv4.init(key, CM)
    ks = jax.random.split(jax.random.fold_in(key, 1), 2)
    p["time_mix_k_D"] = jax.random.uniform(ks[0], (D,))
    p["time_mix_r_D"] = jax.random.uniform(ks[1], (D,))
    return p


def tm_state(cfg, seed=1, batch=B):
    """A valid random state: any numerator, positive denominator, any log-scale."""
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "x_prev_BD": jax.random.normal(k[0], (batch, cfg.d_model)),
        "aa_BA": jax.random.normal(k[1], (batch, cfg.d_att)),
        "bb_BA": jnp.exp(jax.random.normal(k[2], (batch, cfg.d_att))),
        "pp_BA": jax.random.normal(k[3], (batch, cfg.d_att)),
    }


def xs(L, seed=2, batch=B, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), (batch, L, D))


# ----- slow references: the paper's equations token by token, no stabiliser -----

def ref_time_mix(p, x_BLD, state):
    """wkv_t = (num_{t-1} + e^{u+k_t} v_t) / (den_{t-1} + e^{u+k_t});
    num_t = e^w num_{t-1} + e^{k_t} v_t (den alike), with num_{-1} = aa e^pp, den_{-1} = bb e^pp.
    One token per scan step (a scan rather than a Python loop only to keep compiles short)."""
    w = -jnp.exp(p["time_decay_A"])[None]
    u = p["time_first_A"][None]
    mk, mv, mr = (p[n][None] for n in ("time_mix_k_D", "time_mix_v_D", "time_mix_r_D"))

    def token(carry, xt):
        num, den, prev = carry
        k = (xt * mk + prev * (1 - mk)) @ p["key_DA"]
        v = (xt * mv + prev * (1 - mv)) @ p["value_DA"]
        r = jax.nn.sigmoid((xt * mr + prev * (1 - mr)) @ p["receptance_DA"])
        wkv = (num + jnp.exp(u + k) * v) / (den + jnp.exp(u + k))
        num = jnp.exp(w) * num + jnp.exp(k) * v
        den = jnp.exp(w) * den + jnp.exp(k)
        return (num, den, xt), (r * wkv) @ p["output_AD"]

    num0 = state["aa_BA"] * jnp.exp(state["pp_BA"])
    den0 = state["bb_BA"] * jnp.exp(state["pp_BA"])
    (num, den, _), y_LBD = jax.lax.scan(token, (num0, den0, state["x_prev_BD"]), jnp.moveaxis(x_BLD, 1, 0))
    return jnp.moveaxis(y_LBD, 0, 1), num, den


def ref_channel_mix(p, x_BLD, prev):
    mk, mr = p["time_mix_k_D"][None], p["time_mix_r_D"][None]

    def token(prev, xt):
        k = jnp.square(jax.nn.relu((xt * mk + prev * (1 - mk)) @ p["key_DF"]))
        r = jax.nn.sigmoid((xt * mr + prev * (1 - mr)) @ p["receptance_DD"])
        return xt, r * (k @ p["value_FD"])

    return jnp.moveaxis(jax.lax.scan(token, prev, jnp.moveaxis(x_BLD, 1, 0))[1], 0, 1)


# ----- forms vs reference, values and gradients -----

@pytest.mark.parametrize("form", list(FORMS))
def test_time_mix_matches_reference(form):
    """L = 63 here; L = 15 in the protocol tests."""
    cfg, L = FORMS[form], 63
    p, s0, x = tm_params(FORMS["recurrent"]), tm_state(cfg), xs(L)
    cot = jax.random.normal(jax.random.key(3), (B, L, D))
    c_num, c_den = jax.random.normal(jax.random.key(4), (2, B, A))

    def loss_fast(p, x, s0):
        y, s = rwkv4.forward(p, x, cfg=cfg, state=s0)
        num, den = s["aa_BA"] * jnp.exp(s["pp_BA"]), s["bb_BA"] * jnp.exp(s["pp_BA"])
        return jnp.sum(y * cot) + jnp.sum(num * c_num) + jnp.sum(den * c_den), (y, num, den)

    def loss_ref(p, x, s0):
        y, num, den = ref_time_mix(p, x, s0)
        return jnp.sum(y * cot) + jnp.sum(num * c_num) + jnp.sum(den * c_den), (y, num, den)

    g_fast, out_fast = jax.jit(jax.grad(loss_fast, argnums=(0, 1, 2), has_aux=True))(p, x, s0)
    g_ref, out_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2), has_aux=True))(p, x, s0)
    for a, b, what in zip(out_fast, out_ref, ("y", "num", "den")):
        H.assert_close(a, b, what=what)
    g_fast[2].pop("pp_BA"), g_ref[2].pop("pp_BA")  # pp's gradient depends on the representation
    H.assert_trees_close(g_fast, g_ref, what="grad")


def test_channel_mix_matches_reference():
    p, x = cm_params(), xs(15)
    prev = jax.random.normal(jax.random.key(5), (B, D))
    cot = jax.random.normal(jax.random.key(6), (B, 15, D))
    f = lambda p, x, prev: jnp.sum(rwkv4.forward(p, x, cfg=CM, state={"x_prev_BD": prev})[0] * cot)
    r = lambda p, x, prev: jnp.sum(ref_channel_mix(p, x, prev) * cot)
    H.assert_close(rwkv4.forward(p, x, cfg=CM, state={"x_prev_BD": prev})[0], ref_channel_mix(p, x, prev))
    H.assert_trees_close(jax.jit(jax.grad(f, argnums=(0, 1, 2)))(p, x, prev),
                         jax.jit(jax.grad(r, argnums=(0, 1, 2)))(p, x, prev), what="grad")


def test_forms_return_identical_state_leaves():
    """pp is the exact running maximum in every form, so all leaves agree, not only aa e^pp."""
    x = xs(37)
    p = tm_params(FORMS["recurrent"])
    outs = [JM.forward(p, x, cfg=c, state=tm_state(c)) for c in FORMS.values()]
    for y, s in outs[1:]:
        H.assert_close(y, outs[0][0], what="y")
        H.assert_trees_close(s, outs[0][1])


def test_no_state_in_no_state_out():
    for cfg in (*FORMS.values(), CM):
        p = cm_params() if cfg is CM else tm_params(FORMS["recurrent"])
        # eval_shape traces without compiling: the contract is structural.
        y, s = jax.eval_shape(lambda p, x: rwkv4.forward(p, x, cfg=cfg), p, xs(7))
        assert s is None and y.shape == (B, 7, D)


# ----- the mixer protocol -----

@pytest.mark.parametrize("form", list(FORMS))
def test_protocol_time_mix(form):
    cfg = FORMS[form]
    p = tm_params(FORMS["recurrent"])
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
    """With a state, the first document continues it and later documents start from zero."""
    cfg = FORMS["chunked"]
    p, s0, x = tm_params(FORMS["recurrent"]), tm_state(cfg), xs(21, batch=1)
    s0 = jax.tree.map(lambda a: a[:1], s0)
    seg = jnp.asarray(np.repeat([1, 2, 3], [5, 9, 7])[None].astype(np.int32))
    y, s = JM.forward(p, x, cfg=cfg, state=s0, segment_ids=seg)
    y1, _ = JM.forward(p, x[:, :5], cfg=cfg, state=s0)
    y2, _ = JM.forward(p, x[:, 5:14], cfg=cfg)
    y3, s3 = JM.forward(p, x[:, 14:], cfg=cfg, state=rwkv4.init_state(cfg, 1, 1))
    H.assert_close(y, jnp.concatenate([y1, y2, y3], 1), what="y")
    H.assert_trees_close(s, s3)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_bf16_inputs_fp32_state(form):
    cfg = FORMS[form]
    p, s0, x = tm_params(FORMS["recurrent"]), tm_state(cfg), xs(63)
    y32, s32 = JM.forward(p, x, cfg=cfg, state=s0)
    y16, s16 = JM.forward(p, x.astype(jnp.bfloat16), cfg=cfg, state=s0)
    assert y16.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16))
    H.assert_close(y16, y32, H.BF16_TOL, "bf16 y")
    # Compare the state through its meaning (pp may pick a different but equivalent scale).
    H.assert_close(s16["aa_BA"] * jnp.exp(s16["pp_BA"]), s32["aa_BA"] * jnp.exp(s32["pp_BA"]),
                   H.BF16_TOL, "bf16 num")
    yc, _ = JM.forward(cm_params(), x.astype(jnp.bfloat16), cfg=CM)
    assert yc.dtype == jnp.bfloat16
    H.assert_close(yc, JM.forward(cm_params(), x, cfg=CM)[0], H.BF16_TOL, "bf16 channel mix")


def test_state_is_fp32_and_max_len_free():
    s = rwkv4.init_state(FORMS["recurrent"], 3, 100, jnp.bfloat16)
    assert {k: v.shape for k, v in s.items()} == {
        "x_prev_BD": (3, D), "aa_BA": (3, A), "bb_BA": (3, A), "pp_BA": (3, A)}
    assert all(v.dtype == jnp.float32 for v in s.values())


def test_param_specs_axes_and_fp32_decay():
    specs = rwkv4.param_specs(FORMS["recurrent"])
    assert specs["time_decay_A"].keep_dtype and specs["time_first_A"].keep_dtype
    assert specs["key_DA"].logical_axes == ("embed", "mlp")
    assert set(rwkv4.param_specs(CM)) == {"time_mix_k_D", "time_mix_r_D", "key_DF", "receptance_DD",
                                          "value_FD"}


def test_default_init_matches_specs_and_runs():
    """The initialisers produce the declared shapes, and a default-initialised layer is finite."""
    from layers import params as P
    for cfg in (FORMS["recurrent"], CM):
        specs = rwkv4.param_specs(cfg)
        got = jax.eval_shape(lambda: rwkv4.init(jax.random.key(0), cfg))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(
            lambda a: (a.shape, a.dtype), P.abstract(specs))
        y, _ = JM.forward(rwkv4.init(jax.random.key(0), cfg), xs(7), cfg=cfg)
        assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=8, d_att=-1), "d_att"),
    (dict(d_model=8, form="quadratic"), "form"),
    (dict(d_model=8, chunk_size=0), "chunk_size"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RWKV4TimeMixConfig(**kwargs)


def test_channel_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="d_ff"):
        RWKV4ChannelMixConfig(d_model=8, d_ff=0)


# ----- long sequences and stress -----

@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_long_chunked_matches_recurrent(L, chunk):
    rec = RWKV4TimeMixConfig(d_model=D, d_att=A)
    cfg = dataclasses.replace(rec, form="chunked", chunk_size=chunk)
    p, s0, x = tm_params(rec, decay_scale=2.0), tm_state(rec), xs(L)
    cot = jax.random.normal(jax.random.key(8), (B, L, D))
    loss = lambda c: jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(rwkv4.forward(p, x, cfg=c, state=s0)[0] * cot), argnums=(0, 1)))(p, x)
    (l1, g1), (l2, g2) = loss(rec), loss(cfg)
    H.assert_close(l2, l1, what="loss")
    H.assert_trees_close(g2, g1, what="grad")
    y1, s1 = rwkv4.forward(p, x, cfg=rec, state=s0)
    y2, s2 = rwkv4.forward(p, x, cfg=cfg, state=s0)
    H.assert_close(y2, y1, what="y")
    H.assert_trees_close(s2, s1)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
def test_long_parallel_and_reference(L):
    rec = RWKV4TimeMixConfig(d_model=D, d_att=8)
    par = dataclasses.replace(rec, form="parallel")
    p, s0, x = tm_params(rec), tm_state(rec), xs(L, batch=1)
    s0 = jax.tree.map(lambda a: a[:1], s0)
    y_rec, _ = rwkv4.forward(p, x, cfg=rec, state=s0)
    y_par, _ = rwkv4.forward(p, x, cfg=par, state=s0)
    H.assert_close(y_par, y_rec, what="parallel vs recurrent")
    if L == 500:
        H.assert_close(y_rec, jax.jit(ref_time_mix)(p, x, s0)[0], what="recurrent vs reference")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_stress_long_extreme_values_stay_finite(form):
    """L=8192, large inputs, very slow and very fast decays, large bonuses: the naive formula
    overflows here (e^k with k ~ 1e2); the stabilised forms stay finite forward and backward.
    (The quadratic "parallel" form needs L^2 memory and is not meant for such lengths.)"""
    L = 8192
    cfg = RWKV4TimeMixConfig(d_model=D, d_att=A, form=form)
    p = tm_params(cfg, decay_scale=6.0, first_scale=30.0)
    x = xs(L, batch=1, scale=30.0)
    s0 = rwkv4.init_state(cfg, 1, L)

    def loss(p, x):
        y, s = rwkv4.forward(p, x, cfg=cfg, state=s0)
        return jnp.mean(jnp.square(y)) + jnp.mean(s["aa_BA"])

    t0 = time.time()
    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, x)
    assert np.isfinite(float(val)), "loss"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
    assert time.time() - t0 < 120
