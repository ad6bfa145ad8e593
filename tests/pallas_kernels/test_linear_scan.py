"""Chunked linear-recurrence kernel (interpret mode) against the token-by-token reference and
the XLA chunked path: values, final state and gradients (q, k, v, g, h0); lowering; validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from layers.linear_recurrence import decayed_linear_attention
from pallas_kernels.linear_scan import linear_scan, linear_scan_reference
from tests.pallas_kernels.kernel_checks import BF16, FP32, assert_match, lowers, values_and_grads


def _inputs(key, B, L, H, K, V, per_key, dtype=jnp.float32):
    ks = jax.random.split(key, 6)
    q, k = (jax.random.normal(ks[i], (B, L, H, K)).astype(dtype) for i in (0, 1))
    v = jax.random.normal(ks[2], (B, L, H, V)).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, L, H, K) if per_key else (B, L, H)))
    h0 = jax.random.normal(ks[4], (B, H, K, V))
    reset = jax.random.bernoulli(ks[5], 0.15, (B, L))
    return q, k, v, g, h0, reset


def _check(shape, per_key, chunk, dtype=jnp.float32, tol=FP32, seed=0):
    q, k, v, g, h0, reset = _inputs(jax.random.key(seed), *shape, per_key, dtype)

    def kernel(q, k, v, g, h0):
        return linear_scan(q, k, v, g, h0, reset, scale=0.7, chunk_size=chunk)

    def ref(q, k, v, g, h0):
        return linear_scan_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                     g, h0, reset, scale=0.7)
    args = (q, k, v, g, h0)
    got, dgot = values_and_grads(kernel, args, range(5), jax.random.key(seed + 1))
    want, dwant = values_and_grads(ref, args, range(5), jax.random.key(seed + 1))
    assert_match(got, want, tol["value"], "output, final state")
    assert_match(dgot, dwant, tol["grad"], "dq, dk, dv, dg, dh0")


def test_per_key_decay_resets_initial_state_fp32():
    # 21 tokens in chunks of 8 (padding), per-key decays, document resets, initial state.
    _check((2, 21, 2, 8, 16), per_key=True, chunk=8)


@pytest.mark.slow
def test_per_head_decay_and_dispatch_matches_xla_chunked():
    _check((1, 40, 3, 16, 8), per_key=False, chunk=16, seed=3)
    q, k, v, g, h0, reset = _inputs(jax.random.key(7), 1, 40, 2, 8, 8, per_key=False)
    for impl in ("pallas", "reference"):
        got = decayed_linear_attention(q, k, v, g, h0, reset, scale=0.5, chunk_size=16, impl=impl)
        want = decayed_linear_attention(q, k, v, g, h0, reset, scale=0.5, chunk_size=16, impl="xla")
        assert_match(got, want, FP32["value"], f"impl={impl} vs xla")


@pytest.mark.slow
def test_bf16_inputs_loose():
    _check((1, 24, 2, 16, 16), per_key=True, chunk=8, dtype=jnp.bfloat16, tol=BF16, seed=5)


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "triton")])
def test_lowers_forward_and_backward(platform, backend, marker):
    B, L, H, K, V = 1, 256, 2, 64, 64
    S = jax.ShapeDtypeStruct
    args = (S((B, L, H, K), jnp.bfloat16), S((B, L, H, K), jnp.bfloat16), S((B, L, H, V), jnp.bfloat16),
            S((B, L, H, K), jnp.float32), S((B, H, K, V), jnp.float32), S((B, L), jnp.bool_))

    def fwd(q, k, v, g, h0, r):
        return linear_scan(q, k, v, g, h0, r, chunk_size=64, backend=backend, interpret=False)

    def bwd(*a):
        def loss(q, k, v, g, h0):
            o, h = fwd(q, k, v, g, h0, a[5])
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(h)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a[:5])
    for fn in (fwd, bwd):
        assert marker in lowers(fn, args, platform)


def test_validation_errors():
    q = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match="k_BLHK: expected shape"):
        linear_scan(q, jnp.ones((1, 8, 2, 5)), q)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        linear_scan(q, q, q, chunk_size=12)
    with pytest.raises(ValueError, match=r"g: expected shape \(1, 8, 2\)"):
        linear_scan(q, q, q, jnp.ones((1, 8, 3)))
    with pytest.raises(ValueError, match="impl"):
        decayed_linear_attention(q, q, q, scale=1.0, impl="cuda")
