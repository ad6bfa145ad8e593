"""Attention whose keys and values are given: cross-attention over an encoder's output, and the
building block of encoder-decoder self-attention with an external score bias (T5).

Unlike the attention mixer (layers/attention.py), this is not a sequence mixer: its caller
decides where keys and values come from (`project_kv` of a memory, computed once per sequence
for cross-attention) and which keys each query may see (positions, -1 = masked key), and may add
a score bias. The math is `layers.attention_core.attend`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import attention_core, checks
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossAttentionConfig:
    """Attributes:
    d_model: width D of the queries' stream (and of the output).
    n_heads: H (keys and values have as many heads).
    head_dim: K; defaults to d_model // n_heads (T5 sets n_heads * head_dim independently).
    d_source: width of the memory the keys and values come from; defaults to d_model.
    query_scale: multiplier on scores; None gives head_dim ** -0.5, T5 uses 1.0 (its init
      absorbs the scale).
    use_bias: biases on the q/k/v and output projections (BART), none for T5.
    impl: "xla" | "reference" | "pallas" (see layers.attention_core).
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    d_source: int | None = None
    query_scale: float | None = None
    use_bias: bool = False
    impl: str = "xla"

    def __post_init__(self):
        name = "CrossAttentionConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        if self.head_dim is None:
            checks.divides(name, "n_heads", self.n_heads, "d_model", self.d_model)
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        checks.positive(name, "head_dim", self.head_dim)
        if self.d_source is None:
            object.__setattr__(self, "d_source", self.d_model)
        checks.positive(name, "d_source", self.d_source)
        if self.query_scale is not None and not self.query_scale > 0:
            checks.fail(name, "query_scale", "a positive float or None", self.query_scale)
        checks.one_of(name, "impl", self.impl, attention_core.IMPLS)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale


def param_specs(cfg: CrossAttentionConfig) -> dict:
    D, S, H, K = cfg.d_model, cfg.d_source, cfg.n_heads, cfg.head_dim
    specs = {
        "wq_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wk_DHK": ParamSpec((S, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wv_DHK": ParamSpec((S, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wo_HKD": ParamSpec((H, K, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }
    if cfg.use_bias:
        specs["bq_HK"] = ParamSpec((H, K), ("heads", "head_dim"), zeros, decay=False)
        specs["bk_HK"] = ParamSpec((H, K), ("heads", "head_dim"), zeros, decay=False)
        specs["bv_HK"] = ParamSpec((H, K), ("heads", "head_dim"), zeros, decay=False)
        specs["bo_D"] = ParamSpec((D,), ("embed",), zeros)
    return specs


def _project(x_BLD, w_DHK, b_HK):
    y_BLHK = jnp.einsum("BLD,DHK->BLHK", x_BLD, w_DHK.astype(x_BLD.dtype), preferred_element_type=jnp.float32)
    if b_HK is not None:
        y_BLHK = y_BLHK + b_HK.astype(jnp.float32)[None, None]
    return y_BLHK.astype(x_BLD.dtype)


def project_kv(params: dict, memory_BSD: "Float[Array, 'B S D']", *,
               cfg: CrossAttentionConfig) -> dict:
    """Keys and values of a memory: {"k_BSHK", "v_BSHK"} (compute once, attend many times)."""
    checks.array("memory_BSD", memory_BSD, rank=3, kind="f", shape=(None, None, cfg.d_source))
    return {"k_BSHK": _project(memory_BSD, params["wk_DHK"], params.get("bk_HK")),
            "v_BSHK": _project(memory_BSD, params["wv_DHK"], params.get("bv_HK"))}


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", kv: dict, *, cfg: CrossAttentionConfig,
            q_pos_BL: "Int[Array, 'B L']", k_pos_BS: "Int[Array, 'B S']", causal: bool = False,
            bias_BHLS: "Float[Array, 'B H L S'] | None" = None) -> "Float[Array, 'B L D']":
    """Queries from x attend to the given keys and values.

    q_pos_BL, k_pos_BS: positions; keys with a negative position are masked (padding, empty cache
      slots), and with causal=True a key after its query is masked.
    bias_BHLS: additive score bias (fp32), e.g. layers.relative_position.bias.
    """
    k_BSHK, v_BSHK = kv["k_BSHK"].astype(x_BLD.dtype), kv["v_BSHK"].astype(x_BLD.dtype)
    q_BLHK = _project(x_BLD, params["wq_DHK"], params.get("bq_HK"))
    o_BLHK = attention_core.attend(q_BLHK, k_BSHK, v_BSHK, q_pos_BL=q_pos_BL, k_pos_BS=k_pos_BS,
                                   causal=causal, scale=cfg.scale, bias_BHLS=bias_BHLS, impl=cfg.impl)
    y_BLD = jnp.einsum("BLHK,HKD->BLD", o_BLHK, params["wo_HKD"].astype(x_BLD.dtype),
                       preferred_element_type=jnp.float32)
    if "bo_D" in params:
        y_BLD = y_BLD + params["bo_D"].astype(jnp.float32)[None, None]
    return y_BLD.astype(x_BLD.dtype)


def init(key: jax.Array, cfg: CrossAttentionConfig) -> dict:
    from layers import params as P
    return P.init(key, param_specs(cfg))
