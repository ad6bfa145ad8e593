"""Mamba-1: the selective scan's three forms against a slow float64 reference, the block against a
token-by-token NumPy transcription of mamba_simple.Mamba.step, the mixer protocol, packing,
initialisation, dtype policy and config validation."""

import dataclasses

import chex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers import mamba, mixers
from layers.attention import AttentionConfig
from layers.checks import ConfigError
from layers.mamba import MambaConfig, selective_scan
from tests.layers import mixer_harness as H
from zoo.config import BlockConfig, ModelConfig

Bsz, L, E, N = 2, 13, 6, 4  # odd length on purpose


# ---------------------------------------------------------------------------------------------
# Slow references (NumPy float64, one token at a time).


def loop_scan(u, delta, A, Bm, C, D=None, h0=None, reset=None):
    """selective_scan_ref: h = exp(delta A) h + delta B u; y = h C + D u. Loops over b, t."""
    u, delta, A, Bm, C = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (u, delta, A, Bm, C))
    b_, l_, e_ = u.shape
    y = np.zeros((b_, l_, e_))
    h_out = np.zeros((b_, e_, A.shape[1]))
    for b in range(b_):
        h = np.zeros((e_, A.shape[1])) if h0 is None else np.asarray(h0, np.float64)[b].copy()
        for t in range(l_):
            if reset is not None and reset[b, t]:
                h = np.zeros_like(h)
            h = np.exp(delta[b, t][:, None] * A) * h + (delta[b, t] * u[b, t])[:, None] * Bm[b, t][None, :]
            y[b, t] = h @ C[b, t]
            if D is not None:
                y[b, t] += np.asarray(D, np.float64) * u[b, t]
        h_out[b] = h
    return y, h_out


def _silu(v):
    return v / (1.0 + np.exp(-v))


def loop_block(params, x, cfg, conv0=None, h0=None, segment_ids=None):
    """The Mamba block token by token, transcribed from mamba_simple.Mamba.step (float64)."""
    p = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64), params)
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    b_, l_, _ = x.shape
    R, Ns, W = cfg.dt_rank, cfg.d_state, cfg.d_conv
    A = -np.exp(p["A_log_EN"])
    out = np.zeros((b_, l_, cfg.d_model))
    convs, hs = [], []
    for b in range(b_):
        window = np.zeros((W - 1, cfg.d_inner)) if conv0 is None else np.asarray(conv0, np.float64)[b].copy()
        h = np.zeros((cfg.d_inner, Ns)) if h0 is None else np.asarray(h0, np.float64)[b].copy()
        for t in range(l_):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                window, h = np.zeros_like(window), np.zeros_like(h)
            xz = np.einsum("d,dse->se", x[b, t], p["win_D2E"])
            if "bin_2E" in p:
                xz = xz + p["bin_2E"]
            xs, z = xz
            full = np.concatenate([window, xs[None]], axis=0)
            window = full[1:]
            c = (full * p["conv"]["w_WC"]).sum(0) + p["conv"].get("b_C", 0.0)
            xc = _silu(c)
            proj = xc @ p["wx_EP"]
            dt, Bv, Cv = proj[:R], proj[R:R + Ns], proj[R + Ns:]
            delta = np.logaddexp(0.0, dt @ p["wdt_RE"] + p["bdt_E"])
            h = np.exp(delta[:, None] * A) * h + (delta * xc)[:, None] * Bv[None, :]
            y = (h @ Cv + p["D_E"] * xc) * _silu(z)
            out[b, t] = y @ p["wout_ED"] + p.get("bout_D", 0.0)
        convs.append(window)
        hs.append(h)
    return out, np.stack(convs), np.stack(hs)


def scan_inputs(key, *, b=Bsz, l=L, e=E, n=N, dt_scale=1.0, dtype=jnp.float32):
    k = jax.random.split(key, 8)
    u = jax.random.normal(k[0], (b, l, e)).astype(dtype)
    delta = dt_scale * jax.nn.softplus(jax.random.normal(k[1], (b, l, e)))
    A = -jnp.exp(jax.random.normal(k[2], (e, n)))
    Bm = jax.random.normal(k[3], (b, l, n)).astype(dtype)
    C = jax.random.normal(k[4], (b, l, n)).astype(dtype)
    D = jax.random.normal(k[5], (e,))
    h0 = jax.random.normal(k[6], (b, e, n))
    reset = jax.random.bernoulli(k[7], 0.2, (b, l))
    return u, delta, A, Bm, C, D, h0, reset


FORMS = [("sequential", 64), ("associative", 64), ("chunked", 1), ("chunked", 4), ("chunked", 5),
         ("chunked", 13), ("chunked", 64)]


# ---------------------------------------------------------------------------------------------
# selective_scan


@pytest.mark.parametrize("mode,chunk", FORMS)
@pytest.mark.parametrize("with_state", [True, False])
def test_selective_scan_matches_loops(mode, chunk, with_state):
    u, delta, A, Bm, C, D, h0, reset = scan_inputs(jax.random.key(0))
    if not with_state:
        D = h0 = reset = None
    y, h = selective_scan(u, delta, A, Bm, C, D, h0, reset, mode=mode, chunk_size=chunk)
    y_ref, h_ref = loop_scan(u, delta, A, Bm, C, D, h0, None if reset is None else np.asarray(reset))
    assert y.shape == (Bsz, L, E) and y.dtype == jnp.float32
    assert h.shape == (Bsz, E, N) and h.dtype == jnp.float32
    H.assert_close(y, y_ref, 1e-5, f"{mode}/{chunk} y")
    H.assert_close(h, h_ref, 1e-5, f"{mode}/{chunk} h")


@pytest.mark.parametrize("mode", mamba.SCAN_MODES)
def test_selective_scan_long_and_strongly_decaying(mode):
    """Long odd length (chunks do not divide it), steps up to ~10: finite and exact."""
    u, delta, A, Bm, C, D, h0, reset = scan_inputs(jax.random.key(1), b=1, l=301, dt_scale=5.0)
    y, h = selective_scan(u, delta, A, Bm, C, D, h0, reset, mode=mode, chunk_size=64)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(h)))
    y_ref, h_ref = loop_scan(u, delta, A, Bm, C, D, h0, np.asarray(reset))
    H.assert_close(y, y_ref, 1e-5, f"{mode} y")
    H.assert_close(h, h_ref, 1e-5, f"{mode} h")


@pytest.mark.parametrize("mode", ["associative", "chunked"])
def test_selective_scan_gradients_match_sequential(mode):
    u, delta, A, Bm, C, D, h0, reset = scan_inputs(jax.random.key(2))
    ky, kh = jax.random.split(jax.random.key(3))
    wy = jax.random.normal(ky, (Bsz, L, E))
    wh = jax.random.normal(kh, (Bsz, E, N))

    def loss(m, *args):
        y, h = selective_scan(*args, reset, mode=m, chunk_size=4)
        return jnp.sum(y * wy) + jnp.sum(h * wh)

    args = (u, delta, A, Bm, C, D, h0)
    g = jax.grad(loss, argnums=tuple(range(1, 8)))(mode, *args)
    g_ref = jax.grad(loss, argnums=tuple(range(1, 8)))("sequential", *args)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "h0"), g, g_ref):
        assert bool(jnp.all(jnp.isfinite(a))), name
        H.assert_close(a, b, 1e-5, f"{mode} d{name}")


@pytest.mark.parametrize("mode", mamba.SCAN_MODES)
def test_selective_scan_bf16_inputs(mode):
    u, delta, A, Bm, C, D, h0, reset = scan_inputs(jax.random.key(4), dtype=jnp.bfloat16)
    y, h = selective_scan(u, delta, A, Bm, C, D, h0, reset, mode=mode, chunk_size=4)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    y_ref, h_ref = loop_scan(u, delta, A, Bm, C, D, h0, np.asarray(reset))
    H.assert_close(y, y_ref, H.BF16_TOL, f"{mode} y")
    H.assert_close(h, h_ref, 1e-5, f"{mode} h")  # inputs are exact bf16 values; the state is fp32


@pytest.mark.parametrize("mode", mamba.SCAN_MODES)
def test_selective_scan_reset_starts_afresh(mode):
    """A reset at t = 5 makes the tail equal a fresh scan of the tail from zeros."""
    u, delta, A, Bm, C, D, h0, _ = scan_inputs(jax.random.key(5))
    reset = jnp.zeros((Bsz, L), bool).at[:, 5].set(True)
    y, h = selective_scan(u, delta, A, Bm, C, D, h0, reset, mode=mode, chunk_size=4)
    y2, h2 = selective_scan(u[:, 5:], delta[:, 5:], A, Bm[:, 5:], C[:, 5:], D, None, None, mode=mode,
                            chunk_size=4)
    H.assert_close(y[:, 5:], y2, 1e-6, "tail y")
    H.assert_close(h, h2, 1e-6, "final h")


@pytest.mark.slow
def test_chunked_gradient_keeps_only_chunk_states():
    """Backward memory of the chunked form grows slower with L than one [B, L, E, N] tensor;
    the associative form's grows faster (it keeps several)."""
    e, n = 8, 16

    def temp_bytes(mode, length):
        u, delta, A, Bm, C, *_ = scan_inputs(jax.random.key(6), b=1, l=length, e=e, n=n)
        f = jax.jit(jax.grad(lambda u, d, b, c: selective_scan(u, d, A, b, c, mode=mode)[0].sum(),
                             argnums=(0, 1, 2, 3)))
        analysis = f.lower(u, delta, Bm, C).compile().memory_analysis()
        if analysis is None:
            pytest.skip("backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    growth = {m: temp_bytes(m, 512) - temp_bytes(m, 128) for m in ("chunked", "associative")}
    full_growth = (512 - 128) * e * n * 4
    assert growth["chunked"] < full_growth < growth["associative"], growth


@pytest.mark.parametrize("bad,match", [
    (dict(mode="parallel"), "mode"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(A=jnp.zeros((E + 1, N))), "A_EN"),
    (dict(Bm=jnp.zeros((Bsz, L, N + 1))), "B_BLN"),
    (dict(C=jnp.zeros((Bsz, L - 1, N))), "C_BLN"),
    (dict(delta=jnp.zeros((Bsz, L, E), jnp.int32)), "delta_BLE"),
    (dict(h0=jnp.zeros((Bsz, N, E))), "h0_BEN"),
    (dict(reset=jnp.zeros((Bsz, L + 1), bool)), "reset_BL"),
])
def test_selective_scan_rejects_bad_arguments(bad, match):
    u, delta, A, Bm, C, D, h0, reset = scan_inputs(jax.random.key(7))
    kw = dict(u=u, delta=delta, A=A, Bm=Bm, C=C, D=D, h0=h0, reset=reset, mode="chunked", chunk_size=4)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan(kw["u"], kw["delta"], kw["A"], kw["Bm"], kw["C"], kw["D"], kw["h0"], kw["reset"],
                       mode=kw["mode"], chunk_size=kw["chunk_size"])


# ---------------------------------------------------------------------------------------------
# The block


D_MODEL = 16


def make(key, scan="chunked", chunk_size=4, **kw):
    """Config and params with every parameter non-trivial (D, biases random, not their init)."""
    cfg = MambaConfig(d_model=D_MODEL, d_state=4, scan=scan, chunk_size=chunk_size, **kw)
    k1, k2 = jax.random.split(key)
    params = mamba.init(k1, cfg)
    leaves, treedef = jax.tree.flatten(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = jax.random.split(k2, len(leaves))
    new = []
    for (path, leaf), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        if any(s in name for s in ("D_E", "b_C", "bin_2E", "bout_D")):
            leaf = leaf + 0.5 * jax.random.normal(k, leaf.shape, leaf.dtype)
        new.append(leaf)
    return cfg, treedef.unflatten(new)


def inputs(key, b=2, l=L, dtype=jnp.float32):
    return jax.random.normal(key, (b, l, D_MODEL)).astype(dtype)


@pytest.mark.parametrize("scan", mamba.SCAN_MODES)
@pytest.mark.parametrize("proj_bias", [False, True])
def test_block_matches_token_loop(scan, proj_bias):
    cfg, params = make(jax.random.key(10), scan=scan, proj_bias=proj_bias)
    x = inputs(jax.random.key(11))
    state = H.random_state(mamba, cfg, 2, jax.random.key(12))
    seg = np.array([[1] * 4 + [2] * 6 + [3] * 3, [1] * 13], np.int32)
    y, s = mamba.forward(params, x, cfg=cfg, state=state, segment_ids=jnp.asarray(seg))
    y_ref, conv_ref, h_ref = loop_block(params, x, cfg, state["conv"], state["ssm"], seg)
    H.assert_close(y, y_ref, 1e-5, "output")
    H.assert_close(s["conv"], conv_ref, 1e-6, "conv state")
    H.assert_close(s["ssm"], h_ref, 1e-5, "ssm state")


@pytest.mark.parametrize("scan", mamba.SCAN_MODES)
def test_block_forms_agree_from_zero_state(scan):
    cfg, params = make(jax.random.key(13), scan=scan, chunk_size=5)
    x = inputs(jax.random.key(14), l=23)
    y, s = mamba.forward(params, x, cfg=cfg)
    assert s is None
    y_ref, _, _ = loop_block(params, x, cfg)
    H.assert_close(y, y_ref, 1e-5, "output")


@pytest.mark.parametrize("scan", mamba.SCAN_MODES)
def test_forward_equals_step(scan):
    cfg, params = make(jax.random.key(20), scan=scan)
    x = inputs(jax.random.key(21))
    H.check_step_equivalence(mamba, cfg, params, x, H.random_state(mamba, cfg, 2, jax.random.key(22)))


@pytest.mark.parametrize("scan", mamba.SCAN_MODES)
def test_split_forward_continues_state(scan):
    cfg, params = make(jax.random.key(23), scan=scan)
    x = inputs(jax.random.key(24))
    for t in (1, 6):
        H.check_split_equivalence(mamba, cfg, params, x, t, H.random_state(mamba, cfg, 2, jax.random.key(25)))


@pytest.mark.parametrize("scan", mamba.SCAN_MODES)
def test_packed_documents_equal_separate_calls(scan):
    cfg, params = make(jax.random.key(26), scan=scan)
    x = inputs(jax.random.key(27), b=1)
    H.check_packing(mamba, cfg, params, x, (3, 6, 1, 3))


def test_state_is_constant_in_length_and_ssm_state_fp32():
    cfg = MambaConfig(d_model=D_MODEL)
    H.check_state_constant(cfg)
    s = mamba.init_state(cfg, 3, 100, jnp.bfloat16)
    assert s["conv"].shape == (3, cfg.d_conv - 1, cfg.d_inner) and s["conv"].dtype == jnp.bfloat16
    assert s["ssm"].shape == (3, cfg.d_inner, cfg.d_state) and s["ssm"].dtype == jnp.float32


def test_bf16_activations_step_equals_forward_and_track_fp32():
    cfg, params = make(jax.random.key(30))
    params_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    for k in ("A_log_EN", "D_E", "bdt_E"):
        params_bf16[k] = params[k]
    x = inputs(jax.random.key(31))
    state = mamba.init_state(cfg, 2, 1, jnp.bfloat16)
    H.check_step_equivalence(mamba, cfg, params_bf16, x.astype(jnp.bfloat16), state, H.BF16_TOL)
    y16, s16 = mamba.forward(params_bf16, x.astype(jnp.bfloat16), cfg=cfg, state=state)
    y32, _ = mamba.forward(params, x, cfg=cfg, state=mamba.init_state(cfg, 2, 1))
    assert y16.dtype == jnp.bfloat16 and s16["ssm"].dtype == jnp.float32
    H.assert_close(y16, y32, 3e-2, "bf16 vs fp32 forward")


@pytest.mark.parametrize("scan", mamba.SCAN_MODES)
def test_causal(scan):
    cfg, params = make(jax.random.key(32), scan=scan)
    x = inputs(jax.random.key(33))
    x2 = x.at[:, 7:].set(jax.random.normal(jax.random.key(34), (2, L - 7, D_MODEL)))
    y, _ = mamba.forward(params, x, cfg=cfg)
    y2, _ = mamba.forward(params, x2, cfg=cfg)
    np.testing.assert_array_equal(np.asarray(y[:, :7]), np.asarray(y2[:, :7]))
    assert not np.allclose(np.asarray(y[:, 7:]), np.asarray(y2[:, 7:]))


def test_gradients_finite_for_every_parameter():
    cfg, params = make(jax.random.key(35))
    x = inputs(jax.random.key(36))
    g = jax.jit(jax.grad(lambda p: jnp.sum(mamba.forward(p, x, cfg=cfg)[0] ** 2)))(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert bool(jnp.all(jnp.isfinite(leaf))), jax.tree_util.keystr(path)
        assert float(jnp.abs(leaf).max()) > 0, jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------------------------
# Initialisation, specs and config


def test_init_follows_mamba():
    cfg = MambaConfig(d_model=64, d_state=16)
    assert cfg.d_inner == 128 and cfg.dt_rank == 4
    p = mamba.init(jax.random.key(0), cfg)
    assert p["win_D2E"].shape == (64, 2, 128)
    assert p["wx_EP"].shape == (128, 4 + 2 * 16)
    assert p["wdt_RE"].shape == (4, 128) and float(jnp.abs(p["wdt_RE"]).max()) <= 4 ** -0.5
    assert p["conv"]["w_WC"].shape == (4, 128) and "b_C" in p["conv"]
    assert "bin_2E" not in p and "bout_D" not in p
    # A = -(1..N) per channel (S4D-real), D = 1.
    np.testing.assert_allclose(np.asarray(-jnp.exp(p["A_log_EN"])),
                               -np.tile(np.arange(1, 17, dtype=np.float32), (128, 1)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(p["D_E"]), np.ones(128, np.float32))
    # softplus(dt bias) = dt, log-uniform in [dt_min, dt_max]: spread over the range, never zero biases.
    dt = np.asarray(jax.nn.softplus(p["bdt_E"]))
    assert dt.min() >= cfg.dt_min * (1 - 1e-4) and dt.max() <= cfg.dt_max * (1 + 1e-4)
    log_dt = np.log(dt)
    assert log_dt.max() - log_dt.min() > 0.8 * (np.log(cfg.dt_max) - np.log(cfg.dt_min))
    assert np.all(p["bdt_E"] != 0) and len(np.unique(np.asarray(p["bdt_E"]))) == 128


def test_dt_floor_applies():
    cfg = MambaConfig(d_model=16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    dt = np.asarray(jax.nn.softplus(mamba.init(jax.random.key(0), cfg)["bdt_E"]))
    np.testing.assert_allclose(dt, 1e-3, rtol=1e-3)


def test_specs_keep_fp32_for_a_log_d_and_dt_bias_under_bf16_model():
    specs = mamba.param_specs(MambaConfig(d_model=16, proj_bias=True))
    kept = {k for k, s in specs.items() if isinstance(s, mamba.ParamSpec) and s.keep_dtype}
    assert kept == {"A_log_EN", "D_E", "bdt_E"}
    for path, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda v: isinstance(v, mamba.ParamSpec)):
        assert len(s.logical_axes) == len(s.shape), jax.tree_util.keystr(path)
    mcfg = _model_cfg(param_dtype="bfloat16")
    params = zoo.init(jax.random.key(0), mcfg)
    m = params["blocks"][1]["mixer"]
    assert m["A_log_EN"].dtype == m["D_E"].dtype == m["bdt_E"].dtype == jnp.float32
    assert m["win_D2E"].dtype == m["wdt_RE"].dtype == jnp.bfloat16


def test_registered_as_mixer():
    assert mixers.module_for(MambaConfig(d_model=8)) is mamba


@pytest.mark.parametrize("override,field", [
    (dict(d_state=0), "d_state"), (dict(d_conv=0), "d_conv"), (dict(expand=0), "expand"),
    (dict(dt_rank=0), "dt_rank"), (dict(chunk_size=0), "chunk_size"), (dict(scan="fast"), "scan"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"), (dict(dt_init_floor=0.0), "dt_init_floor"),
])
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        MambaConfig(d_model=16, **override)


# ---------------------------------------------------------------------------------------------
# In a model


def _model_cfg(**kw):
    attn = BlockConfig(mixer=AttentionConfig(d_model=32, n_heads=4), ffn=None)
    ssm = BlockConfig(mixer=MambaConfig(d_model=32, chunk_size=4), ffn=None)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, pattern=(attn, ssm), **kw)


@pytest.mark.slow
def test_hybrid_model_forward_equals_step():
    cfg = _model_cfg()
    params = zoo.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 64, jnp.int32)
    logits = zoo.forward(params, tokens, cfg=cfg)
    state = zoo.init_state(cfg, 2, 16)
    steps = []
    for t in range(tokens.shape[1]):
        out, state = zoo.step(params, tokens[:, t], state, cfg=cfg)
        steps.append(out)
    H.assert_close(jnp.stack(steps, axis=1), logits, H.FP32_TOL, "model step vs forward")


def test_config_is_hashable_static_argument():
    cfg = MambaConfig(d_model=16)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    f = jax.jit(mamba.forward, static_argnames=("cfg",))
    params = mamba.init(jax.random.key(0), cfg)
    for key in (1, 2, 3):
        f(params, inputs(jax.random.key(key)), cfg=cfg)
    assert f._cache_size() == 1


def test_auto_is_the_default_and_picks_sequential_on_cpu():
    """The default scan "auto" runs the per-token scan on CPU (measured fastest there): the same
    numbers as "sequential" exactly, values and gradients (the forms agree: tests above)."""
    assert MambaConfig(d_model=D_MODEL).scan == "auto"
    cfg, params = make(jax.random.key(40), scan="auto")
    x = inputs(jax.random.key(41))
    loss = lambda p, c: jnp.sum(jnp.sin(mamba.forward(p, x, cfg=c)[0]))  # noqa: E731
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grads = value_and_grad(params, cfg)
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks the Pallas kernel off CPU")
    seq_value, seq_grads = value_and_grad(params, dataclasses.replace(cfg, scan="sequential"))
    np.testing.assert_array_equal(value, seq_value)
    chex.assert_trees_all_equal(grads, seq_grads)
