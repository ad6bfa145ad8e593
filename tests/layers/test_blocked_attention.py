"""Blocked XLA attention equals the reference attention (values and gradients) wherever the
index-order contract holds: causal, windows, packed segments, GQA/MQA, odd lengths, softcap,
ALiBi, sinks and caches; its tiles cover every entry such masks keep."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import attention, attention_core, blocked_attention
from layers.attention import AttentionConfig
from layers.positions import alibi_slopes

B, L, K = 2, 13, 8  # odd length, not a multiple of the block
BLOCK = 4


def _qkv(H, G, *, Lq=L, S=L, seed=0, batch=B, head_dim=K, cotangent=False):
    """Random q [batch, Lq, H, K], k and v [batch, S, G, K] (and an output cotangent like q)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    out = (jax.random.normal(ks[0], (batch, Lq, H, head_dim), jnp.float32),
           jax.random.normal(ks[1], (batch, S, G, head_dim), jnp.float32),
           jax.random.normal(ks[2], (batch, S, G, head_dim), jnp.float32))
    return out + (jax.random.normal(ks[3], (batch, Lq, H, head_dim), jnp.float32),) if cotangent else out


def _packed_positions():
    """Two rows of packed documents: positions restart at each segment."""
    seg = np.array([[1] * 5 + [2] * 6 + [3] * 2, [1] * 9 + [2] * 4], np.int32)
    pos = np.zeros_like(seg)
    for b in range(B):
        for i in range(1, L):
            pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
    return jnp.asarray(pos), jnp.asarray(seg)


CASES = {
    "causal_gqa": dict(H=4, G=2, causal=True),
    "causal_mqa_softcap": dict(H=4, G=1, causal=True, softcap=3.0),
    "causal_window": dict(H=4, G=2, causal=True, window=5),
    "causal_window_sinks": dict(H=2, G=2, causal=True, window=3, sinks=2),
    "bidirectional_window": dict(H=4, G=2, causal=False, window=4),
    "bidirectional_full": dict(H=4, G=2, causal=False),
    "packed_segments_window": dict(H=4, G=2, causal=True, window=4, packed=True),
    "causal_alibi": dict(H=4, G=2, causal=True, alibi=True),
}


def _run(impl, q, k, v, case, pos, seg, *, block=BLOCK):
    slopes = jnp.asarray(alibi_slopes(q.shape[2])) if case.get("alibi") else None
    kwargs = dict(q_pos_BL=pos, k_pos_BS=pos, q_seg_BL=seg, k_seg_BS=seg, causal=case["causal"],
                  window=case.get("window"), softcap=case.get("softcap"), alibi_slopes_H=slopes,
                  sinks=case.get("sinks", 0))
    if impl == "blocked":  # the module's own entry, with a block size that leaves an odd tail
        mask = attention_core.make_mask(pos, pos, causal=case["causal"], window=case.get("window"),
                                        q_seg_BL=seg, k_seg_BS=seg, sinks=case.get("sinks", 0))
        bias = None if slopes is None else attention_core.alibi_bias(slopes, pos, pos, causal=case["causal"])
        return blocked_attention.attend_blocked(q, k, v, mask, bias, scale=K ** -0.5, softcap=case.get("softcap"),
                                                causal=case["causal"], window=case.get("window"),
                                                sinks=case.get("sinks", 0), block=block)
    return attention_core.attend(q, k, v, impl=impl, **kwargs)


# Four cases cover causal/bidirectional, windows, sinks, segments and GQA in the default run.
DEFAULT_CASES = ("causal_gqa", "causal_window_sinks", "bidirectional_window", "packed_segments_window")


@pytest.mark.parametrize("name", [n if n in DEFAULT_CASES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES])
def test_blocked_equals_reference_values_and_grads(name):
    case = CASES[name]
    q, k, v = _qkv(case["H"], case["G"])
    if case.get("packed"):
        pos, seg = _packed_positions()
    else:
        pos, seg = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)), None
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    @jax.jit
    def values_and_grads(q, k, v):
        outs = {impl: _run(impl, q, k, v, case, pos, seg) for impl in ("blocked", "xla_blocked", "reference")}
        grads = {impl: jax.grad(lambda q, k, v: jnp.sum(_run(impl, q, k, v, case, pos, seg) * w),
                                argnums=(0, 1, 2))(q, k, v) for impl in ("blocked", "reference")}
        return outs, grads

    outs, grads = values_and_grads(q, k, v)
    for impl in ("blocked", "xla_blocked"):
        np.testing.assert_allclose(np.asarray(outs[impl]), np.asarray(outs["reference"]), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads["blocked"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_tiles_cover_every_kept_entry_and_skip_some(name):
    """The skipped tiles hold no entry the mask keeps (so skipping is exact), and causal or
    windowed masks do skip work."""
    case = CASES[name]
    pos, seg = _packed_positions() if case.get("packed") else (
        jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)), None)
    mask = np.asarray(attention_core.make_mask(pos, pos, causal=case["causal"], window=case.get("window"),
                                               q_seg_BL=seg, k_seg_BS=seg, sinks=case.get("sinks", 0)))
    ranges = blocked_attention.key_ranges(L, L, block=BLOCK, causal=case["causal"], window=case.get("window"),
                                          sinks=case.get("sinks", 0))
    seen = blocked_attention.covered(ranges, L, L)
    assert not (mask & ~seen[None]).any()
    assert [r[:2] for r in ranges] == [(i, min(i + BLOCK, L)) for i in range(0, L, BLOCK)]
    if case["causal"] or case.get("window"):
        assert seen.sum() < L * L
    else:
        assert seen.all()


def test_cache_prefill_uses_one_tile_and_matches():
    """L != S (queries continuing a cache with empty slots): every key is one tile, still exact."""
    q, k, v = _qkv(4, 2, Lq=5, S=L)
    q_pos = jnp.broadcast_to(jnp.arange(6, 11, dtype=jnp.int32), (B, 5))
    k_pos = jnp.where(jnp.arange(L) < 11, jnp.arange(L), -1).astype(jnp.int32)
    k_pos = jnp.broadcast_to(k_pos, (B, L))
    outs = jax.jit(lambda q, k, v: [attention_core.attend(q, k, v, q_pos_BL=q_pos, k_pos_BS=k_pos, window=4,
                                                          impl=impl) for impl in ("xla_blocked", "reference")])(q, k, v)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


def test_masked_softmax_matches_autodiff_and_zeroes_empty_rows():
    x = jax.random.normal(jax.random.key(3), (3, 7), jnp.float32) * 3
    mask = jnp.asarray(np.array([[1, 0, 1, 1, 0, 1, 1], [0] * 7, [1] * 7], bool))
    dy = jax.random.normal(jax.random.key(4), (3, 7), jnp.float32)
    got = blocked_attention.masked_softmax(x, mask)
    want = attention_core.masked_softmax_autodiff(x, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(got)[1] == 0)
    g_got = jax.grad(lambda x: jnp.sum(blocked_attention.masked_softmax(x, mask) * dy))(x)
    g_want = jax.grad(lambda x: jnp.sum(attention_core.masked_softmax_autodiff(x, mask) * dy))(x)
    assert np.all(np.isfinite(np.asarray(g_got)))
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_layer_with_xla_blocked_equals_xla():
    """Through the attention layer (RoPE, projections, training positions), values and grads."""
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, impl="xla")
    params = attention.init(jax.random.key(1), cfg)
    x = jax.random.normal(jax.random.key(2), (B, 2 * blocked_attention.DEFAULT_BLOCK + 3, 32), jnp.float32)

    def loss(p, impl):
        y, _ = attention.forward(p, x, cfg=dataclasses.replace(cfg, impl=impl))
        return jnp.sum(y * x)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, impl)
                          for impl in ("xla", "xla_blocked"))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bad_block_is_named():
    with pytest.raises(ValueError, match="block"):
        blocked_attention.key_ranges(8, 8, block=0, causal=True, window=None)


@pytest.mark.parametrize("index_order", [True, False])
def test_auto_picks_blocked_only_for_index_order_and_equals_xla(index_order, monkeypatch):
    """impl="auto" on CPU: the blocked path exactly when the caller vouches for index order (and
    L is long enough), the full path otherwise; both equal "xla", values and gradients."""
    calls = []
    real = blocked_attention.attend_blocked
    monkeypatch.setattr(blocked_attention, "attend_blocked", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = attention_core.AUTO_BLOCKED_MIN_LEN
    q, k, v, dy = _qkv(2, 1, Lq=n, S=n, seed=7, batch=1, head_dim=4, cotangent=True)
    pos = jnp.arange(n, dtype=jnp.int32)[None]

    def loss(q, k, v, impl):
        o = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, impl=impl, index_order=index_order)
        return jnp.sum(o * dy), o

    both = jax.jit(lambda q, k, v: [jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, impl)
                                    for impl in ("auto", "xla")])
    ((_, o_auto), g_auto), ((_, o_xla), g_xla) = both(q, k, v)
    assert len(calls) == int(index_order)
    np.testing.assert_allclose(np.asarray(o_auto), np.asarray(o_xla), rtol=1e-5, atol=1e-5)
    for a, b in zip(g_auto, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_attention_layer_tells_attend_index_order(monkeypatch):
    """Default positions without a cache vouch for index order; passed positions do not."""
    seen = []
    real = attention_core.attend
    monkeypatch.setattr(attention_core, "attend", lambda *a, **k: seen.append(k["index_order"]) or real(*a, **k))
    cfg = AttentionConfig(d_model=8, n_heads=2, n_kv_heads=1, head_dim=4)
    params = attention.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, 3, 8), jnp.float32)
    jax.eval_shape(lambda p, x: attention.forward(p, x, cfg=cfg), params, x)
    jax.eval_shape(lambda p, x: attention.forward(p, x, cfg=cfg, positions=jnp.arange(3, dtype=jnp.int32)[None]),
                   params, x)
    assert seen == [True, False]


def test_default_block_keeps_at_most_max_tiles():
    """The tile count stays bounded (compile time grows with it): long sequences get longer tiles."""
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
    q, k, v, dy = _qkv(2, 1, Lq=n, S=n, seed=3, batch=1, head_dim=4, cotangent=True)
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
