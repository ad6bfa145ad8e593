"""Attention: fast paths against slow references, the mixer protocol, masks and causality."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import attention, attention_core
from layers.attention import AttentionConfig
from layers.checks import ConfigError
from layers.positions import RopeConfig, alibi_slopes

B, L, D = 2, 11, 32  # odd length on purpose


def loop_attention(q, k, v, *, causal, window, softcap, scale, slopes=None, q_pos=None, k_pos=None,
                   q_seg=None, k_seg=None):
    """Slow obvious attention in NumPy float64: loops over batch, head and query."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    Bq, Lq, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    q_pos = np.arange(Lq)[None].repeat(Bq, 0) if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(S)[None].repeat(Bq, 0) if k_pos is None else np.asarray(k_pos)
    out = np.zeros_like(q)
    for b in range(Bq):
        for h in range(H):
            g = h // (H // G)
            for i in range(Lq):
                allowed = []
                for j in range(S):
                    ok = k_pos[b, j] >= 0
                    d = q_pos[b, i] - k_pos[b, j]
                    if causal:
                        ok &= d >= 0
                    if window is not None:
                        ok &= (d if causal else abs(d)) < window
                    if q_seg is not None:
                        ok &= q_seg[b, i] == k_seg[b, j]
                    allowed.append(ok)
                allowed = np.array(allowed)
                if not allowed.any():
                    continue
                s = k[b, :, g] @ q[b, i, h] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                if slopes is not None:
                    dist = q_pos[b, i] - k_pos[b]
                    s = s - slopes[h] * (dist if causal else np.abs(dist))
                s = np.where(allowed, s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, i, h] = p @ v[b, :, g]
    return out


CASES = {
    "mha_causal": dict(H=4, G=4, causal=True, window=None, softcap=None, alibi=False),
    "gqa_window": dict(H=4, G=2, causal=True, window=4, softcap=None, alibi=False),
    "mqa_softcap": dict(H=4, G=1, causal=True, window=None, softcap=5.0, alibi=False),
    "bidir_window_alibi": dict(H=6, G=3, causal=False, window=3, softcap=None, alibi=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_attend_matches_loops(name, impl):
    c = CASES[name]
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    K = 8
    q = jax.random.normal(kq, (B, L, c["H"], K))
    k = jax.random.normal(kk, (B, L, c["G"], K))
    v = jax.random.normal(kv, (B, L, c["G"], K))
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    slopes = alibi_slopes(c["H"]) if c["alibi"] else None
    out = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, causal=c["causal"],
                                window=c["window"], softcap=c["softcap"], scale=0.3,
                                alibi_slopes_H=None if slopes is None else jnp.asarray(slopes), impl=impl)
    want = loop_attention(q, k, v, causal=c["causal"], window=c["window"], softcap=c["softcap"],
                          scale=0.3, slopes=slopes)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


def test_grouped_gradients_match_reference():
    kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (B, L, 6, 8))
    k = jax.random.normal(kk, (B, L, 2, 8))
    v = jax.random.normal(kv, (B, L, 2, 8))
    cot = jax.random.normal(kg, q.shape)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

    def loss(impl, q, k, v):
        o = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, window=5, softcap=4.0,
                                  alibi_slopes_H=jnp.asarray(alibi_slopes(6)), impl=impl)
        return jnp.sum(o * cot)

    g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_xla, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32():
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(kk_, (B, L, 4, 16)) for kk_ in (kq, kk, kv))
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    o32 = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos)
    o16 = attention_core.attend(*(a.astype(jnp.bfloat16) for a in (q, k, v)), q_pos_BL=pos, k_pos_BS=pos)
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o16.astype(jnp.float32)), np.asarray(o32), rtol=5e-2, atol=5e-2)


def test_segments_and_empty_rows():
    """Packed rows attend within their segment; a query with no allowed key gives zeros."""
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(x, (1, 6, 2, 4)) for x in (kq, kk, kv))
    seg = jnp.array([[1, 1, 1, 2, 2, 2]], jnp.int32)
    pos = jnp.array([[0, 1, 2, 0, 1, 2]], jnp.int32)
    out = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, q_seg_BL=seg, k_seg_BS=seg)
    first = attention_core.attend(q[:, :3], k[:, :3], v[:, :3], q_pos_BL=pos[:, :3], k_pos_BS=pos[:, :3])
    second = attention_core.attend(q[:, 3:], k[:, 3:], v[:, 3:], q_pos_BL=pos[:, 3:], k_pos_BS=pos[:, 3:])
    np.testing.assert_allclose(np.asarray(out), np.concatenate([first, second], 1), rtol=1e-6, atol=1e-6)
    empty = jnp.full((1, 6), -1, jnp.int32)  # every key slot empty
    z = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=empty)
    assert np.all(np.asarray(z) == 0.0)
    g = jax.grad(lambda q: jnp.sum(attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=empty)))(q)
    assert np.all(np.isfinite(np.asarray(g)))


# ----- the mixer -----

MIXERS = {
    "gqa_rope": AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2),
    "mqa_window_softcap_qknorm": AttentionConfig(d_model=D, n_heads=4, n_kv_heads=1, sliding_window=3,
                                                 logit_softcap=8.0, qk_norm=True),
    "mha_alibi_bias": AttentionConfig(d_model=D, n_heads=4, rope=None, alibi=True, use_bias=True, out_bias=True),
    "interleaved_partial_rope": AttentionConfig(d_model=D, n_heads=2, n_kv_heads=2,
                                                rope=RopeConfig(layout="interleaved", fraction=0.5)),
}


def _params_and_x(cfg, seed=0):
    kp, kx, kb = jax.random.split(jax.random.key(seed), 3)
    params = attention.init(kp, cfg)
    # Biases start at zero; make them random so the test sees them.
    params = {n: (jax.random.normal(kb, p.shape) if n.startswith("b") else p) for n, p in params.items()}
    return params, jax.random.normal(kx, (B, L, D))


@pytest.mark.parametrize("name", list(MIXERS))
def test_forward_equals_step_by_step(name):
    cfg = MIXERS[name]
    params, x = _params_and_x(cfg)
    y, none_state = attention.forward(params, x, cfg=cfg)
    assert none_state is None
    state = attention.init_state(cfg, B, L + 3)
    step = jax.jit(lambda p, xt, s: attention.step(p, xt, s, cfg=cfg))
    ys = []
    for t in range(L):
        yt, state = step(params, x[:, t], state)
        ys.append(yt)
    np.testing.assert_allclose(np.stack(ys, 1), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert step._cache_size() == 1


@pytest.mark.parametrize("name", ["gqa_rope", "mqa_window_softcap_qknorm"])
def test_prefill_then_continue(name):
    cfg = MIXERS[name]
    params, x = _params_and_x(cfg, seed=1)
    y, _ = attention.forward(params, x, cfg=cfg)
    state = attention.init_state(cfg, B, 16)
    y1, state = attention.forward(params, x[:, :6], cfg=cfg, state=state)
    y2, state = attention.forward(params, x[:, 6:], cfg=cfg, state=state)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert np.asarray(state["index_B"]).tolist() == [L, L]


def test_gqa_equals_mha_with_repeated_kv():
    gqa = MIXERS["gqa_rope"]
    mha = dataclasses.replace(gqa, n_kv_heads=4)
    params, x = _params_and_x(gqa, seed=2)
    rep = dict(params)
    for n in ("wk_DGK", "wv_DGK"):
        rep[n] = jnp.repeat(params[n], 2, axis=1)
    y_gqa, _ = attention.forward(params, x, cfg=gqa)
    y_mha, _ = attention.forward(rep, x, cfg=mha)
    np.testing.assert_allclose(np.asarray(y_gqa), np.asarray(y_mha), rtol=1e-5, atol=1e-5)


def test_sliding_window_equals_band_masked_full_attention():
    cfg = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, sliding_window=4, rope=None)
    full = dataclasses.replace(cfg, sliding_window=None)
    params, x = _params_and_x(cfg, seed=3)
    y_win, _ = attention.forward(params, x, cfg=cfg)
    y_full, _ = attention.forward(params, x, cfg=full)
    # Tokens before the window boundary see the same keys either way; later ones must differ.
    np.testing.assert_allclose(np.asarray(y_win[:, :4]), np.asarray(y_full[:, :4]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(y_win[:, 4:]), np.asarray(y_full[:, 4:]), atol=1e-4)
    # And the full computation with the band mask written out by hand:
    xf = np.asarray(x, np.float64)
    q = np.einsum("bld,dhk->blhk", xf, np.asarray(params["wq_DHK"]))
    k = np.einsum("bld,dgk->blgk", xf, np.asarray(params["wk_DGK"]))
    v = np.einsum("bld,dgk->blgk", xf, np.asarray(params["wv_DGK"]))
    o = loop_attention(q, k, v, causal=True, window=4, softcap=None, scale=cfg.scale)
    want = np.einsum("blhk,hkd->bld", o, np.asarray(params["wo_HKD"]))
    np.testing.assert_allclose(np.asarray(y_win), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa_rope", "mha_alibi_bias"])
def test_causality_gradient_is_exactly_zero(name):
    cfg = MIXERS[name]
    params, x = _params_and_x(cfg, seed=4)
    t = 5
    g = jax.grad(lambda x: jnp.sum(attention.forward(params, x, cfg=cfg)[0][:, t]))(x)
    g = np.asarray(g)
    assert np.all(g[:, t + 1:] == 0.0)
    assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0)


def test_padding_slots_in_cache_are_ignored():
    """Left padding with segment id 0 gives the same outputs as the unpadded prompt."""
    cfg = MIXERS["gqa_rope"]
    params, x = _params_and_x(cfg, seed=5)
    pad = 3
    x_pad = jnp.concatenate([jax.random.normal(jax.random.key(9), (B, pad, D)), x], 1)
    seg = jnp.concatenate([jnp.zeros((B, pad), jnp.int32), jnp.ones((B, L), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.zeros((B, pad), jnp.int32),
                           jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))], 1)
    y_pad, _ = attention.forward(params, x_pad, cfg=cfg, state=attention.init_state(cfg, B, 20),
                                 positions=pos, segment_ids=seg)
    y, _ = attention.forward(params, x, cfg=cfg)
    np.testing.assert_allclose(np.asarray(y_pad[:, pad:]), np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=32, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(d_model=32, n_heads=4, sliding_window=0), "sliding_window"),
    (dict(d_model=32, n_heads=4, impl="cuda"), "impl"),
    (dict(d_model=32, n_heads=0), "n_heads"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AttentionConfig(**kwargs)
