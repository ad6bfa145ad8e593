"""Griffin's recurrent block (De et al. 2024, "Griffin"; RecurrentGemma) as a sequence mixer.

    y      = act(x W_y + b_y)                             gate branch, D -> E (GELU-tanh)
    u      = conv1d(x W_x + b_x)                          causal depthwise conv, width W
    i_t    = sigmoid(u_t W_i + b_i)                       input gate, block-diagonal per head
    r_t    = sigmoid(u_t W_r + b_r)                       recurrence gate, block-diagonal per head
    log a_t = -c * r_t * softplus(Lambda)                 a = sigmoid-like decay in (0, 1), c = 8
    h_t    = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)      the RG-LRU, fp32
    out    = (h * y) W_out + b_out                        E -> D

At a reset (the first token of a sequence, position 0, or a packed document start) the state
is dropped and the input is not normalised (multiplier 1, not sqrt(1 - a^2)), as RecurrentGemma
does. Position 0 comes from `positions` when given, otherwise from a token counter kept in the
state (a fresh forward without state starts at position 0).

Shape letters: B batch, L length, D model width, E recurrence width (lru_width), H gate blocks,
K = E / H block width, W conv width.

Decoding state: {"conv": last W-1 conv inputs [B, W-1, E], "h": [B, E] fp32,
"t_B": tokens seen per row, int32}; its size does not depend on max_len.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks, mlp, segments, short_conv
from layers import params as P
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

INNER_AXIS = "mlp"  # logical axis of E: sharded like an MLP's hidden width under TP


@dataclasses.dataclass(frozen=True, kw_only=True)
class RGLRUConfig:
    """Attributes:
    d_model: model width D.
    width: E, width of the recurrence (RecurrentGemma's lru_width); None gives d_model.
    n_heads: H, blocks of the block-diagonal gate projections; must divide width.
    conv_width: W, width of the causal depthwise convolution.
    c: exponent constant of the decay a = exp(-c * r * softplus(Lambda)) (Griffin: 8).
    activation: activation of the gate branch (one of layers.mlp.ACTIVATIONS; Griffin: gelu_tanh).
    a_min, a_max: Lambda is initialised so that a^c (r = 1) is uniform in [a_min^2, a_max^2]
      (Griffin's init of the decay).
    """

    d_model: int
    width: int | None = None
    n_heads: int = 1
    conv_width: int = 4
    c: float = 8.0
    activation: str = "gelu_tanh"
    a_min: float = 0.9
    a_max: float = 0.999

    def __post_init__(self):
        name = "RGLRUConfig"
        if self.width is None:
            object.__setattr__(self, "width", self.d_model)
        for f in ("d_model", "width", "n_heads", "conv_width"):
            checks.positive(name, f, getattr(self, f))
        checks.divides(name, "n_heads", self.n_heads, "width", self.width)
        if not self.c > 0:
            checks.fail(name, "c", "a positive float", self.c)
        if not 0 < self.a_min <= self.a_max < 1:
            raise checks.ConfigError(f"{name}: expected 0 < a_min <= a_max < 1, got a_min={self.a_min!r}, "
                                     f"a_max={self.a_max!r}")
        checks.one_of(name, "activation", self.activation, tuple(mlp.ACTIVATIONS))

    @property
    def block_width(self) -> int:
        return self.width // self.n_heads


def _lambda_init(cfg: RGLRUConfig) -> P.Initializer:
    """softplus(Lambda) = -log(a) / c with a^2 uniform in [a_min^2, a_max^2] (Griffin)."""

    def init(key, shape, dtype):
        a2 = jax.random.uniform(key, shape, jnp.float32, cfg.a_min ** 2, cfg.a_max ** 2)
        sp = -0.5 * jnp.log(a2) / cfg.c  # softplus(Lambda)
        return (sp + jnp.log(-jnp.expm1(-sp))).astype(dtype)  # inverse softplus

    return init


def param_specs(cfg: RGLRUConfig) -> dict:
    D, E, H, K, W = cfg.d_model, cfg.width, cfg.n_heads, cfg.block_width, cfg.conv_width
    gate = lambda: ParamSpec((H, K, K), ("heads", None, None), fan_in_normal((1,)))  # noqa: E731
    return {
        "wx_DE": ParamSpec((D, E), ("embed", INNER_AXIS), fan_in_normal((0,))),
        "bx_E": ParamSpec((E,), (INNER_AXIS,), zeros),
        "wy_DE": ParamSpec((D, E), ("embed", INNER_AXIS), fan_in_normal((0,))),
        "by_E": ParamSpec((E,), (INNER_AXIS,), zeros),
        "conv": short_conv.param_specs(E, W, INNER_AXIS, use_bias=True),
        "wi_HKK": gate(), "bi_HK": ParamSpec((H, K), ("heads", None), zeros),
        "wr_HKK": gate(), "br_HK": ParamSpec((H, K), ("heads", None), zeros),
        "lambda_E": ParamSpec((E,), (INNER_AXIS,), _lambda_init(cfg), keep_dtype=True),
        "wout_ED": ParamSpec((E, D), (INNER_AXIS, "embed"), fan_in_normal((0,))),
        "bout_D": ParamSpec((D,), ("embed",), zeros),
    }


def init(key: jax.Array, cfg: RGLRUConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: RGLRUConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    checks.positive("init_state", "batch_size", batch_size)
    checks.positive("init_state", "max_len", max_len)
    return {"conv": short_conv.init_state(batch_size, cfg.width, cfg.conv_width, dtype),
            "h": jnp.zeros((batch_size, cfg.width), jnp.float32),
            "t_B": jnp.zeros((batch_size,), jnp.int32)}


def _combine(left, right):
    """Compose h -> a_l h + b_l, then h -> a_r h + b_r."""
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def rg_lru(u_BLE: "Float[Array, 'B L E']", r_BLE: "Float[Array, 'B L E']", i_BLE: "Float[Array, 'B L E']",
           lambda_E: "Float[Array, 'E']", reset_BL: "Array", h0_BE: "Float[Array, 'B E'] | None", *,
           c: float) -> tuple["Float[Array, 'B L E']", "Float[Array, 'B E']"]:
    """The RG-LRU recurrence (fp32) from gates r, i in (0, 1) -> (h for every token, last h).
    reset_BL: True where the state is dropped and the input is not normalised."""
    # -- context parallelism (logic in sharding/context_recurrent.py): None unless the rules split seq --
    from sharding import context_recurrent
    split = context_recurrent.dispatch_rglru(u_BLE, r_BLE, i_BLE, lambda_E, reset_BL, h0_BE, c=c)
    if split is not None:
        return split
    # -- end context parallelism --
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    log_a_BLE = -c * f32(r_BLE) * jax.nn.softplus(f32(lambda_E))[None, None, :]
    reset_BL1 = reset_BL[:, :, None]
    # sqrt(1 - a^2) = sqrt(-expm1(2 log a)): accurate when a is close to 1.
    mult_BLE = jnp.where(reset_BL1, 1.0, jnp.sqrt(-jnp.expm1(2.0 * log_a_BLE)))
    a_BLE = jnp.where(reset_BL1, 0.0, jnp.exp(log_a_BLE))
    b_BLE = f32(u_BLE) * f32(i_BLE) * mult_BLE
    if h0_BE is not None:
        b_BLE = b_BLE.at[:, 0].add(a_BLE[:, 0] * f32(h0_BE))  # fold the incoming state into token 0
    _, h_BLE = jax.lax.associative_scan(_combine, (a_BLE, b_BLE), axis=1)
    return h_BLE, h_BLE[:, -1]


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: RGLRUConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Mix x (continuing from `state` when given). The state resets at position 0 and at packed
    document starts (segment_ids)."""
    B, L, _ = x_BLD.shape
    dtype = x_BLD.dtype
    H, K = cfg.n_heads, cfg.block_width

    def proj(w, b):
        y = jnp.einsum("bld,de->ble", x_BLD, params[w].astype(dtype), preferred_element_type=jnp.float32)
        return y + params[b].astype(jnp.float32)[None, None, :]

    y_BLE = mlp.ACTIVATIONS[cfg.activation](proj("wy_DE", "by_E"))
    u_BLE = proj("wx_DE", "bx_E").astype(dtype)
    u_BLE, new_conv = short_conv.forward(params["conv"], u_BLE, state=None if state is None else state["conv"],
                                         segment_ids=segment_ids)

    u_BLHK = u_BLE.reshape(B, L, H, K)

    def gate(w, b):
        g = jnp.einsum("blhk,hkj->blhj", u_BLHK, params[w].astype(dtype), preferred_element_type=jnp.float32)
        return jax.nn.sigmoid(g + params[b].astype(jnp.float32)[None, None]).reshape(B, L, H * K)

    t0_B = jnp.zeros((B,), jnp.int32) if state is None else state["t_B"]
    if positions is None:
        positions = t0_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
    reset_BL = (positions == 0) | segments.starts(segment_ids, L, B)
    h0_BE = None if state is None else state["h"]
    h_BLE, h_BE = rg_lru(u_BLE, gate("wr_HKK", "br_HK"), gate("wi_HKK", "bi_HK"), params["lambda_E"], reset_BL,
                         h0_BE, c=cfg.c)

    z_BLE = (h_BLE.astype(dtype).astype(jnp.float32) * y_BLE).astype(dtype)
    out_BLD = jnp.einsum("ble,ed->bld", z_BLE, params["wout_ED"].astype(dtype), preferred_element_type=jnp.float32)
    out_BLD = out_BLD + params["bout_D"].astype(jnp.float32)[None, None, :]
    # The next position continues the last one given (prefill with positions, then steps).
    new_state = None if state is None else {"conv": new_conv, "h": h_BE, "t_B": positions[:, -1] + 1}
    return out_BLD.astype(dtype), new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: RGLRUConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token: shift the conv window, one state update."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=cfg, state=state)
    return y_B1D[:, 0], state
