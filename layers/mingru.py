"""minGRU and minLSTM sequence mixers ("Were RNNs All We Needed?", Feng et al. 2024).

Both cells drop the hidden-state dependence of the GRU/LSTM gates, so the recurrence is a
first-order linear one with positive input, per hidden channel e:

    h_t = a_t * h_{t-1} + b_t,      a_t in (0, 1),  b_t > 0

    minGRU:  z = sigmoid(k_z),  a = 1 - z,  b = z * g(k_h)
    minLSTM: f = sigmoid(k_f),  i = sigmoid(k_i),  a = f / (f + i),  b = i / (f + i) * g(k_h)

with k_* = x W_* (+ bias) and g(x) = x + 0.5 for x >= 0, sigmoid(x) otherwise (keeps the
candidate positive so its log exists). All gate logs are computed with softplus, never as the
log of a rounded probability:

    log(1 - sigmoid(k)) = -softplus(k),       log sigmoid(k) = -softplus(-k)
    minLSTM: d = log(i / f) = softplus(-k_f) - softplus(-k_i);
             log f' = -softplus(d),  log i' = -softplus(-d)

Forms (`form`):
  "log_scan":   the paper's parallel scan in log space, h_t = exp(A_t + log sum_{s<=t} exp(log b_s - A_s))
                with A = cumsum(log a). The paper folds h_0 in as an extra first value through
                log h_0, which only exists for h_0 > 0; here h_0 is any real number: its
                contribution exp(A_t) * h_0 is added outside the log (sign exact), and only the
                positive values b go through the log-space sum. With `chunk_size` set, the scan
                runs per chunk and a `lax.scan` carries h across chunks, which bounds |A| (with
                saturated gates A falls by ~30 per token, and fp32 loses the cancellation
                A_t + logsumexp(...) at |A| ~ 1e5) and the activation memory of the backward pass.
                Its gradient is not autodiff of the log-space formula (which cancels two large
                terms and loses ~1e-2 of a gate-bias gradient at L = 1000 in fp32) but the
                adjoint recurrence lambda_t = g_t + a_{t+1} lambda_{t+1}, run as a linear-space
                associative scan (stable: products of decays in (0, 1) only shrink).
  "sequential": `lax.scan` over tokens in linear space, the obvious recurrence.
`step` is one token of the sequential form.

Layer (the paper's language-model block, minus the norms and MLP that the model's block adds):
  u = causal depthwise conv(x) over D channels (width `conv_width`; skipped when None)
  k_* = u W_*   [D -> E = expand * D]
  h = cell(k_*)                        fp32 state, segment starts reset it to 0 (layers.segments)
  y = h W_o     [E -> D]

Shape letters: B batch, L length, D model width, E hidden width, W conv width, C chunk length,
N number of chunks.

Decoding state: {"h_BE": fp32 [B, E], "conv_BWD": fp32 [B, W-1, D] (only with a conv)};
its size does not depend on max_len.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import checks, segments, short_conv
from layers import params as P
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

FORMS = ("log_scan", "sequential")
HIDDEN_AXIS = "mlp"  # logical axis of E: sharded like an MLP's hidden width under TP


@dataclasses.dataclass(frozen=True, kw_only=True)
class _MinRNNConfig:
    """Attributes:
    d_model: model width D.
    expand: hidden width E = expand * d_model (must be a whole number); the paper's language
      models expand the recurrent width and project back down.
    conv_width: W of the causal depthwise convolution applied to the input before the cell
      (as in the paper's language-model block); None disables it.
    use_bias: biases on the gate and candidate projections (the paper's Linear layers have them).
    out_bias: bias on the output projection E -> D.
    form: "log_scan" (parallel, log space) or "sequential" (lax.scan); see the module docstring.
    chunk_size: log_scan only: run the log-space scan per chunk of this many tokens and carry the
      state across chunks (None: one scan over the whole sequence, as in the paper).
    """

    d_model: int
    expand: float = 1.5
    conv_width: int | None = 4
    use_bias: bool = True
    out_bias: bool = False
    form: str = "log_scan"
    chunk_size: int | None = 256

    def __post_init__(self):
        name = type(self).__name__
        checks.positive(name, "d_model", self.d_model)
        if isinstance(self.expand, bool) or not isinstance(self.expand, (int, float)) or not self.expand > 0:
            checks.fail(name, "expand", "a positive number", self.expand)
        hidden = self.expand * self.d_model
        if hidden != int(hidden) or int(hidden) < 1:
            checks.fail(name, "expand", f"a factor making expand * d_model (d_model={self.d_model}) "
                        "a positive whole number", self.expand)
        if self.conv_width is not None:
            checks.positive(name, "conv_width", self.conv_width)
            if self.conv_width < 2:
                checks.fail(name, "conv_width", "an integer >= 2, or None for no convolution",
                            self.conv_width)
        checks.one_of(name, "form", self.form, FORMS)
        if self.chunk_size is not None:
            checks.positive(name, "chunk_size", self.chunk_size)

    @property
    def d_hidden(self) -> int:
        return int(self.expand * self.d_model)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinGRUConfig(_MinRNNConfig):
    __doc__ = "minGRU mixer. " + (_MinRNNConfig.__doc__ or "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinLSTMConfig(_MinRNNConfig):
    __doc__ = "minLSTM mixer. " + (_MinRNNConfig.__doc__ or "")


def _gate_names(cfg: _MinRNNConfig) -> tuple[str, ...]:
    """Projections D -> E: the gates of the cell, then the candidate h~ ("h")."""
    if isinstance(cfg, MinGRUConfig):
        return ("z", "h")
    if isinstance(cfg, MinLSTMConfig):
        return ("f", "i", "h")
    raise TypeError(f"expected MinGRUConfig or MinLSTMConfig, got {type(cfg).__name__}")


# ---------------------------------------------------------------------------------------------
# Parameters and state


def param_specs(cfg: _MinRNNConfig) -> dict:
    D, E = cfg.d_model, cfg.d_hidden
    specs: dict[str, Any] = {}
    for g in _gate_names(cfg):
        specs[f"w{g}_DE"] = ParamSpec((D, E), ("embed", HIDDEN_AXIS), fan_in_normal((0,)))
        if cfg.use_bias:
            specs[f"b{g}_E"] = ParamSpec((E,), (HIDDEN_AXIS,), zeros)
    specs["wo_ED"] = ParamSpec((E, D), (HIDDEN_AXIS, "embed"), fan_in_normal((0,)))
    if cfg.out_bias:
        specs["bo_D"] = ParamSpec((D,), ("embed",), zeros)
    if cfg.conv_width is not None:
        specs["conv"] = short_conv.param_specs(D, cfg.conv_width, "embed")
    return specs


def init(key: jax.Array, cfg: _MinRNNConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: _MinRNNConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zero state. Everything is fp32 whatever `dtype` (the conv window is tiny and keeping it
    fp32 lets forward and step share one state layout); max_len does not matter."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    state = {"h_BE": jnp.zeros((batch_size, cfg.d_hidden), jnp.float32)}
    if cfg.conv_width is not None:
        state["conv_BWD"] = short_conv.init_state(batch_size, cfg.d_model, cfg.conv_width, jnp.float32)
    return state


# ---------------------------------------------------------------------------------------------
# The cell in log space


def log_g(k: jax.Array) -> jax.Array:
    """log of g(k) = k + 0.5 (k >= 0), sigmoid(k) (k < 0); both branches finite for the gradient."""
    return jnp.where(k >= 0, jnp.log(jnp.maximum(k, 0.0) + 0.5), -jax.nn.softplus(-k))


def log_coefficients(cfg: _MinRNNConfig, k: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Pre-activations (fp32) -> (log a, log b) of the recurrence h = a h + b."""
    if isinstance(cfg, MinGRUConfig):
        log_a = -jax.nn.softplus(k["z"])          # log(1 - z)
        log_z = -jax.nn.softplus(-k["z"])         # log z
        return log_a, log_z + log_g(k["h"])
    d = jax.nn.softplus(-k["f"]) - jax.nn.softplus(-k["i"])  # log(i / f)
    log_f = -jax.nn.softplus(d)                  # log(f / (f + i))
    log_i = -jax.nn.softplus(-d)                 # log(i / (f + i))
    return log_f, log_i + log_g(k["h"])


def _segmented(op, x_BLE, reset_BL):
    """Inclusive prefix `op` along L that restarts at every reset position."""
    reset_BLE = jnp.broadcast_to(reset_BL[:, :, None], x_BLE.shape)

    def combine(left, right):
        r_l, x_l = left
        r_r, x_r = right
        return r_l | r_r, jnp.where(r_r, x_r, op(x_l, x_r))

    return jax.lax.associative_scan(combine, (reset_BLE, x_BLE), axis=1)[1]


def _log_space_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL):
    """The paper's log-space evaluation (see `log_scan`)."""
    if reset_BL is None:
        A_BLE = jnp.cumsum(log_a_BLE, axis=1)
        S_BLE = jax.lax.cumlogsumexp(log_b_BLE - A_BLE, axis=1)
        return jnp.exp(A_BLE + S_BLE) + jnp.exp(A_BLE) * h0_BE[:, None, :]
    log_a_BLE = jnp.where(reset_BL[:, :, None], 0.0, log_a_BLE)
    A_BLE = _segmented(jnp.add, log_a_BLE, reset_BL)
    S_BLE = _segmented(jnp.logaddexp, log_b_BLE - A_BLE, reset_BL)
    first_BL1 = (jnp.cumsum(reset_BL.astype(jnp.int32), axis=1) == 0)[:, :, None]
    h0_BLE = jnp.where(first_BL1, jnp.exp(A_BLE) * h0_BE[:, None, :], 0.0)
    return jnp.exp(A_BLE + S_BLE) + h0_BLE


def linear_scan(c_BLE, d_BLE):
    """y_t = c_t y_{t-1} + d_t from y_{-1} = 0, by an associative scan over affine maps. Stable for
    0 <= c <= 1: products of decays only shrink."""
    def combine(left, right):
        c_l, d_l = left
        c_r, d_r = right
        return c_l * c_r, c_r * d_l + d_r

    return jax.lax.associative_scan(combine, (c_BLE, d_BLE), axis=1)[1]


@jax.custom_vjp
def _log_scan(h0_BE, log_a_BLE, log_b_BLE, keep_BL):
    reset_BL = None if keep_BL is None else keep_BL < 0.5
    return _log_space_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL)


def _log_scan_fwd(h0_BE, log_a_BLE, log_b_BLE, keep_BL):
    h_BLE = _log_scan(h0_BE, log_a_BLE, log_b_BLE, keep_BL)
    return h_BLE, (h0_BE, log_a_BLE, log_b_BLE, keep_BL, h_BLE)


def _log_scan_bwd(res, g_BLE):
    """Adjoint of h_t = a_t h_{t-1} + b_t: lambda_t = g_t + a_{t+1} lambda_{t+1} (a reverse linear
    scan), then d log b_t = lambda_t b_t, d log a_t = lambda_t a_t h_{t-1}, d h0 = lambda_0 a_0.
    Differentiating the log-space formula instead subtracts two nearly equal terms per (s, t)
    pair (d/dA through exp(A + S) and through S), which in fp32 loses ~1e-2 of a bias gradient
    at L = 1000."""
    h0_BE, log_a_BLE, log_b_BLE, keep_BL, h_BLE = res
    a_BLE = jnp.exp(log_a_BLE)
    if keep_BL is not None:
        a_BLE = a_BLE * keep_BL[:, :, None]  # a reset cuts the dependence on h_{t-1}
    a_next_BLE = jnp.concatenate([a_BLE[:, 1:], jnp.zeros_like(a_BLE[:, :1])], axis=1)
    lam_BLE = jnp.flip(linear_scan(jnp.flip(a_next_BLE, 1), jnp.flip(g_BLE, 1)), 1)
    h_prev_BLE = jnp.concatenate([h0_BE[:, None, :], h_BLE[:, :-1]], axis=1)
    d_keep = None if keep_BL is None else jnp.zeros_like(keep_BL)
    return (lam_BLE[:, 0] * a_BLE[:, 0], lam_BLE * a_BLE * h_prev_BLE,
            lam_BLE * jnp.exp(log_b_BLE), d_keep)


_log_scan.defvjp(_log_scan_fwd, _log_scan_bwd)


def log_scan(h0_BE: "Float[Array, 'B E']", log_a_BLE: "Float[Array, 'B L E']",
             log_b_BLE: "Float[Array, 'B L E']", reset_BL: "Bool[Array, 'B L'] | None"
             ) -> "Float[Array, 'B L E']":
    """All h_t of h_t = a_t h_{t-1} + b_t (h reset to 0 before each `reset` token), b > 0, any real h0.

    Within a segment, h_t = exp(A_t) h0 [first segment only] + exp(A_t + log sum_s exp(log b_s - A_s)),
    A = cumsum(log a) restarted per segment (log a of a segment's first token is dropped: the
    state it would decay is zero). The gradient is the adjoint recurrence (`_log_scan_bwd`)."""
    keep_BL = None if reset_BL is None else 1.0 - reset_BL.astype(jnp.float32)
    return _log_scan(h0_BE, log_a_BLE, log_b_BLE, keep_BL)


def chunked_log_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL, chunk_size: int):
    """`log_scan` per chunk of `chunk_size` tokens, h carried across chunks by a lax.scan."""
    B, L, E = log_a_BLE.shape
    C = chunk_size
    if L <= C:
        return log_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL)
    N = -(-L // C)
    pad = N * C - L
    # Padding sits after the last real token, so it never reaches an output we keep.
    log_a_BTE = jnp.pad(log_a_BLE, ((0, 0), (0, pad), (0, 0)))
    log_b_BTE = jnp.pad(log_b_BLE, ((0, 0), (0, pad), (0, 0)))
    reset_BT = (jnp.zeros((B, N * C), bool) if reset_BL is None
                else jnp.pad(reset_BL, ((0, 0), (0, pad))))

    def chunks(v):  # [B, N*C, ...] -> [N, B, C, ...]
        return jnp.moveaxis(v.reshape((B, N, C) + v.shape[2:]), 1, 0)

    @jax.checkpoint  # keep only chunk-boundary states for the backward pass
    def body(h_BE, xs):
        la_BCE, lb_BCE, r_BC = xs
        h_BCE = log_scan(h_BE, la_BCE, lb_BCE, None if reset_BL is None else r_BC)
        return h_BCE[:, -1], h_BCE

    _, h_NBCE = jax.lax.scan(body, h0_BE, (chunks(log_a_BTE), chunks(log_b_BTE), chunks(reset_BT)))
    return jnp.moveaxis(h_NBCE, 0, 1).reshape(B, N * C, E)[:, :L]


def sequential_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL):
    """The same recurrence token by token in linear space."""
    keep_BL = (jnp.ones(log_a_BLE.shape[:2], jnp.float32) if reset_BL is None
               else 1.0 - reset_BL.astype(jnp.float32))

    def body(h_BE, xs):
        la_BE, lb_BE, keep_B = xs
        h_BE = jnp.exp(la_BE) * (keep_B[:, None] * h_BE) + jnp.exp(lb_BE)
        return h_BE, h_BE

    xs = (jnp.moveaxis(log_a_BLE, 1, 0), jnp.moveaxis(log_b_BLE, 1, 0), jnp.moveaxis(keep_BL, 1, 0))
    _, h_LBE = jax.lax.scan(body, h0_BE, xs)
    return jnp.moveaxis(h_LBE, 0, 1)


# ---------------------------------------------------------------------------------------------
# The mixer


def _project_in(params: dict, u_BLD, cfg: _MinRNNConfig) -> dict[str, jax.Array]:
    """Gate and candidate pre-activations in fp32 (matmul in the activation dtype, fp32 accumulate)."""
    k = {}
    for g in _gate_names(cfg):
        k_BLE = jnp.einsum("BLD,DE->BLE", u_BLD, params[f"w{g}_DE"].astype(u_BLD.dtype),
                           preferred_element_type=jnp.float32)
        if f"b{g}_E" in params:
            k_BLE = k_BLE + params[f"b{g}_E"].astype(jnp.float32)[None, None, :]
        k[g] = k_BLE
    return k


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: _MinRNNConfig,
            state: dict | None = None, positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Whole sequence. `positions` is unused (a recurrence knows its order); segment starts reset
    the state (and the conv window) to zero. Output in x's dtype; the state stays fp32."""
    del positions
    checks.array("x_BLD", x_BLD, rank=3, kind="f", shape=(None, None, cfg.d_model))
    B, L, _ = x_BLD.shape
    if segment_ids is not None:
        checks.array("segment_ids", segment_ids, rank=2, kind="i", shape=(B, L))
    new_state: dict | None = None if state is None else {}

    u_BLD = x_BLD
    if cfg.conv_width is not None:
        conv_state = None if state is None else state["conv_BWD"]
        u_BLD, conv_BWD = short_conv.forward(params["conv"], x_BLD, state=conv_state,
                                             segment_ids=segment_ids)
        if new_state is not None:
            new_state["conv_BWD"] = conv_BWD.astype(jnp.float32)

    log_a_BLE, log_b_BLE = log_coefficients(cfg, _project_in(params, u_BLD, cfg))
    h0_BE = (jnp.zeros((B, cfg.d_hidden), jnp.float32) if state is None
             else state["h_BE"].astype(jnp.float32))
    reset_BL = None if segment_ids is None else segments.starts(segment_ids, L, B)
    # -- context parallelism (logic in sharding/context_recurrent.py): None unless the rules split seq --
    from sharding import context_recurrent
    split = context_recurrent.dispatch_mingru(h0_BE, log_a_BLE, log_b_BLE, reset_BL, form=cfg.form,
                                              chunk_size=cfg.chunk_size)
    # -- end context parallelism --
    if split is not None:
        h_BLE = split
    elif cfg.form == "sequential":
        h_BLE = sequential_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL)
    elif cfg.chunk_size is None:
        h_BLE = log_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL)
    else:
        h_BLE = chunked_log_scan(h0_BE, log_a_BLE, log_b_BLE, reset_BL, cfg.chunk_size)
    if new_state is not None:
        new_state["h_BE"] = h_BLE[:, -1]

    y_BLD = jnp.einsum("BLE,ED->BLD", h_BLE.astype(x_BLD.dtype), params["wo_ED"].astype(x_BLD.dtype),
                       preferred_element_type=jnp.float32)
    if "bo_D" in params:
        y_BLD = y_BLD + params["bo_D"].astype(jnp.float32)[None, None, :]
    return y_BLD.astype(x_BLD.dtype), new_state


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: _MinRNNConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token: h = a h + b in linear space, O(1) memory."""
    x_B1D = x_BD[:, None, :]
    u_B1D = x_B1D
    new_state = {}
    if cfg.conv_width is not None:
        u_B1D, conv_BWD = short_conv.forward(params["conv"], x_B1D, state=state["conv_BWD"])
        new_state["conv_BWD"] = conv_BWD.astype(jnp.float32)
    log_a_B1E, log_b_B1E = log_coefficients(cfg, _project_in(params, u_B1D, cfg))
    h_BE = jnp.exp(log_a_B1E[:, 0]) * state["h_BE"].astype(jnp.float32) + jnp.exp(log_b_B1E[:, 0])
    new_state["h_BE"] = h_BE
    y_BD = jnp.einsum("BE,ED->BD", h_BE.astype(x_BD.dtype), params["wo_ED"].astype(x_BD.dtype),
                      preferred_element_type=jnp.float32)
    if "bo_D" in params:
        y_BD = y_BD + params["bo_D"].astype(jnp.float32)[None, :]
    return y_BD.astype(x_BD.dtype), new_state
