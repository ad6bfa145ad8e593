"""Mamba-2 (SSD): both forms against per-token loops written from the paper's equations, the
mixer protocol (step, split, packing, constant state), bf16 inputs, long and extreme inputs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mamba2
from layers.checks import ConfigError
from layers.mamba2 import Mamba2Config
from tests.layers import mixer_harness as mh


Bsz = 2
CFG = Mamba2Config(d_model=16, d_state=8, head_dim=8, n_groups=2, chunk_size=4)  # E 32, H 4, G 2
SCANS = ("chunked", "sequential")


# ----- slow obvious references -----

def loop_ssd(x, log_a, Bm, Cm, h0, reset):
    """h_t = exp(a_t) h_{t-1} + x_t B_t^T (decay 0 at a reset), y_t = h_t C_t; one token at a time
    (a lax.scan over tokens only so that compiling its gradient stays cheap)."""
    H, G = x.shape[2], Bm.shape[2]
    Bh = jnp.repeat(Bm, H // G, axis=2)  # head h reads group h // (H / G)
    Ch = jnp.repeat(Cm, H // G, axis=2)
    if reset is None:
        reset = jnp.zeros(x.shape[:2], bool)

    def token(h, inp):
        x_t, a_t, B_t, C_t, r_t = inp
        decay = jnp.where(r_t[:, None], 0.0, jnp.exp(a_t))
        h = decay[:, :, None, None] * h + x_t[:, :, :, None] * B_t[:, :, None, :]
        return h, jnp.sum(h * C_t[:, :, None, :], axis=-1)

    h, ys = jax.lax.scan(token, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (x, log_a, Bh, Ch, reset)))
    return jnp.moveaxis(ys, 0, 1), h


def loop_mixer(p, x, cfg, state, seg):
    """The Mamba-2 block token by token, in fp32, from the paper / reference module."""
    Bn, L, _ = x.shape
    H, P, G, N = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
    A = -jnp.exp(p["A_log_H"])
    if seg is None:
        reset = jnp.zeros((Bn, L), bool)
    else:
        reset = jnp.concatenate([jnp.zeros((Bn, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

    def token(carry, inp):
        bufs, h = carry
        u, r = inp
        raw = {"x": jnp.einsum("bd,dhp->bhp", u, p["wx_DHP"]).reshape(Bn, H * P),
               "B": jnp.einsum("bd,dgn->bgn", u, p["wB_DGN"]).reshape(Bn, G * N),
               "C": jnp.einsum("bd,dgn->bgn", u, p["wC_DGN"]).reshape(Bn, G * N)}
        conv, new_bufs = {}, {}
        for k, v in raw.items():
            prev = jnp.where(r[:, None, None], 0.0, bufs[k])  # a new document sees no old inputs
            win = jnp.concatenate([prev, v[:, None]], axis=1)  # [b, W, c], oldest first
            w, b = p["conv_" + k]["w_WC"], p["conv_" + k]["b_C"]
            conv[k] = jax.nn.silu(jnp.sum(win * w[None], axis=1) + b[None])
            new_bufs[k] = win[:, 1:]
        xs = conv["x"].reshape(Bn, H, P)
        Bh = jnp.repeat(conv["B"].reshape(Bn, G, N), H // G, axis=1)
        Ch = jnp.repeat(conv["C"].reshape(Bn, G, N), H // G, axis=1)
        dt = jax.nn.softplus(jnp.einsum("bd,dh->bh", u, p["wdt_DH"]) + p["dt_bias_H"][None])
        decay = jnp.where(r[:, None], 0.0, jnp.exp(dt * A[None]))
        h = decay[:, :, None, None] * h + (xs * dt[:, :, None])[:, :, :, None] * Bh[:, :, None, :]
        y = jnp.sum(h * Ch[:, :, None, :], axis=-1) + p["D_H"][None, :, None] * xs
        z = jnp.einsum("bd,dhp->bhp", u, p["wz_DHP"])
        g = (y * jax.nn.silu(z)).reshape(Bn, G, (H // G) * P)
        g = g / jnp.sqrt(jnp.mean(g * g, axis=-1, keepdims=True) + cfg.norm_eps)
        g = g.reshape(Bn, H, P) * p["norm_scale_HP"][None]
        return (new_bufs, h), jnp.einsum("bhp,hpd->bd", g, p["wo_HPD"])

    E, GN = H * P, G * N
    conv_BWK = state["conv_BWK"]
    bufs = {"x": conv_BWK[..., :E], "B": conv_BWK[..., E:E + GN], "C": conv_BWK[..., E + GN:]}
    (bufs, h), ys = jax.lax.scan(token, (bufs, state["ssm_BHPN"]),
                                 (jnp.moveaxis(x, 1, 0), jnp.moveaxis(reset, 1, 0)))
    new_state = {"conv_BWK": jnp.concatenate([bufs["x"], bufs["B"], bufs["C"]], axis=-1), "ssm_BHPN": h}
    return jnp.moveaxis(ys, 0, 1), new_state


# ----- helpers -----

# Test inputs are built under jit: eager random ops would each compile separately (slow here).
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def ssd_inputs(key, L, H=4, G=2, P=8, N=8, scale=1.0):
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (Bsz, L, H, P))
    # Gates as in fla's tests: log-sigmoid of normals, scaled; some near 0, some strongly negative.
    log_a = jax.nn.log_sigmoid(jax.random.normal(ks[1], (Bsz, L, H))) * scale
    Bm = jax.random.normal(ks[2], (Bsz, L, G, N)) / np.sqrt(N)
    Cm = jax.random.normal(ks[3], (Bsz, L, G, N)) / np.sqrt(N)
    h0 = jax.random.normal(ks[4], (Bsz, H, P, N))
    reset = jax.random.uniform(ks[5], (Bsz, L)) < 0.1
    reset = reset.at[:, 0].set(False)
    return x, log_a, Bm, Cm, h0, reset


@functools.partial(jax.jit, static_argnums=0)  # seed traced: one compile for every seed
def make_params(cfg, seed=0):
    """Init, then randomise the parameters that start constant (biases, D, norm scale)."""
    p = mamba2.init(jax.random.key(seed), cfg)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed + 100), 5)
    p["D_H"] = p["D_H"] + 0.5 * jax.random.normal(k1, p["D_H"].shape)
    p["norm_scale_HP"] = 1.0 + 0.3 * jax.random.normal(k2, p["norm_scale_HP"].shape)
    for k, kk in zip(("conv_x", "conv_B", "conv_C"), (k3, k4, k5)):
        p[k]["b_C"] = 0.3 * jax.random.normal(kk, p[k]["b_C"].shape)
    return p


@functools.partial(jax.jit, static_argnums=0)
def rand_state(cfg, key):
    return mh.random_state(mamba2, cfg, Bsz, key)


def cfg_with(scan, **kw):
    return dataclasses.replace(CFG, scan=scan, **kw)


# ----- the SSD function -----

def value_and_grads(fn, args, cots):
    """Outputs of fn(*args) and the gradient of <outputs, cots> w.r.t. every arg."""
    def loss(*a):
        out = fn(*a)
        return sum(jnp.sum(o * c) for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cots))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


@pytest.fixture(scope="module", params=[15, 63])
def ssd_case(request):
    """Inputs with a random initial state and resets, the loop's outputs and gradients (computed
    once, shared by both forms)."""
    L = request.param
    x, log_a, Bm, Cm, h0, reset = ssd_inputs(jax.random.key(L), L)
    cots = (jax.random.normal(jax.random.key(1), x.shape), jax.random.normal(jax.random.key(2), h0.shape))
    args = (x, log_a, Bm, Cm, h0)
    ref = value_and_grads(lambda *a: loop_ssd(*a, reset), args, cots)
    return args, reset, cots, ref


@pytest.mark.parametrize("mode", SCANS)
def test_ssd_matches_loop_values_and_grads(ssd_case, mode):
    args, reset, cots, ((y_ref, h_ref), g_ref) = ssd_case
    (y, h), g = value_and_grads(lambda *a: mamba2.ssd(*a, reset, chunk_size=16, mode=mode), args, cots)
    mh.assert_close(y, y_ref, what="y")
    mh.assert_close(h, h_ref, what="final state")
    for name, a, b in zip(("x", "log_a", "B", "C", "h0"), g, g_ref):
        mh.assert_close(a, b, what=f"grad {name}")


def test_ssd_bf16_inputs_fp32_state():
    x, log_a, Bm, Cm, h0, reset = ssd_inputs(jax.random.key(6), 15)
    x16, B16, C16 = (a.astype(jnp.bfloat16) for a in (x, Bm, Cm))
    y_ref, h_ref = loop_ssd(x16.astype(jnp.float32), log_a, B16.astype(jnp.float32),
                            C16.astype(jnp.float32), h0, reset)
    for mode in SCANS:
        y, h = mamba2.ssd(x16, log_a, B16, C16, h0, reset, chunk_size=4, mode=mode)
        assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
        mh.assert_close(y, y_ref, mh.BF16_TOL, f"{mode} y")
        mh.assert_close(h, h_ref, mh.FP32_TOL, f"{mode} state")


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_ssd_long_odd_lengths(L, chunk):
    x, log_a, Bm, Cm, h0, reset = ssd_inputs(jax.random.key(L + chunk), L)
    y_ref, h_ref = jax.jit(lambda *a: loop_ssd(*a, reset))(x, log_a, Bm, Cm, h0)
    cot = jax.random.normal(jax.random.key(3), x.shape)
    grads = {}
    for mode in SCANS:
        fn = jax.jit(lambda *a, mode=mode: mamba2.ssd(*a, reset, chunk_size=chunk, mode=mode))
        y, h = fn(x, log_a, Bm, Cm, h0)
        mh.assert_close(y, y_ref, what=f"{mode} y")
        mh.assert_close(h, h_ref, what=f"{mode} state")
        grads[mode] = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a)[0] * cot), argnums=(0, 1, 2, 3, 4))(
            x, log_a, Bm, Cm, h0)
    for name, a, b in zip(("x", "log_a", "B", "C", "h0"), grads["chunked"], grads["sequential"]):
        mh.assert_close(a, b, what=f"grad {name}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", SCANS)
def test_ssd_extreme_gates_at_8192_stay_finite(mode):
    L = 8192
    x, _, Bm, Cm, h0, reset = ssd_inputs(jax.random.key(7), L, H=4, P=4, N=4)
    # Per head: no decay at all, barely any, strong, and a huge log-decay (exp underflows to 0).
    scales = jnp.array([0.0, 1e-6, 10.0, 1e4], jnp.float32)
    log_a = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(8), (Bsz, L, 4))) * scales[None, None, :]
    x = x * 10.0

    @jax.jit
    def loss(x, log_a, Bm, Cm, h0):
        y, h = mamba2.ssd(x, log_a, Bm, Cm, h0, reset, chunk_size=64, mode=mode)
        return jnp.mean(jnp.square(y)) + jnp.mean(jnp.square(h))

    val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, log_a, Bm, Cm, h0)
    assert np.isfinite(float(val))
    for name, g in zip(("x", "log_a", "B", "C", "h0"), grads):
        assert np.all(np.isfinite(np.asarray(g))), f"grad {name} not finite"


# ----- the mixer -----

SEG = jnp.array([[1] * 6 + [2] * 9, [3] * 2 + [4] * 11 + [5] * 2], jnp.int32)  # resets mid-chunk


@pytest.fixture(scope="module")
def mixer_case():
    """Params, input, random state, segment ids; the loop's outputs and gradients (computed once)."""
    p = make_params(CFG)
    x = jax.random.normal(jax.random.key(1), (Bsz, SEG.shape[1], CFG.d_model))
    s0 = rand_state(CFG, jax.random.key(2))
    cots = (jax.random.normal(jax.random.key(3), x.shape),
            {"conv_BWK": jax.random.normal(jax.random.key(4), s0["conv_BWK"].shape),
             "ssm_BHPN": jax.random.normal(jax.random.key(5), s0["ssm_BHPN"].shape)})
    args = (p, x, s0)
    ref = value_and_grads(lambda p, x, s: loop_mixer(p, x, CFG, s, SEG), args, cots)
    return args, cots, ref


@pytest.mark.parametrize("scan", SCANS)
def test_mixer_matches_loop_values_and_grads(mixer_case, scan):
    """Projections, conv, gates, SSD, D skip, gated group norm; with a random state and packed rows."""
    cfg = cfg_with(scan)
    args, cots, ((y_ref, s_ref), g_ref) = mixer_case
    (y, s), g = value_and_grads(
        lambda p, x, s: mamba2.forward(p, x, cfg=cfg, state=s, segment_ids=SEG), args, cots)
    mh.assert_close(y, y_ref, what="y")
    mh.assert_trees_close(s, s_ref, what="state")
    mh.assert_trees_close(g, g_ref, what="grads")


# step always runs the sequential form; forward's forms are both checked against the loop above,
# so these two protocol checks run on the default (chunked) form only, to keep compiles few.
def test_step_equivalence():
    cfg = CFG
    p = make_params(CFG, 1)
    x = jax.random.normal(jax.random.key(10), (Bsz, 15, cfg.d_model))
    mh.check_step_equivalence(mamba2, cfg, p, x, rand_state(CFG, jax.random.key(11)))


def test_split_equivalence():
    cfg = CFG
    p = make_params(CFG, 2)
    x = jax.random.normal(jax.random.key(12), (Bsz, 15, cfg.d_model))
    mh.check_split_equivalence(mamba2, cfg, p, x, 7, rand_state(CFG, jax.random.key(13)))


@pytest.mark.parametrize("scan", SCANS)
def test_packing(scan):
    cfg = cfg_with(scan)
    p = make_params(CFG, 4)
    x = jax.random.normal(jax.random.key(14), (1, 21, cfg.d_model))
    mh.check_packing(mamba2, cfg, p, x, [5, 9, 7])
    seg = jnp.asarray(np.repeat([1, 2, 3], [5, 9, 7])[None].astype(np.int32))
    assert mamba2.forward(p, x, cfg=cfg, segment_ids=seg)[1] is None  # training builds no state


def test_state_constant_and_fp32():
    mh.check_state_constant(CFG)
    state = mamba2.init_state(CFG, 3, 100, jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    assert state["ssm_BHPN"].shape == (3, CFG.n_heads, CFG.head_dim, CFG.d_state)


def test_bf16_inputs_close_to_fp32():
    p = make_params(CFG, seed=5)
    x16 = jax.random.normal(jax.random.key(15), (Bsz, 15, CFG.d_model)).astype(jnp.bfloat16)
    s0 = rand_state(CFG, jax.random.key(16))
    y32, s32 = mamba2.forward(p, x16.astype(jnp.float32), cfg=CFG, state=s0)
    y16, s16 = mamba2.forward(p, x16, cfg=CFG, state=s0)
    assert y16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(s16))
    mh.assert_close(y16, y32, mh.BF16_TOL, "bf16 output")
    mh.assert_trees_close(s16, s32, mh.BF16_TOL, "bf16 state")


@pytest.mark.slow
def test_mixer_extreme_gates_at_8192_stay_finite():
    cfg = Mamba2Config(d_model=8, d_state=4, head_dim=4, n_groups=1, chunk_size=64)  # H = 4
    p = make_params(cfg, 6)
    # dt from ~2e-9 to ~30 (softplus of the bias), |A| from 1 to 1e4: log-decays from ~0 to ~-3e5.
    p["dt_bias_H"] = jnp.array([-20.0, -2.0, 5.0, 30.0], jnp.float32)
    p["A_log_H"] = jnp.array([0.0, 2.0, 5.0, 9.2], jnp.float32)
    x = 3.0 * jax.random.normal(jax.random.key(17), (1, 8192, cfg.d_model))
    seg = jnp.asarray(np.repeat(np.arange(1, 9), 1024)[None].astype(np.int32))
    outs = {}
    for scan in SCANS:
        c = dataclasses.replace(cfg, scan=scan)

        @jax.jit
        def loss(p, x, c=c):
            y, _ = mamba2.forward(p, x, cfg=c, segment_ids=seg)
            return jnp.mean(jnp.square(y)), y

        (val, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        assert np.isfinite(float(val))
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(g)), scan
        outs[scan] = y
    mh.assert_close(outs["chunked"], outs["sequential"], what="chunked vs sequential at 8192")


# ----- parameters and config -----

def test_param_specs_and_init():
    specs = mamba2.param_specs(CFG)
    for name in ("A_log_H", "dt_bias_H", "D_H"):
        assert specs[name].keep_dtype and specs[name].dtype == jnp.float32
    key = jax.random.key(0)
    a = np.exp(np.asarray(specs["A_log_H"].init(key, (256,), jnp.float32)))
    assert np.all((a >= 1.0) & (a <= 16.0)) and a.min() < 2.0 and a.max() > 15.0
    dt = np.asarray(jax.nn.softplus(specs["dt_bias_H"].init(key, (256,), jnp.float32)))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)) and dt.min() < 2e-3 and dt.max() > 0.05
    assert np.all(np.asarray(specs["D_H"].init(key, (4,), jnp.float32)) == 1.0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=16, head_dim=5), "head_dim"),
    (dict(d_model=16, head_dim=8, n_groups=3), "n_groups"),
    (dict(d_model=16, head_dim=8, scan="parallel"), "scan"),
    (dict(d_model=16, head_dim=8, chunk_size=0), "chunk_size"),
    (dict(d_model=0), "d_model"),
    (dict(d_model=16, d_state=-1), "d_state"),
    (dict(d_model=16, dt_min=0.0), "dt_min"),
    (dict(d_model=16, dt_min=0.1, dt_max=0.01), "dt_max"),
    (dict(d_model=16, a_init_range=(0.0, 16.0)), "a_init_range"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Mamba2Config(**{"head_dim": 8, **kwargs})  # head_dim 8 divides 32: only `field` is wrong


def test_config_is_hashable():
    assert hash(CFG) == hash(dataclasses.replace(CFG))
