"""Tests for layers.positions: RoPE (layouts, partial rotary, scalings), ALiBi, sinusoidal, learned."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import params as params_lib
from layers import positions
from layers.checks import ConfigError
from layers.positions import RopeConfig


@pytest.fixture(autouse=True)
def strict_promotion():
    # Run strict even when this module is collected without the project's conftest.
    old_dtype = jax.config.jax_numpy_dtype_promotion
    old_rank = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    yield
    jax.config.update("jax_numpy_dtype_promotion", old_dtype)
    jax.config.update("jax_numpy_rank_promotion", old_rank)


# Inputs from NumPy: jax.random would compile a fresh threefry kernel for every shape.
def rand(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(dtype)


def rand_pos(seed, shape, hi):
    # Arbitrary (unsorted, repeated) positions, as packed sequences and caches produce.
    return jnp.asarray(np.random.default_rng(seed).integers(0, hi, shape, np.int32))


# ---------------------------------------------------------------------------------------------
# Slow references, written from the formulas with Python loops.


def ref_plain(theta, rot_dim):
    return [theta ** (-(2 * i) / rot_dim) for i in range(rot_dim // 2)]


def ref_yarn(theta, rot_dim, factor, orig, beta_fast, beta_slow):
    def dim_for(n_rot):
        return rot_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(ref_plain(theta, rot_dim)):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f * (1 - ramp) + (f / factor) * ramp)
    return out, low, high


def ref_llama3(theta, rot_dim, factor, orig, low_ff, high_ff):
    out, regions = [], []
    for f in ref_plain(theta, rot_dim):
        wavelen = 2 * math.pi / f
        if wavelen < orig / high_ff:
            out.append(f)
            regions.append("high")
        elif wavelen > orig / low_ff:
            out.append(f / factor)
            regions.append("low")
        else:
            s = (orig / wavelen - low_ff) / (high_ff - low_ff)
            out.append((1 - s) * f / factor + s * f)
            regions.append("mid")
    return out, regions


def ref_rope(x, pos, inv, *, layout, rot_dim, mult=1.0):
    """Apply an explicit 2x2 rotation matrix to every pair, in float64."""
    x = np.asarray(x, np.float64)
    pos = np.asarray(pos)
    out = x.copy()
    B, L, H, _ = x.shape
    half = rot_dim // 2
    for b in range(B):
        for l in range(L):
            for i in range(half):
                a = pos[b, l] * inv[i]
                rot = mult * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
                ia, ib = (i, i + half) if layout == "half" else (2 * i, 2 * i + 1)
                for h in range(H):
                    out[b, l, h, [ia, ib]] = rot @ x[b, l, h, [ia, ib]]
    return out


# Jitted once per (shape, cfg): one compile is cheaper than dispatching every op eagerly.
rope = jax.jit(positions.apply_rope, static_argnames="cfg")


def scores(q_BLHK, k_BSHK):
    return jnp.einsum("blhk,bshk->bhls", q_BLHK, k_BSHK)


# ---------------------------------------------------------------------------------------------
# RoPE


SCALED = [
    RopeConfig(),
    RopeConfig(scaling="linear", factor=4.0),
    RopeConfig(scaling="yarn", factor=8.0, original_max_len=64),
    RopeConfig(scaling="llama3", factor=8.0, original_max_len=64, theta=500000.0),
]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("base", SCALED, ids=lambda c: str(c.scaling))
def test_rope_scores_depend_only_on_relative_offset(layout, fraction, base):
    cfg = dataclasses.replace(base, layout=layout, fraction=fraction)
    B, L, S, H, K = 2, 5, 7, 3, 16
    q, k = rand(0, (B, L, H, K)), rand(1, (B, S, H, K))
    q_pos, k_pos = rand_pos(2, (B, L), 60), rand_pos(3, (B, S), 60)

    def rotated_scores(shift):
        return scores(rope(q, q_pos + shift, cfg=cfg),
                      rope(k, k_pos + shift, cfg=cfg))

    s0 = rotated_scores(0)
    np.testing.assert_allclose(rotated_scores(123), s0, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(rotated_scores(1000), s0, atol=5e-3, rtol=1e-3)
    # The rotation did something: scores differ from the unrotated ones.
    assert np.max(np.abs(np.asarray(s0 - scores(q, k)))) > 0.5


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_interleaved_equals_half_after_permutation(fraction):
    B, L, H, K = 2, 6, 2, 16
    R = round(fraction * K)
    # Gather pairs (2i, 2i+1) into (i, i + R/2); pass-through dims stay put.
    perm = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2), np.arange(R, K)])
    inv_perm = np.argsort(perm)
    x, pos = rand(4, (B, L, H, K)), rand_pos(5, (B, L), 200)
    half = rope(x[..., perm], pos, cfg=RopeConfig(layout="half", fraction=fraction))
    inter = rope(x, pos, cfg=RopeConfig(layout="interleaved", fraction=fraction))
    np.testing.assert_allclose(half[..., inv_perm], inter, atol=1e-5, rtol=1e-5)
    # The two layouts are genuinely different on the same input.
    half_same_x = rope(x, pos, cfg=RopeConfig(layout="half", fraction=fraction))
    assert np.max(np.abs(np.asarray(half_same_x - inter))) > 0.1


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("cfg_kw", [{}, {"scaling": "linear", "factor": 2.0},
                                    {"scaling": "dynamic", "factor": 2.0, "original_max_len": 16},
                                    {"scaling": "llama3", "factor": 8.0, "original_max_len": 64},
                                    {"scaling": "yarn", "factor": 4.0, "original_max_len": 64}],
                         ids=["plain", "linear", "dynamic", "llama3", "yarn"])
def test_rope_preserves_norms(layout, cfg_kw):
    cfg = RopeConfig(layout=layout, fraction=0.75, **cfg_kw)
    B, L, H, K = 2, 9, 3, 32
    R = 24
    x, pos = rand(6, (B, L, H, K)), rand_pos(7, (B, L), 100)
    y = rope(x, pos, cfg=cfg)
    _, mult = positions.inv_frequencies(cfg, R)
    # Only yarn scales, and by exactly its attention factor.
    assert (mult > 1.0) == (cfg.scaling == "yarn")
    np.testing.assert_allclose(jnp.linalg.norm(y[..., :R], axis=-1),
                               mult * jnp.linalg.norm(x[..., :R], axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(y[..., R:], x[..., R:])
    assert not np.allclose(y[..., :R], x[..., :R], atol=1e-2)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_apply_rope_matches_explicit_rotation(layout, fraction):
    cfg = RopeConfig(layout=layout, fraction=fraction, theta=500.0)
    B, L, H, K = 2, 4, 2, 12
    R = round(fraction * K)
    x, pos = rand(8, (B, L, H, K)), rand_pos(9, (B, L), 50)
    want = ref_rope(x, pos, ref_plain(500.0, R), layout=layout, rot_dim=R)
    np.testing.assert_allclose(positions.apply_rope(x, pos, cfg=cfg), want, atol=2e-5, rtol=1e-5)


def test_apply_rope_yarn_matches_explicit_rotation():
    cfg = RopeConfig(scaling="yarn", factor=16.0, original_max_len=128, layout="interleaved")
    B, L, H, K = 1, 5, 2, 32
    x, pos = rand(10, (B, L, H, K)), rand_pos(11, (B, L), 2000)
    inv, _, _ = ref_yarn(10000.0, K, 16.0, 128, 32.0, 1.0)
    want = ref_rope(x, pos, inv, layout="interleaved", rot_dim=K, mult=0.1 * math.log(16.0) + 1)
    np.testing.assert_allclose(positions.apply_rope(x, pos, cfg=cfg), want, atol=5e-4, rtol=1e-4)


def test_apply_rope_dynamic_follows_max_position():
    cfg = RopeConfig(scaling="dynamic", factor=4.0, original_max_len=16)
    B, L, H, K = 2, 6, 2, 16
    x = rand(12, (B, L, H, K))
    theta, R = 10000.0, K

    short = rand_pos(13, (B, L), 16)  # max + 1 <= 16: plain frequencies
    np.testing.assert_allclose(positions.apply_rope(x, short, cfg=cfg),
                               ref_rope(x, short, ref_plain(theta, R), layout="half", rot_dim=R),
                               atol=2e-5, rtol=1e-5)

    long = rand_pos(14, (B, L), 40).at[1, 2].set(39)  # seq_len = 40 > 16: grown base
    new_base = theta * (4.0 * 40 / 16 - 3.0) ** (R / (R - 2))
    want = ref_rope(x, long, ref_plain(new_base, R), layout="half", rot_dim=R)
    np.testing.assert_allclose(positions.apply_rope(x, long, cfg=cfg), want, atol=5e-5, rtol=1e-4)
    jitted = jax.jit(positions.apply_rope, static_argnames="cfg")
    np.testing.assert_allclose(jitted(x, long, cfg=cfg), want, atol=5e-5, rtol=1e-4)


def test_apply_rope_bf16_close_to_fp32():
    cfg = RopeConfig(layout="interleaved", fraction=0.5)
    x, pos = rand(15, (2, 8, 4, 32)), rand_pos(16, (2, 8), 4000)
    y32 = positions.apply_rope(x, pos, cfg=cfg)
    y16 = positions.apply_rope(x.astype(jnp.bfloat16), pos, cfg=cfg)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=5e-2, rtol=2e-2)
    # Pass-through dims are the bf16 input, bit for bit.
    np.testing.assert_array_equal(y16[..., 16:], x.astype(jnp.bfloat16)[..., 16:])


def test_linear_scaling_equals_divided_positions():
    cfg = RopeConfig(scaling="linear", factor=4.0)
    x, m = rand(17, (2, 5, 2, 16)), rand_pos(18, (2, 5), 300)
    np.testing.assert_allclose(rope(x, m * 4, cfg=cfg),
                               rope(x, m, cfg=RopeConfig()), atol=2e-4, rtol=1e-4)


def test_inv_frequencies_plain_and_linear():
    inv, mult = positions.inv_frequencies(RopeConfig(theta=10000.0), 64)
    assert inv.shape == (32,) and inv.dtype == jnp.float32 and mult == 1.0
    np.testing.assert_allclose(inv, ref_plain(10000.0, 64), rtol=1e-6)
    inv, mult = positions.inv_frequencies(RopeConfig(scaling="linear", factor=3.0), 64)
    np.testing.assert_allclose(inv, np.array(ref_plain(10000.0, 64)) / 3.0, rtol=1e-6)
    assert mult == 1.0


def test_inv_frequencies_dynamic():
    cfg = RopeConfig(scaling="dynamic", factor=2.0, original_max_len=2048, theta=10000.0)
    plain = np.asarray(positions.inv_frequencies(RopeConfig(), 64)[0])
    for seq_len in (None, 1, 100, 2048):
        inv, _ = positions.inv_frequencies(cfg, 64, seq_len)
        np.testing.assert_array_equal(inv, plain)
    for seq_len in (2049, 5000, 100_000):
        base = 10000.0 * (2.0 * seq_len / 2048 - 1.0) ** (64 / 62)
        want = ref_plain(base, 64)
        inv, mult = positions.inv_frequencies(cfg, 64, seq_len)
        np.testing.assert_allclose(inv, want, rtol=2e-5)
        assert mult == 1.0
        # The lowest frequency shrinks, the highest (i = 0) is unchanged.
        assert inv[-1] < plain[-1] and inv[0] == plain[0]
        # seq_len may be traced.
        traced = jax.jit(lambda n: positions.inv_frequencies(cfg, 64, n)[0])(jnp.int32(seq_len))
        np.testing.assert_allclose(traced, want, rtol=2e-5)


@pytest.mark.parametrize("factor,orig,rot_dim", [(8.0, 2048, 64), (4.0, 4096, 128), (40.0, 4096, 64)])
def test_inv_frequencies_yarn(factor, orig, rot_dim):
    cfg = RopeConfig(scaling="yarn", factor=factor, original_max_len=orig)
    want, low, high = ref_yarn(10000.0, rot_dim, factor, orig, 32.0, 1.0)
    inv, mult = positions.inv_frequencies(cfg, rot_dim)
    np.testing.assert_allclose(inv, want, rtol=1e-6)
    assert mult == pytest.approx(0.1 * math.log(factor) + 1.0)
    # Both ends of the ramp are present: high frequencies kept, low ones interpolated.
    plain = np.array(ref_plain(10000.0, rot_dim))
    assert 0 < low < high < rot_dim // 2
    np.testing.assert_allclose(inv[:low], plain[:low], rtol=1e-6)
    np.testing.assert_allclose(inv[math.ceil(high):], plain[math.ceil(high):] / factor, rtol=1e-6)
    # An explicit attention factor overrides the default.
    _, mult = positions.inv_frequencies(RopeConfig(scaling="yarn", factor=factor, attention_factor=1.5),
                                        rot_dim)
    assert mult == 1.5
    _, mult = positions.inv_frequencies(RopeConfig(scaling="yarn", factor=1.0), rot_dim)
    assert mult == 1.0


def test_inv_frequencies_llama3():
    # Llama 3.1 settings.
    cfg = RopeConfig(scaling="llama3", factor=8.0, original_max_len=8192, theta=500000.0,
                     low_freq_factor=1.0, high_freq_factor=4.0)
    want, regions = ref_llama3(500000.0, 128, 8.0, 8192, 1.0, 4.0)
    assert {"high", "mid", "low"} <= set(regions)
    inv, mult = positions.inv_frequencies(cfg, 128)
    assert mult == 1.0
    np.testing.assert_allclose(inv, want, rtol=1e-6)
    plain = np.array(ref_plain(500000.0, 128))
    reg = np.array(regions)
    np.testing.assert_allclose(inv[reg == "high"], plain[reg == "high"], rtol=1e-6)
    np.testing.assert_allclose(inv[reg == "low"], plain[reg == "low"] / 8.0, rtol=1e-6)
    mid = np.asarray(inv)[reg == "mid"]
    assert np.all(mid < plain[reg == "mid"]) and np.all(mid > plain[reg == "mid"] / 8.0)


def test_rope_jit_matches_eager():
    cfg = RopeConfig(scaling="llama3", factor=8.0, original_max_len=64, layout="interleaved")
    x, pos = rand(19, (2, 5, 2, 16)), rand_pos(20, (2, 5), 500)
    jitted = jax.jit(positions.apply_rope, static_argnames="cfg")
    np.testing.assert_allclose(jitted(x, pos, cfg=cfg), positions.apply_rope(x, pos, cfg=cfg),
                               atol=1e-6, rtol=1e-6)


_SHORT = (1.0, 1.25, 1.6, 2.0, 2.9, 4.1, 5.5, 7.0)
_LONG = (1.1, 2.0, 3.5, 6.0, 11.0, 19.0, 30.0, 47.0)


def test_apply_rope_longrope_picks_factors_by_max_position():
    # One factor set per call: short while max(pos) + 1 <= original_max_len, long beyond.
    cfg = RopeConfig(scaling="longrope", factor=8.0, original_max_len=16, short_factor=_SHORT, long_factor=_LONG)
    B, L, H, K = 2, 5, 2, 16
    x = rand(31, (B, L, H, K))
    mult = math.sqrt(1 + math.log(8.0) / math.log(16))
    plain = ref_plain(10000.0, K)
    within = rand_pos(32, (B, L), 16).at[0, 1].set(15)  # seq_len 16: still short
    want = ref_rope(x, within, [f / s for f, s in zip(plain, _SHORT)], layout="half", rot_dim=K, mult=mult)
    np.testing.assert_allclose(rope(x, within, cfg=cfg), want, atol=2e-5, rtol=1e-5)
    beyond = within.at[1, 3].set(16)  # seq_len 17: long, for every token of the call
    want = ref_rope(x, beyond, [f / s for f, s in zip(plain, _LONG)], layout="half", rot_dim=K, mult=mult)
    np.testing.assert_allclose(rope(x, beyond, cfg=cfg), want, atol=2e-5, rtol=1e-5)
    # An explicit attention factor wins; factor 1 means no scaling of cos and sin.
    for kw, m in (({"attention_factor": 0.7}, 0.7), ({"factor": 1.0}, 1.0)):
        assert positions.inv_frequencies(dataclasses.replace(cfg, **kw), K)[1] == pytest.approx(m)


def test_inv_frequencies_longrope_matches_transformers():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = dict(rope_type="longrope", rope_theta=500000.0, original_max_position_embeddings=32,
              short_factor=list(_SHORT), long_factor=list(_LONG))
    for extra, factor in (({}, 128 / 32), ({"factor": 2.0, "attention_factor": 1.3}, 2.0)):
        hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=128,
                                      rope_parameters={**rp, **extra})
        cfg = RopeConfig(theta=500000.0, scaling="longrope", factor=factor, original_max_len=32, short_factor=_SHORT,
                         long_factor=_LONG, attention_factor=extra.get("attention_factor"))
        for seq_len in (None, 32, 33, 100):
            want, want_mult = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=seq_len)
            got, mult = positions.inv_frequencies(cfg, 16, seq_len)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
            assert mult == pytest.approx(want_mult, rel=1e-12)


def test_longrope_config_validates():
    kw = dict(scaling="longrope", factor=2.0, short_factor=_SHORT, long_factor=_LONG)
    with pytest.raises(ConfigError, match=r"RopeConfig\.short_factor"):
        RopeConfig(**{**kw, "short_factor": None})
    with pytest.raises(ConfigError, match=r"RopeConfig\.short_factor"):
        RopeConfig(**{**kw, "short_factor": list(_SHORT)})  # a list would make the config unhashable
    with pytest.raises(ConfigError, match=r"RopeConfig\.long_factor"):
        RopeConfig(**{**kw, "long_factor": _LONG[:4]})
    with pytest.raises(ConfigError, match=r"RopeConfig\.short_factor"):
        RopeConfig(short_factor=_SHORT)  # factors without longrope
    with pytest.raises(ValueError, match=r"short_factor: expected 4 entries"):
        positions.inv_frequencies(RopeConfig(**kw), 8)


@pytest.mark.parametrize("kw,field", [
    ({"theta": 0.0}, "theta"),
    ({"theta": -5.0}, "theta"),
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"),
    ({"layout": "neox"}, "layout"),
    ({"scaling": "ntk"}, "scaling"),
    ({"scaling": "linear", "factor": 0.5}, "factor"),
    ({"scaling": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0}, "high_freq_factor"),
    ({"original_max_len": 0}, "original_max_len"),
])
def test_rope_config_validates(kw, field):
    with pytest.raises(ConfigError, match=rf"RopeConfig\.{field}"):
        RopeConfig(**kw)


def test_apply_rope_rejects_bad_inputs():
    x = rand(21, (1, 3, 2, 10))
    pos = rand_pos(22, (1, 3), 10)
    with pytest.raises(ValueError, match="fraction"):  # 0.5 * 10 = 5 dims: odd
        positions.apply_rope(x, pos, cfg=RopeConfig(fraction=0.5))
    with pytest.raises(ValueError, match="pos_BL"):
        positions.apply_rope(x, rand_pos(22, (1, 4), 10), cfg=RopeConfig())
    with pytest.raises(TypeError, match="pos_BL"):
        positions.apply_rope(x, pos.astype(jnp.float32), cfg=RopeConfig())


# ---------------------------------------------------------------------------------------------
# ALiBi


def ref_slopes(n):
    def geometric(m):
        return [2 ** (-8 * i / m) for i in range(1, m + 1)]

    p = 1
    while p * 2 <= n:
        p *= 2
    return geometric(p) + geometric(2 * p)[0::2][: n - p]


def test_alibi_slopes_power_of_two():
    s = positions.alibi_slopes(8)
    assert s.dtype == np.float32 and s.shape == (8,)
    np.testing.assert_array_equal(s, 2.0 ** -np.arange(1, 9, dtype=np.float32))


@pytest.mark.parametrize("n", [1, 2, 6, 12, 20, 32])
def test_alibi_slopes_general(n):
    np.testing.assert_allclose(positions.alibi_slopes(n), ref_slopes(n), rtol=1e-6)


def test_alibi_slopes_six_heads_literal():
    want = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    np.testing.assert_array_equal(positions.alibi_slopes(6), np.array(want, np.float32))
    with pytest.raises(ValueError, match="n_heads"):
        positions.alibi_slopes(0)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_matches_formula(causal):
    B, H, L, S = 2, 6, 4, 7
    slopes = positions.alibi_slopes(H)
    q_pos, k_pos = rand_pos(23, (B, L), 30), rand_pos(24, (B, S), 30)
    bias = positions.alibi_bias(slopes, q_pos, k_pos, causal=causal)
    assert bias.shape == (B, H, L, S) and bias.dtype == jnp.float32
    qp, kp = np.asarray(q_pos), np.asarray(k_pos)
    want = np.empty((B, H, L, S))
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    d = int(qp[b, i]) - int(kp[b, j])
                    want[b, h, i, j] = -float(slopes[h]) * (d if causal else abs(d))
    np.testing.assert_allclose(bias, want, rtol=1e-6, atol=1e-6)
    # Works with a jnp slope vector and under jit too.
    jitted = jax.jit(positions.alibi_bias, static_argnames="causal")
    np.testing.assert_allclose(jitted(jnp.asarray(slopes), q_pos, k_pos, causal=causal), want,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sinusoidal and learned absolute positions


def test_sinusoidal_matches_formula():
    D = 10
    pos = rand_pos(25, (2, 5), 500)
    out = positions.sinusoidal(pos, D, max_timescale=10000.0)
    assert out.shape == (2, 5, D) and out.dtype == jnp.float32
    want = np.empty((2, 5, D))
    for b in range(2):
        for l in range(5):
            for i in range(D // 2):
                a = int(pos[b, l]) * 10000.0 ** (-2 * i / D)
                want[b, l, i] = math.sin(a)
                want[b, l, D // 2 + i] = math.cos(a)
    np.testing.assert_allclose(out, want, atol=2e-4)
    bf = positions.sinusoidal(pos, D, dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf.astype(jnp.float32), want, atol=1e-2)


def test_sinusoidal_rejects_odd_width():
    with pytest.raises(ValueError, match="d_model"):
        positions.sinusoidal(rand_pos(26, (1, 3), 10), 7)


def test_learned_positions():
    specs = positions.learned_param_specs(16, 8, init_std=0.5)
    spec = specs["pos_PD"]
    assert spec.shape == (16, 8) and spec.logical_axes == ("positions", "embed")
    p = params_lib.init(jax.random.key(27), specs)
    assert float(jnp.std(p["pos_PD"])) == pytest.approx(0.5, rel=0.3)
    pos = rand_pos(28, (3, 5), 16)
    out = positions.learned(p, pos, dtype=jnp.bfloat16)
    assert out.shape == (3, 5, 8) and out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, np.asarray(p["pos_PD"])[np.asarray(pos)].astype(jnp.bfloat16))
    # Under jit the range check is skipped: valid rows gather, an out-of-range row is NaN, not clamped.
    jitted = jax.jit(positions.learned)(p, pos.at[0, 0].set(16))
    np.testing.assert_array_equal(jitted[1:], np.asarray(p["pos_PD"])[np.asarray(pos)][1:])
    assert bool(jnp.all(jnp.isnan(jitted[0, 0])))


@pytest.mark.parametrize("bad", [16, 40, -1])
def test_learned_rejects_out_of_range(bad):
    p = params_lib.init(jax.random.key(29), positions.learned_param_specs(16, 4))
    pos = rand_pos(30, (2, 3), 16).at[1, 1].set(bad)
    with pytest.raises(ValueError, match=r"pos_BL.*max_len=16"):
        positions.learned(p, pos)
