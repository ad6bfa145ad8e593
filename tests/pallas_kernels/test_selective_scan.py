"""Mamba-1 selective-scan kernel (interpret mode) against the token-by-token reference and
layers.mamba's XLA forms: values, final state, gradients of every float input; lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from layers import mamba
from pallas_kernels.selective_scan import selective_scan, selective_scan_reference
from tests.pallas_kernels.kernel_checks import BF16, FP32, assert_match, lowers, values_and_grads


def _inputs(key, Bz, L, E, N, dtype=jnp.float32):
    ks = jax.random.split(key, 8)
    u = jax.random.normal(ks[0], (Bz, L, E)).astype(dtype)
    delta = jax.nn.softplus(jax.random.normal(ks[1], (Bz, L, E)))
    A = -jnp.exp(jax.random.normal(ks[2], (E, N)))
    B, C = (jax.random.normal(ks[i], (Bz, L, N)).astype(dtype) for i in (3, 4))
    D = jax.random.normal(ks[5], (E,))
    h0 = jax.random.normal(ks[6], (Bz, E, N))
    reset = jax.random.bernoulli(ks[7], 0.1, (Bz, L))
    return (u, delta, A, B, C, D, h0), reset


def _check(shape, chunk, dtype=jnp.float32, tol=FP32, seed=0, **kw):
    args, reset = _inputs(jax.random.key(seed), *shape, dtype)

    def kernel(*a):
        return selective_scan(*a, reset, chunk_size=chunk, **kw)

    def ref(u, delta, A, B, C, D, h0):
        f = lambda x: x.astype(jnp.float32)  # noqa: E731
        return selective_scan_reference(f(u), delta, A, f(B), f(C), D, h0, reset)
    got, dgot = values_and_grads(kernel, args, range(7), jax.random.key(seed + 1))
    want, dwant = values_and_grads(ref, args, range(7), jax.random.key(seed + 1))
    assert_match(got, want, tol["value"], "y, final state")
    assert_match(dgot, dwant, tol["grad"], "du, ddelta, dA, dB, dC, dD, dh0")


def test_resets_initial_state_padding_fp32():
    # 19 tokens in chunks of 8, 12 channels in blocks of 8, 5 states: every axis is padded.
    _check((2, 19, 12, 5), chunk=8)


@pytest.mark.slow
def test_bf16_inputs_loose_and_layer_dispatch():
    _check((1, 24, 16, 4), chunk=8, dtype=jnp.bfloat16, tol=BF16, seed=2)
    args, reset = _inputs(jax.random.key(4), 1, 33, 8, 4)
    got = mamba.selective_scan(*args, reset, mode="pallas", chunk_size=16)
    want = mamba.selective_scan(*args, reset, mode="sequential")
    assert_match(got, want, FP32["value"], "mode=pallas vs sequential")


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "triton")])
def test_lowers_forward_and_backward(platform, backend, marker):
    Bz, L, E, N = 1, 128, 256, 16
    S = jax.ShapeDtypeStruct
    args = (S((Bz, L, E), jnp.bfloat16), S((Bz, L, E), jnp.float32), S((E, N), jnp.float32),
            S((Bz, L, N), jnp.bfloat16), S((Bz, L, N), jnp.bfloat16), S((E,), jnp.float32),
            S((Bz, E, N), jnp.float32), S((Bz, L), jnp.bool_))

    def fwd(*a):
        return selective_scan(*a, chunk_size=16, backend=backend, interpret=False)

    def bwd(*a):
        def loss(*d):
            y, h = fwd(*d, a[7])
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)
        return jax.grad(loss, argnums=tuple(range(7)))(*a[:7])
    for fn in (fwd, bwd):
        assert marker in lowers(fn, args, platform)


def test_validation_errors():
    u = delta = jnp.ones((1, 8, 4))
    A, B, C = jnp.ones((4, 3)), jnp.ones((1, 8, 3)), jnp.ones((1, 8, 3))
    with pytest.raises(ValueError, match="A: expected shape"):
        selective_scan(u, delta, jnp.ones((5, 3)), B, C)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        selective_scan(u, delta, A, B, C, chunk_size=10)
    with pytest.raises(mamba.checks.ConfigError, match="scan"):
        mamba.MambaConfig(d_model=8, scan="cuda")
