"""The blocked path's tile count stays bounded (compile time grows with it): long sequences get
longer tiles, with the same result as the full path."""

import jax
import jax.numpy as jnp
import numpy as np

from layers import attention_core, blocked_attention


def test_default_block_keeps_at_most_max_tiles():
    for L in (1, 63, 64, 129, 512, 513, 1024, 4096, 16384 + 5):
        block = blocked_attention.default_block(L)
        ranges = blocked_attention.key_ranges(L, L, block=block, causal=True, window=None)
        assert block >= blocked_attention.DEFAULT_BLOCK
        assert len(ranges) <= blocked_attention.MAX_TILES, (L, block, len(ranges))
        if L <= blocked_attention.DEFAULT_BLOCK * blocked_attention.MAX_TILES:
            assert block == blocked_attention.DEFAULT_BLOCK, L


def test_longer_tiles_equal_the_full_path(monkeypatch):
    """With the cap lowered to 2 tiles, L = 3 blocks + 5 runs 2 longer tiles (the second one
    shorter) and equals impl="xla", values and gradients, causal with a window."""
    monkeypatch.setattr(blocked_attention, "MAX_TILES", 2)
    n = 3 * blocked_attention.DEFAULT_BLOCK + 5
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (1, n, 2, 4), jnp.float32)
    k = jax.random.normal(ks[1], (1, n, 1, 4), jnp.float32)
    v = jax.random.normal(ks[2], (1, n, 1, 4), jnp.float32)
    dy = jax.random.normal(ks[3], (1, n, 2, 4), jnp.float32)
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    assert len(blocked_attention.key_ranges(n, n, block=blocked_attention.default_block(n), causal=True,
                                            window=None)) == 2

    def loss(q, k, v, impl):
        o = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, window=150, impl=impl)
        return jnp.sum(o * dy)

    both = jax.jit(lambda q, k, v: [jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, impl)
                                    for impl in ("xla_blocked", "xla")])
    (l_b, g_b), (l_x, g_x) = both(q, k, v)
    np.testing.assert_allclose(float(l_b), float(l_x), rtol=1e-5)
    for a, b in zip(g_b, g_x):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
