"""sLSTM (xLSTM's scalar-memory LSTM with exponential gating) as a sequence mixer.

The cell (Beck et al. 2024, "xLSTM", eqs. 8-17; NX-AI/xlstm blocks/slstm/src/vanilla/slstm.py),
per head with block-diagonal recurrent weights R [H, Dh, Dh] for each gate g in (i, f, z, o):

    g_raw = W_g x_t + R_g h_{t-1} + b_g
    m_t = max(i_raw, log sigmoid(f_raw) + m_{t-1})        (m_t = i_raw when n_{t-1} = 0)
    c_t = exp(log sigmoid(f_raw) + m_{t-1} - m_t) c_{t-1} + exp(i_raw - m_t) tanh(z_raw)
    n_t = exp(log sigmoid(f_raw) + m_{t-1} - m_t) n_{t-1} + exp(i_raw - m_t)
    h_t = sigmoid(o_raw) c_t / n_t

The recurrence through h makes it sequential: a lax.scan (the only form, "recurrent"); forward
and step share the cell. The reference takes m_t = i_raw on the first step when every n is 0;
here the test is per element (n == 0), which is the same on an empty state and also covers a
packed document start, where (c, n, m, h) reset to zero. After the first step the stabilised n
is >= 1 (one of the two gate factors is exp(0)), so n == 0 means exactly "empty state". The
empty state's forget branch is dropped (weight exp(-inf)), so a very negative i cannot overflow.

Layer (NX-AI/xlstm blocks/slstm/layer.py): optional causal conv + silu feeding the i and f gates
(z and o read x directly), per-head input maps W [H, Dh, Dh], the cell, per-head LayerNorm of h
(weight only), and an optional D -> D output projection (`out_proj`; the reference layer has
none: its block follows with a gated MLP). Simplification: the forget bias starts at
linspace(3, 6) across each head's channels instead of the reference's block-dependent power law.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import checks, norms, params as P, segments, short_conv
from layers.params import ParamSpec, fan_in_normal, normal, ones, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

FORMS = ("recurrent",)
GATES = ("i", "f", "z", "o")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLSTMConfig:
    """Attributes:
    d_model: model width D (also the cell width).
    n_heads: heads H; head dim Dh = D // H; recurrent weights are block-diagonal per head.
    conv_width: causal conv width feeding the i and f gates (xLSTM: 4); 0 turns it off.
    form: "recurrent" (the only form: the recurrence through h is not parallelisable).
    unroll: lax.scan unroll factor (speed only).
    norm_eps: eps of the per-head LayerNorm of h.
    out_proj: add a D -> D output projection after the norm (the reference layer has none).
    """

    d_model: int
    n_heads: int = 4
    conv_width: int = 4
    form: str = "recurrent"
    unroll: int = 1
    norm_eps: float = 1e-5
    out_proj: bool = False

    def __post_init__(self):
        name = "SLSTMConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        checks.divides(name, "n_heads", self.n_heads, "d_model", self.d_model)
        if not isinstance(self.conv_width, int) or isinstance(self.conv_width, bool) or self.conv_width < 0:
            checks.fail(name, "conv_width", "a non-negative integer (0: no conv)", self.conv_width)
        checks.one_of(name, "form", self.form, FORMS)
        checks.positive(name, "unroll", self.unroll)
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _bias_init(key, shape, dtype):
    """[4, H, Dh]: zeros except the forget gate, linspace(3, 6) over each head's channels."""
    del key
    b = jnp.zeros(shape, jnp.float32)
    f = jnp.broadcast_to(jnp.linspace(3.0, 6.0, shape[-1], dtype=jnp.float32), shape[1:])
    return b.at[GATES.index("f")].set(f).astype(dtype)


def param_specs(cfg: SLSTMConfig) -> dict:
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    specs: dict[str, Any] = {
        # Per-head input maps (xLSTM's "small init", std sqrt(2 / (5 D))).
        "w_4HKJ": ParamSpec((4, H, Dh, Dh), (None, "heads", None, "head_dim"),
                            normal(math.sqrt(2.0 / (5.0 * D)))),
        # Recurrent maps start at zero, as the reference's default.
        "r_4HKJ": ParamSpec((4, H, Dh, Dh), (None, "heads", None, "head_dim"), zeros),
        "b_4HJ": ParamSpec((4, H, Dh), (None, "heads", "head_dim"), _bias_init, keep_dtype=True),
        "norm_HK": ParamSpec((H, Dh), ("heads", "head_dim"), ones),
    }
    if cfg.conv_width:
        specs["conv"] = short_conv.param_specs(D, cfg.conv_width, "embed")
    if cfg.out_proj:
        specs["wo_DD"] = ParamSpec((D, D), ("embed", None), fan_in_normal((0,)))
    return specs


def init(key: jax.Array, cfg: SLSTMConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: SLSTMConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Cell state c, normaliser n, stabiliser m, hidden h (each [B, H, Dh], zero = empty) and the
    conv window [B, W-1, D]; fp32 whatever `dtype`, independent of max_len."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    shape = (batch_size, cfg.n_heads, cfg.head_dim)
    state = {n: jnp.zeros(shape, jnp.float32) for n in ("c_BHK", "n_BHK", "m_BHK", "h_BHK")}
    if cfg.conv_width:
        state["conv_BWD"] = short_conv.init_state(batch_size, cfg.d_model, cfg.conv_width, jnp.float32)
    return state


# ----- the cell -----

def cell_step(pre_4BHK, c_BHK, n_BHK, m_BHK, h_BHK, r_4HKJ):
    """One token. pre: input part of the gate pre-activations (W x + b), fp32."""
    raw_4BHK = pre_4BHK + jnp.einsum("BHK,GHKJ->GBHJ", h_BHK, r_4HKJ)
    i_raw, f_raw, z_raw, o_raw = raw_4BHK
    empty_BHK = n_BHK == 0.0
    # On an empty state the forget branch has weight 0 (log -inf), so m = i and nothing overflows.
    logfm_BHK = jnp.where(empty_BHK, -jnp.inf, jax.nn.log_sigmoid(f_raw) + m_BHK)
    m_new = jnp.maximum(i_raw, logfm_BHK)
    ig = jnp.exp(i_raw - m_new)
    fg = jnp.exp(logfm_BHK - m_new)
    c_new = fg * c_BHK + ig * jnp.tanh(z_raw)
    n_new = fg * n_BHK + ig
    h_new = jax.nn.sigmoid(o_raw) * c_new / n_new
    return c_new, n_new, m_new, h_new


@functools.partial(jax.jit, static_argnames=("unroll",))
def cell(pre_BL4HK: "Float[Array, 'B L 4 H K']", r_4HKJ: "Float[Array, '4 H K J']",
         state: tuple | None = None, *, starts_BL: "Array | None" = None, unroll: int = 1):
    """Scan the cell over L tokens from state (c, n, m, h) (None: empty). starts_BL: True where a
    packed document begins (the state resets to empty). Returns h [B, L, H, Dh] and the state."""
    B, L, _, H, K = pre_BL4HK.shape
    f32 = jnp.float32
    if state is None:
        state = tuple(jnp.zeros((B, H, K), f32) for _ in range(4))
    state = tuple(s.astype(f32) for s in state)
    if starts_BL is None:
        starts_BL = jnp.zeros((B, L), bool)
    r_4HKJ = r_4HKJ.astype(f32)

    def one(carry, xs):
        pre_B4HK, start_B = xs
        keep_B111 = (1.0 - start_B.astype(f32))[:, None, None]
        carry = tuple(s * keep_B111 for s in carry)
        carry = cell_step(jnp.moveaxis(pre_B4HK, 1, 0), *carry, r_4HKJ)
        return carry, carry[3]

    xs = (jnp.moveaxis(pre_BL4HK.astype(f32), 1, 0), jnp.moveaxis(starts_BL, 1, 0))
    state, h_LBHK = jax.lax.scan(one, state, xs, unroll=unroll)
    return jnp.moveaxis(h_LBHK, 0, 1), state


# ----- the layer -----

@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: SLSTMConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """The sLSTM mixer over a sequence; continues from `state` when given (else from empty).
    positions are unused; segment_ids reset the cell and the conv window at document starts.
    Jitted with cfg static (one compilation per shape when called eagerly; inlined under jit)."""
    del positions
    B, L, D = x_BLD.shape
    H, K = cfg.n_heads, cfg.head_dim
    dt = x_BLD.dtype
    f32 = jnp.float32
    new_state: dict = {}
    x_BLHK = x_BLD.reshape(B, L, H, K)
    if cfg.conv_width:
        conv_BLD, conv_state = short_conv.forward(params["conv"], x_BLD,
                                                  state=None if state is None else state["conv_BWD"],
                                                  segment_ids=segment_ids)
        new_state["conv_BWD"] = conv_state.astype(f32)
        xc_BLHK = jax.nn.silu(conv_BLD.astype(f32)).astype(dt).reshape(B, L, H, K)
    else:
        xc_BLHK = x_BLHK
    w_4HKJ = params["w_4HKJ"].astype(dt)
    # i and f read the conv branch, z and o the input itself (as the reference layer).
    pre_if = jnp.einsum("BLHK,GHKJ->BLGHJ", xc_BLHK, w_4HKJ[:2], preferred_element_type=f32)
    pre_zo = jnp.einsum("BLHK,GHKJ->BLGHJ", x_BLHK, w_4HKJ[2:], preferred_element_type=f32)
    pre_BL4HK = jnp.concatenate([pre_if, pre_zo], axis=2) + params["b_4HJ"].astype(f32)[None, None]

    cell_state = None if state is None else tuple(state[n] for n in ("c_BHK", "n_BHK", "m_BHK", "h_BHK"))
    starts_BL = None if segment_ids is None else segments.starts(segment_ids, L, B)
    h_BLHK, (c, n, m, h) = cell(pre_BL4HK, params["r_4HKJ"], cell_state, starts_BL=starts_BL,
                                unroll=cfg.unroll)
    y_BLD = norms.layer_norm(h_BLHK, params["norm_HK"], None, cfg.norm_eps).reshape(B, L, D).astype(dt)
    if cfg.out_proj:
        y_BLD = jnp.einsum("BLD,DE->BLE", y_BLD, params["wo_DD"].astype(dt),
                           preferred_element_type=f32).astype(dt)
    if state is None:
        return y_BLD, None
    new_state.update({"c_BHK": c, "n_BHK": n, "m_BHK": m, "h_BHK": h})
    return y_BLD, new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: SLSTMConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token (the same cell, a length-1 scan): O(1) in generated length."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=cfg, state=state)
    return y_B1D[:, 0], state
