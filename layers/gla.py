"""Gated linear attention (GLA, Yang et al. 2023; fla `layers/gla.py`, `ops/gla/naive.py`) and
plain linear attention (Katharopoulos et al. 2020; fla `layers/linear_attn.py`) as sequence mixers.

GLA, per head, with a data-dependent decay per key dimension:

    g_t = logsigmoid(x_t W1 W2 + b) / normaliser        (low-rank gate, normaliser 16)
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = K^-0.5 q_t S_t
    y = Wo( RMSNorm_head(o) * swish(x Wg) )

Linear attention: the same without decay (g = 0), q and k through a feature map ("identity" or
"elu1" = elu + 1), optionally divided by q_t . sum_{s<=t} k_s (the running key sum), then an
optional per-head RMSNorm (fla's default output norm) and the output projection.

Both run `layers.linear_recurrence.decayed_linear_attention`; forms "chunked", "recurrent" and
"parallel" give the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import checks, norms, params as P, segments
from layers.linear_recurrence import decayed_linear_attention
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

FORMS = ("chunked", "recurrent", "parallel")
FEATURE_MAPS = ("identity", "elu1")
# Added to the linear-attention denominator: it only guards against an exact zero.
DENOMINATOR_EPS = 1e-6


def _validate_common(name, cfg):
    checks.positive(name, "d_model", cfg.d_model)
    checks.positive(name, "n_heads", cfg.n_heads)
    checks.positive(name, "head_dim", cfg.head_dim)
    checks.positive(name, "value_head_dim", cfg.value_head_dim)
    if not (isinstance(cfg.norm_eps, (int, float)) and cfg.norm_eps > 0):
        checks.fail(name, "norm_eps", "a positive float", cfg.norm_eps)
    checks.one_of(name, "form", cfg.form, FORMS)
    checks.positive(name, "chunk_size", cfg.chunk_size)


def _default_dim(cfg, field, expand, name):
    if getattr(cfg, field) is None:
        width = int(cfg.d_model * expand)
        if width % cfg.n_heads:
            raise checks.ConfigError(
                f"{name}.n_heads={cfg.n_heads} must divide {name}.d_model * {expand} = {width} "
                f"(or set {name}.{field})")
        object.__setattr__(cfg, field, width // cfg.n_heads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLAConfig:
    """Attributes:
    d_model: model width D.
    n_heads: heads H.
    head_dim: query/key dim per head K; defaults to d_model / 2 / n_heads (fla's expand_k 0.5).
    value_head_dim: value dim per head V; defaults to d_model / n_heads (fla's expand_v 1).
    gate_low_rank_dim: rank R of the decay projection D -> R -> H*K.
    gate_logit_normalizer: log-decay = logsigmoid(logits) / this (16 in the paper); larger
      values decay more slowly.
    clamp_min: optional lower bound on the log-decay (fla's clamp_min), None for none.
    norm_eps: eps of the per-head output RMSNorm.
    form: "chunked" (training), "recurrent" (token scan) or "parallel" (quadratic, short inputs).
    chunk_size: tokens per chunk of the chunked form.
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    value_head_dim: int | None = None
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    clamp_min: float | None = None
    norm_eps: float = 1e-5
    form: str = "chunked"
    chunk_size: int = 64

    def __post_init__(self):
        name = "GLAConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        _default_dim(self, "head_dim", 0.5, name)
        _default_dim(self, "value_head_dim", 1.0, name)
        _validate_common(name, self)
        checks.positive(name, "gate_low_rank_dim", self.gate_low_rank_dim)
        if not (isinstance(self.gate_logit_normalizer, (int, float)) and self.gate_logit_normalizer > 0):
            checks.fail(name, "gate_logit_normalizer", "a positive number", self.gate_logit_normalizer)
        if self.clamp_min is not None and not self.clamp_min < 0:
            checks.fail(name, "clamp_min", "a negative float or None", self.clamp_min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAttentionConfig:
    """Attributes:
    d_model: model width D.
    n_heads: heads H.
    head_dim: query/key dim per head K; defaults to d_model / n_heads.
    value_head_dim: value dim per head V; defaults to d_model / n_heads.
    feature_map: applied to q and k: "identity" or "elu1" (elu(x) + 1, positive).
    normalize: divide by q_t . sum_{s<=t} k_s (the running key sum is then part of the state);
      off by default, as in fla. Meant for a positive feature map ("elu1").
    output_norm: per-head RMSNorm (with a learned scale) on the output, fla's default.
    norm_eps: eps of that norm.
    form: "chunked", "recurrent" or "parallel".
    chunk_size: tokens per chunk of the chunked form.
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    value_head_dim: int | None = None
    feature_map: str = "elu1"
    normalize: bool = False
    output_norm: bool = True
    norm_eps: float = 1e-5
    form: str = "chunked"
    chunk_size: int = 64

    def __post_init__(self):
        name = "LinearAttentionConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        _default_dim(self, "head_dim", 1.0, name)
        _default_dim(self, "value_head_dim", 1.0, name)
        _validate_common(name, self)
        checks.one_of(name, "feature_map", self.feature_map, FEATURE_MAPS)


Config = GLAConfig | LinearAttentionConfig


def param_specs(cfg: Config) -> dict:
    D, H, K, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.value_head_dim
    specs: dict[str, Any] = {
        "wq_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wk_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wv_DHV": ParamSpec((D, H, V), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wo_HVD": ParamSpec((H, V, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }
    if isinstance(cfg, GLAConfig):
        R = cfg.gate_low_rank_dim
        specs["wg_DHV"] = ParamSpec((D, H, V), ("embed", "heads", "head_dim"), fan_in_normal((0,)))
        specs["wgk1_DR"] = ParamSpec((D, R), ("embed", "gate_rank"), fan_in_normal((0,)))
        specs["wgk2_RHK"] = ParamSpec((R, H, K), ("gate_rank", "heads", "head_dim"), fan_in_normal((0,)))
        # The decay bias stays fp32 under a bf16 policy: it sets the memory length.
        specs["bgk_HK"] = ParamSpec((H, K), ("heads", "head_dim"), zeros, keep_dtype=True)
    if isinstance(cfg, GLAConfig) or cfg.output_norm:
        specs["norm"] = {"scale": ParamSpec((V,), ("head_dim",), P.ones)}
    return specs


def init(key: jax.Array, cfg: Config) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: Config, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """State S [B, H, K, V] in float32 (and the running key sum z [B, H, K] for normalised
    linear attention); independent of max_len."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    B, H, K, V = batch_size, cfg.n_heads, cfg.head_dim, cfg.value_head_dim
    state = {"h_BHKV": jnp.zeros((B, H, K, V), jnp.float32)}
    if isinstance(cfg, LinearAttentionConfig) and cfg.normalize:
        state["z_BHK"] = jnp.zeros((B, H, K), jnp.float32)
    return state


def _project(x_BLD, w_D__):
    # Kept in float32: the recurrence and the gates compute in float32 anyway, so rounding the
    # projections to a bf16 compute dtype first would only add error.
    return jnp.einsum("BLD,D...->BL...", x_BLD, w_D__.astype(x_BLD.dtype), preferred_element_type=jnp.float32)


def gla_log_decay(params: dict, x_BLD: "Float[Array, 'B L D']", cfg: GLAConfig) -> "Float[Array, 'B L H K']":
    """logsigmoid(x W1 W2 + b) / normaliser in float32 (optionally clamped from below)."""
    r_BLR = _project(x_BLD, params["wgk1_DR"])
    logits_BLHK = (jnp.einsum("BLR,RHK->BLHK", r_BLR, params["wgk2_RHK"].astype(jnp.float32))
                   + params["bgk_HK"].astype(jnp.float32)[None, None])
    g_BLHK = jax.nn.log_sigmoid(logits_BLHK) / cfg.gate_logit_normalizer
    if cfg.clamp_min is not None:
        g_BLHK = jnp.maximum(g_BLHK, cfg.clamp_min)
    return g_BLHK


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: Config, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None, segment_ids: "Int[Array, 'B L'] | None" = None,
            ) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Mix x, continuing from `state` when given. `positions` is accepted for the protocol and
    unused (no positional encoding); where `segment_ids` changes, the state restarts at zero."""
    del positions
    checks.array("x_BLD", x_BLD, rank=3, shape=(None, None, cfg.d_model))
    B, L, _ = x_BLD.shape
    V = cfg.value_head_dim
    q_BLHK = _project(x_BLD, params["wq_DHK"])
    k_BLHK = _project(x_BLD, params["wk_DHK"])
    v_BLHV = _project(x_BLD, params["wv_DHV"])
    h0_BHKV = None if state is None else state["h_BHKV"]
    normalize = isinstance(cfg, LinearAttentionConfig) and cfg.normalize
    if isinstance(cfg, GLAConfig):
        g_BLHK = gla_log_decay(params, x_BLD, cfg)
    else:
        g_BLHK = None
        if cfg.feature_map == "elu1":
            q_BLHK = jax.nn.elu(q_BLHK) + 1.0
            k_BLHK = jax.nn.elu(k_BLHK) + 1.0
        if normalize:
            # A column of ones appended to v makes the recurrence also carry z = sum_s k_s and
            # output q_t . z_t in that column: the denominator rides the same kernel.
            v_BLHV = jnp.concatenate([v_BLHV, jnp.ones_like(v_BLHV[..., :1])], axis=-1)
            if state is not None:
                h0_BHKV = jnp.concatenate([h0_BHKV, state["z_BHK"][..., None]], axis=-1)
    reset_BL = None if segment_ids is None else segments.starts(segment_ids)
    o_BLHV, h_BHKV = decayed_linear_attention(
        q_BLHK, k_BLHK, v_BLHV, g_BLHK, h0_BHKV, reset_BL, scale=cfg.head_dim ** -0.5,
        form=cfg.form, chunk_size=cfg.chunk_size)
    # The core returns q's dtype (float32 here); the output projection runs in x's dtype.
    new_state = None if state is None else {"h_BHKV": h_BHKV}
    if normalize:
        o_BLHV = o_BLHV[..., :V] / (o_BLHV[..., V:] + DENOMINATOR_EPS)
        if state is not None:
            new_state = {"h_BHKV": h_BHKV[..., :V], "z_BHK": h_BHKV[..., V]}
    if isinstance(cfg, GLAConfig) or cfg.output_norm:
        o_BLHV = norms.rms_norm(o_BLHV, params["norm"]["scale"], cfg.norm_eps)
    if isinstance(cfg, GLAConfig):
        o_BLHV = o_BLHV * jax.nn.silu(_project(x_BLD, params["wg_DHV"]))
    y_BLD = jnp.einsum("BLHV,HVD->BLD", o_BLHV.astype(x_BLD.dtype), params["wo_HVD"].astype(x_BLD.dtype),
                       preferred_element_type=jnp.float32).astype(x_BLD.dtype)
    return y_BLD, new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *, cfg: Config) -> tuple["Float[Array, 'B D']", dict]:
    """One token with the recurrent form: O(1) work and memory in the generated length."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=dataclasses.replace(cfg, form="recurrent"),
                           state=state)
    return y_B1D[:, 0], state
