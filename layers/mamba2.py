"""Mamba-2 (SSD, "Transformers are SSMs", Dao & Gu 2024) as a sequence mixer.

Block (state-spaces/mamba `modules/mamba2.py`):
  z, x, B, C, dt = in-projections of u           (x: E = expand * D channels as H heads of P)
  x, B, C = silu(causal depthwise conv(x, B, C))  (width d_conv, one conv per channel)
  dt = softplus(dt + dt_bias);  A = -exp(A_log)   (one scalar decay per head)
  y = SSD(x * dt, A * dt, B, C) + D * x
  out = out_proj(rmsnorm_grouped(y * silu(z)))   (norm over E / n_groups channels per group)

SSD per head h (group g = h // (H / G)), state h_t [P, N]:
  h_t = exp(a_t) h_{t-1} + x_t B_t^T,   y_t = h_t C_t,   a_t = log-decay = A dt_t <= 0.

Two forms of the same recurrence, chosen by `Mamba2Config.scan`:
  "chunked": the SSD algorithm: inside each chunk of Q tokens a masked (quadratic) form whose
    decay matrix comes from a stable segment sum; between chunks a scan carries the state.
  "sequential": a `lax.scan` over tokens of the recurrence above.
`ssd` is a pure function of the SSD inputs so a kernel can replace it later.

Shape letters: B batch, L length, D model width, H heads, P head dim, G groups of B/C, R = H / G
heads per group, N state size, C chunks, Q tokens per chunk (i, j: tokens inside a chunk), W the
conv window, K conv channels (E + 2 G N). `B_...` and `C_...` names are the SSM's B and C
matrices; their suffix is the shape.

Packed sequences (layers.segments): at a document start the log-decay is -inf (the state
carried in is forgotten exactly) and the conv window is cleared. Segment sums never subtract
cumulative sums, so -inf and very negative log-decays give zeros, not NaNs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks, segments, short_conv
from layers import params as P
from layers.params import ParamSpec, fan_in_normal

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

SCANS = ("chunked", "sequential")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Attributes:
    d_model: model width D.
    d_state: SSM state size N per head (shared by the heads of a group).
    d_conv: width of the causal depthwise convolution on x, B and C.
    expand: inner width E = expand * d_model.
    head_dim: P, channels per head; H = E / P heads, each with its own scalar decay.
    n_groups: G groups of B/C projections (like GQA's kv heads); must divide H.
    chunk_size: Q, tokens per chunk of the "chunked" form (any length works: padded inside).
    scan: "chunked" (SSD) or "sequential" (per-token recurrence); same math, tests compare them.
    dt_min, dt_max: the initial dt (after softplus) is log-uniform in [dt_min, dt_max].
    dt_init_floor: lower clamp on that initial dt.
    a_init_range: A = -exp(A_log) starts uniform in this range (magnitudes).
    norm_eps: epsilon of the gated RMSNorm.
    conv_bias: learn a bias in the convolution (the reference does).
    """

    d_model: int
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 64
    scan: str = "chunked"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    conv_bias: bool = True

    def __post_init__(self):
        name = "Mamba2Config"
        for field in ("d_model", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            checks.positive(name, field, getattr(self, field))
        checks.divides(name, "head_dim", self.head_dim, "d_inner (expand * d_model)", self.d_inner)
        checks.divides(name, "n_groups", self.n_groups, "n_heads (d_inner / head_dim)", self.n_heads)
        checks.one_of(name, "scan", self.scan, SCANS)
        if not self.dt_min > 0:
            checks.fail(name, "dt_min", "a positive float", self.dt_min)
        if not self.dt_max >= self.dt_min:
            checks.fail(name, "dt_max", f"a float >= dt_min={self.dt_min}", self.dt_max)
        if not self.dt_init_floor > 0:
            checks.fail(name, "dt_init_floor", "a positive float", self.dt_init_floor)
        lo_hi = tuple(self.a_init_range)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            checks.fail(name, "a_init_range", "(lo, hi) with 0 < lo <= hi", self.a_init_range)
        object.__setattr__(self, "a_init_range", (float(lo_hi[0]), float(lo_hi[1])))
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim


# ----- parameters -----

def _a_log_init(lo: float, hi: float) -> P.Initializer:
    def init(key, shape, dtype):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
    return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float) -> P.Initializer:
    """Inverse softplus of a log-uniform dt, so softplus(0 + dt_bias) starts in [dt_min, dt_max]."""
    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), written without overflow.
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def param_specs(cfg: Mamba2Config) -> dict:
    D, H, Pd, G, N, W = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_conv
    # The reference fuses the in-projections into one matrix; separate ones keep the head axis
    # visible so tensor parallelism can shard heads (z, x, dt) without slicing a fused output.
    return {
        "wz_DHP": ParamSpec((D, H, Pd), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wx_DHP": ParamSpec((D, H, Pd), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wB_DGN": ParamSpec((D, G, N), ("embed", "ssm_groups", "ssm_state"), fan_in_normal((0,))),
        "wC_DGN": ParamSpec((D, G, N), ("embed", "ssm_groups", "ssm_state"), fan_in_normal((0,))),
        "wdt_DH": ParamSpec((D, H), ("embed", "heads"), fan_in_normal((0,))),
        # Depthwise conv: one filter per channel, so x, B and C may be convolved separately.
        # x's channels are flattened head-major (h * P + p), hence the "heads" axis.
        "conv_x": short_conv.param_specs(H * Pd, W, "heads", use_bias=cfg.conv_bias),
        "conv_B": short_conv.param_specs(G * N, W, "ssm_state", use_bias=cfg.conv_bias),
        "conv_C": short_conv.param_specs(G * N, W, "ssm_state", use_bias=cfg.conv_bias),
        # Decay and step-size parameters stay fp32 under a bf16 policy (mamba#6).
        "dt_bias_H": ParamSpec((H,), ("heads",), _dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                               keep_dtype=True),
        "A_log_H": ParamSpec((H,), ("heads",), _a_log_init(*cfg.a_init_range), keep_dtype=True),
        "D_H": ParamSpec((H,), ("heads",), P.ones, keep_dtype=True),
        "norm_scale_HP": ParamSpec((H, Pd), ("heads", "head_dim"), P.ones),
        "wo_HPD": ParamSpec((H, Pd, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }


def init(key: jax.Array, cfg: Mamba2Config) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: Mamba2Config, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Conv windows (last d_conv - 1 inputs) and the SSM state [B, H, P, N]. Everything is fp32
    whatever `dtype` (recurrent state accumulates); nothing depends on `max_len`."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    E, GN, W = cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.d_conv
    return {
        # Last d_conv - 1 inputs of the conv, channels [x (E) | B (G*N) | C (G*N)].
        "conv_BWK": short_conv.init_state(batch_size, E + 2 * GN, W, jnp.float32),
        "ssm_BHPN": jnp.zeros((batch_size, cfg.n_heads, cfg.head_dim, cfg.d_state), jnp.float32),
    }


# ----- SSD -----

def _segsum(a_XQ: "Float[Array, '... Q']") -> "Float[Array, '... Q Q']":
    """S[i, j] = sum_{k=j+1..i} a_k for i >= j, -inf above the diagonal.

    Masked cumulative sum over k (entries k <= j zeroed first), never cumsum[i] - cumsum[j]:
    that difference cancels catastrophically for long chunks and is NaN with -inf resets."""
    Q = a_XQ.shape[-1]
    k_QQ = jnp.arange(Q)[:, None]
    j_QQ = jnp.arange(Q)[None, :]
    a_XQQ = jnp.broadcast_to(a_XQ[..., :, None], a_XQ.shape + (Q,))  # [..., k, j] = a_k
    a_XQQ = jnp.where(k_QQ > j_QQ, a_XQQ, 0.0)
    s_XQQ = jnp.cumsum(a_XQQ, axis=-2)                               # [..., i, j]
    return jnp.where(k_QQ >= j_QQ, s_XQQ, -jnp.inf)


def _ssd_sequential(x_BLGRP, a_BLGR, B_BLGN, C_BLGN, h_BGRPN):
    def body(h_BGRPN, inputs):
        x_BGRP, a_BGR, B_BGN, C_BGN = inputs
        return _recur(h_BGRPN, x_BGRP, a_BGR, B_BGN, C_BGN)

    xs = tuple(jnp.moveaxis(t, 1, 0) for t in (x_BLGRP, a_BLGR, B_BLGN, C_BLGN))
    h_BGRPN, y_LBGRP = jax.lax.scan(body, h_BGRPN, xs)
    return jnp.moveaxis(y_LBGRP, 0, 1), h_BGRPN


def _recur(h_BGRPN, x_BGRP, a_BGR, B_BGN, C_BGN):
    """One token: h = exp(a) h + x B^T, y = h C."""
    h_BGRPN = (jnp.exp(a_BGR)[..., None, None] * h_BGRPN
               + jnp.einsum("BGRP,BGN->BGRPN", x_BGRP, B_BGN))
    y_BGRP = jnp.einsum("BGRPN,BGN->BGRP", h_BGRPN, C_BGN)
    return h_BGRPN, y_BGRP


def _ssd_chunked(x_BLGRP, a_BLGR, B_BLGN, C_BLGN, h_BGRPN, Q):
    Bsz, L, G, R, Pd = x_BLGRP.shape
    N = B_BLGN.shape[-1]
    nC = -(-L // Q)
    pad = nC * Q - L
    if pad:
        # Padded tokens: x = B = C = 0 adds nothing, log-decay 0 keeps the state as it is.
        def padded(t):
            return jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        x_BLGRP, a_BLGR, B_BLGN, C_BLGN = map(padded, (x_BLGRP, a_BLGR, B_BLGN, C_BLGN))
    x_BCQGRP = x_BLGRP.reshape(Bsz, nC, Q, G, R, Pd)
    B_BCQGN = B_BLGN.reshape(Bsz, nC, Q, G, N)
    C_BCQGN = C_BLGN.reshape(Bsz, nC, Q, G, N)
    a_BCGRQ = jnp.moveaxis(a_BLGR.reshape(Bsz, nC, Q, G, R), 2, -1)

    # Decays inside a chunk: from the chunk start to token i (inclusive) and between tokens.
    cum_BCGRQ = jnp.cumsum(a_BCGRQ, axis=-1)
    seg_BCGRQQ = _segsum(a_BCGRQ)
    decay_BCGRQQ = jnp.exp(seg_BCGRQQ)                      # [.., i, j], 0 above the diagonal
    to_end_BCGRQ = decay_BCGRQQ[..., -1, :]                 # token j -> end of its chunk

    # 1. Within chunks: y_i = sum_{j<=i} (C_i . B_j) decay[i, j] x_j.
    # Contractions pairwise, decays applied as broadcasts: the contraction order is fixed here
    # rather than left to einsum's path search over three operands.
    cb_BCGQQ = jnp.einsum("BCiGN,BCjGN->BCGij", C_BCQGN, B_BCQGN)
    w_BCGRQQ = cb_BCGQQ[:, :, :, None] * decay_BCGRQQ
    y_diag_BCQGRP = jnp.einsum("BCGRij,BCjGRP->BCiGRP", w_BCGRQQ, x_BCQGRP)

    # 2. The state each chunk adds by its end, from a zero start.
    xe_BCQGRP = jnp.moveaxis(to_end_BCGRQ, -1, 2)[..., None] * x_BCQGRP
    s_BCGRPN = jnp.einsum("BCjGRP,BCjGN->BCGRPN", xe_BCQGRP, B_BCQGN)

    # 3. Carry states across chunks: h_c = exp(sum of chunk c's log-decays) h_{c-1} + s_c.
    def carry(h_BGRPN, inputs):
        s_BGRPN, total_BGR = inputs
        return jnp.exp(total_BGR)[..., None, None] * h_BGRPN + s_BGRPN, h_BGRPN

    h_BGRPN, h_in_CBGRPN = jax.lax.scan(
        carry, h_BGRPN, (jnp.moveaxis(s_BCGRPN, 1, 0), jnp.moveaxis(cum_BCGRQ[..., -1], 1, 0)))
    h_in_BCGRPN = jnp.moveaxis(h_in_CBGRPN, 0, 1)

    # 4. What the state entering each chunk contributes to its tokens.
    y_off_BCQGRP = (jnp.einsum("BCiGN,BCGRPN->BCiGRP", C_BCQGN, h_in_BCGRPN)
                    * jnp.moveaxis(jnp.exp(cum_BCGRQ), -1, 2)[..., None])
    y_BLGRP = (y_diag_BCQGRP + y_off_BCQGRP).reshape(Bsz, nC * Q, G, R, Pd)[:, :L]
    return y_BLGRP, h_BGRPN


# Jitted (config static) so eager callers compile once per shape instead of dispatching op by op;
# under an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames=("chunk_size", "mode"))
def ssd(x_BLHP: "Float[Array, 'B L H P']", log_a_BLH: "Float[Array, 'B L H']",
        B_BLGN: "Float[Array, 'B L G N']", C_BLGN: "Float[Array, 'B L G N']",
        h0_BHPN: "Float[Array, 'B H P N'] | None" = None, reset_BL: "Bool[Array, 'B L'] | None" = None,
        *, chunk_size: int, mode: str) -> tuple["Float[Array, 'B L H P']", "Float[Array, 'B H P N']"]:
    """The SSD recurrence h_t = exp(log_a_t) h_{t-1} + x_t B_t^T, y_t = h_t C_t, per head.

    Head h reads group h // (H / G) of B and C. `reset_BL` True at t forgets the state before t.
    Computed in fp32; y in x's dtype, the final state in fp32. mode: "chunked" | "sequential".
    """
    Bsz, L, H, Pd = x_BLHP.shape
    G, N = B_BLGN.shape[2], B_BLGN.shape[3]
    if H % G:
        raise ValueError(f"ssd: groups G={G} of B/C must divide heads H={H}")
    if mode not in SCANS:
        raise ValueError(f"ssd: mode must be one of {SCANS}, got {mode!r}")
    # -- context parallelism (logic in sharding/context_recurrent.py): None unless the rules split seq --
    from sharding import context_recurrent
    split = context_recurrent.dispatch_ssd(x_BLHP, log_a_BLH, B_BLGN, C_BLGN, h0_BHPN, reset_BL,
                                           chunk_size=chunk_size, mode=mode)
    if split is not None:
        return split
    # -- end context parallelism --
    R = H // G
    f32 = jnp.float32
    a_BLH = log_a_BLH.astype(f32)
    if reset_BL is not None:
        a_BLH = jnp.where(reset_BL[:, :, None], -jnp.inf, a_BLH)
    x_BLGRP = x_BLHP.astype(f32).reshape(Bsz, L, G, R, Pd)
    a_BLGR = a_BLH.reshape(Bsz, L, G, R)
    h_BGRPN = (jnp.zeros((Bsz, G, R, Pd, N), f32) if h0_BHPN is None
               else h0_BHPN.astype(f32).reshape(Bsz, G, R, Pd, N))
    args = (x_BLGRP, a_BLGR, B_BLGN.astype(f32), C_BLGN.astype(f32), h_BGRPN)
    if mode == "chunked":
        y_BLGRP, h_BGRPN = _ssd_chunked(*args, chunk_size)
    else:
        y_BLGRP, h_BGRPN = _ssd_sequential(*args)
    return y_BLGRP.reshape(Bsz, L, H, Pd).astype(x_BLHP.dtype), h_BGRPN.reshape(Bsz, H, Pd, N)


# ----- the mixer -----

def _project(x_BLD, w):
    y = jnp.einsum("BLD,D...->BL...", x_BLD, w.astype(x_BLD.dtype), preferred_element_type=jnp.float32)
    return y.astype(x_BLD.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "mode"))
def _apply(params, x_BLD, state, segment_ids, *, cfg: Mamba2Config, mode: str):
    Bsz, L, _ = x_BLD.shape
    H, Pd, G, N = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
    f32 = jnp.float32
    z_BLHP = _project(x_BLD, params["wz_DHP"])
    dt_BLH = _project(x_BLD, params["wdt_DH"])
    # One depthwise conv over [x | B | C] (as the reference's fused conv1d): fewer ops than three.
    xbc_BLK = jnp.concatenate([_project(x_BLD, params["wx_DHP"]).reshape(Bsz, L, H * Pd),
                               _project(x_BLD, params["wB_DGN"]).reshape(Bsz, L, G * N),
                               _project(x_BLD, params["wC_DGN"]).reshape(Bsz, L, G * N)], axis=-1)
    parts = [params[k] for k in ("conv_x", "conv_B", "conv_C")]
    conv = {k: jnp.concatenate([q[k] for q in parts], axis=-1) for k in parts[0]}
    xbc_BLK, conv_state = short_conv.forward(conv, xbc_BLK, segment_ids=segment_ids,
                                             state=None if state is None else state["conv_BWK"])
    xbc_BLK = jax.nn.silu(xbc_BLK.astype(f32))
    xs_BLHP = xbc_BLK[..., :H * Pd].reshape(Bsz, L, H, Pd)
    B_BLGN = xbc_BLK[..., H * Pd:H * Pd + G * N].reshape(Bsz, L, G, N)
    C_BLGN = xbc_BLK[..., H * Pd + G * N:].reshape(Bsz, L, G, N)

    dt_BLH = jax.nn.softplus(dt_BLH.astype(f32) + params["dt_bias_H"].astype(f32)[None, None, :])
    A_H = -jnp.exp(params["A_log_H"].astype(f32))
    log_a_BLH = dt_BLH * A_H[None, None, :]
    reset_BL = None if segment_ids is None else segments.starts(segment_ids, L, Bsz)
    h0 = None if state is None else state["ssm_BHPN"]
    y_BLHP, h_BHPN = ssd(xs_BLHP * dt_BLH[..., None], log_a_BLH, B_BLGN, C_BLGN, h0, reset_BL,
                         chunk_size=cfg.chunk_size, mode=mode)
    y_BLHP = y_BLHP + params["D_H"].astype(f32)[None, None, :, None] * xs_BLHP

    # Gated RMSNorm, gate first (norm_before_gate=False), normalised per group of H / G heads.
    g_BLHP = y_BLHP * jax.nn.silu(z_BLHP.astype(f32))
    g_BLGX = g_BLHP.reshape(Bsz, L, G, (H // G) * Pd)
    inv_BLG1 = jax.lax.rsqrt(jnp.mean(jnp.square(g_BLGX), axis=-1, keepdims=True) + cfg.norm_eps)
    n_BLHP = (g_BLGX * inv_BLG1).reshape(Bsz, L, H, Pd) * params["norm_scale_HP"].astype(f32)[None, None]

    out_BLD = jnp.einsum("BLHP,HPD->BLD", n_BLHP.astype(x_BLD.dtype), params["wo_HPD"].astype(x_BLD.dtype),
                         preferred_element_type=f32).astype(x_BLD.dtype)
    if state is None:
        return out_BLD, None
    return out_BLD, {"conv_BWK": conv_state, "ssm_BHPN": h_BHPN}


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: Mamba2Config, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None, segment_ids: "Int[Array, 'B L'] | None" = None
            ) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Whole sequence. `positions` is unused (order is the recurrence's); segment ids reset the
    SSM state and the conv window at each document start. With `state`, continue from it.

    A one-token call (the model's decode step comes here, not through `step`) runs the
    sequential form: the chunked one would pad the token to a whole chunk and build its
    [Q, Q] decays (6x slower per token at Q 64; docs/recurrent_performance.md)."""
    del positions
    mode = "sequential" if x_BLD.shape[1] == 1 else cfg.scan
    return _apply(params, x_BLD, state, segment_ids, cfg=cfg, mode=mode)


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *, cfg: Mamba2Config
         ) -> tuple["Float[Array, 'B D']", dict]:
    """One token: the sequential form on a length-1 sequence (no chunk padding)."""
    y_B1D, state = _apply(params, x_BD[:, None, :], state, None, cfg=cfg, mode="sequential")
    return y_B1D[:, 0], state
