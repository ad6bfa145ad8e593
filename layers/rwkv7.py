"""RWKV-7 ("Goose") time mix and channel mix, after BlinkDL/RWKV-LM `RWKV-v7/rwkv_v7_numpy.py`
(the generalised delta rule of fla's `ops/generalized_delta_rule/dplr`).

Per head (K = head_dim), the state S is [V, K] (value rows, key columns, as in the reference):

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,      y_t = S_t r_t
    a_t = -kk_t,  b_t = kk_t * alr_t,  kk = L2-normalised (k * k_k) per head,
    w_t = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w W1) W2))  in (0.545, 1),
    alr_t = sigmoid(a0 + x_a A1 A2),  k_t <- k_t * (1 + (alr_t - 1) * k_a),
    out = W_o ((GroupNorm_head(y) + (sum_K r * k * r_k) v) * g),  g = sigmoid(x_g G1) G2.

Token shift: x_* = x + mix_* * (x_{t-1} - x) with static per-channel coefficients, which is
what RWKV-7 itself uses (RWKV-6's data-dependent shift LoRA is gone in v7). Not implemented:
the cross-layer value residual (v_first / "v0" of the reference: layers after the first mix
their v towards layer 0's v); each layer here uses its own v.

Forms (cfg.form):
    "recurrent"  lax.scan over tokens;
    "chunked"    a true chunkwise (WY-style) form: within a chunk the vectors u_t = S_{t-1} a_t
                 solve one unit-lower-triangular system (the sequential dependence through
                 S a b^T), then outputs and the chunk's final state are matrix products;
                 chunks are scanned with the state carried in fp32.
Decays inside a chunk are products of w >= 0.545, so the factors e^{-cumsum(log w)} stay below
e^{0.61 C}; chunk_size is capped at 128 to keep them far from fp32 overflow.

Packed sequences (segment ids) reset S and the token shift at each document start
(layers/segments.py). State and recurrence math are fp32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp

from layers import checks, segments
from layers import params as P
from layers.params import ParamSpec, fan_in_normal, ones, zeros
from layers.rwkv4 import token_shift

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

FORMS = ("recurrent", "chunked")
MAX_CHUNK = 128
DECAY_SCALE = math.exp(-0.5)  # log w = -e^{-1/2} sigmoid(.), so w lies in (e^{-0.6065}, 1)


def _lora_rank(d_model: int, factor: float, power: float) -> int:
    """The reference's LoRA widths: multiples of 32, at least 32."""
    return max(32, int(round(factor * d_model ** power / 32)) * 32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV7TimeMixConfig:
    """Attributes:
    d_model: model width D = n_heads * head_dim.
    head_dim: K, the per-head key and value width (64 in the released models).
    decay_lora, a_lora, gate_lora: LoRA ranks of the decay, in-context learning rate and gate
      (default: the reference's widths from d_model).
    form: "recurrent" | "chunked" (see the module docstring); they agree.
    chunk_size: tokens per chunk of the "chunked" form (at most 128; any length works).
    norm_eps: epsilon of the per-head group norm (the reference uses 64e-5 for head_dim 64).
    """

    d_model: int
    head_dim: int = 64
    decay_lora: int | None = None
    a_lora: int | None = None
    gate_lora: int | None = None
    form: Literal["recurrent", "chunked"] = "recurrent"
    chunk_size: int = 16
    norm_eps: float = 64e-5

    def __post_init__(self):
        name = "RWKV7TimeMixConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "head_dim", self.head_dim)
        checks.divides(name, "head_dim", self.head_dim, "d_model", self.d_model)
        for field, factor, power in (("decay_lora", 1.8, 0.5), ("a_lora", 1.8, 0.5),
                                     ("gate_lora", 0.6, 0.8)):
            if getattr(self, field) is None:
                object.__setattr__(self, field, _lora_rank(self.d_model, factor, power))
            checks.positive(name, field, getattr(self, field))
        checks.one_of(name, "form", self.form, FORMS)
        checks.positive(name, "chunk_size", self.chunk_size)
        if self.chunk_size > MAX_CHUNK:
            checks.fail(name, "chunk_size", f"at most {MAX_CHUNK}", self.chunk_size)
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV7ChannelMixConfig:
    """Attributes:
    d_model: model width D.
    d_ff: hidden width F of the squared-ReLU key (RWKV-7 uses 4 * d_model).
    """

    d_model: int
    d_ff: int

    def __post_init__(self):
        checks.positive("RWKV7ChannelMixConfig", "d_model", self.d_model)
        checks.positive("RWKV7ChannelMixConfig", "d_ff", self.d_ff)


# ----- initialisers (the reference's spreads for a middle layer) -----

def _mix_init(power: float):
    """Token-shift weights 1 - (i / D) ** power: channels range from mostly-previous to current."""
    def init(key, shape, dtype):
        del key
        i = jnp.arange(shape[-1], dtype=jnp.float32) / shape[-1]
        return (1.0 - i ** power).astype(dtype)
    return init


def _w0_init(key, shape, dtype):
    # Decay speeds spread over all channels (slow to fast), as in the reference; + 0.5 as there.
    del key
    n = math.prod(shape)
    h = jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)
    return (-7.0 + 5.0 * h ** (0.85 + 0.5 ** 0.5) + 0.5).reshape(shape).astype(dtype)


def param_specs(cfg: RWKV7TimeMixConfig | RWKV7ChannelMixConfig) -> dict:
    if isinstance(cfg, RWKV7ChannelMixConfig):
        return _cm_param_specs(cfg)
    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    Rw, Ra, Rg = cfg.decay_lora, cfg.a_lora, cfg.gate_lora
    hk = ("heads", "head_dim")
    proj = lambda: ParamSpec((D, H, K), ("embed", *hk), fan_in_normal((0,)))
    # LoRA: down-projection zero, up-projection small, so the data-dependent parts start at zero
    # and still receive gradients.
    lora_down = lambda r: ParamSpec((D, r), ("embed", None), zeros)
    lora_up = lambda r: ParamSpec((r, H, K), (None, *hk), fan_in_normal((0,), 0.1))
    return {
        "x_r_D": ParamSpec((D,), ("embed",), _mix_init(0.2)),
        "x_w_D": ParamSpec((D,), ("embed",), _mix_init(0.9)),
        "x_k_D": ParamSpec((D,), ("embed",), _mix_init(0.7)),
        "x_v_D": ParamSpec((D,), ("embed",), _mix_init(0.7)),
        "x_a_D": ParamSpec((D,), ("embed",), _mix_init(0.9)),
        "x_g_D": ParamSpec((D,), ("embed",), _mix_init(0.2)),
        # The decay bias enters an exponential of an exponential: it stays fp32.
        "w0_HK": ParamSpec((H, K), hk, _w0_init, keep_dtype=True),
        "w1_DR": lora_down(Rw), "w2_RHK": lora_up(Rw),
        "a0_HK": ParamSpec((H, K), hk, zeros, keep_dtype=True),
        "a1_DR": lora_down(Ra), "a2_RHK": lora_up(Ra),
        "g1_DR": lora_down(Rg), "g2_RHK": lora_up(Rg),
        "k_k_HK": ParamSpec((H, K), hk, P.constant(0.85)),
        "k_a_HK": ParamSpec((H, K), hk, ones),
        "r_k_HK": ParamSpec((H, K), hk, zeros),
        "receptance_DHK": proj(), "key_DHK": proj(), "value_DHK": proj(),
        "output_HKD": ParamSpec((H, K, D), (*hk, "embed"), fan_in_normal((0, 1))),
        "ln_x": {"scale_HK": ParamSpec((H, K), hk, ones), "bias_HK": ParamSpec((H, K), hk, zeros)},
    }


def init(key: jax.Array, cfg) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Previous input (token shift) and, for the time mix, S [B, H, V, K]; fp32, max_len-free."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    state = {"x_prev_BD": jnp.zeros((batch_size, cfg.d_model), jnp.float32)}
    if isinstance(cfg, RWKV7TimeMixConfig):
        H, K = cfg.n_heads, cfg.head_dim
        state["S_BHVK"] = jnp.zeros((batch_size, H, K, K), jnp.float32)
    return state


# ----- the recurrence -----

def _recurrent(S_BHVK, r, logw, k, v, a, b, starts_BL):
    """Token by token; all per-token inputs [B, L, H, K] fp32."""
    def body(S_BHVK, inp):
        r_BHK, lw_BHK, k_BHK, v_BHK, a_BHK, b_BHK, s_B = inp
        S_BHVK = jnp.where(s_B[:, None, None, None], 0.0, S_BHVK)
        sa_BHV = jnp.einsum("BHVK,BHK->BHV", S_BHVK, a_BHK)
        S_BHVK = (S_BHVK * jnp.exp(lw_BHK)[:, :, None, :] + sa_BHV[..., None] * b_BHK[:, :, None, :]
                  + v_BHK[..., None] * k_BHK[:, :, None, :])
        return S_BHVK, jnp.einsum("BHVK,BHK->BHV", S_BHVK, r_BHK)

    xs = tuple(jnp.moveaxis(z, 1, 0) for z in (r, logw, k, v, a, b, starts_BL))
    S_BHVK, y_LBHV = jax.lax.scan(body, S_BHVK, xs)
    return jnp.moveaxis(y_LBHV, 0, 1), S_BHVK


def chunk_update(S_BHVK, r, logw, k, v, a, b, starts_BC):
    """One chunk of C tokens (inputs [B, H, C, K]) continuing from S. -> (y [B, H, C, V], S).

    With c_t = sum_{j<=t} log w_j inside the chunk, unrolling the recurrence gives
      u_t = S_{t-1} a_t = S_0 (a_t e^{c_{t-1}}) + sum_{i<t} [u_i (b_i e^{-c_i}) + v_i (k_i e^{-c_i})] . a_t e^{c_{t-1}}
      y_t = S_t r_t     = S_0 (r_t e^{c_t})     + sum_{i<=t} [u_i (b_i e^{-c_i}) + v_i (k_i e^{-c_i})] . r_t e^{c_t}
    so U solves (I - A) U = rhs with A strictly lower triangular. Tokens interact only within a
    document; S_0 reaches only tokens before the chunk's first document start.
    """
    C = r.shape[2]
    doc_BC = jnp.cumsum(starts_BC.astype(jnp.int32), axis=1)
    same_BTI = doc_BC[:, :, None] == doc_BC[:, None, :]
    t_C = jnp.arange(C)
    strict_BTI = same_BTI & (t_C[:, None] > t_C[None, :])[None]
    incl_BTI = same_BTI & (t_C[:, None] >= t_C[None, :])[None]
    first_B1C1 = (doc_BC == 0)[:, None, :, None].astype(jnp.float32)

    c = jnp.cumsum(logw, axis=2)
    c_excl = jnp.concatenate([jnp.zeros_like(c[:, :, :1]), c[:, :, :-1]], axis=2)
    # e^{-c_i} <= e^{0.61 C}: bounded because w >= 0.545 and C <= 128 (see module docstring).
    inv = jnp.exp(-c)
    a_dec, r_dec = a * jnp.exp(c_excl), r * jnp.exp(c)
    b_inv, k_inv = b * inv, k * inv

    def pair(q, kk, mask_BTI):
        m = jnp.einsum("BHTK,BHIK->BHTI", q, kk)
        return jnp.where(mask_BTI[:, None], m, 0.0)

    A_ab, A_ak = pair(a_dec, b_inv, strict_BTI), pair(a_dec, k_inv, strict_BTI)
    R_rb, R_rk = pair(r_dec, b_inv, incl_BTI), pair(r_dec, k_inv, incl_BTI)
    rhs = jnp.einsum("BHVK,BHTK->BHTV", S_BHVK, a_dec) * first_B1C1 + jnp.einsum(
        "BHTI,BHIV->BHTV", A_ak, v)
    eye_TI = jnp.eye(C, dtype=jnp.float32)
    u = jax.scipy.linalg.solve_triangular(eye_TI[None, None] - A_ab, rhs, lower=True,
                                          unit_diagonal=True)
    y = (jnp.einsum("BHVK,BHTK->BHTV", S_BHVK, r_dec) * first_B1C1
         + jnp.einsum("BHTI,BHIV->BHTV", R_rb, u) + jnp.einsum("BHTI,BHIV->BHTV", R_rk, v))

    # Final state: decays from each token to the chunk end are e^{c_last - c_i} <= 1.
    c_last = c[:, :, -1:, :]
    to_end = jnp.exp(c_last - c)
    keep_B1C1 = (doc_BC == doc_BC[:, -1:])[:, None, :, None].astype(jnp.float32)
    carry_B = (doc_BC[:, -1] == 0).astype(jnp.float32)
    S_new = (S_BHVK * jnp.exp(c_last) * carry_B[:, None, None, None]
             + jnp.einsum("BHIV,BHIK->BHVK", u * keep_B1C1, b * to_end)
             + jnp.einsum("BHIV,BHIK->BHVK", v * keep_B1C1, k * to_end))
    return y, S_new


def _chunked(S_BHVK, r, logw, k, v, a, b, starts_BL, chunk):
    B, L, H, K = r.shape
    n = -(-L // chunk)
    pad = n * chunk - L
    if pad:
        # Padded tokens are identity steps (w = 1, a = b = k = v = 0): the state passes unchanged.
        pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
        r, logw, k, v, a, b = (jnp.pad(z, pad4) for z in (r, logw, k, v, a, b))
        starts_BL = jnp.pad(starts_BL, ((0, 0), (0, pad)))

    def chunks(z):  # [B, n*C, H, K] -> [n, B, H, C, K] (v may be wider: [..., V])
        return jnp.moveaxis(z.reshape(B, n, chunk, H, z.shape[-1]), (1, 3), (0, 2))

    xs = tuple(chunks(z) for z in (r, logw, k, v, a, b)) + (
        jnp.moveaxis(starts_BL.reshape(B, n, chunk), 1, 0),)

    def body(S, inp):
        y, S = chunk_update(S, *inp)
        return S, y

    S_BHVK, y_NBHCV = jax.lax.scan(body, S_BHVK, xs)
    y_BLHV = jnp.moveaxis(y_NBHCV, (0, 2), (1, 3)).reshape(B, n * chunk, H, y_NBHCV.shape[-1])[:, :L]
    return y_BLHV, S_BHVK


def recurrence(S_BHVK: "Float[Array, 'B H V K']", r: "Float[Array, 'B L H K']", logw: "Float[Array, 'B L H K']",
               k: "Float[Array, 'B L H K']", v: "Float[Array, 'B L H V']", a: "Float[Array, 'B L H K']",
               b: "Float[Array, 'B L H K']", starts_BL: "Bool[Array, 'B L']", *, form: str = "recurrent",
               chunk_size: int = 16) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H V K']"]:
    """The state recurrence (module docstring) from S over a sequence, fp32 inputs: (y, final S).
    starts_BL: True where a document starts (S resets there). V may differ from K."""
    # -- context parallelism (logic in sharding/context_delta.py): None unless the rules split seq --
    from sharding import context_delta
    split = context_delta.dispatch_rwkv7(S_BHVK, r, logw, k, v, a, b, starts_BL, form=form, chunk_size=chunk_size)
    if split is not None:
        return split
    # -- end context parallelism --
    if form == "recurrent":
        return _recurrent(S_BHVK, r, logw, k, v, a, b, starts_BL)
    return _chunked(S_BHVK, r, logw, k, v, a, b, starts_BL, chunk_size)


# ----- the layer -----

def _lerp(x32_BLD, xprev_BLD, mix_D, dtype):
    """x + mix * (x_{t-1} - x), the reference's orientation (mix weights the previous token)."""
    m_11D = mix_D.astype(jnp.float32)[None, None, :]
    return (x32_BLD + m_11D * (xprev_BLD - x32_BLD)).astype(dtype)


def _proj(x_BLD, w_DHK):
    return jnp.einsum("BLD,DHK->BLHK", x_BLD, w_DHK.astype(x_BLD.dtype),
                      preferred_element_type=jnp.float32)


def _lora(x_BLD, down_DR, up_RHK, inner=None):
    h_BLR = jnp.einsum("BLD,DR->BLR", x_BLD, down_DR.astype(x_BLD.dtype),
                       preferred_element_type=jnp.float32)
    if inner is not None:
        h_BLR = inner(h_BLR)
    return jnp.einsum("BLR,RHK->BLHK", h_BLR, up_RHK.astype(jnp.float32))


def _head_group_norm(y_BLHK, scale_HK, bias_HK, eps):
    mean = jnp.mean(y_BLHK, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y_BLHK - mean), axis=-1, keepdims=True)
    return ((y_BLHK - mean) * jax.lax.rsqrt(var + eps) * scale_HK.astype(jnp.float32)[None, None]
            + bias_HK.astype(jnp.float32)[None, None])


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None, form: str | None = None
            ) -> tuple["Float[Array, 'B L D']", dict | None]:
    """RWKV-7 time mix (or channel mix, by config type) over a sequence; continues from `state`
    when given and then returns the state after the last token. `positions` is unused. `form`
    overrides cfg.form (step uses "recurrent")."""
    del positions
    if isinstance(cfg, RWKV7ChannelMixConfig):
        return _cm_forward(params, x_BLD, cfg=cfg, state=state, segment_ids=segment_ids)
    form = cfg.form if form is None else form
    B, L, D = x_BLD.shape
    dt = x_BLD.dtype
    st = init_state(cfg, B, 1) if state is None else state
    starts_BL = segments.starts(segment_ids, L, B)
    x32_BLD = x_BLD.astype(jnp.float32)
    xprev_BLD = token_shift(x_BLD, st["x_prev_BD"], starts_BL)
    xr, xk, xv = (_lerp(x32_BLD, xprev_BLD, params[f"x_{n}_D"], dt) for n in "rkv")
    # The LoRA paths (decay, in-context rate, gate) are small (rank << D) and steer every state
    # update: they run in fp32 whatever the activation dtype.
    xw, xa, xg = (_lerp(x32_BLD, xprev_BLD, params[f"x_{n}_D"], jnp.float32) for n in "wag")

    r = _proj(xr, params["receptance_DHK"])
    k = _proj(xk, params["key_DHK"])
    v = _proj(xv, params["value_DHK"])
    z_w = params["w0_HK"].astype(jnp.float32)[None, None] + _lora(xw, params["w1_DR"], params["w2_RHK"],
                                                                  jnp.tanh)
    logw = -DECAY_SCALE * jax.nn.sigmoid(z_w)  # log-space decay: no log of a rounded w
    alr = jax.nn.sigmoid(params["a0_HK"].astype(jnp.float32)[None, None]
                         + _lora(xa, params["a1_DR"], params["a2_RHK"]))
    g = _lora(xg, params["g1_DR"], params["g2_RHK"], jax.nn.sigmoid)

    kk = k * params["k_k_HK"].astype(jnp.float32)[None, None]
    # kk / max(|kk|, 1e-12), written with rsqrt of the squared norm: finite gradient at kk = 0.
    kk = kk * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(kk), axis=-1, keepdims=True), 1e-24))
    k = k * (1.0 + (alr - 1.0) * params["k_a_HK"].astype(jnp.float32)[None, None])
    a, b = -kk, kk * alr

    S0 = st["S_BHVK"].astype(jnp.float32)
    y_BLHV, S_BHVK = recurrence(S0, r, logw, k, v, a, b, starts_BL, form=form, chunk_size=cfg.chunk_size)

    y = _head_group_norm(y_BLHV, params["ln_x"]["scale_HK"], params["ln_x"]["bias_HK"], cfg.norm_eps)
    bonus_BLH1 = jnp.sum(r * k * params["r_k_HK"].astype(jnp.float32)[None, None], axis=-1, keepdims=True)
    y = (y + bonus_BLH1 * v) * g
    out_BLD = jnp.einsum("BLHK,HKD->BLD", y.astype(dt), params["output_HKD"].astype(dt),
                         preferred_element_type=jnp.float32).astype(dt)
    if state is None:
        return out_BLD, None
    return out_BLD, {"x_prev_BD": x32_BLD[:, -1], "S_BHVK": S_BHVK}


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *, cfg
         ) -> tuple["Float[Array, 'B D']", dict]:
    y_B1D, state = forward(params, x_BD[:, None], cfg=cfg, state=state, form="recurrent")
    return y_B1D[:, 0], state


# ----- channel mix: the public functions dispatch on the config type, so this module is
# registered for both RWKV7TimeMixConfig and RWKV7ChannelMixConfig. -----

def _cm_param_specs(cfg: RWKV7ChannelMixConfig) -> dict:
    D, F = cfg.d_model, cfg.d_ff
    return {
        "x_k_D": ParamSpec((D,), ("embed",), _mix_init(0.5)),
        "key_DF": ParamSpec((D, F), ("embed", "mlp"), fan_in_normal((0,))),
        "value_FD": ParamSpec((F, D), ("mlp", "embed"), fan_in_normal((0,))),
    }


def _cm_forward(params, x_BLD, *, cfg, state=None, segment_ids=None):
    B, L, D = x_BLD.shape
    dt = x_BLD.dtype
    prev_BD = jnp.zeros((B, D), jnp.float32) if state is None else state["x_prev_BD"]
    x32_BLD = x_BLD.astype(jnp.float32)
    xprev_BLD = token_shift(x_BLD, prev_BD, segments.starts(segment_ids, L, B))
    xk_BLD = _lerp(x32_BLD, xprev_BLD, params["x_k_D"], dt)
    h_BLF = jnp.einsum("BLD,DF->BLF", xk_BLD, params["key_DF"].astype(dt),
                       preferred_element_type=jnp.float32)
    # Squared ReLU in fp32, then back to the activation dtype for the second matmul.
    k_BLF = jnp.square(jax.nn.relu(h_BLF)).astype(dt)
    y_BLD = jnp.einsum("BLF,FD->BLD", k_BLF, params["value_FD"].astype(dt),
                       preferred_element_type=jnp.float32).astype(dt)
    return y_BLD, (None if state is None else {"x_prev_BD": x32_BLD[:, -1]})
