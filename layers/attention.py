"""Softmax attention as a sequence mixer: MHA / GQA / MQA, causal or bidirectional, sliding
window, logit softcap, qk-norm, RoPE or ALiBi, packed-sequence masks, and a KV cache.

Mixer protocol (DESIGN.md): param_specs, init, forward, init_state, step.

The cache keeps, per row, the keys and values of every slot plus the logical position written
there (-1 = empty). Masks are built from positions, so decoding, prefill and packed training
share one code path (`layers.attention_core.attend`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import attention_core, checks, dense, norms, params as P
from layers.params import ParamSpec, fan_in_normal, zeros
from layers.positions import RopeConfig, alibi_slopes, apply_rope

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Attributes:
    d_model: model width D.
    n_heads: query heads H.
    n_kv_heads: key/value heads G (H for MHA, 1 for MQA); must divide n_heads.
    head_dim: K; defaults to d_model // n_heads.
    causal: False gives bidirectional (encoder) attention.
    sliding_window: attend to the last W positions including the current one (None: all).
    logit_softcap: scores become cap * tanh(scores / cap) (Gemma 2).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (OLMo 2, Gemma 3).
    rope: rotary embedding settings, or None for no rotary.
    alibi: add ALiBi distance biases (usually with rope=None).
    use_bias: biases on the q/k/v projections; out_bias: on the output projection.
    query_scale: multiplier on scores; defaults to head_dim ** -0.5.
    impl: "auto" | "xla" | "xla_blocked" | "reference" | "pallas" (see layers.attention_core).
      "auto" (the default) takes the Pallas kernel on GPU/TPU; on CPU the blocked XLA path for
      training calls on the default positions (L >= 128), else "xla".
    attention_sinks: with sliding_window, keys at the first this-many positions stay visible
      beyond the window (StreamingLLM's attention sinks); 0 = none.
    rolling_cache: the KV cache keeps only attention_sinks + sliding_window slots, reused as a
      ring, so decoding runs to any length in constant memory (needs sliding_window). Keys keep
      their original positions: the result equals full attention under the sink + window mask.
    kv_cache_dtype: None stores K/V in the dtype given to init_state; "int8" stores int8 values
      with one fp32 scale per (position, kv head) (absmax / 127), dequantised when attending.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    sliding_window: int | None = None
    logit_softcap: float | None = None
    qk_norm: bool = False
    rope: RopeConfig | None = dataclasses.field(default_factory=RopeConfig)
    alibi: bool = False
    use_bias: bool = False
    out_bias: bool = False
    query_scale: float | None = None
    impl: str = "auto"
    attention_sinks: int = 0
    rolling_cache: bool = False
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        name = "AttentionConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        checks.positive(name, "n_kv_heads", self.n_kv_heads)
        checks.divides(name, "n_kv_heads", self.n_kv_heads, "n_heads", self.n_heads)
        if self.head_dim is None:
            checks.divides(name, "n_heads", self.n_heads, "d_model", self.d_model)
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        checks.positive(name, "head_dim", self.head_dim)
        if self.sliding_window is not None:
            checks.positive(name, "sliding_window", self.sliding_window)
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            checks.fail(name, "logit_softcap", "a positive float or None", self.logit_softcap)
        checks.one_of(name, "impl", self.impl, attention_core.IMPLS)
        if not isinstance(self.attention_sinks, int) or self.attention_sinks < 0:
            checks.fail(name, "attention_sinks", "an integer >= 0", self.attention_sinks)
        if self.attention_sinks and self.sliding_window is None:
            checks.fail(name, "sliding_window", "a window when attention_sinks > 0", None)
        if self.rolling_cache and self.sliding_window is None:
            checks.fail(name, "sliding_window", "a window when rolling_cache=True", None)
        checks.one_of(name, "kv_cache_dtype", self.kv_cache_dtype, (None, "int8"))
        if self.rope is not None and self.head_dim % 2:
            checks.fail(name, "head_dim", "an even number when rope is used", self.head_dim)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale


def param_specs(cfg: AttentionConfig) -> dict:
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    specs: dict[str, Any] = {
        "wq_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wk_DGK": ParamSpec((D, G, K), ("embed", "kv_heads", "head_dim"), fan_in_normal((0,))),
        "wv_DGK": ParamSpec((D, G, K), ("embed", "kv_heads", "head_dim"), fan_in_normal((0,))),
        "wo_HKD": ParamSpec((H, K, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }
    if cfg.use_bias:
        specs["bq_HK"] = ParamSpec((H, K), ("heads", "head_dim"), zeros, decay=False)
        specs["bk_GK"] = ParamSpec((G, K), ("kv_heads", "head_dim"), zeros, decay=False)
        specs["bv_GK"] = ParamSpec((G, K), ("kv_heads", "head_dim"), zeros, decay=False)
    if cfg.out_bias:
        specs["bo_D"] = ParamSpec((D,), ("embed",), zeros)
    if cfg.qk_norm:
        specs["q_norm"] = {"scale": ParamSpec((K,), ("head_dim",), P.ones)}
        specs["k_norm"] = {"scale": ParamSpec((K,), ("head_dim",), P.ones)}
    return specs


def init(key: jax.Array, cfg: AttentionConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: AttentionConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """KV cache: k/v [B, T, G, K], the logical position of each slot (-1 empty) and the
    next slot to write per row (`index_B`). A rolling cache has T = attention_sinks +
    sliding_window slots whatever max_len is, and tracks the next position (`next_pos_B`)
    instead: it never fills. An int8 cache adds k/v scales [B, T, G]."""
    checks.positive("init_state", "batch_size", batch_size)
    checks.positive("init_state", "max_len", max_len)
    T = cfg.attention_sinks + cfg.sliding_window if cfg.rolling_cache else max_len
    shape = (batch_size, T, cfg.n_kv_heads, cfg.head_dim)
    kv_dtype = jnp.int8 if cfg.kv_cache_dtype == "int8" else dtype
    state = {
        "k_BTGK": jnp.zeros(shape, kv_dtype),
        "v_BTGK": jnp.zeros(shape, kv_dtype),
        "pos_BT": jnp.full((batch_size, T), -1, jnp.int32),
        ("next_pos_B" if cfg.rolling_cache else "index_B"): jnp.zeros((batch_size,), jnp.int32),
    }
    if cfg.kv_cache_dtype == "int8":
        state["k_scale_BTG"] = jnp.ones(shape[:3], jnp.float32)
        state["v_scale_BTG"] = jnp.ones(shape[:3], jnp.float32)
    return state


def _int8(x_BLGK):
    """Symmetric int8 with one fp32 scale per (token, kv head): absmax / 127."""
    x = x_BLGK.astype(jnp.float32)
    scale_BLG = jnp.max(jnp.abs(x), axis=-1) / 127.0
    scale_BLG = jnp.where(scale_BLG > 0, scale_BLG, 1.0)
    return jnp.clip(jnp.round(x / scale_BLG[..., None]), -127, 127).astype(jnp.int8), scale_BLG


def _cache_entries(k_BLGK, v_BLGK, cfg: AttentionConfig) -> dict:
    """What the cache stores for new keys and values (named as the state's leaves)."""
    if cfg.kv_cache_dtype != "int8":
        return {"k_BTGK": k_BLGK, "v_BTGK": v_BLGK}
    (k_q, k_s), (v_q, v_s) = _int8(k_BLGK), _int8(v_BLGK)
    return {"k_BTGK": k_q, "v_BTGK": v_q, "k_scale_BTG": k_s, "v_scale_BTG": v_s}


def _cache_kv(entries: dict, dtype):
    """Keys and values in the compute dtype from cache entries (dequantised when int8)."""
    k, v = entries["k_BTGK"], entries["v_BTGK"]
    if "k_scale_BTG" in entries:
        k = k.astype(jnp.float32) * entries["k_scale_BTG"][..., None]
        v = v.astype(jnp.float32) * entries["v_scale_BTG"][..., None]
    return k.astype(dtype), v.astype(dtype)


def _project(x_BLD, w, b):
    B, L, D = x_BLD.shape
    if dense.flat_rows():
        y_NO = jnp.einsum("ND,DO->NO", x_BLD.reshape(B * L, D), w.reshape(D, -1).astype(x_BLD.dtype),
                          preferred_element_type=jnp.float32)
        y = y_NO.reshape(B, L, *w.shape[1:])
    else:
        y = jnp.einsum("BLD,D...->BL...", x_BLD, w.astype(x_BLD.dtype), preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)[None, None]
    return y.astype(x_BLD.dtype)


def _out_project(o_BLHK, w_HKD, dtype):
    B, L, H, K = o_BLHK.shape
    if dense.flat_rows():
        y_ND = jnp.einsum("NI,ID->ND", o_BLHK.reshape(B * L, H * K), w_HKD.reshape(H * K, -1).astype(dtype),
                          preferred_element_type=jnp.float32)
        return y_ND.reshape(B, L, -1)
    return jnp.einsum("BLHK,HKD->BLD", o_BLHK, w_HKD.astype(dtype), preferred_element_type=jnp.float32)


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: AttentionConfig,
            state: dict | None = None, positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Attend over x (and the cache, when `state` is given).

    positions: logical position of each token (RoPE, ALiBi, causal order); defaults to
      0..L-1, or continuing each row's cache.
    segment_ids: packed sequences attend only within their own segment; with a cache, tokens
      with segment id 0 are padding and are written as empty slots.
    """
    B, L, _ = x_BLD.shape
    # Default positions in a training call follow token order, which lets attend's "auto" pick
    # the blocked path (its tiles assume index order; layers/blocked_attention.py).
    index_order = positions is None and state is None
    if positions is None:
        offset_B = (jnp.zeros((B,), jnp.int32) if state is None
                    else state["next_pos_B" if cfg.rolling_cache else "index_B"])
        positions = offset_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
    q_BLHK = _project(x_BLD, params["wq_DHK"], params.get("bq_HK"))
    k_BLGK = _project(x_BLD, params["wk_DGK"], params.get("bk_GK"))
    v_BLGK = _project(x_BLD, params["wv_DGK"], params.get("bv_GK"))
    if cfg.qk_norm:
        q_BLHK = norms.rms_norm(q_BLHK, params["q_norm"]["scale"], 1e-6)
        k_BLGK = norms.rms_norm(k_BLGK, params["k_norm"]["scale"], 1e-6)
    if cfg.rope is not None:
        q_BLHK = apply_rope(q_BLHK, positions, cfg=cfg.rope)
        k_BLGK = apply_rope(k_BLGK, positions, cfg=cfg.rope)

    if state is None:
        k_pos_BS, k_seg_BS, k_BSGK, v_BSGK = positions, segment_ids, k_BLGK, v_BLGK
        q_seg_BL = segment_ids
        new_state = None
    elif cfg.rolling_cache:
        # Attend over the cache before this call plus the new keys (a long prefill needs keys
        # that its own later tokens evict), then keep what later queries can still see.
        entries = _cache_entries(k_BLGK, v_BLGK, cfg)
        new_pos_BL = positions if segment_ids is None else jnp.where(segment_ids > 0, positions, -1)
        k_pos_BS = jnp.concatenate([state["pos_BT"], new_pos_BL], axis=1)
        (k_old, v_old), (k_new, v_new) = _cache_kv(state, x_BLD.dtype), _cache_kv(entries, x_BLD.dtype)
        k_BSGK, v_BSGK = jnp.concatenate([k_old, k_new], axis=1), jnp.concatenate([v_old, v_new], axis=1)
        new_state = attention_core.cache_write_rolling(state, entries, positions, segment_ids,
                                                       sinks=cfg.attention_sinks, window=cfg.sliding_window)
        q_seg_BL = k_seg_BS = None
    else:
        new_state = attention_core.cache_append(state, _cache_entries(k_BLGK, v_BLGK, cfg), positions,
                                                segment_ids)
        k_pos_BS = new_state["pos_BT"]
        k_BSGK, v_BSGK = _cache_kv(new_state, x_BLD.dtype)
        q_seg_BL = k_seg_BS = None

    slopes = jnp.asarray(alibi_slopes(cfg.n_heads)) if cfg.alibi else None
    o_BLHK = attention_core.attend(
        q_BLHK, k_BSGK, v_BSGK, q_pos_BL=positions, k_pos_BS=k_pos_BS,
        q_seg_BL=q_seg_BL, k_seg_BS=k_seg_BS, causal=cfg.causal, window=cfg.sliding_window,
        softcap=cfg.logit_softcap, scale=cfg.scale, alibi_slopes_H=slopes, sinks=cfg.attention_sinks,
        impl=cfg.impl, index_order=index_order)
    y_BLD = _out_project(o_BLHK, params["wo_HKD"], x_BLD.dtype)
    if "bo_D" in params:
        y_BLD = y_BLD + params["bo_D"].astype(jnp.float32)[None, None]
    return y_BLD.astype(x_BLD.dtype), new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: AttentionConfig) -> tuple["Float[Array, 'B D']", dict]:
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=cfg, state=state)
    return y_B1D[:, 0], state
