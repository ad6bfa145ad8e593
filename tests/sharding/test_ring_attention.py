"""Ring attention over a sequence axis of 4 devices equals unsharded attention (values and
gradients) for causal (zigzag layout), windowed and packed inputs; its HLO rotates K/V blocks
with collective-permute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from layers import attention_core
from sharding.ring_attention import ring_attention, unzigzag, zigzag

B, L, H, G, K = 2, 32, 4, 2, 8
N = 4  # devices on the sequence axis


def _inputs(packed):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, L, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, L, G, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, L, G, K), jnp.float32)
    w = jax.random.normal(ks[3], (B, L, H, K), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    seg = None
    if packed:
        # Row 0: three documents, boundaries not on block edges; row 1: two.
        seg = jnp.asarray([[1] * 5 + [2] * 14 + [3] * 13, [1] * 20 + [2] * 12], jnp.int32)
        pos = pos - jnp.where(seg == 2, jnp.asarray([[5], [20]]), 0) - jnp.where(seg == 3, 19, 0)
    return q, k, v, w, pos, seg


def _reference(q, k, v, pos, seg, causal, window):
    mask = attention_core.make_mask(pos, pos, causal=causal, window=window, q_seg_BL=seg, k_seg_BS=seg)
    return attention_core.attend_reference(q, k, v, mask, scale=K ** -0.5)


CASES = {
    "causal_zigzag": dict(causal=True, window=None, packed=False, layout="zigzag"),
    "window_packed": dict(causal=True, window=6, packed=True, layout="zigzag"),
    "bidirectional_packed": dict(causal=False, window=None, packed=True, layout="contiguous"),
}


@pytest.mark.parametrize("case", [c if c == "window_packed" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_ring_attention_matches_reference(case):
    causal, window, packed, layout = (CASES[case][k] for k in ("causal", "window", "packed", "layout"))
    q, k, v, w, pos, seg = _inputs(packed)
    mesh = sharding.make_mesh("data=2,sequence=4")

    def ref_loss(q, k, v):
        out = _reference(q, k, v, pos, seg, causal, window)
        return jnp.sum(out * w), out

    def ring_loss(q, k, v):
        order = (lambda a: zigzag(a, N)) if layout == "zigzag" else (lambda a: a)
        back = (lambda a: unzigzag(a, N)) if layout == "zigzag" else (lambda a: a)
        p = order(pos)
        s = None if seg is None else order(seg)
        out = ring_attention(order(q), order(k), order(v), q_pos_BL=p, k_pos_BS=p, q_seg_BL=s, k_seg_BS=s,
                             mesh=mesh, axis="sequence", batch_axes=("data",), causal=causal, window=window)
        out = back(out)
        return jnp.sum(out * w), out

    (_, want), want_g = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    ring = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True)).lower(q, k, v).compile()
    (_, got), got_g = ring(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert "collective-permute" in ring.as_text()


def test_zigzag_balances_causal_work_and_inverts():
    x = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16)
    z = zigzag(x, 4)
    np.testing.assert_array_equal(np.asarray(unzigzag(z, 4)), np.asarray(x))
    # Causal pairs per device: contiguous blocks range 1x..7x; zigzag blocks are all equal.
    pos = np.asarray(z[0]).reshape(4, 4)
    work = [sum(int(p) + 1 for p in blk) for blk in pos]
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="multiple of 2"):
        zigzag(x, 3)
