"""DeltaNet / Gated DeltaNet: both forms of the delta rule against a per-token reference written
from the paper equations (values and gradients), the layer against a hand composition, and the
mixer protocol (step, split, packing, constant state, bf16)."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import deltanet
from layers.checks import ConfigError
from layers.deltanet import DeltaNetConfig, delta_rule
from layers.params import ParamSpec
from tests.layers import mixer_harness as MH



# ----- the pure delta rule -----


def reference_delta_rule(q, k, v, beta, g, h0, reset, scale):
    """Per-token recurrence straight from the papers, S [K, V] per head:
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale S_t^T q_t,
    alpha_t = exp(g_t) (1 without a gate), 0 where a document starts. The transition matrix is
    built explicitly (unlike the module's delta form); lax.scan only to keep compiles short."""
    B, L, H, K = q.shape
    eye = jnp.eye(K, dtype=jnp.float32)[None, None]
    alpha = jnp.ones((B, L, H), jnp.float32) if g is None else jnp.exp(g)
    if reset is not None:
        alpha = jnp.where(reset[:, :, None], 0.0, alpha)

    def token(S, xs):
        qt, kt, vt, bt, at = xs
        bt = bt[:, :, None, None]
        transition = eye - bt * jnp.einsum("bhi,bhj->bhij", kt, kt)
        S = (at[:, :, None, None] * jnp.einsum("bhij,bhjv->bhiv", transition, S)
             + bt * jnp.einsum("bhi,bhv->bhiv", kt, vt))
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, beta, alpha))
    S, o = jax.lax.scan(token, h0, xs)
    return jnp.moveaxis(o, 0, 1), S


def _l2(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# Test data comes from NumPy: eager jax.random calls compile once per shape, and those compiles
# cost more CPU time than the tests themselves.
def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def make_inputs(seed, B=2, L=15, H=2, K=8, V=6, gate_scale=1.0, gated=True, reset_rate=0.0):
    """q, k (unit norm), v, beta in (0, 1), g = logsigmoid(randn) / gate_scale, h0, resets."""
    rng = np.random.default_rng(seed)
    q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (_randn(rng, B, L, H, K),
                                                                   _randn(rng, B, L, H, K)))
    v = _randn(rng, B, L, H, V)
    beta = 1.0 / (1.0 + np.exp(-_randn(rng, B, L, H)))
    g = -np.logaddexp(0.0, -_randn(rng, B, L, H)) / gate_scale if gated else None
    h0 = _randn(rng, B, H, K, V)
    reset = rng.uniform(size=(B, L)) < reset_rate if reset_rate else None
    as_jax = lambda x: None if x is None else jnp.asarray(x if x.dtype == bool else x.astype(np.float32))
    return tuple(as_jax(x) for x in (q, k, v, beta, g, h0, reset))


@functools.cache
def _compiled_outputs_and_grads(fn):
    @jax.jit
    def run(d, reset, cot_o, cot_h):
        def loss(d):
            o, h = fn(d["q"], d["k"], d["v"], d["beta"], d.get("g"), d["h0"], reset)
            return jnp.sum(o * cot_o) + jnp.sum(h * cot_h), (o, h)
        grads, (o, h) = jax.grad(loss, has_aux=True)(d)
        return o, h, grads
    return run


def _outputs_and_grads(fn, inputs, seed=99):
    """(o, h) and the gradients of a random linear functional of them w.r.t. every float input,
    in one compiled function (compiles dominate these tests' time)."""
    q, k, v, beta, g, h0, reset = inputs
    rng = np.random.default_rng(seed)
    cot_o, cot_h = jnp.asarray(_randn(rng, *v.shape)), jnp.asarray(_randn(rng, *h0.shape))
    d = dict(q=q, k=k, v=v, beta=beta, h0=h0, **({} if g is None else {"g": g}))
    return _compiled_outputs_and_grads(fn)(d, reset, cot_o, cot_h)


SCALE = 0.35


def _ref(q, k, v, beta, g, h0, reset):
    return reference_delta_rule(q, k, v, beta, g, h0, reset, SCALE)


@functools.cache
def _ours(form, chunk_size):
    """delta_rule with the reference's calling convention, jitted once per (form, chunk)."""
    def fn(q, k, v, beta, g, h0, reset):
        return delta_rule(q, k, v, beta, g, h0, reset, form=form, chunk_size=chunk_size, scale=SCALE)
    return jax.jit(fn)


_ref_jit = jax.jit(_ref)
_delta_rule = jax.jit(delta_rule, static_argnames=("form", "chunk_size", "scale"))
_reference = jax.jit(reference_delta_rule, static_argnames=("scale",))


@pytest.mark.parametrize("gated", [True, False])
def test_forms_match_reference_values_and_gradients(gated):
    """L = 63 with a random h0 and packed-document resets: recurrent and chunked (C = 16, so the
    last chunk is padded) against the reference, values and gradients."""
    inputs = make_inputs(63 + gated, L=63, gated=gated, reset_rate=0.1)
    o_ref, h_ref, g_ref = _outputs_and_grads(_ref, inputs)
    assert set(g_ref) == {"q", "k", "v", "beta", "h0"} | ({"g"} if gated else set())
    for form, chunk_size in [("recurrent", 64), ("chunked", 16)]:
        o, h, g_ours = _outputs_and_grads(_ours(form, chunk_size), inputs)
        assert h.dtype == jnp.float32
        MH.assert_close(o, o_ref, 1e-5, f"{form}{chunk_size} o")
        MH.assert_close(h, h_ref, 1e-5, f"{form}{chunk_size} h")
        for n in g_ref:
            MH.assert_close(g_ours[n], g_ref[n], 1e-4, f"{form}{chunk_size} d{n}")


def test_forms_match_reference_length_15():
    """Length 15: chunks of 4 (padded), one chunk longer than the sequence (C = 64), recurrent."""
    inputs = make_inputs(15, L=15)
    o_ref, h_ref = _ref_jit(*inputs)
    for form, chunk_size in [("recurrent", 64), ("chunked", 4), ("chunked", 64)]:
        o, h = _ours(form, chunk_size)(*inputs)
        MH.assert_close(o, o_ref, 1e-5, f"{form}{chunk_size} o")
        MH.assert_close(h, h_ref, 1e-5, f"{form}{chunk_size} h")


@pytest.mark.parametrize("gate_scale", [0.1, 1.0, 10.0])
def test_chunked_gate_strengths(gate_scale):
    """g = logsigmoid(randn) / {0.1, 1, 10}: from strong to weak decay."""
    inputs = make_inputs(7, L=63, gate_scale=gate_scale)
    o, h = _ours("chunked", 16)(*inputs)
    o_ref, h_ref = _ref_jit(*inputs)
    MH.assert_close(o, o_ref, 1e-5, "o")
    MH.assert_close(h, h_ref, 1e-5, "h")


def test_zero_initial_state_and_no_reset_defaults():
    q, k, v, beta, g, _, _ = make_inputs(3, L=15)
    o, h = _delta_rule(q, k, v, beta, g, form="chunked", chunk_size=4)
    o_ref, h_ref = _reference(q, k, v, beta, g, jnp.zeros(h.shape), None, 1.0)
    MH.assert_close(o, o_ref, 1e-5, "o")
    MH.assert_close(h, h_ref, 1e-5, "h")


def test_reset_equals_separate_documents():
    """A reset at t equals restarting from a zero state at t (and h0 does not leak past it)."""
    q, k, v, beta, g, h0, _ = make_inputs(4, B=1, L=21)
    reset = jnp.zeros((1, 21), bool).at[0, 8].set(True)
    o, h = _delta_rule(q, k, v, beta, g, h0, reset, form="chunked", chunk_size=16)
    o1, _ = _reference(q[:, :8], k[:, :8], v[:, :8], beta[:, :8], g[:, :8], h0, None, 1.0)
    o2, h2 = _reference(q[:, 8:], k[:, 8:], v[:, 8:], beta[:, 8:], g[:, 8:], jnp.zeros_like(h0), None, 1.0)
    MH.assert_close(o, jnp.concatenate([o1, o2], axis=1), 1e-5, "o")
    MH.assert_close(h, h2, 1e-5, "h")


def test_bf16_inputs_fp32_state():
    inputs = make_inputs(5, L=63)
    q, k, v, beta, g, h0, _ = inputs
    lo = [a.astype(jnp.bfloat16) for a in (q, k, v, beta, g)]
    up = [a.astype(jnp.float32) for a in lo]
    for form in ("chunked", "recurrent"):
        o, h = _delta_rule(*lo, h0, form=form, chunk_size=16)
        assert o.dtype == jnp.bfloat16 and h.dtype == jnp.float32
        o_ref, h_ref = _reference(*up, h0, None, 1.0)
        MH.assert_close(o, o_ref, MH.BF16_TOL, f"{form} o")
        MH.assert_close(h, h_ref, MH.BF16_TOL, f"{form} h")


@pytest.mark.slow
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("L", [500, 1000])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_long_odd_lengths_chunked_equals_recurrent(L, chunk_size, gated):
    """The recurrent form is checked against the reference above; at long lengths compare the
    chunked form with it (values and gradients), with resets and a random h0."""
    inputs = make_inputs(L + chunk_size, B=1, L=L, H=2, K=16, V=16, gated=gated, reset_rate=0.01)
    o, h, g_chk = _outputs_and_grads(_ours("chunked", chunk_size), inputs)
    o_ref, h_ref, g_rec = _outputs_and_grads(_ours("recurrent", 64), inputs)
    MH.assert_close(o, o_ref, 1e-4, "o")
    MH.assert_close(h, h_ref, 1e-4, "h")
    for n in g_rec:
        MH.assert_close(g_chk[n], g_rec[n], 1e-3, f"d{n}")


@pytest.mark.slow
def test_long_against_reference():
    inputs = make_inputs(11, B=1, L=500, H=2, K=8, V=8, reset_rate=0.01)
    o, h = _ours("chunked", 64)(*inputs)
    o_ref, h_ref = _ref_jit(*inputs)
    MH.assert_close(o, o_ref, 1e-4, "o")
    MH.assert_close(h, h_ref, 1e-4, "h")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_stress_8192_extreme_decays_finite(form):
    """Decays from ~1 (g = -1e-7) to 0 (g = -1e4), a huge beta spread, no decay at all on one
    head: forward and backward stay finite, and the forms agree."""
    B, L, H, K, V = 1, 8192, 3, 16, 16
    q, k, v, beta, _, h0, _ = make_inputs(13, B=B, L=L, H=H, K=K, V=V, gated=False)
    kg = jax.random.split(jax.random.key(14), 2)
    g = jax.nn.log_sigmoid(jax.random.normal(kg[0], (B, L, H))) / 0.01  # strong: ~ -70 on average
    g = g.at[:, :, 1].set(-1e-7)  # almost no decay
    g = g.at[:, ::97, 1].set(-1e4)  # and sudden total forgetting
    g = g.at[:, :, 2].set(0.0)  # none: plain delta rule over 8192 tokens
    beta = jnp.where(jax.random.uniform(kg[1], beta.shape) < 0.5, 1e-6, 1.0 - 1e-6)
    o, h, grads = _outputs_and_grads(_ours(form, 64), (q, k, v, beta, g, h0, None))
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(h)).all()
    for n, grad in grads.items():
        assert np.isfinite(np.asarray(grad)).all(), n
    if form == "chunked":
        o_rec, h_rec = _ours("recurrent", 64)(q, k, v, beta, g, h0, None)
        MH.assert_close(o, o_rec, 1e-3, "o")
        MH.assert_close(h, h_rec, 1e-3, "h")


def test_delta_rule_input_errors_name_the_argument():
    q, k, v, beta, g, h0, _ = make_inputs(0)
    with pytest.raises(ValueError, match="k_BLHK"):
        delta_rule(q, k[:, :-1], v, beta, g)
    with pytest.raises(ValueError, match="beta_BLH"):
        delta_rule(q, k, v, beta[:, :, :1], g)
    with pytest.raises(ValueError, match="h0_BHKV"):
        delta_rule(q, k, v, beta, g, h0[..., :2])
    with pytest.raises(ConfigError, match="form"):
        delta_rule(q, k, v, beta, g, form="parallel")


# ----- the layer -----

D = 32
CONFIGS = {
    "gated_chunked": DeltaNetConfig(d_model=D, n_heads=2, head_dim=8, v_head_dim=12, gated=True,
                                    chunk_size=4),
    "plain_chunked": DeltaNetConfig(d_model=D, n_heads=4, chunk_size=4),
    "plain_no_conv": DeltaNetConfig(d_model=D, n_heads=2, use_short_conv=False, chunk_size=8),
}


# The harness calls module.forward op by op; a jitted forward keeps these tests' time down.
JIT = types.SimpleNamespace(forward=jax.jit(deltanet.forward, static_argnames=("cfg",)),
                            step=deltanet.step, init_state=deltanet.init_state)


def _params(cfg, seed=0):
    """Random parameters distributed like deltanet.init's (checked in test_param_specs_and_init),
    drawn with NumPy; the output norm scale is random too so the tests see it."""
    rng = np.random.default_rng(seed)

    def one(path, spec):
        name = jax.tree_util.keystr(path)
        if "A_log" in name:
            x = np.log(rng.uniform(1.0, 16.0, spec.shape))
        elif "dt_bias" in name:
            dt = np.exp(rng.uniform(np.log(cfg.dt_min), np.log(cfg.dt_max), spec.shape))
            x = dt + np.log(-np.expm1(-dt))
        elif "o_norm" in name:
            x = 1.0 + 0.3 * _randn(rng, *spec.shape)
        else:  # fan-in scaled: every weight's input axes lead (wo_HVD has two)
            fan_in = spec.shape[0] * (spec.shape[1] if "wo_HVD" in name else 1)
            x = _randn(rng, *spec.shape) / np.sqrt(fan_in)
        return jnp.asarray(np.asarray(x, np.float32))

    return jax.tree_util.tree_map_with_path(one, deltanet.param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def _x(seed, B=2, L=15, dtype=jnp.float32):
    return jnp.asarray(_randn(np.random.default_rng(100 + seed), B, L, D)).astype(dtype)


def _random_state(cfg, B, seed, scale=0.5):
    """A random non-zero state shaped like init_state's (the harness's helper, in NumPy)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda z: jnp.asarray(scale * _randn(rng, *z.shape)),
                        deltanet.init_state(cfg, B, 1))


def reference_layer(params, x, cfg, h0=None):
    """The layer composed by hand: loops for the convs, the reference recurrence."""
    B, L, _ = x.shape
    H, K, V = cfg.n_heads, cfg.head_dim, cfg.v_head_dim

    def feat(w, conv, dim):
        y = jnp.einsum("bld,dhk->blhk", x, w).reshape(B, L, H * dim)
        if conv is not None:
            W = conv.shape[0]
            acc = jnp.zeros_like(y)
            for j in range(W):  # y[t] = sum_j w[j] x[t - (W-1) + j]
                shift = W - 1 - j
                tap = jnp.pad(y, ((0, 0), (shift, 0), (0, 0)))[:, :L]
                acc = acc + tap * conv[j][None, None, :]
            y = acc
        return jax.nn.silu(y.reshape(B, L, H, dim))

    conv = (lambda n: params[n]["w_WC"]) if cfg.use_short_conv else (lambda n: None)
    q = _l2(feat(params["wq_DHK"], conv("conv_q"), K))
    k = _l2(feat(params["wk_DHK"], conv("conv_k"), K))
    v = feat(params["wv_DHV"], conv("conv_v"), V)
    beta = jax.nn.sigmoid(jnp.einsum("bld,dh->blh", x, params["wbeta_DH"]))
    g = None
    if cfg.gated:
        a = jnp.einsum("bld,dh->blh", x, params["wa_DH"]) + params["dt_bias_H"][None, None]
        g = -jnp.exp(params["A_log_H"])[None, None] * jax.nn.softplus(a)
    h0 = jnp.zeros((B, H, K, V)) if h0 is None else h0
    o, _ = reference_delta_rule(q, k, v, beta, g, h0, None, K ** -0.5)
    o = o / jnp.sqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + cfg.norm_eps)
    o = o * params["o_norm"]["scale"][None, None, None]
    if cfg.gated:
        o = o * jax.nn.silu(jnp.einsum("bld,dhv->blhv", x, params["wgate_DHV"]))
    return jnp.einsum("blhv,hvd->bld", o, params["wo_HVD"])


@pytest.mark.parametrize("name", ["gated_chunked", "plain_no_conv"])
def test_layer_matches_hand_composition(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    x = _x(0)
    y, none_state = JIT.forward(params, x, cfg=cfg)
    assert none_state is None
    want = jax.jit(reference_layer, static_argnames=("cfg",))(params, x, cfg=cfg)
    MH.assert_close(y, want, 1e-4, "layer")


@pytest.mark.parametrize("name", ["gated_chunked", "plain_chunked", "plain_no_conv"])
def test_step_equivalence(name):
    cfg = CONFIGS[name]
    params = _params(cfg, 1)
    state0 = _random_state(cfg, 2, 2)
    MH.check_step_equivalence(JIT, cfg, params, _x(1), state0)


@pytest.mark.parametrize("name", ["gated_chunked"])
def test_split_equivalence(name):
    cfg = CONFIGS[name]
    params = _params(cfg, 2)
    state0 = _random_state(cfg, 2, 3)
    MH.check_split_equivalence(JIT, cfg, params, _x(2), 7, state0)


@pytest.mark.parametrize("name", ["gated_chunked"])
def test_packing(name):
    cfg = CONFIGS[name]
    MH.check_packing(JIT, cfg, _params(cfg, 3), _x(3, B=1, L=21), [5, 9, 7])


@pytest.mark.parametrize("name", ["gated_chunked", "plain_no_conv"])
def test_state_constant(name):
    MH.check_state_constant(CONFIGS[name])
    state = deltanet.init_state(CONFIGS[name], 2, 7, jnp.bfloat16)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))


def test_layer_forms_agree():
    """Chunked and recurrent layers agree with a state and packed documents."""
    cfg = CONFIGS["gated_chunked"]
    rec = dataclasses.replace(cfg, form="recurrent")
    params = _params(cfg, 4)
    x = _x(4, L=21)
    seg = jnp.asarray(np.repeat([[1, 1, 2, 3]], [5, 4, 9, 3], axis=1).reshape(1, 21).repeat(2, 0), jnp.int32)
    state0 = _random_state(cfg, 2, 6)
    y1, s1 = JIT.forward(params, x, cfg=cfg, state=state0, segment_ids=seg)
    y2, s2 = JIT.forward(params, x, cfg=rec, state=state0, segment_ids=seg)
    MH.assert_close(y1, y2, 1e-5, "y")
    MH.assert_trees_close(s1, s2, 1e-5)


@pytest.mark.parametrize("name", ["gated_chunked", "plain_chunked"])
def test_layer_bf16(name):
    """bf16 activations, fp32 state: close to the fp32 layer on the same inputs. The weights are
    made bf16-representable first: the layer computes its matmuls in the activation dtype, and
    rounding fp32 weights to bf16 is a storage-precision effect, not the one tested here."""
    cfg = CONFIGS[name]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), _params(cfg, 5))
    x16 = _x(5, L=15, dtype=jnp.bfloat16)
    state0 = _random_state(cfg, 2, 7)
    y16, s16 = JIT.forward(params, x16, cfg=cfg, state=state0)
    y32, s32 = JIT.forward(params, x16.astype(jnp.float32), cfg=cfg, state=state0)
    assert y16.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(s16))
    MH.assert_close(y16, y32, MH.BF16_TOL, "y")
    MH.assert_close(s16["h_BHKV"], s32["h_BHKV"], MH.BF16_TOL, "h")


def test_layer_gradients_finite_and_causal():
    """Output t depends on inputs up to t only; every parameter receives a finite gradient."""
    cfg = CONFIGS["gated_chunked"]
    params = _params(cfg, 6)
    x = _x(6)
    t = 6
    gp, gx = jax.jit(jax.grad(lambda p, x: jnp.sum(deltanet.forward(p, x, cfg=cfg)[0][:, t]),
                              argnums=(0, 1)))(params, x)
    gx = np.asarray(gx)
    assert np.all(gx[:, t + 1:] == 0.0)
    assert np.all(np.abs(gx[:, :t + 1]).sum(-1) > 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(gp):
        leaf = np.asarray(leaf)
        assert np.isfinite(leaf).all() and np.abs(leaf).sum() > 0, jax.tree_util.keystr(path)


def test_param_specs_and_init():
    cfg = CONFIGS["gated_chunked"]
    specs = deltanet.param_specs(cfg)
    assert specs["A_log_H"].keep_dtype and specs["dt_bias_H"].keep_dtype
    assert specs["wq_DHK"].logical_axes == ("embed", "heads", "head_dim")
    params = deltanet.init(jax.random.key(0, impl="rbg"), cfg)  # rbg: cheaper to compile on CPU
    assert jax.tree.structure(params) == jax.tree.structure(_params(cfg))
    for p, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, ParamSpec))):
        assert p.shape == spec.shape and p.dtype == jnp.float32
    dt = np.asarray(jax.nn.softplus(params["dt_bias_H"]))
    assert np.all((dt >= cfg.dt_min * 0.999) & (dt <= cfg.dt_max * 1.001))
    A = np.exp(np.asarray(params["A_log_H"]))
    assert np.all((A >= 1.0) & (A <= 16.0))
    assert "wa_DH" not in deltanet.param_specs(CONFIGS["plain_chunked"])


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(d_model=32, n_heads=0), "n_heads"),
    (dict(d_model=32, n_heads=4, head_dim=0), "head_dim"),
    (dict(d_model=32, n_heads=4, v_head_dim=-1), "v_head_dim"),
    (dict(d_model=32, n_heads=4, form="parallel"), "form"),
    (dict(d_model=32, n_heads=4, chunk_size=0), "chunk_size"),
    (dict(d_model=32, n_heads=4, conv_width=0), "conv_width"),
    (dict(d_model=32, n_heads=4, gated="yes"), "gated"),
    (dict(d_model=32, n_heads=4, norm_eps=0.0), "norm_eps"),
    (dict(d_model=32, n_heads=4, dt_min=0.5, dt_max=0.1), "dt_min"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DeltaNetConfig(**kwargs)


def test_wrong_input_width_names_the_argument():
    cfg = CONFIGS["plain_chunked"]
    with pytest.raises(ValueError, match="x_BLD"):
        deltanet.forward(_params(cfg), jnp.ones((1, 3, D + 1)), cfg=cfg)


# ----- the matmul-only triangular inverse of the chunked form -----


@pytest.mark.parametrize("C", [3, 64])
def test_unit_lower_inverse_matches_triangular_solve(C):
    """(I + M)^{-1} by the doubling product equals XLA's triangular solve, values and gradients,
    for M as the chunked form builds it: beta_i k_i.k_j below the diagonal, unit keys (K = 8)."""
    kk, kb, kr = jax.random.split(jax.random.key(C), 3)
    k = jax.random.normal(kk, (2, 3, C, 8), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.random.uniform(kb, (2, 3, C, 1), jnp.float32, 0.05, 0.95)
    m = jnp.tril(beta * jnp.einsum("...ik,...jk->...ij", k, k), -1)
    r = jax.random.normal(kr, (2, 3, C, C), jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(C, dtype=jnp.float32), m.shape)

    def solved(m):
        return jax.lax.linalg.triangular_solve(m + eye, eye, left_side=True, lower=True, unit_diagonal=True)

    @jax.jit
    def both(m):
        fast = deltanet._unit_lower_inverse(m)
        grad_fast = jax.grad(lambda m: jnp.sum(deltanet._unit_lower_inverse(m) * r))(m)
        grad_ref = jax.grad(lambda m: jnp.sum(solved(m) * r))(m)
        return fast, solved(m), grad_fast, grad_ref

    fast, ref, grad_fast, grad_ref = both(m)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.tril(grad_fast, -1), jnp.tril(grad_ref, -1), rtol=1e-4, atol=1e-4)
