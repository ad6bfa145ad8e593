"""KV cache options of the attention mixer: the int8 cache (per position and kv-head scales) and
the rolling cache with attention sinks (StreamingLLM), against full attention under the same
mask, written out here independently of layers.attention_core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import attention, mixers
from layers.attention import AttentionConfig
from layers.checks import ConfigError

B, D = 2, 32


def _params_and_x(cfg, L, seed=0):
    kp, kx = jax.random.split(jax.random.key(seed))
    return attention.init(kp, cfg), jax.random.normal(kx, (B, L, D))


def _steps(params, x, state, cfg):
    step = jax.jit(lambda p, xt, s: attention.step(p, xt, s, cfg=cfg))
    ys = []
    for t in range(x.shape[1]):
        yt, state = step(params, x[:, t], state)
        ys.append(yt)
    return np.stack(ys, 1), state, step


def _sink_window_reference(params, x, cfg, sinks, window):
    """float64 NumPy attention (no RoPE) where query i sees key j iff j <= i and (i - j < window
    or j < sinks)."""
    x = np.asarray(x, np.float64)
    q = np.einsum("bld,dhk->blhk", x, np.asarray(params["wq_DHK"], np.float64))
    k = np.einsum("bld,dgk->blgk", x, np.asarray(params["wk_DGK"], np.float64))
    v = np.einsum("bld,dgk->blgk", x, np.asarray(params["wv_DGK"], np.float64))
    L, H, G = x.shape[1], cfg.n_heads, cfg.n_kv_heads
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))
    k, v = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)
    s = np.einsum("blhk,bshk->bhls", q, k) * cfg.scale
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhls,bshk->blhk", p, v)
    return np.einsum("blhk,hkd->bld", o, np.asarray(params["wo_HKD"], np.float64))


def test_int8_cache_decodes_close_to_full_precision_in_a_third_of_the_bytes():
    cfg = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2)
    q8 = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, kv_cache_dtype="int8")
    params, x = _params_and_x(cfg, 12)
    y, _ = attention.forward(params, x, cfg=cfg)
    y8, state, _ = _steps(params, x, attention.init_state(q8, B, 16), q8)
    assert state["k_BTGK"].dtype == jnp.int8 and state["k_scale_BTG"].shape == (B, 16, 2)
    err = np.abs(y8 - np.asarray(y)).max() / np.abs(np.asarray(y)).max()
    # Rounding to 1/254 of each (position, head) absmax: about 0.2% relative; bound 1%.
    assert 1e-5 < err < 1e-2
    # K/V bytes per position and kv head: head_dim int8 + one fp32 scale against head_dim fp32.
    kv = lambda c: sum(v.nbytes for n, v in attention.init_state(c, B, 16).items() if n[0] in "kv")
    assert kv(q8) / kv(cfg) == (cfg.head_dim + 4) / (4 * cfg.head_dim)


@pytest.mark.slow
def test_int8_cache_prefill_and_ragged_padding():
    q8 = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=1, kv_cache_dtype="int8")
    params, x = _params_and_x(q8, 9, seed=1)
    y, _ = attention.forward(params, x, cfg=q8)
    state = attention.init_state(q8, B, 12)
    y1, state = attention.forward(params, x[:, :5], cfg=q8, state=state)
    y2, state = attention.forward(params, x[:, 5:], cfg=q8, state=state)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), np.asarray(y), atol=2e-2 * float(jnp.abs(y).max()))
    assert np.asarray(state["index_B"]).tolist() == [9, 9]


@pytest.mark.parametrize("sinks, window", [(2, 4), pytest.param(0, 3, marks=pytest.mark.slow)])
def test_rolling_cache_equals_the_sink_window_mask_on_the_full_sequence(sinks, window):
    cfg = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, rope=None, sliding_window=window,
                          attention_sinks=sinks, rolling_cache=True)
    L = 17  # several times around the ring
    params, x = _params_and_x(cfg, L, seed=2)
    want = _sink_window_reference(params, x, cfg, sinks, window)
    y_full, _ = attention.forward(params, x, cfg=cfg)
    np.testing.assert_allclose(np.asarray(y_full), want, rtol=1e-4, atol=1e-4)
    # Token by token through sinks + window slots: max_len is not what bounds it.
    state = attention.init_state(cfg, B, 4)
    assert state["k_BTGK"].shape[1] == sinks + window
    y_steps, state, step = _steps(params, x, state, cfg)
    np.testing.assert_allclose(y_steps, want, rtol=1e-4, atol=1e-4)
    assert step._cache_size() == 1 and np.asarray(state["next_pos_B"]).tolist() == [L, L]
    # The slots hold the sinks and the last `window` positions.
    assert sorted(np.asarray(state["pos_BT"][0]).tolist()) == list(range(sinks)) + list(range(L - window, L))


@pytest.mark.slow
def test_rolling_cache_prefill_chunks_longer_than_the_window():
    sinks, window, L = 2, 4, 17
    cfg = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, rope=None, sliding_window=window,
                          attention_sinks=sinks, rolling_cache=True)
    params, x = _params_and_x(cfg, L, seed=2)
    want = _sink_window_reference(params, x, cfg, sinks, window)
    state = attention.init_state(cfg, B, 4)
    y1, state = attention.forward(params, x[:, :7], cfg=cfg, state=state)
    y2, state = attention.forward(params, x[:, 7:13], cfg=cfg, state=state)
    y3, _, _ = _steps(params, x[:, 13:], state, cfg)
    np.testing.assert_allclose(np.concatenate([y1, y2, y3], 1), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rolling_cache_with_a_large_window_equals_the_full_cache():
    full = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2)
    rolling = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, sliding_window=16, attention_sinks=2,
                              rolling_cache=True)
    params, x = _params_and_x(full, 10, seed=3)
    y, _ = attention.forward(params, x, cfg=full)
    # Left padding: padded tokens (segment id 0) are not written.
    seg = jnp.asarray([[1] * 10, [0, 0, 0] + [1] * 7], jnp.int32)
    pos = jnp.asarray([list(range(10)), [0, 0, 0] + list(range(7))], jnp.int32)
    y_pad, state = attention.forward(params, x, cfg=rolling, state=attention.init_state(rolling, B, 8),
                                     positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(y_pad[0]), np.asarray(y[0]), rtol=1e-5, atol=1e-5)
    y_alone, _ = attention.forward(params, x[1:, 3:], cfg=full)
    np.testing.assert_allclose(np.asarray(y_pad[1, 3:]), np.asarray(y_alone[0]), rtol=1e-5, atol=1e-5)
    assert np.asarray(state["next_pos_B"]).tolist() == [10, 7]


def test_rolling_int8_state_bytes_do_not_grow_with_length():
    cfg = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, sliding_window=8, attention_sinks=4,
                          rolling_cache=True, kv_cache_dtype="int8")
    assert mixers.state_bytes(cfg, 1, 64) == mixers.state_bytes(cfg, 1, 1 << 20)


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention_sinks=2), "sliding_window"), (dict(rolling_cache=True), "sliding_window"),
    (dict(attention_sinks=-1, sliding_window=4), "attention_sinks"), (dict(kv_cache_dtype="int4"), "kv_cache_dtype")])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AttentionConfig(d_model=D, n_heads=4, **kwargs)
