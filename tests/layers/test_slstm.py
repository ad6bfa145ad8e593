"""sLSTM: the cell scan against a per-token reference (values and gradients, random states,
packed resets), the mixer protocol via the shared harness, bf16, stress, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import slstm
from layers.checks import ConfigError
from layers.slstm import SLSTMConfig
from tests.layers import mixer_harness as mh

B, H, K = 2, 2, 4


def ref_cell(pre, R, c0, n0, m0, h0, starts):
    """The paper's stabilised sLSTM recurrence, one token at a time (xLSTM eqs. 8-17).

    pre [B, L, 4, H, K]: W x + b for gates (i, f, z, o); R [4, H, K, K] per-head recurrent maps.
    The first step of an empty state (n = 0) takes m = i; a packed document start resets to empty.
    """

    def one(carry, xs):
        c, n, m, h = carry
        p, s = xs
        r = s[:, None, None]
        c, n, m, h = (jnp.where(r, 0.0, a) for a in (c, n, m, h))
        rec = jnp.stack([jnp.einsum("bhk,hkj->bhj", h, R[g]) for g in range(4)])
        i_t, f_t, z_t, o_t = (p[:, g] + rec[g] for g in range(4))
        logf = jax.nn.log_sigmoid(f_t)
        first = n == 0.0
        m_t = jnp.where(first, i_t, jnp.maximum(i_t, logf + m))
        f_s = jnp.where(first, 0.0, jnp.exp(logf + m - m_t))
        i_s = jnp.exp(i_t - m_t)
        c = f_s * c + i_s * jnp.tanh(z_t)
        n = f_s * n + i_s
        h = jax.nn.sigmoid(o_t) * (c / n)
        return (c, n, m_t, h), h

    state, hs = jax.lax.scan(one, (c0, n0, m0, h0), (jnp.moveaxis(pre, 1, 0), jnp.moveaxis(starts, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), state


def rnd(rng, shape, scale=1.0, shift=0.0):
    """Test data from NumPy: no per-shape compilation, unlike eager jax.random."""
    return jnp.asarray((shift + scale * rng.standard_normal(shape)).astype(np.float32))


def cell_inputs(L, seed, gate_scale=1.0, with_starts=True):
    rng = np.random.default_rng(seed)
    pre = rnd(rng, (B, L, 4, H, K), gate_scale)
    R = rnd(rng, (4, H, K, K), 0.5)
    c0 = rnd(rng, (B, H, K))
    n0 = 0.5 + jnp.abs(rnd(rng, (B, H, K)))  # a normaliser reached by the cell is >= 1
    m0 = rnd(rng, (B, H, K))
    h0 = rnd(rng, (B, H, K), 0.5)
    starts = rng.random((B, L)) < 0.1 if with_starts else np.zeros((B, L), bool)
    starts[:, 0] = False
    return (pre, R, c0, n0, m0, h0), jnp.asarray(starts)


def loss_and_grads(fn, args, seed=99):
    shapes = jax.tree.leaves(jax.eval_shape(fn, *args))
    rng = np.random.default_rng(seed)
    cots = [rnd(rng, a.shape) for a in shapes]

    def loss(*a):
        out = fn(*a)
        return sum(jnp.sum(x * c) for x, c in zip(jax.tree.leaves(out), cots)), out

    grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


def compare_cell(L, seed, tol=mh.FP32_TOL):
    args, starts = cell_inputs(L, seed)
    out, g = loss_and_grads(lambda pre, R, *s: slstm.cell(pre, R, s, starts_BL=starts), args)
    out_ref, g_ref = loss_and_grads(lambda pre, R, *s: ref_cell(pre, R, *s, starts), args)
    mh.assert_trees_close(out, out_ref, tol, "output/state")
    for n, a, b in zip(("pre", "R", "c0", "n0", "m0", "h0"), g, g_ref):
        mh.assert_close(a, b, tol, f"grad {n}")


@pytest.mark.parametrize("L", [15, 63])
def test_cell_matches_reference(L):
    compare_cell(L, seed=L)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
def test_cell_long(L):
    compare_cell(L, seed=L)


def test_empty_state_first_step_takes_m_equal_i():
    args, _ = cell_inputs(3, 4, with_starts=False)
    pre, R = args[:2]
    _, (c, n, m, h) = slstm.cell(pre[:, :1], R, None)
    np.testing.assert_allclose(np.asarray(m), np.asarray(pre[:, 0, 0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(n), 1.0, rtol=1e-6)
    # Very negative input gates on an empty state must not overflow the forget branch.
    h2, s2 = slstm.cell(pre.at[:, :, 0].set(-200.0), R, None)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in (h2, *s2))


@pytest.mark.slow
def test_stress_long_large_gates_finite():
    """L = 8192 with gate pre-activations ~ N(0, 30^2): finite forward and backward."""
    args, _ = cell_inputs(8192, 11, gate_scale=30.0, with_starts=False)

    @jax.jit
    def run(pre, R):
        def loss(pre, R):
            h, (c, n, m, hl) = slstm.cell(pre, R, None)
            return jnp.mean(h ** 2) + jnp.mean(c ** 2) + jnp.mean(n ** 2), h
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(pre, R)

    (val, h), grads = run(*args[:2])
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(h)))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


# ----- the mixer -----

D = 16


def layer_params(cfg, seed=0):
    """Random parameters for every spec (NumPy), including the recurrent maps (zero at init)."""
    rng = np.random.default_rng(seed)

    def one(path, spec):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return rnd(rng, spec.shape, 0.3, 1.0)
        if "b_4HJ" in name:
            return rnd(rng, spec.shape)
        if "b_C" in name:
            return rnd(rng, spec.shape, 0.3)
        if "r_4HKJ" in name:
            return rnd(rng, spec.shape, 0.3)
        if "w_4HKJ" in name:
            return rnd(rng, spec.shape, 0.5)
        return rnd(rng, spec.shape, 1.0 / np.sqrt(spec.shape[0]))

    return jax.tree_util.tree_map_with_path(one, slstm.param_specs(cfg),
                                            is_leaf=lambda x: hasattr(x, "logical_axes"))


def layer_x(L, seed=1, batch=B):
    return rnd(np.random.default_rng(seed), (batch, L, D))


def random_state(cfg, seed):
    """A random non-zero state shaped like init_state's; the normaliser positive (as reached)."""
    rng = np.random.default_rng(seed)
    s = jax.tree.map(lambda z: rnd(rng, z.shape, 0.5), slstm.init_state(cfg, B, 1))
    s["n_BHK"] = 0.5 + jnp.abs(s["n_BHK"])
    return s


CFG = SLSTMConfig(d_model=D, n_heads=2)
CFG_NOCONV = SLSTMConfig(d_model=D, n_heads=4, conv_width=0, out_proj=True)


@pytest.mark.parametrize("cfg", [CFG, CFG_NOCONV], ids=["conv", "noconv_outproj"])
def test_layer_step_equivalence(cfg):
    params = layer_params(cfg)
    mh.check_step_equivalence(slstm, cfg, params, layer_x(15), random_state(cfg, 7))


def test_layer_split_and_packing():
    params = layer_params(CFG, seed=2)
    mh.check_split_equivalence(slstm, CFG, params, layer_x(14, seed=3), 7, random_state(CFG, 8))
    mh.check_packing(slstm, CFG, params, layer_x(21, seed=4, batch=1), [5, 9, 7])


def test_layer_state_none_and_constant():
    mh.check_state_constant(CFG)
    params = layer_params(CFG, seed=3)
    x = layer_x(15, seed=5)
    y, s = slstm.forward(params, x, cfg=CFG)
    assert s is None and y.shape == x.shape and y.dtype == x.dtype
    y0, s0 = slstm.forward(params, x, cfg=CFG, state=slstm.init_state(CFG, B, 15, jnp.bfloat16))
    mh.assert_close(y0, y, what="none vs init_state")
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s0))
    assert set(slstm.param_specs(CFG)) == set(jax.eval_shape(lambda: slstm.init(jax.random.key(0), CFG)))


def test_layer_bf16_inputs():
    """bf16 activations, fp32 state: within BF16_TOL of the fp32 run on the same (bf16-exact)
    inputs and parameters; the state stays fp32."""
    params = layer_params(CFG, seed=4)
    x = layer_x(15, seed=6)
    state0 = random_state(CFG, 9)
    params_r, x_r = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), (params, x))
    y16, s16 = slstm.forward(params_r, x.astype(jnp.bfloat16), cfg=CFG, state=state0)
    assert y16.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16))
    y32, s32 = slstm.forward(params_r, x_r, cfg=CFG, state=state0)
    mh.assert_close(y16, y32, mh.BF16_TOL, "bf16 vs fp32 output")
    mh.assert_trees_close(s16, s32, mh.BF16_TOL, "bf16 vs fp32 state")


def test_layer_gradients_finite_and_causal():
    params = layer_params(CFG, seed=5)
    x = layer_x(15, seed=7)
    t = 6
    gp, g = jax.grad(lambda p, x: jnp.sum(slstm.forward(p, x, cfg=CFG)[0][:, t] ** 2),
                     argnums=(0, 1))(params, x)
    g = np.asarray(g)
    assert np.all(g[:, t + 1:] == 0.0)
    assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0)
    for leaf in jax.tree.leaves(gp):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=16, n_heads=3), "n_heads"),
    (dict(d_model=16, conv_width=-1), "conv_width"),
    (dict(d_model=16, form="parallel"), "form"),
    (dict(d_model=16, unroll=0), "unroll"),
    (dict(d_model=16, norm_eps=0.0), "norm_eps"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SLSTMConfig(**kwargs)
