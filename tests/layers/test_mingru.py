"""minGRU / minLSTM: every form against a per-token reference from the paper, the mixer protocol,
packing, bf16 inputs, long sequences and saturated gates."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from layers import mingru
from layers.checks import ConfigError
from layers.mingru import MinGRUConfig, MinLSTMConfig
from tests.layers import mixer_harness as H

D = 8
CELLS = {"gru": MinGRUConfig, "lstm": MinLSTMConfig}
# (form, chunk_size): the paper's one-shot log scan, the chunked log scan (16 does not divide the
# odd lengths, so the last chunk is partial) and the sequential lax.scan.
FORMS = {
    "log_scan": dict(form="log_scan", chunk_size=None),
    "log_scan_chunk16": dict(form="log_scan", chunk_size=16),
    "sequential": dict(form="sequential"),
}


def make(cell: str, form: str, **kw):
    return CELLS[cell](d_model=D, expand=1.5, **{**FORMS[form], **kw})


def random_params(cfg, key):
    """init, then every leaf (biases included) perturbed so no gate sits at its zero-bias default."""
    params = mingru.init(key, cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def setup(cfg, L, B=2, seed=0):
    kp, kx, ks = jax.random.split(jax.random.key(seed), 3)
    params = random_params(cfg, kp)
    x = jax.random.normal(kx, (B, L, D))
    state0 = H.random_state(mingru, cfg, B, ks, scale=1.0)  # mixed-sign, non-zero h0 and conv window
    return params, x, state0


# ---------------------------------------------------------------------------------------------
# Slow obvious reference: the paper's equations one token at a time, linear space.


def sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def g(v):
    return jnp.where(v >= 0, v + 0.5, sigmoid(v))


def reference(params, x, cfg, state0):
    """-> (y, final state). Conv taps, gates and the recurrence written out per token (a lax.scan
    over tokens only so that it compiles quickly; the body is one step of the paper's equations)."""
    W = cfg.conv_width

    def linear(u, name):
        bias = params.get("b" + name + "_E")
        out = u @ params["w" + name + "_DE"]
        return out if bias is None else out + bias[None, :]

    def one_token(carry, x_t):
        h, window = carry
        if W is not None:
            taps = jnp.concatenate([window, x_t[:, None, :]], axis=1)  # [B, W, D], oldest first
            u_t = params["conv"]["b_C"][None, :] + sum(
                taps[:, j] * params["conv"]["w_WC"][j][None, :] for j in range(W))
            window = taps[:, 1:]
        else:
            u_t = x_t
        h_tilde = g(linear(u_t, "h"))
        if isinstance(cfg, MinGRUConfig):
            z = sigmoid(linear(u_t, "z"))
            h = (1.0 - z) * h + z * h_tilde
        else:
            f = sigmoid(linear(u_t, "f"))
            i = sigmoid(linear(u_t, "i"))
            h = f / (f + i) * h + i / (f + i) * h_tilde
        return (h, window), h @ params["wo_ED"]

    window0 = state0["conv_BWD"] if W is not None else jnp.zeros(())
    (h, window), y_LBD = jax.lax.scan(one_token, (state0["h_BE"], window0), jnp.moveaxis(x, 1, 0))
    state = {"h_BE": h}
    if W is not None:
        state["conv_BWD"] = window
    return jnp.moveaxis(y_LBD, 0, 1), state


def loss_fn(run, y_weight, h_weight):
    """A scalar touching every output and the final state, for gradient checks."""
    def loss(params, x, state0):
        y, s = run(params, x, state0)
        return jnp.sum(y * y_weight) + jnp.sum(s["h_BE"] * h_weight), (y, s)
    return loss


def weights(L, B=2, E=12):
    kw, kh = jax.random.split(jax.random.key(7))
    return jax.random.normal(kw, (B, L, D)), jax.random.normal(kh, (B, E))


@functools.lru_cache(maxsize=None)
def reference_case(cell, L, with_grads=True):
    """Params, inputs, state and the reference's outputs and gradients; the same for every form
    (the form does not change the parameters), so computed once per cell and length."""
    cfg = make(cell, "sequential")
    params, x, state0 = setup(cfg, L)
    loss = loss_fn(lambda p, x, s: reference(p, x, cfg, s), *weights(L))
    if not with_grads:
        y, s = jax.jit(lambda p, x, s: reference(p, x, cfg, s))(params, x, state0)
        return params, x, state0, y, s, None
    grads, (y, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, state0)
    return params, x, state0, y, s, grads


class Jitted:
    """The mixer module with forward and step jitted (cfg static), for the shared harness."""
    forward = staticmethod(jax.jit(mingru.forward, static_argnames=("cfg",)))
    step = staticmethod(jax.jit(mingru.step, static_argnames=("cfg",)))
    init_state = staticmethod(mingru.init_state)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_forms_match_reference(cell, form):
    """Values, final state and gradients (params, inputs, initial state) at L = 63. L = 15 is
    checked against the reference in test_protocol, sharing its compiled forward."""
    L = 63
    cfg = make(cell, form)
    params, x, state0, y_ref, s_ref, grads_ref = reference_case(cell, L)
    loss = loss_fn(lambda p, x, s: mingru.forward(p, x, cfg=cfg, state=s), *weights(L))
    grads, (y, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, state0)
    H.assert_close(y, y_ref, what="output")
    H.assert_trees_close(s, s_ref, what="final state")
    H.assert_trees_close(grads, grads_ref, what="grad")


@pytest.mark.parametrize("cell", list(CELLS))
def test_without_conv_and_without_biases(cell):
    cfg = make(cell, "log_scan", conv_width=None, use_bias=False, out_bias=True)
    params, x, state0 = setup(cfg, 15)
    assert "conv" not in params and "bh_E" not in params and "conv_BWD" not in state0
    y, s = Jitted.forward(params, x, cfg=cfg, state=state0)
    y_ref, s_ref = jax.jit(lambda p, x, s: reference(p, x, cfg, s))(
        {k: v for k, v in params.items() if k != "bo_D"}, x, state0)
    H.assert_close(y, y_ref + params["bo_D"][None, None, :], what="output")
    H.assert_trees_close(s, s_ref)


def test_log_scan_with_negative_initial_state():
    """The log-space scan takes log of positive values only; h0 < 0 (and h0 of either sign within
    one row) must still come out exactly, with and without segment resets."""
    B, L, E = 2, 13, 5
    ka, kb, kh = jax.random.split(jax.random.key(3), 3)
    log_a = -jax.nn.softplus(jax.random.normal(ka, (B, L, E)))
    log_b = jax.random.normal(kb, (B, L, E))
    h0 = -3.0 * jnp.abs(jax.random.normal(kh, (B, E))) * jnp.array([1.0, -1.0, 1.0, -1.0, 1.0])[None, :]
    reset = jnp.zeros((B, L), bool).at[1, 6].set(True)
    @jax.jit
    def scans(r):
        return (mingru.sequential_scan(h0, log_a, log_b, r), mingru.log_scan(h0, log_a, log_b, r),
                mingru.chunked_log_scan(h0, log_a, log_b, r, 4))

    for r in (None, reset):
        want, h, h_chunked = scans(r)
        H.assert_close(h, want, what="log_scan")
        H.assert_close(h_chunked, want, what="chunked")
    # Without a reset, the first steps carry h0's sign.
    h = scans(None)[1]
    manual = jnp.exp(log_a[:, 0]) * h0 + jnp.exp(log_b[:, 0])
    H.assert_close(h[:, 0], manual, what="first token")

    # The log scan's custom gradient (adjoint recurrence), with a reset, against autodiff of
    # the sequential scan.
    w = jax.random.normal(jax.random.key(4), (B, L, E))

    @jax.jit
    def grads(r):
        def loss(scan):
            return lambda h0, la, lb: jnp.sum(scan(h0, la, lb) * w)
        args = (h0, log_a, log_b)
        return (jax.grad(loss(lambda *a: mingru.sequential_scan(*a, r)), argnums=(0, 1, 2))(*args),
                jax.grad(loss(lambda *a: mingru.log_scan(*a, r)), argnums=(0, 1, 2))(*args),
                jax.grad(loss(lambda *a: mingru.chunked_log_scan(*a, r, 4)), argnums=(0, 1, 2))(*args))

    for r in (None, reset):
        want, got, got_chunked = grads(r)
        H.assert_trees_close(got, want, what="log_scan grad")
        H.assert_trees_close(got_chunked, want, what="chunked grad")


# The chunked log scan is left out here: at these lengths it is one chunk, i.e. plain log_scan
# (its chunk carry is checked with packing below, and against the reference at L = 63).
@pytest.mark.parametrize("form", ["log_scan", "sequential"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_protocol(cell, form):
    cfg = make(cell, form)
    params, x, state0, y_ref, s_ref, _ = reference_case(cell, 15, with_grads=False)
    y, s = Jitted.forward(params, x, cfg=cfg, state=state0)
    H.assert_close(y, y_ref, what="output at L=15")
    H.assert_trees_close(s, s_ref, what="final state at L=15")
    H.check_step_equivalence(Jitted, cfg, params, x, state0)
    H.check_split_equivalence(Jitted, cfg, params, x, 7, state0)
    x1 = jax.random.normal(jax.random.key(5), (1, 21, D))
    H.check_packing(Jitted, cfg, params, x1, [5, 9, 7])
    y, s = Jitted.forward(params, x, cfg=cfg)
    assert s is None and y.shape == x.shape


@pytest.mark.parametrize("cell", list(CELLS))
def test_packing_matches_between_forms(cell):
    """Segment resets agree between the scans, in a batch whose rows split differently."""
    seg = jnp.array([[1] * 4 + [2] * 6 + [3] * 5, [1] * 11 + [2] * 4], jnp.int32)
    outs = []
    for form in FORMS:
        cfg = make(cell, form, chunk_size=4 if form == "log_scan_chunk16" else FORMS[form].get("chunk_size"))
        params, x, state0 = setup(cfg, 15)
        outs.append(Jitted.forward(params, x, cfg=cfg, state=state0, segment_ids=seg))
    for y, s in outs[1:]:
        H.assert_close(y, outs[0][0], what="output")
        H.assert_trees_close(s, outs[0][1])


@pytest.mark.parametrize("cell", list(CELLS))
def test_state_constant_and_registered_shape(cell):
    cfg = make(cell, "log_scan")
    H.check_state_constant(cfg)
    s = mingru.init_state(cfg, 3, 100, jnp.bfloat16)
    assert s["h_BE"].shape == (3, 12) and s["h_BE"].dtype == jnp.float32
    assert s["conv_BWD"].shape == (3, 3, D) and s["conv_BWD"].dtype == jnp.float32


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_bf16_inputs_fp32_state(cell, form):
    cfg = make(cell, form)
    params, x, state0, y_ref, s_ref, _ = reference_case(cell, 63)
    y, s = Jitted.forward(params, x.astype(jnp.bfloat16), cfg=cfg, state=state0)
    assert y.dtype == jnp.bfloat16 and s["h_BE"].dtype == jnp.float32
    H.assert_close(y, y_ref, H.BF16_TOL, "bf16 output")
    H.assert_close(s["h_BE"], s_ref["h_BE"], H.BF16_TOL, "bf16 state")
    y_t, s_t = Jitted.step(params, x[:, 0].astype(jnp.bfloat16), state0, cfg=cfg)
    assert y_t.dtype == jnp.bfloat16 and s_t["h_BE"].dtype == jnp.float32


def test_params_have_logical_axes():
    for cell in CELLS:
        cfg = make(cell, "log_scan")
        specs = mingru.param_specs(cfg)
        for spec in jax.tree.leaves(specs, is_leaf=lambda v: hasattr(v, "logical_axes")):
            assert len(spec.logical_axes) == len(spec.shape) and all(spec.logical_axes)
        assert specs["wh_DE"].logical_axes == ("embed", "mlp")
        assert specs["wo_ED"].logical_axes == ("mlp", "embed")
    assert set(mingru.param_specs(make("lstm", "log_scan"))) >= {"wf_DE", "wi_DE", "wh_DE"}
    assert cfg.d_hidden == 12 and hash(cfg) == hash(dataclasses.replace(cfg))


@pytest.mark.parametrize("field, kwargs", [
    ("d_model", dict(d_model=0)),
    ("expand", dict(expand=0)),
    ("expand", dict(expand=1.3)),   # 8 * 1.3 is not a whole number
    ("conv_width", dict(conv_width=1)),
    ("form", dict(form="parallel")),
    ("chunk_size", dict(chunk_size=0)),
])
@pytest.mark.parametrize("cell", list(CELLS))
def test_config_errors_name_the_field(cell, field, kwargs):
    with pytest.raises(ConfigError, match=rf"{CELLS[cell].__name__}\.{field}"):
        CELLS[cell](**{"d_model": D, **kwargs})


def test_forward_rejects_wrong_width():
    cfg = make("gru", "log_scan")
    params = mingru.init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="x_BLD"):
        mingru.forward(params, jnp.ones((1, 4, D + 1)), cfg=cfg)


# ---------------------------------------------------------------------------------------------
# Long sequences (slow)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
@pytest.mark.parametrize("cell", list(CELLS))
def test_long_sequences_forms_agree(cell, L):
    """At long lengths the sequential form (checked against the reference above) is the yardstick."""
    results = {}
    for form in FORMS:
        cfg = make(cell, form)
        params, x, state0 = setup(cfg, L, B=1)
        fwd = jax.jit(lambda p, x, s, cfg=cfg: mingru.forward(p, x, cfg=cfg, state=s))
        grad = jax.jit(jax.grad(lambda p, x, s, fwd=fwd: jnp.sum(fwd(p, x, s)[0] ** 2)))
        results[form] = (fwd(params, x, state0), grad(params, x, state0))
    for form in ("log_scan", "log_scan_chunk16"):
        (y, s), gr = results[form]
        (y_seq, s_seq), g_seq = results["sequential"]
        H.assert_close(y, y_seq, what=f"{form} output")
        H.assert_trees_close(s, s_seq, what=f"{form} state")
        H.assert_trees_close(gr, g_seq, what=f"{form} grad")


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_saturated_gates_stay_finite_at_8192(cell, form):
    """Gate and candidate pre-activations of +-30 (random sign per token and channel) over 8192
    tokens: forward and backward stay finite; the chunked log scan also stays accurate."""
    L = 8192
    cfg = CELLS[cell](d_model=D, expand=1, conv_width=None, use_bias=False, **FORMS[form])
    params = mingru.init(jax.random.key(0), cfg)
    params = {k: (jnp.eye(D) if k.endswith("_DE") else v) for k, v in params.items()}
    signs = jnp.sign(jax.random.normal(jax.random.key(1), (1, L, D)))
    x = 30.0 * signs  # k_* = x W_* = +-30 exactly
    state0 = H.random_state(mingru, cfg, 1, jax.random.key(2), scale=2.0)

    def loss(p, x, s):
        y, s_out = mingru.forward(p, x, cfg=cfg, state=s)
        return jnp.mean(y ** 2) + jnp.mean(s_out["h_BE"] ** 2), y

    (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, state0)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(y)))
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    if form != "sequential":
        seq = dataclasses.replace(cfg, form="sequential")
        y_seq, _ = jax.jit(lambda p, x, s: mingru.forward(p, x, cfg=seq, state=s))(params, x, state0)
        # One scan over 8192 saturated tokens drives |cumsum log a| to ~1e5, where fp32 keeps
        # ~1e-2 of the log: the chunked form is the accurate one.
        tol = H.FP32_TOL if cfg.chunk_size is not None else 5e-2
        H.assert_close(y, y_seq, tol, f"{form} vs sequential")
