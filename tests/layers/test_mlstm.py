"""mLSTM: every form of the cell against a per-token reference (values and gradients, random
states, packed resets), the mixer protocol via the shared harness, bf16, stress, config errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mlstm
from layers.checks import ConfigError
from layers.mlstm import MLSTMConfig
from tests.layers import mixer_harness as mh

B, H, K = 2, 2, 4


def ref_cell(q, k, v, i_pre, f_pre, C0, n0, m0, starts, *, eps=1e-6, cap=None):
    """The paper's stabilised mLSTM recurrence, one token at a time (xLSTM eqs. 19-27).

    A packed document start (starts[b, t]) sees the empty state C = 0, n = 0, m = 0."""
    Kd = q.shape[-1]

    def capped(x):
        return x if cap is None else cap * jnp.tanh(x / cap)

    def one(carry, xs):
        C, n, m = carry
        q_t, k_t, v_t, ip_t, fp_t, s_t = xs
        r = s_t[:, None]
        C = jnp.where(r[:, :, None, None], 0.0, C)
        n = jnp.where(r[:, :, None], 0.0, n)
        m = jnp.where(r, 0.0, m)
        i_t = capped(ip_t)
        logf_t = jax.nn.log_sigmoid(capped(fp_t))
        m_t = jnp.maximum(logf_t + m, i_t)
        fs = jnp.exp(logf_t + m - m_t)
        is_ = jnp.exp(i_t - m_t)
        C = fs[:, :, None, None] * C + is_[:, :, None, None] * (k_t[:, :, :, None] * v_t[:, :, None, :])
        n = fs[:, :, None] * n + is_[:, :, None] * k_t
        qs = q_t / math.sqrt(Kd)
        num = jnp.sum(qs[:, :, :, None] * C, axis=2)
        den = jnp.maximum(jnp.abs(jnp.sum(qs * n, axis=-1)), jnp.exp(-m_t)) + eps
        return (C, n, m_t), num / den[:, :, None]

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, i_pre, f_pre, starts))
    state, h = jax.lax.scan(one, (C0, n0, m0), xs)
    return jnp.moveaxis(h, 0, 1), state


def rnd(rng, shape, scale=1.0, shift=0.0):
    """Test data from NumPy: no per-shape compilation, unlike eager jax.random."""
    return jnp.asarray((shift + scale * rng.standard_normal(shape)).astype(np.float32))


def cell_inputs(L, seed, gate_scale=2.0, with_starts=True, Kd=K):
    rng = np.random.default_rng(seed)
    q, k, v = (rnd(rng, (B, L, H, Kd)) for _ in range(3))
    i_pre = rnd(rng, (B, L, H), gate_scale)
    f_pre = rnd(rng, (B, L, H), gate_scale, 1.0)
    C0 = rnd(rng, (B, H, Kd, Kd), 0.5)
    n0 = rnd(rng, (B, H, Kd), 0.5)
    m0 = rnd(rng, (B, H))
    starts = rng.random((B, L)) < 0.1 if with_starts else np.zeros((B, L), bool)
    starts[:, 0] = False
    return (q, k, v, i_pre, f_pre, C0, n0, m0), jnp.asarray(starts)


def loss_and_grads(fn, args, seed=99):
    """Value and gradient of a random projection of (h, C, n, m) w.r.t. every input (one jit)."""
    shapes = jax.tree.leaves(jax.eval_shape(fn, *args))
    rng = np.random.default_rng(seed)
    cots = [rnd(rng, a.shape) for a in shapes]

    def loss(*a):
        out = fn(*a)
        return sum(jnp.sum(x * c) for x, c in zip(jax.tree.leaves(out), cots)), out

    grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


def compare_cell(forms, L, seed, cap=None, gate_scale=2.0, tol=mh.FP32_TOL):
    """forms: (form, chunk_size) pairs, each checked against one reference run."""
    args, starts = cell_inputs(L, seed, gate_scale)

    def ref(q, k, v, i, f, C0, n0, m0):
        return ref_cell(q, k, v, i, f, C0, n0, m0, starts, cap=cap)

    out_ref, g_ref = loss_and_grads(ref, args)
    for form, chunk in forms:
        def mine(q, k, v, i, f, C0, n0, m0):
            return mlstm.cell(q, k, v, i, f, (C0, n0, m0), form=form, chunk_size=chunk,
                              gate_soft_cap=cap, starts_BL=starts)

        out, g = loss_and_grads(mine, args)
        what = f"{form}/{chunk}"
        mh.assert_trees_close(out, out_ref, tol, f"{what} output/state")
        for n, a, b in zip(("q", "k", "v", "i", "f", "C0", "n0", "m0"), g, g_ref):
            mh.assert_close(a, b, tol, f"{what} grad {n}")


@pytest.mark.parametrize("L, forms, cap, gate_scale", [
    (15, [("parallel", 64), ("recurrent", 64), ("chunkwise", 4)], None, 2.0),
    (63, [("chunkwise", 16)], 15.0, 8.0),
    # A gate cap makes XLA recompute log D in two fusions; the parallel form's row max must not
    # take its gradient from comparing them (it once did: wrong gradients under jit).
    (15, [("parallel", 64)], 3.0, 2.0),
])
def test_cell_matches_reference(L, forms, cap, gate_scale):
    """Each form (chunkwise: several chunks and a padded tail) with random initial states and
    packed-document resets, values and gradients; at L = 63 with large gates and the soft cap."""
    compare_cell(forms, L, seed=L, cap=cap, gate_scale=gate_scale)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
def test_cell_long(L):
    compare_cell([("chunkwise", 16), ("chunkwise", 32), ("chunkwise", 64), ("parallel", 64)], L, seed=L)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_stress_long_large_gates_finite(form):
    """L = 8192 with gate pre-activations ~ N(0, 30^2): finite forward and backward.
    (The parallel form is O(L^2) memory and not meant for this length.)"""
    L = 8192
    args, starts = cell_inputs(L, 11, gate_scale=30.0, with_starts=False)

    @jax.jit
    def run(*a):
        def loss(*a):
            h, (C, n, m) = mlstm.cell(*a[:5], tuple(a[5:]), form=form, chunk_size=64)
            return jnp.mean(h ** 2) + jnp.mean(C ** 2) + jnp.mean(n ** 2), h
        return jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True)(*a)

    (val, h), grads = run(*args)
    assert np.isfinite(float(val))
    assert np.all(np.isfinite(np.asarray(h)))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


# ----- the mixer -----

D = 16


def layer_params(cfg, seed=0):
    """Random parameters for every spec (NumPy), including what the reference initialises to
    zeros, ones or constants, so the test sees every parameter act."""
    rng = np.random.default_rng(seed)

    def one(path, spec):
        name = jax.tree_util.keystr(path)
        if "norm" in name or "skip" in name:
            return rnd(rng, spec.shape, 0.3, 1.0)
        if "bf_H" in name:
            return rnd(rng, spec.shape, 1.0, 1.0)
        if "bi_H" in name:
            return rnd(rng, spec.shape)
        if "['b" in name or "b_C" in name:
            return rnd(rng, spec.shape, 0.3)
        if "wi_" in name or "wf_" in name:
            return rnd(rng, spec.shape, 0.2)
        return rnd(rng, spec.shape, 1.0 / math.sqrt(spec.shape[0]))

    return jax.tree_util.tree_map_with_path(one, mlstm.param_specs(cfg),
                                            is_leaf=lambda x: hasattr(x, "logical_axes"))


def layer_x(L, seed=1, batch=B):
    return rnd(np.random.default_rng(seed), (batch, L, D))


def random_state(cfg, seed):
    """A random non-zero state shaped like init_state's (as mixer_harness.random_state, NumPy)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda z: rnd(rng, z.shape, 0.5), mlstm.init_state(cfg, B, 1))


CFGS = {
    "chunkwise": MLSTMConfig(d_model=D, n_heads=2, form="chunkwise", chunk_size=4),
    "parallel": MLSTMConfig(d_model=D, n_heads=2, form="parallel"),
    "recurrent": MLSTMConfig(d_model=D, n_heads=2, form="recurrent"),
}


@pytest.mark.parametrize("form", ["chunkwise"])
def test_layer_step_equivalence(form):
    """step (always recurrent) vs forward; the other forward forms are compared below."""
    cfg = CFGS[form]
    params = layer_params(cfg)
    state0 = random_state(cfg, 7)
    mh.check_step_equivalence(mlstm, cfg, params, layer_x(15), state0)


@pytest.mark.parametrize("form", ["parallel"])
def test_layer_split_and_packing(form):
    """The parallel form compiles fastest; resets inside chunks are covered at the cell level."""
    cfg = CFGS[form]
    params = layer_params(cfg, seed=2)
    state0 = random_state(cfg, 8)
    mh.check_split_equivalence(mlstm, cfg, params, layer_x(14, seed=3), 7, state0)  # halves share a shape
    mh.check_packing(mlstm, cfg, params, layer_x(21, seed=4, batch=1), [5, 9, 7])


def test_layer_forms_agree_and_none_state():
    """With the gate soft cap and biases on, the three forms give the same layer output."""
    cfgs = {f: dataclasses.replace(c, gate_soft_cap=15.0, use_bias=True) for f, c in CFGS.items()}
    params = layer_params(cfgs["parallel"], seed=3)
    x = layer_x(15, seed=5)
    ys = {}
    for form, cfg in cfgs.items():
        y, s = mlstm.forward(params, x, cfg=cfg)
        assert s is None and y.shape == x.shape and y.dtype == x.dtype
        ys[form] = y
    mh.assert_close(ys["chunkwise"], ys["parallel"], what="chunkwise vs parallel")
    mh.assert_close(ys["recurrent"], ys["parallel"], what="recurrent vs parallel")
    # forward without a state equals forward from init_state.
    cfg = cfgs["chunkwise"]
    y0, _ = mlstm.forward(params, x, cfg=cfg, state=mlstm.init_state(cfg, B, 15, jnp.bfloat16))
    mh.assert_close(y0, ys["chunkwise"], what="none vs init_state")


def test_layer_state_constant_and_fp32():
    cfg = CFGS["chunkwise"]
    mh.check_state_constant(cfg)
    state = mlstm.init_state(cfg, B, 8, jnp.bfloat16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))
    assert set(mlstm.param_specs(cfg)) == set(jax.eval_shape(lambda: mlstm.init(jax.random.key(0), cfg)))
    for spec in jax.tree.leaves(mlstm.param_specs(cfg), is_leaf=lambda s: hasattr(s, "logical_axes")):
        assert len(spec.logical_axes) == len(spec.shape)


@pytest.mark.parametrize("form", ["chunkwise"])
def test_layer_bf16_inputs(form):
    """bf16 activations, fp32 state: within BF16_TOL of the fp32 run on the same (bf16-exact)
    inputs and parameters; the state stays fp32."""
    cfg = CFGS[form]
    params = layer_params(cfg, seed=4)
    x = layer_x(15, seed=6)
    state0 = random_state(cfg, 9)
    params_r, x_r = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), (params, x))
    y16, s16 = mlstm.forward(params_r, x.astype(jnp.bfloat16), cfg=cfg, state=state0)
    assert y16.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16))
    y32, s32 = mlstm.forward(params_r, x_r, cfg=cfg, state=state0)
    mh.assert_close(y16, y32, mh.BF16_TOL, "bf16 vs fp32 output")
    mh.assert_trees_close(s16, s32, mh.BF16_TOL, "bf16 vs fp32 state")
    # Against the unrounded fp32 run, parameter rounding adds a little more.
    mh.assert_close(y16, mlstm.forward(params, x, cfg=cfg, state=state0)[0], 2e-2, "bf16 vs fp32")


def test_layer_gradients_finite_and_causal():
    cfg = CFGS["chunkwise"]
    params = layer_params(cfg, seed=5)
    x = layer_x(15, seed=7)
    t = 6
    gp, g = jax.grad(lambda p, x: jnp.sum(mlstm.forward(p, x, cfg=cfg)[0][:, t] ** 2),
                     argnums=(0, 1))(params, x)
    g = np.asarray(g)
    assert np.all(g[:, t + 1:] == 0.0)
    assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0)
    for leaf in jax.tree.leaves(gp):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=16, n_heads=3), "n_heads"),
    (dict(d_model=16, form="quadratic"), "form"),
    (dict(d_model=16, chunk_size=0), "chunk_size"),
    (dict(d_model=16, gate_soft_cap=-1.0), "gate_soft_cap"),
    (dict(d_model=16, conv_width=0), "conv_width"),
    (dict(d_model=16, proj_factor=0.0), "proj_factor"),
    (dict(d_model=16, eps=0.0), "eps"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MLSTMConfig(**kwargs)
