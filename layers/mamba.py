"""Mamba-1 (selective state space) sequence mixer.

Follows state-spaces/mamba `modules/mamba_simple.py::Mamba` and the math of
`ops/selective_scan_interface.py::selective_scan_ref`:

    x, z  = in_proj(u)                            D -> 2E
    x     = silu(causal_depthwise_conv(x))        width d_conv, layers.short_conv
    dt, B, C = x_proj(x)                          E -> R + 2N
    dt    = softplus(dt_proj(dt) + dt_bias)       R -> E, bias fp32
    A     = -exp(A_log)                           [E, N], A_log = log(1..N) (S4D-real)
    h_t   = exp(dt_t A) * h_{t-1} + dt_t B_t x_t  [B, E, N], fp32
    y_t   = h_t C_t + D * x_t
    out   = out_proj(y * silu(z))                 E -> D

Shape letters: B batch, L length, D model width, E inner width (expand * D), N state size,
R dt rank, W conv width, P = R + 2N (x_proj outputs), T chunk length.

The recurrence lives in the pure function `selective_scan`, in three forms selected by `mode`
(all exact, all agree): "sequential" (one lax.scan step per token, the reference form),
"associative" (one jax.lax.associative_scan over the whole sequence; memory B*L*E*N) and
"chunked" (lax.scan over chunks of `chunk_size`, associative scan inside each chunk, the chunk
body rematerialised in the backward pass so only chunk-boundary states are saved). Mode
"pallas" runs the kernel `pallas_kernels.selective_scan` (same numbers), "auto" picks it on GPU/TPU.

Mixer protocol (DESIGN.md): param_specs, init, forward, init_state, step. Decoding state:
{"conv": last d_conv-1 inputs of the conv [B, d_conv-1, E] (activation dtype),
 "ssm": h [B, E, N] (always fp32)}.
Packed sequences (segment_ids): where a document starts the conv window and h reset to zero
(layers.segments convention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks, norms, segments, short_conv
from layers import params as P
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

SCAN_MODES = ("associative", "chunked", "sequential")  # the XLA forms
KERNEL_MODES = ("pallas", "auto")  # dispatch to pallas_kernels.selective_scan
INNER_AXIS = "mlp"  # logical axis of E: the mixer's hidden width, sharded like an MLP's under TP


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig:
    """Attributes:
    d_model: model width D.
    d_state: N, state size per channel.
    d_conv: W, width of the causal depthwise convolution.
    expand: E = expand * d_model.
    dt_rank: R, rank of the dt projection; None gives ceil(d_model / 16).
    dt_min, dt_max: the initial step dt is log-uniform in [dt_min, dt_max] per channel ...
    dt_init_floor: ... and at least this; the dt bias is its inverse softplus.
    conv_bias: bias on the convolution.
    proj_bias: biases on in_proj and out_proj.
    scan: "auto" (default: the Pallas kernel on GPU/TPU, "sequential" on CPU, the fastest there)
      | "chunked" | "associative" | "sequential" | "pallas" (see `selective_scan`). "sequential"
      saves one [B, E, N] state per token for the backward pass; "chunked" only one per chunk.
    chunk_size: chunk length of the "chunked" scan.
    inner_norm_eps: None (plain Mamba), or RMSNorm dt (before dt_proj), B and C with learned
      scales and this eps, as Jamba's Mamba layers do (params "dt_norm_R", "B_norm_N", "C_norm_N").
    """

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False
    scan: str = "auto"
    chunk_size: int = 64
    inner_norm_eps: float | None = None

    def __post_init__(self):
        name = "MambaConfig"
        for f in ("d_model", "d_state", "d_conv", "expand", "chunk_size"):
            checks.positive(name, f, getattr(self, f))
        if self.dt_rank is None:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        checks.positive(name, "dt_rank", self.dt_rank)
        if not 0 < self.dt_min <= self.dt_max:
            raise checks.ConfigError(
                f"{name}: expected 0 < dt_min <= dt_max, got dt_min={self.dt_min!r}, dt_max={self.dt_max!r}")
        if not self.dt_init_floor > 0:
            checks.fail(name, "dt_init_floor", "a positive float", self.dt_init_floor)
        checks.one_of(name, "scan", self.scan, SCAN_MODES + KERNEL_MODES)
        if self.inner_norm_eps is not None and not self.inner_norm_eps > 0:
            checks.fail(name, "inner_norm_eps", "None or a positive float", self.inner_norm_eps)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


# ---------------------------------------------------------------------------------------------
# The selective scan (pure function; a kernel may replace it).


def _discretize(u_BTE, delta_BTE, A_EN, B_BTN, keep_BT):
    """Decay a = exp(delta A) (times 0 where the state resets) and input b = delta B u, fp32."""
    a_BTEN = jnp.exp(jnp.einsum("bte,en->bten", delta_BTE, A_EN))
    if keep_BT is not None:
        a_BTEN = a_BTEN * keep_BT[:, :, None, None]
    b_BTEN = jnp.einsum("bte,btn->bten", delta_BTE * u_BTE, B_BTN)
    return a_BTEN, b_BTEN


def _combine(left, right):
    """Compose h -> a_l h + b_l, then h -> a_r h + b_r."""
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def _scan_block(h_BEN, u_BTE, delta_BTE, A_EN, B_BTN, C_BTN, keep_BT):
    """Associative scan over one block of T tokens starting from h: -> (y_BTE without D, h_T)."""
    a_BTEN, b_BTEN = _discretize(u_BTE, delta_BTE, A_EN, B_BTN, keep_BT)
    b_BTEN = b_BTEN.at[:, 0].add(a_BTEN[:, 0] * h_BEN)  # fold the incoming state into token 0
    _, h_BTEN = jax.lax.associative_scan(_combine, (a_BTEN, b_BTEN), axis=1)
    y_BTE = jnp.einsum("bten,btn->bte", h_BTEN, C_BTN)
    return y_BTE, h_BTEN[:, -1]


def _scan_sequential(h_BEN, u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, keep_BL):
    # Without resets the body has no keep factor: one [B, E, N] multiply fewer per token, and one
    # residual fewer saved per token for the backward pass (the CPU default form, see "auto").
    def body(h_BEN, xs):
        u_BE, delta_BE, B_BN, C_BN = xs[:4]
        a_BEN = jnp.exp(jnp.einsum("be,en->ben", delta_BE, A_EN))
        if keep_BL is not None:
            a_BEN = a_BEN * xs[4][:, None, None]
        h_BEN = a_BEN * h_BEN + jnp.einsum("be,bn->ben", delta_BE * u_BE, B_BN)
        return h_BEN, jnp.einsum("ben,bn->be", h_BEN, C_BN)

    time_major = lambda v: jnp.moveaxis(v, 1, 0)
    inputs = (u_BLE, delta_BLE, B_BLN, C_BLN) + (() if keep_BL is None else (keep_BL,))
    xs = tuple(map(time_major, inputs))
    h_BEN, y_LBE = jax.lax.scan(body, h_BEN, xs)
    return jnp.moveaxis(y_LBE, 0, 1), h_BEN


def _scan_chunked(h_BEN, u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, keep_BL, chunk_size):
    Bsz, L, E = u_BLE.shape
    T = min(chunk_size, L)
    n_chunks = -(-L // T)
    pad = n_chunks * T - L
    if pad:
        # Padded tokens have delta = 0 and keep = 1: decay 1, input 0, so h passes through unchanged.
        padded = lambda v, value=0.0: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2),
                                             constant_values=value)
        u_BLE, delta_BLE, B_BLN, C_BLN = map(padded, (u_BLE, delta_BLE, B_BLN, C_BLN))
        keep_BL = padded(keep_BL, 1.0)

    def chunks(v):  # [B, n*T, ...] -> [n, B, T, ...]
        return jnp.moveaxis(v.reshape(Bsz, n_chunks, T, *v.shape[2:]), 1, 0)

    @jax.checkpoint  # save only chunk-boundary states; recompute [B, T, E, N] in the backward pass
    def body(h_BEN, xs):
        u_BTE, delta_BTE, B_BTN, C_BTN, keep_BT = xs
        y_BTE, h_BEN = _scan_block(h_BEN, u_BTE, delta_BTE, A_EN, B_BTN, C_BTN, keep_BT)
        return h_BEN, y_BTE

    xs = tuple(map(chunks, (u_BLE, delta_BLE, B_BLN, C_BLN, keep_BL)))
    h_BEN, y_nBTE = jax.lax.scan(body, h_BEN, xs)
    y_BLE = jnp.moveaxis(y_nBTE, 0, 1).reshape(Bsz, n_chunks * T, E)
    return y_BLE[:, :L], h_BEN


def selective_scan(u_BLE: "Float[Array, 'B L E']", delta_BLE: "Float[Array, 'B L E']",
                   A_EN: "Float[Array, 'E N']", B_BLN: "Float[Array, 'B L N']",
                   C_BLN: "Float[Array, 'B L N']", D_E: "Float[Array, 'E'] | None" = None,
                   h0_BEN: "Float[Array, 'B E N'] | None" = None,
                   reset_BL: "Bool[Array, 'B L'] | None" = None, *, mode: str = "chunked",
                   chunk_size: int = 64) -> tuple["Float[Array, 'B L E']", "Float[Array, 'B E N']"]:
    """The selective state-space recurrence (Mamba-1), per channel e and state index n:

        h_t = exp(delta_t A) * h_{t-1} * (0 if reset_t else 1) + delta_t * B_t * u_t
        y_t = sum_n h_t C_t + D * u_t

    delta is the final (positive) step: softplus and bias are the caller's. h_{-1} = h0 (zeros if
    None). Math in fp32; returns (y in u's dtype, h after the last token in fp32).
    mode: "sequential" | "associative" | "chunked" (same numbers; see the module docstring), or
      "pallas" (the kernel `pallas_kernels.selective_scan`, interpret mode on CPU) or "auto"
      ("pallas" on GPU/TPU, "sequential" elsewhere: fastest on CPU, see MambaConfig.scan).
    """
    checks.one_of("selective_scan", "mode", mode, SCAN_MODES + KERNEL_MODES)
    checks.positive("selective_scan", "chunk_size", chunk_size)
    checks.array("u_BLE", u_BLE, rank=3, kind="f")
    Bsz, L, E = u_BLE.shape
    checks.array("A_EN", A_EN, rank=2, kind="f", shape=(E, None))
    N = A_EN.shape[1]
    checks.array("delta_BLE", delta_BLE, kind="f", shape=(Bsz, L, E))
    checks.array("B_BLN", B_BLN, kind="f", shape=(Bsz, L, N))
    checks.array("C_BLN", C_BLN, kind="f", shape=(Bsz, L, N))
    if D_E is not None:
        checks.array("D_E", D_E, kind="f", shape=(E,))
    if h0_BEN is not None:
        checks.array("h0_BEN", h0_BEN, kind="f", shape=(Bsz, E, N))
    if reset_BL is not None:
        checks.array("reset_BL", reset_BL, shape=(Bsz, L))
    # -- context parallelism (logic in sharding/context_scan.py): None unless the rules split seq --
    from sharding import context_scan
    split = context_scan.dispatch_selective(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL,
                                            mode=mode, chunk_size=chunk_size)
    if split is not None:
        return split
    # -- end context parallelism --

    return _selective_scan(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL, mode=mode,
                           chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size"))
def _selective_scan(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL, *, mode, chunk_size):
    # Jitted so eager callers compile one program, not every small op of the scan (inlined under jit).
    Bsz, L, E = u_BLE.shape
    N = A_EN.shape[1]
    f32 = lambda v: v.astype(jnp.float32)
    u32_BLE, delta_BLE, A_EN, B_BLN, C_BLN = map(f32, (u_BLE, delta_BLE, A_EN, B_BLN, C_BLN))
    h_BEN = jnp.zeros((Bsz, E, N), jnp.float32) if h0_BEN is None else f32(h0_BEN)
    keep_BL = None if reset_BL is None else 1.0 - reset_BL.astype(jnp.float32)

    if mode == "auto":
        # On CPU the per-token scan beats the chunked associative scan ~2-3x for a train step
        # (fewer passes over [B, T, E, N]; docs/recurrent_performance.md).
        mode = "pallas" if jax.default_backend() in ("gpu", "tpu") else "sequential"
    if L == 1:  # decoding: one update, whatever the mode
        y_BLE, h_BEN = _scan_block(h_BEN, u32_BLE, delta_BLE, A_EN, B_BLN, C_BLN, keep_BL)
    elif mode == "pallas":
        from pallas_kernels.selective_scan import selective_scan as kernel
        chunk = max(8, min(1 << (chunk_size.bit_length() - 1), 1 << (L - 1).bit_length()))
        return kernel(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL, chunk_size=chunk)
    elif mode == "sequential":
        y_BLE, h_BEN = _scan_sequential(h_BEN, u32_BLE, delta_BLE, A_EN, B_BLN, C_BLN, keep_BL)
    elif mode == "associative":
        y_BLE, h_BEN = _scan_block(h_BEN, u32_BLE, delta_BLE, A_EN, B_BLN, C_BLN, keep_BL)
    else:
        keep = jnp.ones((Bsz, L), jnp.float32) if keep_BL is None else keep_BL
        y_BLE, h_BEN = _scan_chunked(h_BEN, u32_BLE, delta_BLE, A_EN, B_BLN, C_BLN, keep, chunk_size)
    if D_E is not None:
        y_BLE = y_BLE + u32_BLE * f32(D_E)[None, None, :]
    return y_BLE.astype(u_BLE.dtype), h_BEN


# ---------------------------------------------------------------------------------------------
# Parameters.


def _dt_bias_init(cfg: MambaConfig) -> P.Initializer:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], floored at dt_init_floor."""

    def init(key, shape, dtype):
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo)
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus(this) == dt

    return init


def _uniform(bound: float) -> P.Initializer:
    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def _a_log_init(key, shape, dtype):
    """S4D-real: A = -(1, 2, ..., N) for every channel."""
    del key
    E, N = shape
    return jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32))[None, :], (E, N)).astype(dtype)


def param_specs(cfg: MambaConfig) -> dict:
    D, E, N, R, W = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    specs = {
        # in_proj as [D, 2, E] ("x", "z"), so sharding E splits both halves alike.
        "win_D2E": ParamSpec((D, 2, E), ("embed", None, INNER_AXIS), fan_in_normal((0,))),
        "conv": short_conv.param_specs(E, W, INNER_AXIS, use_bias=cfg.conv_bias),
        "wx_EP": ParamSpec((E, R + 2 * N), (INNER_AXIS, None), fan_in_normal((0,))),
        "wdt_RE": ParamSpec((R, E), ("dt_rank", INNER_AXIS), _uniform(R ** -0.5)),
        "bdt_E": ParamSpec((E,), (INNER_AXIS,), _dt_bias_init(cfg), keep_dtype=True),
        "A_log_EN": ParamSpec((E, N), (INNER_AXIS, "ssm_state"), _a_log_init, keep_dtype=True),
        "D_E": ParamSpec((E,), (INNER_AXIS,), P.ones, keep_dtype=True),
        "wout_ED": ParamSpec((E, D), (INNER_AXIS, "embed"), fan_in_normal((0,))),
    }
    if cfg.proj_bias:
        specs["bin_2E"] = ParamSpec((2, E), (None, INNER_AXIS), zeros)
        specs["bout_D"] = ParamSpec((D,), ("embed",), zeros)
    if cfg.inner_norm_eps is not None:
        specs["dt_norm_R"] = ParamSpec((R,), ("dt_rank",), P.ones)
        specs["B_norm_N"] = ParamSpec((N,), ("ssm_state",), P.ones)
        specs["C_norm_N"] = ParamSpec((N,), ("ssm_state",), P.ones)
    return specs


def init(key: jax.Array, cfg: MambaConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: MambaConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """{"conv": [B, d_conv-1, E] in `dtype`, "ssm": [B, E, N] fp32}; independent of max_len."""
    checks.positive("init_state", "batch_size", batch_size)
    checks.positive("init_state", "max_len", max_len)
    return {"conv": short_conv.init_state(batch_size, cfg.d_inner, cfg.d_conv, dtype),
            "ssm": jnp.zeros((batch_size, cfg.d_inner, cfg.d_state), jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The mixer.


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: MambaConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Mix x (continuing from `state` when given). positions are unused (order is the recurrence);
    segment_ids reset the conv window and h where a new document starts."""
    del positions
    B, L, _ = x_BLD.shape
    dtype = x_BLD.dtype
    N, R = cfg.d_state, cfg.dt_rank

    xz_BL2E = jnp.einsum("bld,dse->blse", x_BLD, params["win_D2E"].astype(dtype),
                         preferred_element_type=jnp.float32)
    if "bin_2E" in params:
        xz_BL2E = xz_BL2E + params["bin_2E"].astype(jnp.float32)[None, None]
    xz_BL2E = xz_BL2E.astype(dtype)
    x_BLE, z_BLE = xz_BL2E[:, :, 0], xz_BL2E[:, :, 1]

    conv_state = None if state is None else state["conv"]
    x_BLE, new_conv = short_conv.forward(params["conv"], x_BLE, state=conv_state, segment_ids=segment_ids)
    x_BLE = jax.nn.silu(x_BLE.astype(jnp.float32)).astype(dtype)

    p_BLP = jnp.einsum("ble,ep->blp", x_BLE, params["wx_EP"].astype(dtype),
                       preferred_element_type=jnp.float32).astype(dtype)
    dt_BLR, B_BLN, C_BLN = p_BLP[..., :R], p_BLP[..., R:R + N], p_BLP[..., R + N:]
    if cfg.inner_norm_eps is not None:  # Jamba: keeps dt, B and C at unit RMS
        dt_BLR = norms.rms_norm(dt_BLR, params["dt_norm_R"], cfg.inner_norm_eps)
        B_BLN = norms.rms_norm(B_BLN, params["B_norm_N"], cfg.inner_norm_eps)
        C_BLN = norms.rms_norm(C_BLN, params["C_norm_N"], cfg.inner_norm_eps)
    dt_BLE = jnp.einsum("blr,re->ble", dt_BLR, params["wdt_RE"].astype(dtype),
                        preferred_element_type=jnp.float32)
    delta_BLE = jax.nn.softplus(dt_BLE + params["bdt_E"].astype(jnp.float32)[None, None, :])
    A_EN = -jnp.exp(params["A_log_EN"].astype(jnp.float32))

    h0_BEN = None if state is None else state["ssm"]
    reset_BL = None if segment_ids is None else segments.starts(segment_ids, L, B)
    y_BLE, h_BEN = selective_scan(x_BLE, delta_BLE, A_EN, B_BLN, C_BLN, params["D_E"], h0_BEN, reset_BL,
                                  mode=cfg.scan, chunk_size=cfg.chunk_size)
    y_BLE = (y_BLE.astype(jnp.float32) * jax.nn.silu(z_BLE.astype(jnp.float32))).astype(dtype)

    out_BLD = jnp.einsum("ble,ed->bld", y_BLE, params["wout_ED"].astype(dtype),
                         preferred_element_type=jnp.float32)
    if "bout_D" in params:
        out_BLD = out_BLD + params["bout_D"].astype(jnp.float32)[None, None, :]
    new_state = None if state is None else {"conv": new_conv, "ssm": h_BEN}
    return out_BLD.astype(dtype), new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: MambaConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token: shift the conv window, one state update (no scan)."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=cfg, state=state)
    return y_B1D[:, 0], state

