"""The xLSTM-7B mLSTM layer: every form against a per-token reference of the whole layer (values
and gradients, random state, packed resets, q/k head dim != v head dim), the mixer protocol via
the shared harness, bf16 activations, config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mlstm_large as M
from layers.checks import ConfigError
from layers.mlstm_large import MLSTMLargeConfig
from tests.layers import mixer_harness as mh

B, D, H = 2, 16, 2
# K = 4, V = 6: distinct q/k and v head dims; a small gate cap so that it bends the gates.
CFG = MLSTMLargeConfig(d_model=D, n_heads=H, qk_dim=8, v_dim=12, chunk_size=4, gate_soft_cap=3.0)


def rnd(rng, shape, scale=1.0, shift=0.0):
    return jnp.asarray((shift + scale * rng.standard_normal(shape)).astype(np.float32))


def layer_params(cfg, seed=0):
    """Random values for every parameter, the ones initialised to constants included."""
    rng = np.random.default_rng(seed)
    special = {"norm_HV": (0.3, 1.0), "bf_H": (1.0, 1.0), "bi_H": (1.0, 0.0), "wi_DH": (0.5, 0.0),
               "wf_DH": (0.5, 0.0)}
    return {name: rnd(rng, spec.shape, *special.get(name, (1.0 / math.sqrt(D), 0.0)))
            for name, spec in M.param_specs(cfg).items()}


def random_state(cfg, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda z: rnd(rng, z.shape, 0.5), M.init_state(cfg, B, 1))


def layer_x(L, seed=1, batch=B):
    return rnd(np.random.default_rng(seed), (batch, L, D))


def ref_layer(params, x, state, seg, cfg):
    """The layer written out token by token: projections, the stabilised recurrence
    m_t = max(log f_t + m_{t-1}, i_t), h = q C / (max(|q.n|, exp(-m)) + eps), per-head LayerNorm,
    sigmoid output gate, output projection. A packed document start sees C = 0, n = 0, m = 0."""
    cap = lambda a: a if cfg.gate_soft_cap is None else cfg.gate_soft_cap * jnp.tanh(a / cfg.gate_soft_cap)
    q = jnp.einsum("bld,dhk->blhk", x, params["wq_DHK"]) / math.sqrt(cfg.qk_head_dim)
    k = jnp.einsum("bld,dhk->blhk", x, params["wk_DHK"])
    v = jnp.einsum("bld,dhv->blhv", x, params["wv_DHV"])
    o = jax.nn.sigmoid(jnp.einsum("bld,dhv->blhv", x, params["wog_DHV"]))
    i = cap(x @ params["wi_DH"] + params["bi_H"][None, None])
    logf = jax.nn.log_sigmoid(cap(x @ params["wf_DH"] + params["bf_H"][None, None]))
    starts = np.zeros(seg.shape, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]

    def one(carry, xs):
        C, n, m = carry
        q_t, k_t, v_t, i_t, logf_t, s_t = xs
        keep = 1.0 - s_t.astype(jnp.float32)[:, None]
        C, n, m = C * keep[..., None, None], n * keep[..., None], m * keep
        m_new = jnp.maximum(logf_t + m, i_t)
        a, b = jnp.exp(logf_t + m - m_new), jnp.exp(i_t - m_new)
        C = a[..., None, None] * C + b[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n = a[..., None] * n + b[..., None] * k_t
        num = jnp.sum(q_t[..., :, None] * C, axis=-2)
        den = jnp.maximum(jnp.abs(jnp.sum(q_t * n, -1)), jnp.exp(-m_new)) + cfg.eps
        return (C, n, m_new), num / den[..., None]

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, i, logf, jnp.asarray(starts)))
    (C, n, m), h = jax.lax.scan(one, (state["C_BHKV"], state["n_BHK"], state["m_BH"]), xs)
    h = jnp.moveaxis(h, 0, 1)
    mu = h.mean(-1, keepdims=True)
    hn = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * params["norm_HV"][None, None]
    y = jnp.einsum("blhv,hvd->bld", o * hn, params["wo_HVD"])
    return y, {"C_BHKV": C, "n_BHK": n, "m_BH": m}


def value_and_grads(fn, params, x, state, seed=5):
    """A random projection of (y, state) and its gradient w.r.t. params, x and the state."""
    shapes = jax.eval_shape(fn, params, x, state)
    rng = np.random.default_rng(seed)
    cot = jax.tree.map(lambda s: rnd(rng, s.shape), shapes)

    def loss(p, x, s):
        out = fn(p, x, s)
        return sum(jnp.sum(a * c) for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(cot))), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, state)
    return out, grads


@pytest.mark.parametrize("forms", [
    pytest.param(("parallel", "chunkwise"), id="parallel-chunkwise"),
    # The recurrent form (decoding) is also checked by value against forward in the harness test.
    pytest.param(("recurrent",), id="recurrent", marks=pytest.mark.slow),
])
def test_forms_match_per_token_reference(forms):
    """parallel, chunkwise (3 chunks, padded tail) and recurrent: outputs, final states and
    gradients for every parameter, the input and the incoming state, with packed resets."""
    L = 11
    params, x, state = layer_params(CFG), layer_x(L), random_state(CFG, 3)
    # Row 0 has two packed resets; row 1 none, so the incoming state reaches the final one. (The
    # per-head LayerNorm cancels the normaliser n from the output up to norm_eps, so only the
    # final state makes the gradient for the incoming n well conditioned.)
    seg = np.ones((B, L), np.int32)
    seg[0, 4:], seg[0, 9:] = 2, 3
    out_ref, g_ref = value_and_grads(lambda p, x, s: ref_layer(p, x, s, seg, CFG), params, x, state)
    for form in forms:
        def mine(p, x, s):
            return M.forward(p, x, cfg=CFG, state=s, segment_ids=jnp.asarray(seg), form=form)

        out, g = value_and_grads(mine, params, x, state)
        mh.assert_trees_close(out, out_ref, what=f"{form} output/state")
        mh.assert_trees_close(g, g_ref, what=f"{form} grad")


def test_protocol_step_split_packing_state():
    """Shapes are shared between the checks to keep compilations few."""
    params = layer_params(CFG, seed=1)
    state0 = random_state(CFG, 4)
    x = layer_x(10, seed=2)
    mh.check_step_equivalence(M, CFG, params, x, state0)
    mh.check_split_equivalence(M, CFG, params, x, 5, state0)
    x1 = layer_x(10, seed=4, batch=1)
    mh.check_packing(M, CFG, params, x1, [5, 5])
    mh.check_state_constant(CFG)
    y, s = M.forward(params, x1[:, :5], cfg=CFG)
    assert s is None and y.shape == (1, 5, D)
    # forward without a state == forward from init_state (the empty state).
    y0, _ = M.forward(params, x1[:, :5], cfg=CFG, state=M.init_state(CFG, 1, 5))
    mh.assert_close(y0, y, what="none vs init_state")


def test_bf16_activations_keep_an_fp32_state():
    params = layer_params(CFG, seed=2)
    params_r = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
    x = layer_x(10, seed=5).astype(jnp.bfloat16)
    state = random_state(CFG, 6)
    y16, s16 = M.forward(params_r, x, cfg=CFG, state=state)
    assert y16.dtype == jnp.bfloat16 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16))
    y32, s32 = M.forward(params_r, x.astype(jnp.float32), cfg=CFG, state=state)
    mh.assert_close(y16, y32, mh.BF16_TOL, "bf16 vs fp32 output")
    mh.assert_trees_close(s16, s32, mh.BF16_TOL, "bf16 vs fp32 state")


def test_specs_and_defaults():
    cfg = MLSTMLargeConfig(d_model=64, n_heads=4)
    assert (cfg.qk_dim, cfg.v_dim, cfg.qk_head_dim, cfg.v_head_dim) == (32, 64, 8, 16)
    specs = M.param_specs(cfg)
    for spec in specs.values():
        assert len(spec.logical_axes) == len(spec.shape)
    assert specs["wq_DHK"].shape == (64, 4, 8) and specs["wo_HVD"].shape == (4, 16, 64)
    assert jax.tree.map(jnp.shape, M.init_state(cfg, 3, 5)) == {"C_BHKV": (3, 4, 8, 16), "n_BHK": (3, 4, 8),
                                                                "m_BH": (3, 4)}


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=16, n_heads=3), "n_heads=3 must divide MLSTMLargeConfig.qk_dim=8"),
    (dict(d_model=16, n_heads=2, v_dim=7), "v_dim=7"),
    (dict(d_model=16, form="quadratic"), "form"),
    (dict(d_model=16, chunk_size=0), "chunk_size"),
    (dict(d_model=16, gate_soft_cap=-1.0), "gate_soft_cap"),
    (dict(d_model=16, eps=0.0), "eps"),
    (dict(d_model=16, norm_eps=0.0), "norm_eps"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MLSTMLargeConfig(**kwargs)
