"""RWKV-4 time mix (WKV attention) and channel mix, after BlinkDL/RWKV-LM `RWKV-v4neo` (the
architecture of transformers' `modeling_rwkv.py`).

Time mix, per channel a of the attention width A (w = -exp(time_decay) < 0, u = time_first):

    x'_t   = lerp(x_{t-1}, x_t, time_mix_*)                       (token shift)
    k, v, r = x'_k W_k, x'_v W_v, sigmoid(x'_r W_r)
    wkv_t  = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
           / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})
    y_t    = (r_t * wkv_t) W_o

The exponentials overflow fp32 unless a running maximum is factored out: the state keeps the
numerator and denominator as (aa, bb) times e^pp, with pp the largest log-weight seen. Forms:

    "recurrent"  lax.scan over tokens with the (aa, bb, pp) stabiliser (as model_run.py);
    "parallel"   the masked quadratic form over the whole sequence, max-subtracted per row;
    "chunked"    the quadratic form inside chunks of `chunk_size`, (aa, bb, pp) between chunks.

All forms return the same state; pp is the exact maximum log-weight in every form, so even the
state leaves agree (not only aa * e^pp).

Channel mix (RWKV4ChannelMixConfig): y = sigmoid(x'_r W_r) * (relu(x'_k W_k)^2 W_v), with its
own token shift; its state is the previous input. One module serves both configs: the protocol
functions dispatch on the config type, so it is registered for each.

lerp(x_{t-1}, x_t, m) = m x_t + (1 - m) x_{t-1} (RWKV-4's orientation: time_mix weights x_t).
Initialisation follows RWKV-4's per-channel spreads for decay, bonus and mixes (for a middle
layer); the projections use fan-in normal init (RWKV-4 zero-initialises the output and the
channel-mix value projections, a training recipe left to the caller).

Packed sequences (segment ids) reset the WKV state and the token shift at each document start
(layers/segments.py). Recurrent state and the WKV math are fp32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp

from layers import checks, segments
from layers import params as P
from layers.params import ParamSpec, fan_in_normal

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

# The log of an empty sum: finite, so pp + w and pp - p never produce inf - inf.
EMPTY_LOG = -1e38
FORMS = ("recurrent", "parallel", "chunked")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV4TimeMixConfig:
    """Attributes:
    d_model: model width D.
    d_att: attention width A (channels of the WKV recurrence); defaults to d_model.
    form: "recurrent" | "parallel" | "chunked" (see the module docstring); all agree.
    chunk_size: tokens per chunk of the "chunked" form (any length works: the tail is padded).
    """

    d_model: int
    d_att: int | None = None
    form: Literal["recurrent", "parallel", "chunked"] = "recurrent"
    chunk_size: int = 64

    def __post_init__(self):
        name = "RWKV4TimeMixConfig"
        checks.positive(name, "d_model", self.d_model)
        if self.d_att is None:
            object.__setattr__(self, "d_att", self.d_model)
        checks.positive(name, "d_att", self.d_att)
        checks.one_of(name, "form", self.form, FORMS)
        checks.positive(name, "chunk_size", self.chunk_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV4ChannelMixConfig:
    """Attributes:
    d_model: model width D.
    d_ff: hidden width F of the squared-ReLU key (RWKV-4 uses 4 * d_model).
    """

    d_model: int
    d_ff: int

    def __post_init__(self):
        checks.positive("RWKV4ChannelMixConfig", "d_model", self.d_model)
        checks.positive("RWKV4ChannelMixConfig", "d_ff", self.d_ff)


# ----- initialisers (RWKV-4's per-channel spreads, for a middle layer: ratio 0.5) -----

def _ramp(power: float, offset: float = 0.0):
    """time_mix init: (i / D) ** power + offset over channels i."""
    def init(key, shape, dtype):
        del key
        i = jnp.arange(shape[-1], dtype=jnp.float32) / shape[-1]
        return jnp.broadcast_to(i ** power + offset, shape).astype(dtype)
    return init


def _decay_init(key, shape, dtype):
    # Decay speeds spread from slow to fast over channels so the layer sees several time scales.
    del key
    n = shape[-1]
    h = jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)
    return jnp.broadcast_to(-5.0 + 8.0 * h ** (0.7 + 1.3 * 0.5), shape).astype(dtype)


def _first_init(key, shape, dtype):
    del key
    zigzag = 0.5 * (jnp.mod(jnp.arange(shape[-1]) + 1, 3).astype(jnp.float32) - 1.0)
    return jnp.broadcast_to(math.log(0.3) + zigzag, shape).astype(dtype)


def _mix_spec(D: int, init) -> ParamSpec:
    return ParamSpec((D,), ("embed",), init)


# ----- time mix -----

def param_specs(cfg: RWKV4TimeMixConfig | RWKV4ChannelMixConfig) -> dict:
    if isinstance(cfg, RWKV4ChannelMixConfig):
        return _cm_param_specs(cfg)
    D, A = cfg.d_model, cfg.d_att
    return {
        # Decay and bonus enter exponentials: they stay fp32 under a bf16 parameter policy.
        "time_decay_A": ParamSpec((A,), ("mlp",), _decay_init, keep_dtype=True),
        "time_first_A": ParamSpec((A,), ("mlp",), _first_init, keep_dtype=True),
        "time_mix_k_D": _mix_spec(D, _ramp(0.5)),
        "time_mix_v_D": _mix_spec(D, _ramp(0.5, 0.3 * 0.5)),
        "time_mix_r_D": _mix_spec(D, _ramp(0.25)),
        "key_DA": ParamSpec((D, A), ("embed", "mlp"), fan_in_normal((0,))),
        "value_DA": ParamSpec((D, A), ("embed", "mlp"), fan_in_normal((0,))),
        "receptance_DA": ParamSpec((D, A), ("embed", "mlp"), fan_in_normal((0,))),
        "output_AD": ParamSpec((A, D), ("mlp", "embed"), fan_in_normal((0,))),
    }


def init(key: jax.Array, cfg: RWKV4TimeMixConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: RWKV4TimeMixConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Previous input (token shift) and the WKV numerator / denominator / log-scale per channel;
    all fp32 and independent of max_len."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    if isinstance(cfg, RWKV4ChannelMixConfig):
        return {"x_prev_BD": jnp.zeros((batch_size, cfg.d_model), jnp.float32)}
    B, D, A = batch_size, cfg.d_model, cfg.d_att
    return {
        "x_prev_BD": jnp.zeros((B, D), jnp.float32),
        "aa_BA": jnp.zeros((B, A), jnp.float32),
        "bb_BA": jnp.zeros((B, A), jnp.float32),
        "pp_BA": jnp.full((B, A), EMPTY_LOG, jnp.float32),
    }


def token_shift(x_BLD, prev_BD, starts_BL):
    """x_{t-1} for every t (fp32): the carried previous input at t = 0, zero at document starts."""
    x32_BLD = x_BLD.astype(jnp.float32)
    shifted_BLD = jnp.concatenate([prev_BD.astype(jnp.float32)[:, None, :], x32_BLD[:, :-1]], axis=1)
    return jnp.where(starts_BL[:, :, None], 0.0, shifted_BLD)


def _lerp(x32_BLD, xprev_BLD, mix_D, dtype):
    m_11D = mix_D.astype(jnp.float32)[None, None, :]
    return (x32_BLD * m_11D + xprev_BLD * (1.0 - m_11D)).astype(dtype)


def _proj(x_BLD, w_DA):
    return jnp.einsum("BLD,DA->BLA", x_BLD, w_DA.astype(x_BLD.dtype), preferred_element_type=jnp.float32)


def wkv_token(w_A, u_A, k_BA, v_BA, aa_BA, bb_BA, pp_BA):
    """One token of the stabilised recurrence (model_run.py's RNN mode). -> (wkv_BA, aa, bb, pp)."""
    ww_BA = u_A[None] + k_BA
    p_BA = jnp.maximum(pp_BA, ww_BA)
    e1_BA, e2_BA = jnp.exp(pp_BA - p_BA), jnp.exp(ww_BA - p_BA)
    wkv_BA = (e1_BA * aa_BA + e2_BA * v_BA) / (e1_BA * bb_BA + e2_BA)
    # Decay the state one step, then add token t (without the bonus u).
    ww_BA = pp_BA + w_A[None]
    p_BA = jnp.maximum(ww_BA, k_BA)
    e1_BA, e2_BA = jnp.exp(ww_BA - p_BA), jnp.exp(k_BA - p_BA)
    return wkv_BA, e1_BA * aa_BA + e2_BA * v_BA, e1_BA * bb_BA + e2_BA, p_BA


def _wkv_recurrent(w_A, u_A, k_BLA, v_BLA, starts_BL, state):
    def body(carry, inp):
        aa, bb, pp = carry
        k_BA, v_BA, start_B = inp
        s_B1 = start_B[:, None]
        aa, bb = jnp.where(s_B1, 0.0, aa), jnp.where(s_B1, 0.0, bb)
        pp = jnp.where(s_B1, EMPTY_LOG, pp)
        wkv_BA, aa, bb, pp = wkv_token(w_A, u_A, k_BA, v_BA, aa, bb, pp)
        return (aa, bb, pp), wkv_BA

    xs = (jnp.moveaxis(k_BLA, 1, 0), jnp.moveaxis(v_BLA, 1, 0), jnp.moveaxis(starts_BL, 1, 0))
    carry, wkv_LBA = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(wkv_LBA, 0, 1), carry


def wkv_block(w_A, u_A, k_BCA, v_BCA, starts_BC, valid_BC, aa_BA, bb_BA, pp_BA):
    """The quadratic form over one block of C tokens, continuing from (aa, bb, pp).

    Row t mixes tokens i < t of its own document with log-weight (t-1-i) w + k_i, itself with
    u + k_t and, if no document started in the block before it, the carried state with
    pp + t w. Masked entries become -inf before exp; each row subtracts its maximum.
    Padding (valid False, only after the last real token) is left out of the state.
    """
    C = k_BCA.shape[1]
    t_C = jnp.arange(C, dtype=jnp.int32)
    # Document index inside the block; 0 = the document the carried state belongs to.
    doc_BC = jnp.cumsum(starts_BC.astype(jnp.int32), axis=1)
    same_BTI = doc_BC[:, :, None] == doc_BC[:, None, :]
    before_TI = t_C[:, None] > t_C[None, :]
    allowed_BTI = same_BTI & before_TI[None] & valid_BC[:, None, :]
    dist_TI = (t_C[:, None] - 1 - t_C[None, :]).astype(jnp.float32)
    lw_BTIA = dist_TI[None, :, :, None] * w_A[None, None, None, :] + k_BCA[:, None, :, :]
    lw_BTIA = jnp.where(allowed_BTI[:, :, :, None], lw_BTIA, -jnp.inf)
    bonus_BTA = u_A[None, None, :] + k_BCA
    ls_BTA = pp_BA[:, None, :] + t_C.astype(jnp.float32)[None, :, None] * w_A[None, None, :]
    ls_BTA = jnp.where((doc_BC == 0)[:, :, None], ls_BTA, -jnp.inf)
    # The result does not depend on the shift: no gradient through it.
    m_BTA = jax.lax.stop_gradient(jnp.maximum(jnp.max(lw_BTIA, axis=2), jnp.maximum(bonus_BTA, ls_BTA)))
    p_BTIA = jnp.exp(lw_BTIA - m_BTA[:, :, None, :])
    pb_BTA = jnp.exp(bonus_BTA - m_BTA)
    ps_BTA = jnp.exp(ls_BTA - m_BTA)
    num_BTA = jnp.einsum("BTIA,BIA->BTA", p_BTIA, v_BCA) + pb_BTA * v_BCA + ps_BTA * aa_BA[:, None, :]
    den_BTA = jnp.sum(p_BTIA, axis=2) + pb_BTA + ps_BTA * bb_BA[:, None, :]
    wkv_BCA = num_BTA / den_BTA

    # State after the last real token f: tokens i <= f of f's document with (f-i) w + k_i, and
    # the carried state with pp + (f+1) w if that document is the carried one.
    n_B = jnp.sum(valid_BC.astype(jnp.int32), axis=1)
    last_doc_B = doc_BC[:, -1]  # padding never starts a document, so this is f's document
    keep_BI = valid_BC & (doc_BC == last_doc_B[:, None])
    distf_BI = (n_B[:, None] - 1 - t_C[None, :]).astype(jnp.float32)
    lf_BIA = distf_BI[:, :, None] * w_A[None, None, :] + k_BCA
    lf_BIA = jnp.where(keep_BI[:, :, None], lf_BIA, -jnp.inf)
    lsf_BA = pp_BA + n_B.astype(jnp.float32)[:, None] * w_A[None, :]
    lsf_BA = jnp.where((last_doc_B == 0)[:, None], lsf_BA, -jnp.inf)
    # pp is the running maximum itself, as in the recurrence (not only a shift).
    pp_new_BA = jnp.maximum(jnp.max(lf_BIA, axis=1), lsf_BA)
    pf_BIA = jnp.exp(lf_BIA - pp_new_BA[:, None, :])
    psf_BA = jnp.exp(lsf_BA - pp_new_BA)
    aa_new_BA = jnp.einsum("BIA,BIA->BA", pf_BIA, v_BCA) + psf_BA * aa_BA
    bb_new_BA = jnp.sum(pf_BIA, axis=1) + psf_BA * bb_BA
    return wkv_BCA, (aa_new_BA, bb_new_BA, pp_new_BA)


def _wkv_chunked(w_A, u_A, k_BLA, v_BLA, starts_BL, state, chunk):
    B, L, A = k_BLA.shape
    n = -(-L // chunk)
    pad = n * chunk - L
    valid_BL = jnp.ones((B, L), bool)
    if pad:
        # Padded tokens are masked out of every sum and of the state.
        k_BLA, v_BLA = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (k_BLA, v_BLA))
        starts_BL = jnp.pad(starts_BL, ((0, 0), (0, pad)))
        valid_BL = jnp.pad(valid_BL, ((0, 0), (0, pad)))

    def chunks(a):
        return jnp.moveaxis(a.reshape((B, n, chunk) + a.shape[2:]), 1, 0)

    def body(carry, inp):
        k_BCA, v_BCA, s_BC, ok_BC = inp
        wkv_BCA, carry = wkv_block(w_A, u_A, k_BCA, v_BCA, s_BC, ok_BC, *carry)
        return carry, wkv_BCA

    carry, wkv_NBCA = jax.lax.scan(body, state, (chunks(k_BLA), chunks(v_BLA), chunks(starts_BL),
                                                 chunks(valid_BL)))
    wkv_BLA = jnp.moveaxis(wkv_NBCA, 0, 1).reshape(B, n * chunk, A)[:, :L]
    return wkv_BLA, carry


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: RWKV4TimeMixConfig,
            state: dict | None = None, positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None, form: str | None = None
            ) -> tuple["Float[Array, 'B L D']", dict | None]:
    """RWKV-4 time mix over a sequence; continues from `state` when given (then returns the
    state after the last token). `positions` is unused (order is implicit). `form` overrides
    cfg.form (step uses "recurrent")."""
    if isinstance(cfg, RWKV4ChannelMixConfig):
        return _cm_forward(params, x_BLD, cfg=cfg, state=state, segment_ids=segment_ids)
    del positions
    form = cfg.form if form is None else form
    B, L, D = x_BLD.shape
    dt = x_BLD.dtype
    st = init_state(cfg, B, 1) if state is None else state
    starts_BL = segments.starts(segment_ids, L, B)
    x32_BLD = x_BLD.astype(jnp.float32)
    xprev_BLD = token_shift(x_BLD, st["x_prev_BD"], starts_BL)
    k_BLA = _proj(_lerp(x32_BLD, xprev_BLD, params["time_mix_k_D"], dt), params["key_DA"])
    v_BLA = _proj(_lerp(x32_BLD, xprev_BLD, params["time_mix_v_D"], dt), params["value_DA"])
    r_BLA = jax.nn.sigmoid(_proj(_lerp(x32_BLD, xprev_BLD, params["time_mix_r_D"], dt),
                                 params["receptance_DA"]))
    w_A = -jnp.exp(params["time_decay_A"].astype(jnp.float32))
    u_A = params["time_first_A"].astype(jnp.float32)
    wkv_state = (st["aa_BA"].astype(jnp.float32), st["bb_BA"].astype(jnp.float32),
                 st["pp_BA"].astype(jnp.float32))
    # -- context parallelism (logic in sharding/context_recurrent.py): None unless the rules split seq --
    from sharding import context_recurrent
    split = context_recurrent.dispatch_wkv4(w_A, u_A, k_BLA, v_BLA, starts_BL, wkv_state, form=form,
                                            chunk_size=cfg.chunk_size)
    # -- end context parallelism --
    if split is not None:
        wkv_BLA, (aa, bb, pp) = split
    elif form == "recurrent":
        wkv_BLA, (aa, bb, pp) = _wkv_recurrent(w_A, u_A, k_BLA, v_BLA, starts_BL, wkv_state)
    else:
        chunk = L if form == "parallel" else cfg.chunk_size
        wkv_BLA, (aa, bb, pp) = _wkv_chunked(w_A, u_A, k_BLA, v_BLA, starts_BL, wkv_state, chunk)
    y_BLD = jnp.einsum("BLA,AD->BLD", (r_BLA * wkv_BLA).astype(dt), params["output_AD"].astype(dt),
                       preferred_element_type=jnp.float32).astype(dt)
    if state is None:
        return y_BLD, None
    return y_BLD, {"x_prev_BD": x32_BLD[:, -1], "aa_BA": aa, "bb_BA": bb, "pp_BA": pp}


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *, cfg: RWKV4TimeMixConfig
         ) -> tuple["Float[Array, 'B D']", dict]:
    if isinstance(cfg, RWKV4ChannelMixConfig):
        y_B1D, state = _cm_forward(params, x_BD[:, None], cfg=cfg, state=state)
    else:
        y_B1D, state = forward(params, x_BD[:, None], cfg=cfg, state=state, form="recurrent")
    return y_B1D[:, 0], state


# ----- channel mix: the public functions above dispatch on the config type, so this module is
# registered for both RWKV4TimeMixConfig and RWKV4ChannelMixConfig. -----

def _cm_param_specs(cfg: RWKV4ChannelMixConfig) -> dict:
    D, F = cfg.d_model, cfg.d_ff
    return {
        "time_mix_k_D": _mix_spec(D, _ramp(0.5)),
        "time_mix_r_D": _mix_spec(D, _ramp(0.5)),
        "key_DF": ParamSpec((D, F), ("embed", "mlp"), fan_in_normal((0,))),
        "receptance_DD": ParamSpec((D, D), ("embed", None), fan_in_normal((0,))),
        "value_FD": ParamSpec((F, D), ("mlp", "embed"), fan_in_normal((0,))),
    }


def _cm_forward(params, x_BLD, *, cfg, state=None, segment_ids=None):
    B, L, D = x_BLD.shape
    dt = x_BLD.dtype
    prev_BD = jnp.zeros((B, D), jnp.float32) if state is None else state["x_prev_BD"]
    x32_BLD = x_BLD.astype(jnp.float32)
    xprev_BLD = token_shift(x_BLD, prev_BD, segments.starts(segment_ids, L, B))
    xk_BLD = _lerp(x32_BLD, xprev_BLD, params["time_mix_k_D"], dt)
    xr_BLD = _lerp(x32_BLD, xprev_BLD, params["time_mix_r_D"], dt)
    k_BLF = jnp.square(jax.nn.relu(jnp.einsum("BLD,DF->BLF", xk_BLD, params["key_DF"].astype(dt),
                                              preferred_element_type=jnp.float32)))
    kv_BLD = jnp.einsum("BLF,FD->BLD", k_BLF.astype(dt), params["value_FD"].astype(dt),
                        preferred_element_type=jnp.float32)
    r_BLD = jax.nn.sigmoid(jnp.einsum("BLD,DE->BLE", xr_BLD, params["receptance_DD"].astype(dt),
                                      preferred_element_type=jnp.float32))
    y_BLD = (r_BLD * kv_BLD).astype(dt)
    return y_BLD, (None if state is None else {"x_prev_BD": x32_BLD[:, -1]})
