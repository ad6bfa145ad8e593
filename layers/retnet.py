"""RetNet's multi-scale retention (Sun et al. 2023; microsoft/torchscale
`component/multiscale_retention.py`) as a sequence mixer.

Per head h, with the fixed decay gamma_h = 1 - 2^(-5-h):

    q = RoPE(x Wq),  k = RoPE(x Wk) * K^-0.5,  v = x Wv
    S_t = gamma_h S_{t-1} + k_t^T v_t,          o_t = q_t S_t
    y = Wo( swish(x Wg) * GroupNorm_h(o) )

GroupNorm is a per-head RMS normalisation over the value dim without affine weights (as
torchscale). The three forms (parallel, recurrent, chunkwise) all run
`layers.linear_recurrence.decayed_linear_attention` with a per-head scalar log-decay.

Deviations from torchscale, on purpose:
  - torchscale divides its parallel/chunkwise scores by detached running sums (clamped at 1) and
    relies on the group norm's scale invariance to cancel them; that cancellation is exact only
    with eps = 0 and is where public chunkwise versions went wrong (torchscale#77). Here the raw
    retention sums are computed, so all forms agree for any eps. The sums stay bounded
    (at most 1 / (1 - gamma) = 2^(5+h) times a term) in fp32.
  - Rotary: torchscale's xPos-free rotation (`theta_shift`) pairs dims (2i, 2i+1) with angles
    theta^(-i / (K/2 - 1)) (a linspace of exponents); here layers.positions.apply_rope with the
    "interleaved" layout and the standard theta^(-2i/K) frequencies. xPos is not implemented.
  - Initialisers: normal with std gain / sqrt(fan_in) (gain 2^-2.5 on q/k/v/g as torchscale's
    xavier gain) instead of xavier-uniform.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from layers import checks, params as P, segments
from layers.linear_recurrence import decayed_linear_attention
from layers.params import ParamSpec, fan_in_normal
from layers.positions import RopeConfig, apply_rope

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

FORMS = ("parallel", "recurrent", "chunkwise")
_CORE_FORM = {"parallel": "parallel", "recurrent": "recurrent", "chunkwise": "chunked"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetNetConfig:
    """Attributes:
    d_model: model width D.
    n_heads: retention heads H; head h decays with gamma_h = 1 - 2^(-5-h).
    head_dim: query/key dim per head K; defaults to d_model // n_heads.
    value_head_dim: value dim per head V; defaults to 2 * head_dim (torchscale's value_factor 2).
    rope: rotary settings for q and k (interleaved pairs, as torchscale), or None for none.
    norm_eps: eps of the per-head group (RMS) norm.
    form: "parallel" (quadratic, short sequences), "recurrent" (scan over tokens) or
      "chunkwise" (scan over chunks); all give the same numbers.
    chunk_size: tokens per chunk of the chunkwise form.
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    value_head_dim: int | None = None
    rope: RopeConfig | None = dataclasses.field(default_factory=lambda: RopeConfig(layout="interleaved"))
    norm_eps: float = 1e-6
    form: str = "chunkwise"
    chunk_size: int = 64

    def __post_init__(self):
        name = "RetNetConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        if self.head_dim is None:
            checks.divides(name, "n_heads", self.n_heads, "d_model", self.d_model)
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        checks.positive(name, "head_dim", self.head_dim)
        if self.value_head_dim is None:
            object.__setattr__(self, "value_head_dim", 2 * self.head_dim)
        checks.positive(name, "value_head_dim", self.value_head_dim)
        if self.rope is not None and self.head_dim % 2:
            checks.fail(name, "head_dim", "an even number when rope is used", self.head_dim)
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps >= 0):
            checks.fail(name, "norm_eps", "a float >= 0", self.norm_eps)
        checks.one_of(name, "form", self.form, FORMS)
        checks.positive(name, "chunk_size", self.chunk_size)


def log_decays(n_heads: int) -> np.ndarray:
    """log gamma_h = log(1 - 2^(-5-h)), computed in float64 (log1p keeps small 2^(-5-h) exact)."""
    return np.log1p(-np.exp2(-5.0 - np.arange(n_heads, dtype=np.float64))).astype(np.float32)


def param_specs(cfg: RetNetConfig) -> dict:
    D, H, K, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.value_head_dim
    small = fan_in_normal((0,), scale=2 ** -2.5)
    return {
        "wq_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), small),
        "wk_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), small),
        "wv_DHV": ParamSpec((D, H, V), ("embed", "heads", "head_dim"), small),
        "wg_DHV": ParamSpec((D, H, V), ("embed", "heads", "head_dim"), small),
        "wo_HVD": ParamSpec((H, V, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }


def init(key: jax.Array, cfg: RetNetConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: RetNetConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Retention state S [B, H, K, V] (float32 whatever `dtype`) and tokens seen per row (the
    rotary position of the next token). Independent of max_len."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    return {
        "h_BHKV": jnp.zeros((batch_size, cfg.n_heads, cfg.head_dim, cfg.value_head_dim), jnp.float32),
        "index_B": jnp.zeros((batch_size,), jnp.int32),
    }


def _project(x_BLD, w_D__):
    # Kept in float32: the recurrence and the gate compute in float32 anyway, so rounding the
    # projections to a bf16 compute dtype first would only add error.
    return jnp.einsum("BLD,D...->BL...", x_BLD, w_D__.astype(x_BLD.dtype), preferred_element_type=jnp.float32)


def group_norm(o_BLHV: "Float[Array, 'B L H V']", eps: float) -> "Float[Array, 'B L H V']":
    """RMS over each head's values, no affine weight; float32 in and out."""
    return o_BLHV * jax.lax.rsqrt(jnp.mean(jnp.square(o_BLHV), axis=-1, keepdims=True) + eps)


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: RetNetConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None, segment_ids: "Int[Array, 'B L'] | None" = None,
            ) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Retention over x, continuing from `state` when given.

    positions: rotary positions; default 0..L-1, continuing the state's count. Retention only
      sees position differences, so packed documents need not restart their positions.
    segment_ids: where the id changes, the retention state restarts from zero.
    """
    checks.array("x_BLD", x_BLD, rank=3, shape=(None, None, cfg.d_model))
    B, L, _ = x_BLD.shape
    if positions is None:
        offset_B = jnp.zeros((B,), jnp.int32) if state is None else state["index_B"]
        positions = offset_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
    q_BLHK = _project(x_BLD, params["wq_DHK"])
    k_BLHK = _project(x_BLD, params["wk_DHK"]) * cfg.head_dim ** -0.5
    v_BLHV = _project(x_BLD, params["wv_DHV"])
    if cfg.rope is not None:
        q_BLHK = apply_rope(q_BLHK, positions, cfg=cfg.rope)
        k_BLHK = apply_rope(k_BLHK, positions, cfg=cfg.rope)
    g_BLH = jnp.broadcast_to(jnp.asarray(log_decays(cfg.n_heads)).reshape(1, 1, cfg.n_heads),
                             (B, L, cfg.n_heads))
    reset_BL = None if segment_ids is None else segments.starts(segment_ids)
    o_BLHV, h_BHKV = decayed_linear_attention(
        q_BLHK, k_BLHK, v_BLHV, g_BLH, None if state is None else state["h_BHKV"], reset_BL,
        scale=1.0, form=_CORE_FORM[cfg.form], chunk_size=cfg.chunk_size)

    o_BLHV = group_norm(o_BLHV, cfg.norm_eps)
    gate_BLHV = jax.nn.silu(_project(x_BLD, params["wg_DHV"]))
    u_BLHV = (gate_BLHV * o_BLHV).astype(x_BLD.dtype)
    y_BLD = jnp.einsum("BLHV,HVD->BLD", u_BLHV, params["wo_HVD"].astype(x_BLD.dtype),
                       preferred_element_type=jnp.float32).astype(x_BLD.dtype)
    new_state = None if state is None else {"h_BHKV": h_BHKV, "index_B": state["index_B"] + L}
    return y_BLD, new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: RetNetConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token with the recurrent form: O(1) work and memory in the generated length."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=dataclasses.replace(cfg, form="recurrent"),
                           state=state)
    return y_B1D[:, 0], state
