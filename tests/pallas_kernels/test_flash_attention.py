"""Flash attention kernel (interpret mode) against its plain reference: values and gradients;
lowering for TPU (Mosaic) and CUDA (Triton) from this CPU machine; validation."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import attention_core
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from tests.pallas_kernels.kernel_checks import BF16, FAST_COMPILE, FP32, assert_match, lowers, values_and_grads


def _qkv(key, B, L, S, H, G, K, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, L, H, K)).astype(dtype), jax.random.normal(kk, (B, S, G, K)).astype(dtype),
            jax.random.normal(kv, (B, S, G, K)).astype(dtype))


def _two_docs(B, L, split):
    return jnp.asarray(np.where(np.arange(L) < split, 1, 2)[None].repeat(B, 0), jnp.int32)


def _check(kw, shape, dtype=jnp.float32, tol=FP32, seed=0, block_sizes=None):
    B, L, S, H, G, K = shape
    q, k, v = _qkv(jax.random.key(seed), B, L, S, H, G, K, dtype)
    def kernel(q, k, v):
        return flash_attention(q, k, v, block_sizes=block_sizes, **kw)

    def ref(q, k, v):
        return flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), **kw)
    got, dgot = values_and_grads(kernel, (q, k, v), (0, 1, 2), jax.random.key(seed + 1))
    want, dwant = values_and_grads(ref, (q, k, v), (0, 1, 2), jax.random.key(seed + 1))
    assert_match(got, want, tol["value"], "output")
    assert_match(dgot, dwant, tol["grad"], "dq, dk, dv")


def test_fp32_all_features_in_one_case():
    # Odd length (37 -> padded to 48: three 16-row blocks), head dim 24 (padded to 32), GQA 2,
    # causal + sliding window (band skipping), softcap in fwd and bwd, two packed documents.
    L = 37
    _check(dict(causal=True, window=9, softcap=3.0, segment_ids=_two_docs(2, L, 20)), (2, L, L, 4, 2, 24))


@pytest.mark.slow
def test_attend_dispatch_with_cache_positions_gqa4():
    """attend(impl="pallas") takes the kernel with explicit positions (no band: empty blocks are
    skipped by their masks), as in a prefill into a cache with empty slots (position -1)."""
    B, L, T, H, G, K = 2, 6, 24, 4, 1, 16
    q, k, v = _qkv(jax.random.key(3), B, L, T, H, G, K)
    q_pos = jnp.asarray([[10, 11, 12, 13, 14, 15], [0, 1, 2, 3, 4, 5]], jnp.int32)
    k_pos = np.full((B, T), -1, np.int32)
    k_pos[0, :16] = np.arange(16)
    k_pos[1, :6] = np.arange(6)
    k_pos = jnp.asarray(k_pos)

    def attend(impl):
        return lambda q, k, v: attention_core.attend(q, k, v, q_pos_BL=q_pos, k_pos_BS=k_pos, causal=True,
                                                     window=8, softcap=5.0, impl=impl)
    got, dgot = values_and_grads(attend("pallas"), (q, k, v), (0, 1, 2), jax.random.key(4))
    want, dwant = values_and_grads(attend("reference"), (q, k, v), (0, 1, 2), jax.random.key(4))
    assert_match(got, want, FP32["value"], "attend output")
    assert_match(dgot, dwant, FP32["grad"], "attend grads")


@pytest.mark.slow
@pytest.mark.parametrize("ratio,causal", list(itertools.product((1, 2, 4), (True, False))))
def test_gqa_ratios_and_masks(ratio, causal):
    for kw in (dict(), dict(window=7), dict(softcap=2.0, segment_ids=_two_docs(1, 29, 11))):
        _check(dict(causal=causal, **kw), (1, 29, 29, 4, 4 // ratio, 16), seed=ratio)


@pytest.mark.slow
def test_bf16_inputs_loose():
    _check(dict(causal=True, window=13, softcap=4.0), (2, 40, 40, 4, 2, 32), dtype=jnp.bfloat16, tol=BF16)


@pytest.mark.slow
def test_cross_attention_lengths_and_blocks():
    # L != S, non-causal, blocks of different sizes, a (q_ids, kv_ids) segment pair.
    seg = (_two_docs(1, 19, 7), _two_docs(1, 45, 30))
    _check(dict(causal=False, segment_ids=seg), (1, 19, 45, 2, 1, 16), block_sizes=BlockSizes(block_q=8, block_k=32))


def test_skipped_blocks_are_never_loaded():
    """With a causal window the forward loop touches only the band: poison the keys outside
    every query's band with NaN and the output stays finite (masking alone would give NaN)."""
    B, L, H, K, W = 1, 64, 1, 16, 8
    q, k, v = _qkv(jax.random.key(5), B, L, L, H, H, K)
    # q block 3 (rows 48..63, block 16) sees keys >= 48 - 7 = 41: block 2 (32..47) and block 3.
    # Rows 0..15 of k/v are outside the band of every q block >= 2, but inside block 0's band,
    # so poison only the output of blocks 2, 3 by checking those rows.
    k = k.at[:, :16].set(jnp.nan)
    v = v.at[:, :16].set(jnp.nan)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, window=W,
                                                  block_sizes=BlockSizes(block_q=16, block_k=16)),
                  compiler_options=FAST_COMPILE)(q, k, v)
    assert bool(jnp.all(jnp.isfinite(out[:, 32:])))
    assert bool(jnp.all(jnp.isnan(out[:, :16])))


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "triton")])
def test_lowers_forward_and_backward(platform, backend, marker):
    B, L, H, G, K = 1, 256, 4, 2, 64
    q = jax.ShapeDtypeStruct((B, L, H, K), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, L, G, K), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def fwd(q, k, v, s):
        return flash_attention(q, k, v, causal=True, window=100, softcap=30.0, segment_ids=s,
                               backend=backend, interpret=False)

    def fwd_positions(q, k, v, s):  # the attend path: explicit positions, no band
        return flash_attention(q, k, v, q_positions=s, kv_positions=s, backend=backend, interpret=False)

    for f in (fwd, fwd_positions):
        def bwd(q, k, v, s, f=f):
            return jax.grad(lambda *a: jnp.sum(f(*a, s).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
        for fn in (f, bwd):
            assert marker in lowers(fn, (q, kv, kv, seg), platform)


def test_validation_errors():
    q, k, v = (jnp.ones((1, 8, 4, 16)), jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 3, 16)))
    with pytest.raises(ValueError, match="multiple of kv heads G=3"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="head dim K must be <= 256"):
        flash_attention(jnp.ones((1, 8, 2, 512)), jnp.ones((1, 8, 1, 512)), jnp.ones((1, 8, 1, 512)))
    with pytest.raises(ValueError, match="k shape"):
        flash_attention(q, jnp.ones((1, 8, 2, 16)), jnp.ones((1, 9, 2, 16)))
    with pytest.raises(ValueError, match="window must be a positive int"):
        flash_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="q segment ids must be integer"):
        flash_attention(q, q, q, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="BlockSizes.block_q: expected a power of two"):
        BlockSizes(block_q=24, block_k=16)
    with pytest.raises(ValueError, match="interpret=True"):
        flash_attention(q, q, q, backend="cpu", interpret=False)
