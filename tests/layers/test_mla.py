"""Multi-head Latent Attention: against a slow obvious reference, absorbed == naive, the mixer
protocol over the latent cache, causality, precision, cache size and config errors."""

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mla
from layers.checks import ConfigError
from layers.mla import MLAConfig
from layers.positions import RopeConfig
from tests.layers import mixer_harness as mh

B, L, D = 2, 9, 32  # odd length on purpose

CONFIGS = {
    # E != N + R on purpose, so the padding of attend's widths is exercised both ways.
    "q_lora": MLAConfig(d_model=D, n_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=6),
    "direct_q_window": MLAConfig(d_model=D, n_heads=2, kv_lora_rank=12, qk_nope_head_dim=6,
                                 qk_rope_head_dim=6, v_head_dim=16, sliding_window=4),
}


# Jitted entry points (cfg static): eager op-by-op dispatch is what makes small tests slow.
FWD = jax.jit(mla.forward, static_argnames="cfg")
STEP = jax.jit(mla.step, static_argnames="cfg")
# The harness only needs the protocol functions; hand it the jitted ones.
JITTED = types.SimpleNamespace(forward=FWD, step=mla.step, init_state=mla.init_state)


def _params_and_x(cfg, seed=0, dtype=jnp.float32):
    kp, kx, kn = jax.random.split(jax.random.key(seed), 3)
    params = mla.init(kp, cfg)
    # Norm scales start at ones; make them random so the test sees them.
    norms_ = {n: {"scale": 1.0 + 0.3 * jax.random.normal(jax.random.fold_in(kn, i), p["scale"].shape)}
              for i, (n, p) in enumerate(params.items()) if n.endswith("_norm")}
    params = {**params, **norms_}
    return params, jax.random.normal(kx, (B, L, D)).astype(dtype)


# ----- the slow obvious reference (fp32 jnp, so it can be differentiated too) -----

HI = jax.lax.Precision.HIGHEST


def ref_rms(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale.reshape(1, 1, -1)


def ref_rope_interleaved(x, pos, theta):
    """Rotate adjacent pairs (2i, 2i+1) of the last axis by pos * theta^(-2i/R); x [B, L, R]
    with pos [L]."""
    R = x.shape[-1]
    inv = theta ** (-np.arange(0, R, 2, dtype=np.float64) / R)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]  # [L, R/2]
    cos, sin = (jnp.asarray(f(ang)[None], jnp.float32) for f in (np.cos, np.sin))
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(x.shape)


def reference(params, x, cfg):
    """Materialise every head's q, k and v from the weights, then a plain masked softmax with
    an explicit causal (and window) mask; no latent tricks, no cache, no `attend`."""
    Lx = x.shape[1]
    N = cfg.qk_nope_head_dim
    pos = np.arange(Lx)
    theta = cfg.rope.theta
    if cfg.q_lora_rank is None:
        q = jnp.einsum("bld,dhk->blhk", x, params["wq_DHK"], precision=HI)
    else:
        cq = ref_rms(jnp.einsum("bld,dq->blq", x, params["wq_a_DQ"], precision=HI),
                     params["q_norm"]["scale"], cfg.norm_eps)
        q = jnp.einsum("blq,qhk->blhk", cq, params["wq_b_QHK"], precision=HI)
    c = ref_rms(jnp.einsum("bld,dc->blc", x, params["wkv_a_DC"], precision=HI),
                params["kv_norm"]["scale"], cfg.norm_eps)
    k_pe = ref_rope_interleaved(jnp.einsum("bld,dr->blr", x, params["wk_pe_DR"], precision=HI), pos, theta)
    # Per-head keys and values, materialised.
    k_nope = jnp.einsum("blc,chn->blhn", c, params["wk_b_CHN"], precision=HI)
    v = jnp.einsum("blc,che->blhe", c, params["wv_b_CHE"], precision=HI)
    q_nope = q[..., :N]
    q_pe = jnp.stack([ref_rope_interleaved(q[:, :, h, N:], pos, theta) for h in range(cfg.n_heads)], 2)
    allowed = pos[None, :] <= pos[:, None]
    if cfg.sliding_window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < cfg.sliding_window
    s = (jnp.einsum("bihn,bjhn->bhij", q_nope, k_nope, precision=HI)
         + jnp.einsum("bihr,bjr->bhij", q_pe, k_pe, precision=HI)) * cfg.scale
    s = jnp.where(jnp.asarray(allowed)[None, None], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhij,bjhe->bihe", p, v, precision=HI)
    return jnp.einsum("blhe,hed->bld", o, params["wo_HED"], precision=HI)


@pytest.mark.parametrize("name, absorb", [
    ("q_lora", False), ("direct_q_window", False), ("q_lora", True),
    pytest.param("direct_q_window", True, marks=pytest.mark.slow),
])
def test_forward_matches_reference_values_and_gradients(name, absorb):
    cfg = dataclasses.replace(CONFIGS[name], absorb=absorb)
    params, x = _params_and_x(cfg)
    cot = jax.random.normal(jax.random.key(7), x.shape)

    @jax.jit  # one compilation for both functions and both gradients
    def both(params, x):
        y, state = mla.forward(params, x, cfg=cfg)
        want = reference(params, x, cfg)
        g = jax.grad(lambda p, x: jnp.sum(mla.forward(p, x, cfg=cfg)[0] * cot), argnums=(0, 1))(params, x)
        g_ref = jax.grad(lambda p, x: jnp.sum(reference(p, x, cfg) * cot), argnums=(0, 1))(params, x)
        return y, state, want, g, g_ref

    y, none_state, want, g, g_ref = both(params, x)
    assert none_state is None
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        mh.assert_close(a, b, 1e-4, f"grad{jax.tree_util.keystr(path)}")


def test_yarn_mscale_enters_the_softmax_scale():
    rope = RopeConfig(layout="interleaved", scaling="yarn", factor=40.0, original_max_len=64)
    cfg = dataclasses.replace(CONFIGS["q_lora"], rope=rope, mscale_all_dim=0.707)
    m = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert cfg.scale == pytest.approx(12 ** -0.5 * m * m)
    assert dataclasses.replace(cfg, softmax_scale=0.25).scale == 0.25
    assert CONFIGS["q_lora"].scale == pytest.approx(12 ** -0.5)
    # With yarn frequencies and the scale, the layer still matches itself absorbed vs naive.
    params, x = _params_and_x(cfg, seed=8)
    y_n, _ = FWD(params, x, cfg=dataclasses.replace(cfg, absorb=False))
    y_a, _ = FWD(params, x, cfg=dataclasses.replace(cfg, absorb=True))
    mh.assert_close(y_a, y_n, 1e-5, "yarn absorbed vs naive")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_absorbed_equals_naive_with_cache_and_in_step(name):
    base = CONFIGS[name]
    naive, absorbed = (dataclasses.replace(base, absorb=a) for a in (False, True))
    params, x = _params_and_x(base, seed=1)
    # Prefill with a cache, then single steps, both ways.
    s_n = mla.init_state(base, B, L + 2)
    s_a = mla.init_state(base, B, L + 2)
    y_n, s_n = FWD(params, x[:, :5], cfg=naive, state=s_n)
    y_a, s_a = FWD(params, x[:, :5], cfg=absorbed, state=s_a)
    mh.assert_close(y_a, y_n, 1e-5, "prefill absorbed vs naive")
    mh.assert_trees_close(s_a, s_n, 1e-6)
    for t in range(5, L):
        yt_n, s_n = STEP(params, x[:, t], s_n, cfg=naive)
        yt_a, s_a = STEP(params, x[:, t], s_a, cfg=absorbed)
        mh.assert_close(yt_a, yt_n, 1e-5, f"step {t} absorbed vs naive")


def test_absorbed_step_never_builds_per_head_keys_or_values():
    """The absorbed decode step has no [B, T, H, *] intermediate: it only reads the latent."""
    cfg = CONFIGS["q_lora"]
    T = 13  # distinct from every other dimension so shapes are unambiguous
    params, x = _params_and_x(cfg, seed=2)
    state = mla.init_state(cfg, B, T)

    def shapes(c):
        jaxpr = jax.make_jaxpr(lambda p, xt, s: mla.step(p, xt, s, cfg=c))(params, x[:, 0], state)
        return mh.jaxpr_shapes(jaxpr)

    per_head = {(B, T, cfg.n_heads, d) for d in (cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_head_dim)}
    assert not per_head & shapes(cfg)
    assert per_head & shapes(dataclasses.replace(cfg, absorb=False))  # the check can see them


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_step_by_step(name):
    cfg = CONFIGS[name]  # absorb=None: forward naive, step absorbed
    params, x = _params_and_x(cfg, seed=3)
    state0 = mla.init_state(cfg, B, L + 3)
    mh.check_step_equivalence(JITTED, cfg, params, x, state0, tol=1e-5)
    # And the cached forward equals the training forward.
    y, _ = FWD(params, x, cfg=cfg)
    y_c, _ = FWD(params, x, cfg=cfg, state=state0)
    mh.assert_close(y_c, y, 1e-5, "cached vs uncached forward")


def test_step_compiles_once():
    cfg = CONFIGS["q_lora"]
    params, x = _params_and_x(cfg, seed=3)
    state = mla.init_state(cfg, B, L)
    step = jax.jit(lambda p, xt, s: mla.step(p, xt, s, cfg=cfg))
    for t in range(3):
        _, state = step(params, x[:, t], state)
    assert step._cache_size() == 1
    assert np.asarray(state["index_B"]).tolist() == [3, 3]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_continue(name):
    cfg = CONFIGS[name]
    params, x = _params_and_x(cfg, seed=4)
    state0 = mla.init_state(cfg, B, 16)
    mh.check_split_equivalence(JITTED, cfg, params, x, 4, state0, tol=1e-5)


def test_cache_holds_only_latent_and_rope_key():
    cfg = CONFIGS["q_lora"]
    params, x = _params_and_x(cfg, seed=5)
    state = mla.init_state(cfg, B, 12, jnp.bfloat16)
    _, state = FWD(params, x[:, :4], cfg=cfg, state=state)
    _, state = STEP(params, x[:, 4], state, cfg=cfg)
    got = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    assert got == {
        "c_BTC": ((B, 12, cfg.kv_lora_rank), jnp.bfloat16),
        "k_pe_BTR": ((B, 12, cfg.qk_rope_head_dim), jnp.bfloat16),
        "pos_BT": ((B, 12), jnp.int32),
        "index_B": ((B,), jnp.int32),
    }
    assert np.asarray(state["pos_BT"])[0].tolist() == [0, 1, 2, 3, 4] + [-1] * 7
    # The cached latent is the normalised one: its RMS over C follows the norm scale, not x.
    c = np.asarray(state["c_BTC"][:, :5].astype(jnp.float32))
    scale = np.asarray(params["kv_norm"]["scale"])
    np.testing.assert_allclose(np.sqrt(np.mean((c / scale) ** 2, -1)), 1.0, rtol=2e-2)


def test_padding_slots_in_cache_are_ignored():
    """Left padding with segment id 0 gives the same outputs as the unpadded prompt."""
    cfg = CONFIGS["q_lora"]
    params, x = _params_and_x(cfg, seed=6)
    pad = 3
    x_pad = jnp.concatenate([jax.random.normal(jax.random.key(9), (B, pad, D)), x], 1)
    seg = jnp.concatenate([jnp.zeros((B, pad), jnp.int32), jnp.ones((B, L), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.zeros((B, pad), jnp.int32),
                           jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))], 1)
    y_pad, _ = FWD(params, x_pad, cfg=cfg, state=mla.init_state(cfg, B, 16),
                           positions=pos, segment_ids=seg)
    y, _ = FWD(params, x, cfg=cfg)
    mh.assert_close(y_pad[:, pad:], y, 1e-5, "padded vs unpadded")


@pytest.mark.parametrize("absorb", [None, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_close_to_fp32(absorb):
    """absorb=None covers both paths: forward naive, step absorbed."""
    cfg = dataclasses.replace(CONFIGS["q_lora"], absorb=absorb)
    params, x = _params_and_x(cfg, seed=7)
    y32, _ = FWD(params, x, cfg=cfg)
    y16, _ = FWD(params, x.astype(jnp.bfloat16), cfg=cfg)
    assert y16.dtype == jnp.bfloat16
    mh.assert_close(y16, y32, 3e-2, "bf16 vs fp32")
    # Decoding from a bf16 cache too.
    state = mla.init_state(cfg, B, L, jnp.bfloat16)
    yt, state = STEP(params, x[:, 0].astype(jnp.bfloat16), state, cfg=cfg)
    assert yt.dtype == jnp.bfloat16
    mh.assert_close(yt, y32[:, 0], 3e-2, "bf16 step vs fp32")


@pytest.mark.parametrize("absorb", [False, True])
def test_causality_gradient_is_exactly_zero(absorb):
    cfg = dataclasses.replace(CONFIGS["q_lora"], absorb=absorb)
    params, x = _params_and_x(cfg, seed=8)
    t = 4
    g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(mla.forward(params, x, cfg=cfg)[0][:, t])))(x))
    assert np.all(g[:, t + 1:] == 0.0)
    assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0)


def test_kv_cache_bytes():
    cfg = MLAConfig(d_model=64, n_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16)
    assert mla.kv_cache_bytes_per_token(cfg) == (32 + 8) * 2
    assert mla.kv_cache_bytes_per_token(cfg, dtype_bytes=4) == (32 + 8) * 4
    cmp = mla.kv_cache_comparison(cfg, n_kv_heads=2, head_dim=16, dtype_bytes=2)
    assert cmp["mla"] == 80
    assert cmp["mha"] == 2 * 4 * 16 * 2
    assert cmp["gqa"] == 2 * 2 * 16 * 2
    assert cmp["mla_over_mha"] == pytest.approx(80 / 256)
    assert cmp["mla_equivalent_gqa_groups"] == pytest.approx(40 / 32)
    # DeepSeek-V2's own numbers: d_c = 4 d_h, d_h^R = d_h / 2 -> like GQA with 2.25 groups.
    v2 = MLAConfig(d_model=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128)
    assert mla.kv_cache_comparison(v2, head_dim=128)["mla_equivalent_gqa_groups"] == pytest.approx(2.25)
    # The per-token formula agrees with the cache that init_state allocates (bf16 leaves).
    shapes = jax.eval_shape(lambda: mla.init_state(cfg, 1, 10, jnp.bfloat16))
    assert shapes["c_BTC"].size * 2 + shapes["k_pe_BTR"].size * 2 == 10 * mla.kv_cache_bytes_per_token(cfg)


@pytest.mark.parametrize("kwargs, field", [
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(v_head_dim=-1), "v_head_dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(softmax_scale=0.0), "softmax_scale"),
    (dict(mscale_all_dim=1.0), "mscale_all_dim"),
    (dict(rope=RopeConfig(layout="interleaved", fraction=0.5)), "rope"),
    (dict(absorb="yes"), "absorb"),
    (dict(impl="cuda"), "impl"),
])
def test_config_errors_name_the_field(kwargs, field):
    base = dict(d_model=32, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    with pytest.raises(ConfigError, match=f"MLAConfig.{field}"):
        MLAConfig(**{**base, **kwargs})


def test_wrong_input_width_is_named():
    cfg = CONFIGS["q_lora"]
    params, x = _params_and_x(cfg)
    with pytest.raises(ValueError, match="x_BLD"):
        mla.forward(params, x[..., :-1], cfg=cfg)
