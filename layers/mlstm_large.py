"""The xLSTM-7B mLSTM layer (Beck et al. 2025, "xLSTM 7B"; transformers' `xLSTMLayer`) as a mixer.

The cell is the one of layers.mlstm (same stabiliser m, normaliser floor exp(-m) + eps, empty
state C = 0, n = 0, m = 0, gate soft caps, q scaled by K^-0.5 of the q/k head dim), so the
three forms (parallel, chunkwise, recurrent) come from `layers.mlstm.cell`. What differs from
the original xLSTM block of layers.mlstm is the layer around it:

- q, k (width qk_dim = H * K) and v (width v_dim = H * V) are projected straight from the
  (already RMS-normalised) block input; K and V may differ (7B: qk_dim = D / 2, v_dim = D);
  no up-projection, no causal conv, no learnable skip;
- the gate pre-activations i, f are per-head linear maps of the input with biases;
- the cell output is LayerNorm-ed per head (scale, no bias), multiplied by a sigmoid output
  gate sigmoid(x W_o) of width v_dim, and projected back to D.

Blocks around it (pre-RMSNorm, a SwiGLU FFN, the logit soft cap) are zoo configuration: see
zoo.convert.xlstm.model_config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks, norms, params as P, segments
from layers.mlstm import FORMS, cell
from layers.params import ParamSpec, constant, fan_in_normal, linspace, normal, ones, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLSTMLargeConfig:
    """Attributes:
    d_model: model width D.
    n_heads: heads H.
    qk_dim: total query/key width H * K (xLSTM-7B: D / 2).
    v_dim: total value width H * V (xLSTM-7B: D); also the width of the output gate.
    form: "parallel" | "chunkwise" | "recurrent" (layers.mlstm's forms; all agree).
    chunk_size: tokens per chunk of the chunkwise form (any length; padded internally).
    gate_soft_cap: i and f pre-activations become cap * tanh(x / cap) (xLSTM-7B: 15); None: off.
    eps: added to the normaliser max(|q.n|, exp(-m)) (transformers' `eps`, 1e-6).
    norm_eps: eps of the per-head LayerNorm of the cell output (transformers' `norm_eps`).
    """

    d_model: int
    n_heads: int = 4
    qk_dim: int | None = None
    v_dim: int | None = None
    form: str = "chunkwise"
    chunk_size: int = 64
    gate_soft_cap: float | None = 15.0
    eps: float = 1e-6
    norm_eps: float = 1e-6

    def __post_init__(self):
        name = "MLSTMLargeConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        # None means the 7B proportions; stored resolved so equal layers compare equal.
        if self.qk_dim is None:
            object.__setattr__(self, "qk_dim", self.d_model // 2)
        if self.v_dim is None:
            object.__setattr__(self, "v_dim", self.d_model)
        checks.positive(name, "qk_dim", self.qk_dim)
        checks.positive(name, "v_dim", self.v_dim)
        checks.divides(name, "n_heads", self.n_heads, "qk_dim", self.qk_dim)
        checks.divides(name, "n_heads", self.n_heads, "v_dim", self.v_dim)
        checks.one_of(name, "form", self.form, FORMS)
        checks.positive(name, "chunk_size", self.chunk_size)
        if self.gate_soft_cap is not None and not self.gate_soft_cap > 0:
            checks.fail(name, "gate_soft_cap", "a positive float or None", self.gate_soft_cap)
        if not self.eps > 0:
            checks.fail(name, "eps", "a positive float", self.eps)
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.n_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.n_heads


def param_specs(cfg: MLSTMLargeConfig) -> dict:
    D, H, K, V = cfg.d_model, cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
    # The 7B recipe: "small init" std sqrt(2 / (5 D)) for maps from the residual stream, zero gate
    # weights with input-gate bias -10 (memory starts nearly closed to input) and forget biases
    # 3..6 across heads; the output map uses a fan-in init (the layer does not know the depth
    # that the reference's Wang init divides by).
    small = normal(math.sqrt(2.0 / (5.0 * D)))
    head = ("embed", "heads", "head_dim")
    return {
        "wq_DHK": ParamSpec((D, H, K), head, small),
        "wk_DHK": ParamSpec((D, H, K), head, small),
        "wv_DHV": ParamSpec((D, H, V), head, small),
        "wog_DHV": ParamSpec((D, H, V), head, small),
        "wi_DH": ParamSpec((D, H), ("embed", "heads"), zeros),
        "wf_DH": ParamSpec((D, H), ("embed", "heads"), zeros),
        "bi_H": ParamSpec((H,), ("heads",), constant(-10.0), keep_dtype=True),
        "bf_H": ParamSpec((H,), ("heads",), linspace(3.0, 6.0), keep_dtype=True),
        "norm_HV": ParamSpec((H, V), ("heads", "head_dim"), ones),
        "wo_HVD": ParamSpec((H, V, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }


def init(key: jax.Array, cfg: MLSTMLargeConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: MLSTMLargeConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Memory C [B, H, K, V], normaliser n [B, H, K], stabiliser m [B, H]: all zero (the empty
    state), fp32 whatever `dtype`, independent of max_len."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    B, H, K, V = batch_size, cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
    return {"C_BHKV": jnp.zeros((B, H, K, V), jnp.float32), "n_BHK": jnp.zeros((B, H, K), jnp.float32),
            "m_BH": jnp.zeros((B, H), jnp.float32)}


def _proj(x_BLD, w_D_, dtype):
    """x [B, L, D] times w [D, ...] in the activation dtype with fp32 accumulation; the fp32
    result is kept (the cell and the gating run in fp32)."""
    return jnp.einsum("BLD,D...->BL...", x_BLD.astype(dtype), w_D_.astype(dtype),
                      preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "form"))
def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: MLSTMLargeConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None, segment_ids: "Int[Array, 'B L'] | None" = None,
            form: str | None = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """The layer over a sequence, continuing from `state` when given (else from empty).

    positions are unused (order is the recurrence); segment_ids reset the memory at each packed
    document start. `form` overrides cfg.form (step uses "recurrent").
    """
    del positions
    B, L, _ = x_BLD.shape
    dt = x_BLD.dtype
    f32 = jnp.float32
    q_BLHK = _proj(x_BLD, params["wq_DHK"], dt)
    k_BLHK = _proj(x_BLD, params["wk_DHK"], dt)
    v_BLHV = _proj(x_BLD, params["wv_DHV"], dt)
    og_BLHV = _proj(x_BLD, params["wog_DHV"], dt)
    # Gate pre-activations in fp32 from the activation-dtype input: they are exponentiated.
    i_BLH = _proj(x_BLD, params["wi_DH"], dt) + params["bi_H"].astype(f32)[None, None]
    f_BLH = _proj(x_BLD, params["wf_DH"], dt) + params["bf_H"].astype(f32)[None, None]

    cell_state = None if state is None else (state["C_BHKV"], state["n_BHK"], state["m_BH"])
    starts_BL = None if segment_ids is None else segments.starts(segment_ids, L, B)
    h_BLHV, (C, n, m) = cell(q_BLHK, k_BLHK, v_BLHV, i_BLH, f_BLH, cell_state, form=form or cfg.form,
                             chunk_size=cfg.chunk_size, eps=cfg.eps, gate_soft_cap=cfg.gate_soft_cap,
                             starts_BL=starts_BL)
    h_BLHV = norms.layer_norm(h_BLHV, params["norm_HV"], None, cfg.norm_eps)
    out_BLHV = (jax.nn.sigmoid(og_BLHV) * h_BLHV).astype(dt)
    y_BLD = jnp.einsum("BLHV,HVD->BLD", out_BLHV, params["wo_HVD"].astype(dt),
                       preferred_element_type=f32).astype(dt)
    if state is None:
        return y_BLD, None
    return y_BLD, {"C_BHKV": C, "n_BHK": n, "m_BH": m}


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: MLSTMLargeConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token: the recurrent form on a length-1 sequence (O(1) in generated length)."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=cfg, state=state, form="recurrent")
    return y_B1D[:, 0], state
