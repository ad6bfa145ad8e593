"""Context parallelism for the matrix-transition recurrences (sharding/context_delta.py): under the
`cp` rules, layers.deltanet.delta_rule and layers.rwkv7.recurrence split the sequence over 4
devices, pass [K, K + V] chunk maps by a prefix scan, and equal the unsharded recurrence: outputs,
final state and gradients w.r.t. every input, packed rows whose documents start inside a device's
chunk and on a device boundary, a nonzero initial state, both forms, bf16 inputs; whole models
(Gated DeltaNet, RWKV-7) give the single-device loss and gradients without gathering activations
over the sequence. Default run: the chunked forms and the premise test; the rest under -m slow.
The identity-column premise is checked on its own: the augmented scan's last K state columns are
the product of the explicit per-token transition matrices, and exactly zero past a reset."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import zoo
from layers import deltanet, rwkv7
from layers import params as P
from sharding import context_delta
from zoo.train import loss_fn

B, L, H, K, V = 2, 16, 2, 4, 3
MESH = "fsdp=2,sequence=4"  # 4 tokens per sequence device
# Row 0: documents start at 3 (inside device 0), 8 (device boundary) and 13; row 1: one document.
SEG = np.asarray([[1] * 3 + [2] * 5 + [3] * 5 + [4] * 3, [1] * L], np.int32)
RESET = np.concatenate([np.zeros((B, 1), bool), SEG[:, 1:] != SEG[:, :-1]], axis=1)  # segments.starts(SEG)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# Inputs from numpy's generator: eager jax.random calls would each compile a small program.
def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _delta_inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, k = _l2(_normal(rng, B, L, H, K)), _l2(_normal(rng, B, L, H, K))
    v = _normal(rng, B, L, H, V)
    beta = _sigmoid(_normal(rng, B, L, H))
    g = -np.log1p(np.exp(_normal(rng, B, L, H))) * 0.5  # -softplus: log-decays < 0
    h0, w_o = _normal(rng, B, H, K, V), _normal(rng, B, L, H, V)
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v, beta, g)) + (jnp.asarray(h0), jnp.asarray(w_o))


def _rwkv7_inputs():
    rng = np.random.default_rng(1)
    r, k, v = (_normal(rng, B, L, H, K) for _ in range(3))
    logw = -rwkv7.DECAY_SCALE * _sigmoid(_normal(rng, B, L, H, K))
    kk, alr = _l2(_normal(rng, B, L, H, K)), _sigmoid(_normal(rng, B, L, H, K))
    S0, w_o = _normal(rng, B, H, K, K), _normal(rng, B, L, H, K)
    return tuple(jnp.asarray(z, jnp.float32) for z in (S0, r, logw, k, v, -kk, kk * alr, w_o))


def _assert_no_sequence_gather(hlo, length, dtypes=("f32", "bf16", "pred", "s32")):
    """No all-gather result of these element types has a dimension of the full sequence length:
    devices exchange chunk maps (all-gathers of [n, B, H, K, K] and [n, B, H, K, V]), never the
    sequence."""
    gathered = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            gathered += [(t, tuple(int(d) for d in s.split(",") if d))
                         for t, s in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
    assert gathered and not [g for g in gathered if g[0] in dtypes and length in g[1]], gathered


def _check_close(got, want, rtol, atol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)


def _compare_under_cp(fn, args, form):
    """value_and_grad of fn(*args, form) under the cp rules vs unsharded (recurrent form)."""
    grad = jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True)
    (_, want), want_g = jax.jit(grad, static_argnums=len(args)).lower(*args, "recurrent").compile(FAST_COMPILE)(
        *args)
    with sharding.use_rules(sharding.make_mesh(MESH), "cp"):
        run = jax.jit(grad, static_argnums=len(args)).lower(*args, form).compile(FAST_COMPILE)
    (_, got), got_g = run(*args)
    return got, want, got_g, want_g, run.as_text()


@pytest.mark.parametrize("form,gated", [("chunked", True), pytest.param("recurrent", True, marks=pytest.mark.slow),
                                        pytest.param("chunked", False, marks=pytest.mark.slow)])
def test_delta_rule_is_context_parallel_under_cp_rules(form, gated):
    q, k, v, beta, g, h0, w_o = _delta_inputs()

    def loss(q, k, v, beta, g, h0, form):
        o, h = deltanet.delta_rule(q, k, v, beta, g if gated else None, h0, RESET, form=form, chunk_size=2,
                                   scale=0.5)
        return jnp.sum(o * w_o) + jnp.sum(h * h), (o, h)

    got, want, got_g, want_g, hlo = _compare_under_cp(loss, (q, k, v, beta, g, h0), form)
    _check_close(got, want, 1e-5, 1e-5)
    _check_close(got_g, want_g, 1e-4, 1e-5)  # ungated: g is unused, its gradient zero on both sides
    _assert_no_sequence_gather(hlo, L)


@pytest.mark.parametrize("form", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_rwkv7_recurrence_is_context_parallel_under_cp_rules(form):
    S0, r, logw, k, v, a, b, w_o = _rwkv7_inputs()

    def loss(S0, r, logw, k, v, a, b, form):
        y, S = rwkv7.recurrence(S0, r, logw, k, v, a, b, RESET, form=form, chunk_size=2)
        return jnp.sum(y * w_o) + jnp.sum(S * S), (y, S)

    got, want, got_g, want_g, hlo = _compare_under_cp(loss, (S0, r, logw, k, v, a, b), form)
    _check_close(got, want, 1e-5, 1e-5)
    _check_close(got_g, want_g, 1e-4, 1e-5)
    _assert_no_sequence_gather(hlo, L)


@pytest.mark.slow
def test_delta_rule_bf16_inputs_match_unsharded():
    q, k, v, beta, g, h0, _ = _delta_inputs(jnp.bfloat16)
    want_o, want_h = deltanet.delta_rule(q, k, v, beta, g, h0, RESET, form="chunked", chunk_size=4, scale=0.5)
    mesh = sharding.make_mesh(MESH)
    o, h = jax.jit(lambda *a: context_delta.delta_rule(*a, RESET, mesh=mesh, batch_axes=("fsdp",), chunk_size=4,
                                                       scale=0.5))(q, k, v, beta, g, h0)
    assert o.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    # Both compute in fp32 and round the output to bf16 once: where the fp32 values straddle a
    # rounding boundary they differ by one bf16 ulp (2^-7 relative), never more.
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want_o, np.float32), rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), rtol=1e-5, atol=1e-5)


def test_augmented_scan_yields_the_chunk_transition():
    """The premise: from [0 | I] with values [v | 0], the last K state columns are the product of
    the per-token transition matrices (numpy, token by token), and exactly zero once a document
    starts inside the chunk (the layer's reset zeroes the identity columns too)."""
    q, k, v, beta, g, _, _ = _delta_inputs()
    reset = np.zeros((B, L), bool)
    reset[0, 9] = True
    eye_BHKW = np.broadcast_to(np.concatenate([np.zeros((K, V)), np.eye(K)], -1), (B, H, K, V + K)).astype(np.float32)
    vaug = np.concatenate([v, np.zeros((B, L, H, K), np.float32)], -1)
    _, s = jax.jit(deltanet.delta_rule, static_argnames=("form", "chunk_size"))(
        q, k, vaug, beta, g, eye_BHKW, reset, form="recurrent")
    kn, bn, gn = (np.asarray(a[1], np.float64) for a in (k, beta, g))  # row 1: no reset
    want = np.broadcast_to(np.eye(K), (H, K, K))
    for t in range(L):  # S -> exp(g_t) (I - beta_t k_t k_t^T) S
        m_HKK = np.exp(gn[t])[:, None, None] * (np.eye(K) - bn[t][:, None, None] * kn[t][:, :, None] * kn[t][:, None])
        want = m_HKK @ want
    np.testing.assert_allclose(np.asarray(s[1, ..., V:]), want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(s[0, ..., V:]) == 0.0)

    _, r, logw, k7, v7, a, b, _ = _rwkv7_inputs()
    eye_BHWK = np.broadcast_to(np.concatenate([np.zeros((K, K)), np.eye(K)], 0), (B, H, 2 * K, K)).astype(np.float32)
    vaug7 = np.concatenate([v7, np.zeros((B, L, H, K), np.float32)], -1)
    _, S = jax.jit(rwkv7.recurrence, static_argnames=("form", "chunk_size"))(
        eye_BHWK, r, logw, k7, vaug7, a, b, reset, form="recurrent")
    wn, an, bn = (np.asarray(z[1], np.float64) for z in (logw, a, b))
    want = np.broadcast_to(np.eye(K), (H, K, K))
    for t in range(L):  # S -> S (diag(w_t) + a_t b_t^T)
        want = want @ (np.exp(wn[t])[:, None, :] * np.eye(K) + an[t][:, :, None] * bn[t][:, None])
    np.testing.assert_allclose(np.asarray(S[1, :, K:]), want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(S[0, :, K:]) == 0.0)


def test_context_delta_rejects_indivisible_length():
    q, k, v, beta, g, h0, _ = _delta_inputs()
    mesh = sharding.make_mesh("sequence=8")
    with pytest.raises(ValueError, match="multiple of the 'sequence' axis size 8"):
        context_delta.delta_rule(q[:, :12], k[:, :12], v[:, :12], beta[:, :12], g[:, :12], h0, mesh=mesh)
    with pytest.raises(ValueError, match="mesh has no axis 'seq'"):
        context_delta.delta_rule(q, k, v, beta, g, h0, mesh=mesh, axis="seq")


# ---------------------------------------------------------------------------------------------
# Whole models: the cp loss and gradients equal the single-device ones.

LM = 24  # a multiple of the 4 sequence devices; no parameter dimension is 24


def _model(name):
    return zoo.presets.get(name, vocab_size=64, d_model=32, n_layers=1, max_len=LM)


def _model_grads_match(cfg):
    ks = jax.random.split(jax.random.key(2), 2)
    tokens = jax.random.randint(ks[0], (4, LM + 1), 0, cfg.vocab_size, jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 11 + [3] * 8, [1] * LM] * 2, jnp.int32)  # starts at 5 and 16
    batch = (tokens[:, :-1], tokens[:, 1:], seg)
    specs = zoo.param_specs(cfg)
    params = jax.jit(lambda key: P.init(key, specs)).lower(ks[1]).compile(FAST_COMPILE)(ks[1])

    def grad(params, inputs, targets, seg):
        return jax.value_and_grad(loss_fn)(params, inputs, targets, cfg, segment_ids=seg)

    want_loss, want_g = jax.jit(grad).lower(params, *batch).compile(FAST_COMPILE)(params, *batch)
    mesh = sharding.make_mesh(MESH)
    params = jax.device_put(params, sharding.param_shardings(specs, mesh, "cp"))
    data = sharding.batch_sharding(mesh, "cp", (4, LM))
    batch = tuple(jax.device_put(a, data) for a in batch)
    with sharding.use_rules(mesh, "cp"):
        run = jax.jit(grad).lower(params, *batch).compile(FAST_COMPILE)
    loss, grads = run(params, *batch)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    _check_close(grads, want_g, 1e-4, 1e-6)
    hlo = run.as_text()
    # No activation is gathered along the sequence. (The [B, L] document-start masks are: XLA
    # gathers the bool/int results of segments.starts and of short_conv's document-id cumsum,
    # code outside the recurrence; one byte or int per token, not B x L x D.)
    _assert_no_sequence_gather(hlo, LM, dtypes=("f32", "bf16"))
    return hlo


@pytest.mark.slow  # a model's train-step gradient compiled twice: ~12 s of CPU each
@pytest.mark.parametrize("name", ["gated-deltanet-tiny", "rwkv7-tiny"])
def test_model_under_cp_matches_single_device(name):
    cfg = _model(name)
    hlo = _model_grads_match(cfg)
    # The recurrence ran as the context-parallel scan (its shard_map), not gathered by the partitioner.
    assert re.search(r"all-gather(?:-start)?\(.*op_name=\"[^\"]*shard_map", hlo)
