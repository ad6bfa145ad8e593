"""Multi-head Latent Attention (DeepSeek-V2 / V3) as a sequence mixer.

Keys and values are compressed jointly into one latent per token, c = RMSNorm(x W_kv_a), from
which each head's non-rotary key and its value are up-projected. Because RoPE does not commute
with that up-projection, position enters through a separate small key k_pe, rotated and shared
by all heads; each query head is split the same way into q_nope (scored against the latent's
keys) and q_pe (scored against k_pe). Queries are optionally low-rank too (q_lora_rank).

    scores = (q_nope . k_nope + q_pe . k_pe) * scale,   o = softmax(scores) v,   y = o W_o

The cache holds only the normalised latent c [B, T, C] and the rotated shared key k_pe [B, T, R]
(plus each slot's position, -1 = empty, and each row's next slot, as in layers/attention.py), so
one token costs C + R numbers per layer instead of 2 * H * head_dim.

Two equal ways to compute the same scores:
- naive: materialise k_nope / v per head from the latent and call `attend` (cheap for long
  queries: training and prefill).
- absorbed: fold W_k_b into the query (q_nope W_k_b^T gives a query in latent space) so scores are
  taken directly against the cached latent, attend over latents as one shared key/value head
  (MQA with G = 1), then apply W_v_b to the attended latent. No per-head K/V is ever built, which
  is what makes decoding cheap in memory traffic.
`MLAConfig.absorb` forces one of them; None takes naive in `forward` and absorbed in `step`.

Shape letters (beyond ARCHITECTURE.md's): C kv_lora_rank, Q q_lora_rank, N qk_nope_head_dim,
R qk_rope_head_dim, K = N + R (query/key head dim), E v_head_dim, T cache slots.

Checkpoint layout (HF `DeepseekV3Attention`): kv_a_proj_with_mqa [C + R, D] splits into
wkv_a_DC (first C rows) and wk_pe_DR (last R); kv_b_proj [H * (N + E), C] splits per head into
wk_b_CHN and wv_b_CHE; q_b_proj / q_proj rows per head are [nope | rope].
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import attention_core, checks, norms, params as P
from layers.params import ParamSpec, fan_in_normal
from layers.positions import RopeConfig, apply_rope

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


def _default_rope() -> RopeConfig:
    # DeepSeek rotates adjacent pairs (2i, 2i+1) of the rope part.
    return RopeConfig(layout="interleaved")


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's yarn magnitude correction: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Attributes:
    d_model: model width D.
    n_heads: query heads H (every head reads the same latent).
    kv_lora_rank: C, width of the cached key/value latent.
    q_lora_rank: Q, width of the query bottleneck (x -> Q -> RMSNorm -> heads); None projects
      queries directly from D (DeepSeek-V2-Lite).
    qk_nope_head_dim: N, per-head key/query dims without position.
    qk_rope_head_dim: R, per-head query dims with RoPE; the key part is one shared vector.
    v_head_dim: E, per-head value dims.
    causal: False gives bidirectional attention.
    sliding_window: attend to the last W positions including the current one (None: all).
    rope: rotary settings for the rope part (interleaved by default, as DeepSeek); yarn scaling's
      cos/sin multiplier goes in rope.attention_factor.
    softmax_scale: multiplier on scores, used as given; None means (N + R) ** -0.5, times
      yarn_mscale(rope.factor, mscale_all_dim) ** 2 when mscale_all_dim is set.
    mscale_all_dim: DeepSeek's yarn `mscale_all_dim` (needs rope.scaling="yarn").
    norm_eps: epsilon of the q and kv latent RMSNorms.
    absorb: True / False forces the absorbed / naive computation everywhere; None uses naive in
      `forward` and absorbed in `step`.
    impl: attention implementation passed to `attend` ("xla" | "reference" | "pallas").
    """

    d_model: int
    n_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None = None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    causal: bool = True
    sliding_window: int | None = None
    rope: RopeConfig = dataclasses.field(default_factory=_default_rope)
    softmax_scale: float | None = None
    mscale_all_dim: float | None = None
    norm_eps: float = 1e-6
    absorb: bool | None = None
    impl: str = "xla"

    def __post_init__(self):
        name = "MLAConfig"
        for field in ("d_model", "n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                      "v_head_dim"):
            checks.positive(name, field, getattr(self, field))
        if self.q_lora_rank is not None:
            checks.positive(name, "q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            checks.fail(name, "qk_rope_head_dim", "an even number (RoPE rotates pairs)",
                        self.qk_rope_head_dim)
        if self.sliding_window is not None:
            checks.positive(name, "sliding_window", self.sliding_window)
        if not isinstance(self.rope, RopeConfig):
            checks.fail(name, "rope", "a RopeConfig (MLA always rotates its rope part)", self.rope)
        if self.rope.fraction != 1.0:
            # The rope part is its own vector; partial rotation is expressed by qk_nope_head_dim.
            checks.fail(name, "rope", "a RopeConfig with fraction=1.0", self.rope)
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            checks.fail(name, "softmax_scale", "a positive float or None", self.softmax_scale)
        if self.mscale_all_dim is not None:
            if not self.mscale_all_dim > 0:
                checks.fail(name, "mscale_all_dim", "a positive float or None", self.mscale_all_dim)
            if self.rope.scaling != "yarn":
                checks.fail(name, "mscale_all_dim", "None unless rope.scaling='yarn'", self.mscale_all_dim)
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)
        checks.one_of(name, "absorb", self.absorb, (None, True, False))
        checks.one_of(name, "impl", self.impl, attention_core.IMPLS)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        scale = self.qk_head_dim ** -0.5
        if self.mscale_all_dim is not None:
            # Yarn stretches the rope part; DeepSeek compensates the logits' magnitude here.
            scale *= yarn_mscale(self.rope.factor, self.mscale_all_dim) ** 2
        return scale


def param_specs(cfg: MLAConfig) -> dict:
    D, H, C, N, R, E = (cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                        cfg.qk_rope_head_dim, cfg.v_head_dim)
    K = N + R
    specs: dict[str, Any] = {}
    if cfg.q_lora_rank is None:
        specs["wq_DHK"] = ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,)))
    else:
        Q = cfg.q_lora_rank
        specs["wq_a_DQ"] = ParamSpec((D, Q), ("embed", "q_lora"), fan_in_normal((0,)))
        specs["q_norm"] = {"scale": ParamSpec((Q,), ("q_lora",), P.ones)}
        specs["wq_b_QHK"] = ParamSpec((Q, H, K), ("q_lora", "heads", "head_dim"), fan_in_normal((0,)))
    specs["wkv_a_DC"] = ParamSpec((D, C), ("embed", "kv_lora"), fan_in_normal((0,)))
    specs["wk_pe_DR"] = ParamSpec((D, R), ("embed", "head_dim"), fan_in_normal((0,)))
    specs["kv_norm"] = {"scale": ParamSpec((C,), ("kv_lora",), P.ones)}
    specs["wk_b_CHN"] = ParamSpec((C, H, N), ("kv_lora", "heads", "head_dim"), fan_in_normal((0,)))
    specs["wv_b_CHE"] = ParamSpec((C, H, E), ("kv_lora", "heads", "head_dim"), fan_in_normal((0,)))
    specs["wo_HED"] = ParamSpec((H, E, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1)))
    return specs


def init(key: jax.Array, cfg: MLAConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: MLAConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Latent cache: normalised c [B, T, C], rotated shared key k_pe [B, T, R], the logical
    position of each slot (-1 empty) and the next slot to write per row."""
    checks.positive("init_state", "batch_size", batch_size)
    checks.positive("init_state", "max_len", max_len)
    return {
        "c_BTC": jnp.zeros((batch_size, max_len, cfg.kv_lora_rank), dtype),
        "k_pe_BTR": jnp.zeros((batch_size, max_len, cfg.qk_rope_head_dim), dtype),
        "pos_BT": jnp.full((batch_size, max_len), -1, jnp.int32),
        "index_B": jnp.zeros((batch_size,), jnp.int32),
    }


def kv_cache_bytes_per_token(cfg: MLAConfig, dtype_bytes: int = 2) -> int:
    """Cache bytes per token per layer: the latent (C) and the shared rope key (R)."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes


def kv_cache_comparison(cfg: MLAConfig, *, n_kv_heads: int | None = None, head_dim: int | None = None,
                        dtype_bytes: int = 2) -> dict:
    """Per-token, per-layer cache bytes of this MLA against MHA and GQA of the same width.

    head_dim defaults to d_model // n_heads; n_kv_heads (GQA groups G) to n_heads // 4 when that
    divides, else 1. `mla_equivalent_gqa_groups` is the G at which GQA would cache as much
    (DeepSeek-V2 reports 2.25 for its shapes).
    """
    H = cfg.n_heads
    if head_dim is None:
        head_dim = max(cfg.d_model // H, 1)
    checks.positive("kv_cache_comparison", "head_dim", head_dim)
    if n_kv_heads is None:
        n_kv_heads = H // 4 if H % 4 == 0 else 1
    checks.positive("kv_cache_comparison", "n_kv_heads", n_kv_heads)
    mla = kv_cache_bytes_per_token(cfg, dtype_bytes)
    mha = 2 * H * head_dim * dtype_bytes
    gqa = 2 * n_kv_heads * head_dim * dtype_bytes
    return {
        "mla": mla,
        "mha": mha,
        "gqa": gqa,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "mla_over_mha": mla / mha,
        "mla_over_gqa": mla / gqa,
        "mla_equivalent_gqa_groups": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * head_dim),
    }


def _proj(x, w, spec: str):
    """Einsum in the activation dtype with fp32 accumulation, result back in x's dtype."""
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _pad_last(x, width: int):
    extra = width - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _queries(params, x_BLD, positions, cfg):
    """Per-head queries, split into the part without position [B,L,H,N] and the rotated part."""
    if cfg.q_lora_rank is None:
        q_BLHK = _proj(x_BLD, params["wq_DHK"], "BLD,DHK->BLHK")
    else:
        cq_BLQ = _proj(x_BLD, params["wq_a_DQ"], "BLD,DQ->BLQ")
        cq_BLQ = norms.rms_norm(cq_BLQ, params["q_norm"]["scale"], cfg.norm_eps)
        q_BLHK = _proj(cq_BLQ, params["wq_b_QHK"], "BLQ,QHK->BLHK")
    N = cfg.qk_nope_head_dim
    q_pe_BLHR = apply_rope(q_BLHK[..., N:], positions, cfg=cfg.rope)
    return q_BLHK[..., :N], q_pe_BLHR


def _latents(params, x_BLD, positions, cfg):
    """The normalised latent [B,L,C] and the rotated shared rope key [B,L,R] of each token."""
    c_BLC = _proj(x_BLD, params["wkv_a_DC"], "BLD,DC->BLC")
    c_BLC = norms.rms_norm(c_BLC, params["kv_norm"]["scale"], cfg.norm_eps)
    k_pe_BLR = _proj(x_BLD, params["wk_pe_DR"], "BLD,DR->BLR")
    B, L, R = k_pe_BLR.shape
    # apply_rope works on [B, L, heads, dims]: the shared key is one head.
    k_pe_BLR = apply_rope(k_pe_BLR.reshape(B, L, 1, R), positions, cfg=cfg.rope).reshape(B, L, R)
    return c_BLC, k_pe_BLR


def _attend_naive(params, q_nope_BLHN, q_pe_BLHR, c_BSC, k_pe_BSR, masks, cfg):
    """Up-project per-head keys and values from the latent, then ordinary attention."""
    H, E = cfg.n_heads, cfg.v_head_dim
    k_nope_BSHN = _proj(c_BSC, params["wk_b_CHN"], "BSC,CHN->BSHN")
    v_BSHE = _proj(c_BSC, params["wv_b_CHE"], "BSC,CHE->BSHE")
    B, S, R = k_pe_BSR.shape
    k_pe_BSHR = jnp.broadcast_to(k_pe_BSR.reshape(B, S, 1, R), (B, S, H, R))
    q_BLHK = jnp.concatenate([q_nope_BLHN, q_pe_BLHR], axis=-1)
    k_BSHK = jnp.concatenate([k_nope_BSHN, k_pe_BSHR], axis=-1)
    # attend wants one width for q, k and v; zero padding changes neither scores nor outputs.
    W = max(cfg.qk_head_dim, E)
    o_BLHW = attention_core.attend(
        _pad_last(q_BLHK, W), _pad_last(k_BSHK, W), _pad_last(v_BSHE, W), **masks,
        causal=cfg.causal, window=cfg.sliding_window, scale=cfg.scale, impl=cfg.impl)
    return o_BLHW[..., :E]


def _attend_absorbed(params, q_nope_BLHN, q_pe_BLHR, c_BSC, k_pe_BSR, masks, cfg):
    """Scores against the latent itself: q_nope . (c W_k_b) == (q_nope W_k_b^T) . c, and
    softmax . (c W_v_b) == (softmax . c) W_v_b. One shared key/value head (G = 1)."""
    C = cfg.kv_lora_rank
    q_lat_BLHC = _proj(q_nope_BLHN, params["wk_b_CHN"], "BLHN,CHN->BLHC")
    q_BLHM = jnp.concatenate([q_lat_BLHC, q_pe_BLHR], axis=-1)  # M = C + R
    B, S, _ = c_BSC.shape
    # The key [c | k_pe] doubles as the value: its first C dims are the latent to average.
    kv_BS1M = jnp.concatenate([c_BSC, k_pe_BSR], axis=-1).reshape(B, S, 1, -1)
    o_BLHM = attention_core.attend(
        q_BLHM, kv_BS1M, kv_BS1M, **masks,
        causal=cfg.causal, window=cfg.sliding_window, scale=cfg.scale, impl=cfg.impl)
    return _proj(o_BLHM[..., :C], params["wv_b_CHE"], "BLHC,CHE->BLHE")


def _forward(params, x_BLD, *, cfg, state, positions, segment_ids, absorb: bool):
    B, L, _ = x_BLD.shape
    if positions is None:
        offset_B = jnp.zeros((B,), jnp.int32) if state is None else state["index_B"]
        positions = offset_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
    q_nope_BLHN, q_pe_BLHR = _queries(params, x_BLD, positions, cfg)
    c_BLC, k_pe_BLR = _latents(params, x_BLD, positions, cfg)

    if state is None:
        c_BSC, k_pe_BSR = c_BLC, k_pe_BLR
        masks = dict(q_pos_BL=positions, k_pos_BS=positions, q_seg_BL=segment_ids, k_seg_BS=segment_ids)
        new_state = None
    else:
        new_state = attention_core.cache_append(state, {"c_BTC": c_BLC, "k_pe_BTR": k_pe_BLR},
                                                positions, segment_ids)
        c_BSC = new_state["c_BTC"].astype(x_BLD.dtype)
        k_pe_BSR = new_state["k_pe_BTR"].astype(x_BLD.dtype)
        masks = dict(q_pos_BL=positions, k_pos_BS=new_state["pos_BT"])

    attend_fn = _attend_absorbed if absorb else _attend_naive
    o_BLHE = attend_fn(params, q_nope_BLHN, q_pe_BLHR, c_BSC, k_pe_BSR, masks, cfg)
    y_BLD = _proj(o_BLHE, params["wo_HED"], "BLHE,HED->BLD")
    return y_BLD, new_state


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: MLAConfig,
            state: dict | None = None, positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Attend over x (and the latent cache, when `state` is given); naive unless cfg.absorb.

    positions: logical position of each token (RoPE and causal order); defaults to 0..L-1, or
      continuing each row's cache.
    segment_ids: packed sequences attend only within their own segment; with a cache, tokens
      with segment id 0 are padding and are written as empty slots.
    """
    checks.array("x_BLD", x_BLD, rank=3, shape=(None, None, cfg.d_model))
    absorb = False if cfg.absorb is None else cfg.absorb
    return _forward(params, x_BLD, cfg=cfg, state=state, positions=positions,
                    segment_ids=segment_ids, absorb=absorb)


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: MLAConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One decoding token against the latent cache; absorbed unless cfg.absorb is False."""
    checks.array("x_BD", x_BD, rank=2, shape=(None, cfg.d_model))
    absorb = True if cfg.absorb is None else cfg.absorb
    y_B1D, state = _forward(params, x_BD[:, None, :], cfg=cfg, state=state, positions=None,
                            segment_ids=None, absorb=absorb)
    return y_B1D[:, 0], state
