"""Causal depthwise convolution: formula, decoding state, packed documents."""

import jax
import jax.numpy as jnp
import numpy as np

from layers import params as P
from layers import segments, short_conv


def _params(C=5, W=4, seed=0):
    p = P.init(jax.random.key(seed), short_conv.param_specs(C, W, "mlp"))
    return {**p, "b_C": jax.random.normal(jax.random.key(seed + 1), (C,))}


def loop_conv(x, w, b, prev=None):
    x = np.asarray(x, np.float64)
    B, L, C = x.shape
    W = w.shape[0]
    hist = np.zeros((B, W - 1, C)) if prev is None else np.asarray(prev, np.float64)
    xp = np.concatenate([hist, x], 1)
    return np.stack([sum(xp[:, t + j] * np.asarray(w)[j] for j in range(W)) + np.asarray(b)
                     for t in range(L)], 1)


def test_matches_loop_and_carries_state():
    p = _params()
    x = jax.random.normal(jax.random.key(2), (2, 9, 5))
    prev = jax.random.normal(jax.random.key(3), (2, 3, 5))
    y, state = short_conv.forward(p, x, state=prev)
    np.testing.assert_allclose(np.asarray(y), loop_conv(x, p["w_WC"], p["b_C"], prev), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state), np.asarray(x[:, -3:]))
    # Split: the state handed on continues the convolution exactly.
    y1, s1 = short_conv.forward(p, x[:, :2], state=prev)  # shorter than the window
    y2, _ = short_conv.forward(p, x[:, 2:], state=s1)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_packed_documents_do_not_mix():
    p = _params()
    x = jax.random.normal(jax.random.key(4), (1, 10, 5))
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 3]], jnp.int32)
    y, state = short_conv.forward(p, x, state=jnp.zeros((1, 3, 5)), segment_ids=seg)
    parts = [short_conv.forward(p, x[:, a:b])[0] for a, b in ((0, 3), (3, 5), (5, 10))]
    np.testing.assert_allclose(np.asarray(y), np.concatenate(parts, 1), rtol=1e-6, atol=1e-6)
    # Last document is 5 long (>= W-1): the state is its last 3 inputs.
    np.testing.assert_array_equal(np.asarray(state), np.asarray(x[:, -3:]))
    seg_short = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1, 2, 2]], jnp.int32)
    _, state = short_conv.forward(p, x, state=jnp.zeros((1, 3, 5)), segment_ids=seg_short)
    assert np.all(np.asarray(state[:, 0]) == 0.0)  # from the previous document: dropped
    np.testing.assert_array_equal(np.asarray(state[:, 1:]), np.asarray(x[:, -2:]))


def test_segment_starts():
    seg = jnp.array([[3, 3, 4, 4, 4, 1]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(segments.starts(seg)), [[False, False, True, False, False, True]])
    assert not np.any(np.asarray(segments.starts(None, 4, 2)))
    np.testing.assert_array_equal(np.asarray(segments.keep(seg, 6, 1)), [[1, 1, 0, 1, 1, 0]])
