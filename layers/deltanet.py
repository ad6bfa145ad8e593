"""DeltaNet and Gated DeltaNet sequence mixers (Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"; Yang et al. 2025, "Gated Delta
Networks"; the layer as in flash-linear-attention and Qwen3-Next).

Per head, with the state S [K, V] (keys index rows, values columns):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

k and q are L2-normalised, beta_t = sigmoid(x W_beta) in (0, 1), and alpha_t = exp(g_t) with
g_t = -exp(A_log) * softplus(x W_a + dt_bias) <= 0 for Gated DeltaNet (alpha = 1 for DeltaNet).
Equivalently (the form both forms of `delta_rule` compute): delta_t = beta_t (v_t - alpha_t
S_{t-1}^T k_t) and S_t = alpha_t S_{t-1} + k_t delta_t^T.

The layer:

    q, k, v = silu(short_conv(x W_q)), silu(short_conv(x W_k)), silu(short_conv(x W_v))
    q, k    = l2norm(q), l2norm(k)                     per head, over K
    o       = delta_rule(q, k, v, beta, g)             scale K^-0.5 as in fla
    o       = rmsnorm(o) [* silu(x W_gate) if gated]   per head, over V
    y       = o W_o

Shape letters: B batch, L length, D model width, H heads, K key/query head dim, V value head
dim, N number of chunks, C chunk length (C and J both index positions inside a chunk).

Mixer protocol (DESIGN.md): param_specs, init, forward, init_state, step. Decoding state:
{"h_BHKV": S (fp32), "conv_q"/"conv_k"/"conv_v": last conv_width-1 inputs of each short conv
(fp32)} -- its size does not depend on the sequence length. Packed sequences (segment_ids):
where a document starts the conv windows and S reset to zero (layers.segments convention).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from layers import checks, norms, segments, short_conv
from layers import params as P
from layers.params import ParamSpec, fan_in_normal

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

FORMS = ("chunked", "recurrent")
# fp32 matmuls at full precision: the triangular solve and the state recursion lose accuracy
# with the reduced-precision passes some accelerators use for fp32 by default.
_HI = jax.lax.Precision.HIGHEST
# Log-decay that stands for "state resets here": exp() of it is exactly 0, and unlike -inf it
# cannot produce inf - inf or NaN gradients; sums of up to a chunk of them stay finite in fp32.
_RESET_LOG = -1e30


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaNetConfig:
    """Attributes:
    d_model: model width D.
    n_heads: H heads.
    head_dim: K, query/key head dim; defaults to d_model // n_heads.
    v_head_dim: V, value head dim; defaults to head_dim (fla's Gated DeltaNet uses 2 * head_dim).
    gated: Gated DeltaNet: a per-head scalar decay alpha = exp(g) on the state before each delta
      update, and the output norm gated by silu(x W_gate). False gives plain DeltaNet.
    use_short_conv: causal depthwise convolutions on q, k, v (strongly recommended by the papers).
    conv_width: width of those convolutions.
    chunk_size: chunk length of the "chunked" form.
    form: "chunked" (WY/UT transform inside chunks, lax.scan across chunks) or "recurrent"
      (lax.scan over tokens); they compute the same function.
    norm_eps: epsilon of the per-head output RMSNorm.
    dt_min, dt_max: Gated DeltaNet's softplus step is initialised log-uniform in [dt_min, dt_max]
      (dt_bias is its inverse softplus), as in Mamba-2 / fla.
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    v_head_dim: int | None = None
    gated: bool = False
    use_short_conv: bool = True
    conv_width: int = 4
    chunk_size: int = 64
    form: str = "chunked"
    norm_eps: float = 1e-5
    dt_min: float = 0.001
    dt_max: float = 0.1

    def __post_init__(self):
        name = "DeltaNetConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        if self.head_dim is None:
            checks.divides(name, "n_heads", self.n_heads, "d_model", self.d_model)
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        checks.positive(name, "head_dim", self.head_dim)
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        checks.positive(name, "v_head_dim", self.v_head_dim)
        for f in ("gated", "use_short_conv"):
            if not isinstance(getattr(self, f), bool):
                checks.fail(name, f, "a bool", getattr(self, f))
        checks.positive(name, "conv_width", self.conv_width)
        checks.positive(name, "chunk_size", self.chunk_size)
        checks.one_of(name, "form", self.form, FORMS)
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)
        if not 0 < self.dt_min <= self.dt_max:
            raise checks.ConfigError(
                f"{name}: expected 0 < dt_min <= dt_max, got dt_min={self.dt_min!r}, dt_max={self.dt_max!r}")

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


# ---------------------------------------------------------------------------------------------
# The delta rule (pure function; a kernel may replace it).


def _recurrent_step(h_BHKV, q_BHK, k_BHK, v_BHV, beta_BH, logdecay_BH, scale):
    """One token: decay, delta update, read out. All fp32."""
    h_BHKV = h_BHKV * jnp.exp(logdecay_BH)[:, :, None, None]
    pred_BHV = jnp.einsum("BHK,BHKV->BHV", k_BHK, h_BHKV, precision=_HI)
    delta_BHV = beta_BH[:, :, None] * (v_BHV - pred_BHV)
    h_BHKV = h_BHKV + jnp.einsum("BHK,BHV->BHKV", k_BHK, delta_BHV, precision=_HI)
    o_BHV = scale * jnp.einsum("BHK,BHKV->BHV", q_BHK, h_BHKV, precision=_HI)
    return h_BHKV, o_BHV


def _recurrent(q_BLHK, k_BLHK, v_BLHV, beta_BLH, logdecay_BLH, h_BHKV, scale):
    def body(h, xs):
        h, o = _recurrent_step(h, *xs, scale)
        return h, o

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q_BLHK, k_BLHK, v_BLHV, beta_BLH, logdecay_BLH))
    h_BHKV, o_LBHV = jax.lax.scan(body, h_BHKV, xs)
    return jnp.moveaxis(o_LBHV, 0, 1), h_BHKV


def _segsum(logdecay_BHNC):
    """seg[..., i, j] = sum_{j < t <= i} log alpha_t for i >= j, -inf above the diagonal.

    Summed directly over a masked copy (never as a difference of cumulative sums), so strong
    decays do not cancel catastrophically; the mask is applied before any exp.
    """
    C = logdecay_BHNC.shape[-1]
    i_CJ = np.arange(C)[:, None]
    j_CJ = np.arange(C)[None, :]
    below_111CJ = norms.trailing(jnp.asarray(i_CJ > j_CJ), 5)
    on_or_below_111CJ = norms.trailing(jnp.asarray(i_CJ >= j_CJ), 5)
    x_BHNCJ = jnp.broadcast_to(logdecay_BHNC[..., :, None], (*logdecay_BHNC.shape, C))
    seg_BHNCJ = jnp.cumsum(jnp.where(below_111CJ, x_BHNCJ, 0.0), axis=-2)
    return jnp.where(on_or_below_111CJ, seg_BHNCJ, -jnp.inf)


@jax.custom_vjp
def _unit_lower_inverse(m_CJ: "Float[Array, '*batch C C']") -> "Float[Array, '*batch C C']":
    """(I + M)^{-1} for strictly lower-triangular M, as (I - M)(I + M^2)(I + M^4)...

    M is nilpotent (M^C = 0), so the product of ceil(log2 C) factors is the exact inverse: batched
    [C, C] matmuls only. XLA's CPU triangular_solve handles the many small systems here one at a
    time and its gradient needs two more solves: at C = 64 the delta rule's forward + backward
    took ~2.6x longer with it than with this on CPU (docs/recurrent_performance.md).

    The gradient is the inverse's own, dM = -T^T dT T^T on the strict lower triangle (the
    function's domain): two matmuls, where autodiff through the 2 log2(C) products saved and
    revisited every factor (the delta rule's fwd + bwd at C 64: 17 -> 11 ms on CPU).
    """
    return _doubling_inverse(m_CJ)


def _unit_lower_inverse_fwd(m_CJ):
    t_CJ = _doubling_inverse(m_CJ)
    return t_CJ, t_CJ


def _unit_lower_inverse_bwd(t_CJ, dt_CJ):
    tt_JC = jnp.swapaxes(t_CJ, -1, -2)
    dm_CJ = -jnp.matmul(jnp.matmul(tt_JC, dt_CJ, precision=_HI), tt_JC, precision=_HI)
    return (jnp.tril(dm_CJ, -1),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _doubling_inverse(m_CJ):
    C = m_CJ.shape[-1]
    eye_CJ = jnp.broadcast_to(jnp.eye(C, dtype=m_CJ.dtype), m_CJ.shape)
    inv_CJ, power_CJ = eye_CJ - m_CJ, m_CJ
    span = 2  # inv_CJ is exact up to powers of M below `span`
    while span < C:
        power_CJ = jnp.matmul(power_CJ, power_CJ, precision=_HI)
        inv_CJ = inv_CJ + jnp.matmul(inv_CJ, power_CJ, precision=_HI)  # inv (I + M^span)
        span *= 2
    return inv_CJ


def _chunked(q_BLHK, k_BLHK, v_BLHV, beta_BLH, logdecay_BLH, h_BHKV, scale, C):
    """WY/UT form. Inside a chunk, with b_i = sum_{t<=i} log alpha_t and S0 the chunk's
    incoming state, the deltas Delta satisfy (I + M) Delta = diag(beta) (V - diag(e^b) K S0),
    M_ij = beta_i e^{b_i - b_j} k_i.k_j (i > j). So with T = (I + M)^{-1} diag(beta) (one
    unit-lower-triangular solve), U = T V, W = T diag(e^b) K:
        Delta = U - W S0
        O     = scale (diag(e^b) Q S0 + (Q K^T * e^{b_i - b_j}, i >= j) Delta)
        S1    = e^{b_C} S0 + (diag(e^{b_C - b_j}) K)^T Delta
    Everything but the last three lines runs for all chunks at once; lax.scan carries S."""
    B, L, H, K = q_BLHK.shape
    V = v_BLHV.shape[-1]
    N = -(-L // C)
    pad = N * C - L

    def chunks(a):  # [B, L, H, ...] -> [B, H, N, C, ...]; zero padding leaves S unchanged
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(B, N, C, *a.shape[2:])
        return jnp.moveaxis(a, 3, 1)

    q_BHNCK, k_BHNCK, v_BHNCV = chunks(q_BLHK), chunks(k_BLHK), chunks(v_BLHV)
    beta_BHNC, logdecay_BHNC = chunks(beta_BLH), chunks(logdecay_BLH)

    seg_BHNCJ = _segsum(logdecay_BHNC)
    decay_BHNCJ = jnp.exp(seg_BHNCJ)  # e^{b_i - b_j} for i >= j, 0 above the diagonal
    b_BHNC = jnp.cumsum(logdecay_BHNC, axis=-1)
    to_end_BHNC = seg_BHNCJ[..., -1, :]  # b_C - b_j, summed directly

    strict_111CJ = norms.trailing(jnp.asarray(np.tril(np.ones((C, C), bool), -1)), 5)
    kk_BHNCJ = jnp.einsum("BHNCK,BHNJK->BHNCJ", k_BHNCK, k_BHNCK, precision=_HI)
    m_BHNCJ = jnp.where(strict_111CJ, beta_BHNC[..., :, None] * kk_BHNCJ * decay_BHNCJ, 0.0)
    t_BHNCJ = _unit_lower_inverse(m_BHNCJ) * beta_BHNC[..., None, :]
    w_BHNCK = jnp.einsum("BHNCJ,BHNJK->BHNCK", t_BHNCJ,
                         jnp.exp(b_BHNC)[..., None] * k_BHNCK, precision=_HI)
    u_BHNCV = jnp.einsum("BHNCJ,BHNJV->BHNCV", t_BHNCJ, v_BHNCV, precision=_HI)
    qk_BHNCJ = scale * decay_BHNCJ * jnp.einsum("BHNCK,BHNJK->BHNCJ", q_BHNCK, k_BHNCK,
                                                precision=_HI)
    qd_BHNCK = scale * jnp.exp(b_BHNC)[..., None] * q_BHNCK
    kd_BHNCK = jnp.exp(to_end_BHNC)[..., None] * k_BHNCK
    chunk_decay_BHN = jnp.exp(b_BHNC[..., -1])

    def body(h_BHKV, xs):
        w_BHCK, u_BHCV, qk_BHCJ, qd_BHCK, kd_BHCK, decay_BH = xs
        delta_BHCV = u_BHCV - jnp.einsum("BHCK,BHKV->BHCV", w_BHCK, h_BHKV, precision=_HI)
        o_BHCV = (jnp.einsum("BHCK,BHKV->BHCV", qd_BHCK, h_BHKV, precision=_HI)
                  + jnp.einsum("BHCJ,BHJV->BHCV", qk_BHCJ, delta_BHCV, precision=_HI))
        h_BHKV = (decay_BH[:, :, None, None] * h_BHKV
                  + jnp.einsum("BHCK,BHCV->BHKV", kd_BHCK, delta_BHCV, precision=_HI))
        return h_BHKV, o_BHCV

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in
               (w_BHNCK, u_BHNCV, qk_BHNCJ, qd_BHNCK, kd_BHNCK, chunk_decay_BHN))
    h_BHKV, o_NBHCV = jax.lax.scan(body, h_BHKV, xs)
    o_BNCHV = jnp.moveaxis(o_NBHCV, (0, 3), (1, 2))
    o_BLHV = o_BNCHV.reshape(B, N * C, H, V)[:, :L]
    return o_BLHV, h_BHKV


def delta_rule(q_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']",
               v_BLHV: "Float[Array, 'B L H V']", beta_BLH: "Float[Array, 'B L H']",
               g_BLH: "Float[Array, 'B L H'] | None" = None,
               h0_BHKV: "Float[Array, 'B H K V'] | None" = None,
               reset_BL: "Bool[Array, 'B L'] | None" = None, *, form: str = "chunked",
               chunk_size: int = 64, scale: float = 1.0
               ) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H K V']"]:
    """The (gated) delta rule over a sequence, from state h0 (zeros if None).

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale S_t^T q_t.

    g: log-decay per head and token (<= 0; None: no decay, plain DeltaNet). reset: True where
    the state carried in is zeroed (a new packed document). Keys should be L2-normalised (the
    recurrence is then a contraction for beta in (0, 1)). Math in fp32 whatever the input
    dtype; o comes back in v's dtype, the final state in fp32.
    """
    checks.array("q_BLHK", q_BLHK, rank=4, kind="f")
    B, L, H, K = q_BLHK.shape
    checks.array("k_BLHK", k_BLHK, rank=4, kind="f", shape=(B, L, H, K))
    checks.array("v_BLHV", v_BLHV, rank=4, kind="f", shape=(B, L, H, None))
    V = v_BLHV.shape[-1]
    checks.array("beta_BLH", beta_BLH, rank=3, kind="f", shape=(B, L, H))
    if g_BLH is not None:
        checks.array("g_BLH", g_BLH, rank=3, kind="f", shape=(B, L, H))
    if h0_BHKV is not None:
        checks.array("h0_BHKV", h0_BHKV, rank=4, kind="f", shape=(B, H, K, V))
    if reset_BL is not None:
        checks.array("reset_BL", reset_BL, rank=2, shape=(B, L))
    checks.one_of("delta_rule", "form", form, FORMS)
    checks.positive("delta_rule", "chunk_size", chunk_size)
    # -- context parallelism (logic in sharding/context_delta.py): None unless the rules split seq --
    from sharding import context_delta
    split = context_delta.dispatch_delta(q_BLHK, k_BLHK, v_BLHV, beta_BLH, g_BLH, h0_BHKV, reset_BL, form=form,
                                         chunk_size=chunk_size, scale=scale)
    if split is not None:
        return split
    # -- end context parallelism --

    f32 = jnp.float32
    q, k, v, beta = (a.astype(f32) for a in (q_BLHK, k_BLHK, v_BLHV, beta_BLH))
    logdecay_BLH = jnp.zeros((B, L, H), f32) if g_BLH is None else g_BLH.astype(f32)
    if reset_BL is not None:
        logdecay_BLH = jnp.where(reset_BL[:, :, None], _RESET_LOG, logdecay_BLH)
    h_BHKV = jnp.zeros((B, H, K, V), f32) if h0_BHKV is None else h0_BHKV.astype(f32)
    if form == "recurrent":
        o_BLHV, h_BHKV = _recurrent(q, k, v, beta, logdecay_BLH, h_BHKV, scale)
    else:
        o_BLHV, h_BHKV = _chunked(q, k, v, beta, logdecay_BLH, h_BHKV, scale, min(chunk_size, max(L, 1)))
    return o_BLHV.astype(v_BLHV.dtype), h_BHKV


# ---------------------------------------------------------------------------------------------
# The layer.


def _uniform_log(lo: float, hi: float) -> P.Initializer:
    """A_log = log(A), A ~ U[lo, hi] per head (Mamba-2 / Gated DeltaNet)."""
    def init(key, shape, dtype):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
    return init


def _dt_bias(dt_min: float, dt_max: float) -> P.Initializer:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], so softplus(dt_bias) starts there."""
    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, 1e-4)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def param_specs(cfg: DeltaNetConfig) -> dict:
    D, H, K, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.v_head_dim
    specs: dict = {
        "wq_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wk_DHK": ParamSpec((D, H, K), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wv_DHV": ParamSpec((D, H, V), ("embed", "heads", "head_dim"), fan_in_normal((0,))),
        "wbeta_DH": ParamSpec((D, H), ("embed", "heads"), fan_in_normal((0,))),
        "o_norm": {"scale": ParamSpec((V,), ("head_dim",), P.ones)},
        "wo_HVD": ParamSpec((H, V, D), ("heads", "head_dim", "embed"), fan_in_normal((0, 1))),
    }
    if cfg.use_short_conv:
        # Channels are the flattened (head, dim) pairs, head-major, so sharding them in blocks
        # follows the heads.
        specs["conv_q"] = short_conv.param_specs(H * K, cfg.conv_width, "heads", use_bias=False)
        specs["conv_k"] = short_conv.param_specs(H * K, cfg.conv_width, "heads", use_bias=False)
        specs["conv_v"] = short_conv.param_specs(H * V, cfg.conv_width, "heads", use_bias=False)
    if cfg.gated:
        specs["wa_DH"] = ParamSpec((D, H), ("embed", "heads"), fan_in_normal((0,)))
        # The decay parameters stay fp32 under a bf16 policy (as Mamba's A_log and dt bias).
        specs["A_log_H"] = ParamSpec((H,), ("heads",), _uniform_log(1.0, 16.0), keep_dtype=True)
        specs["dt_bias_H"] = ParamSpec((H,), ("heads",), _dt_bias(cfg.dt_min, cfg.dt_max),
                                       keep_dtype=True)
        specs["wgate_DHV"] = ParamSpec((D, H, V), ("embed", "heads", "head_dim"), fan_in_normal((0,)))
    return specs


def init(key: jax.Array, cfg: DeltaNetConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: DeltaNetConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Recurrent state S [B, H, K, V] and the conv windows; fp32 whatever `dtype`, and of a size
    independent of max_len."""
    del dtype, max_len
    checks.positive("init_state", "batch_size", batch_size)
    H, K, V = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
    state = {"h_BHKV": jnp.zeros((batch_size, H, K, V), jnp.float32)}
    if cfg.use_short_conv:
        for name, c in (("conv_q", H * K), ("conv_k", H * K), ("conv_v", H * V)):
            state[name] = short_conv.init_state(batch_size, c, cfg.conv_width, jnp.float32)
    return state


def _project(x_BLD, w):
    y = jnp.einsum("BLD,D...->BL...", x_BLD, w.astype(x_BLD.dtype), preferred_element_type=jnp.float32)
    return y


def _l2norm(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def _apply(params, x_BLD, cfg: DeltaNetConfig, state, segment_ids, form):
    checks.array("x_BLD", x_BLD, rank=3, kind="f", shape=(None, None, cfg.d_model))
    B, L, _ = x_BLD.shape
    H, K, V = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
    dtype = x_BLD.dtype
    new_state = None if state is None else {}

    def feature(name, w, dim):
        # Kept in fp32 through the conv: q, k, v feed the fp32 recurrence anyway, and each bf16
        # rounding on the way adds error the state then accumulates.
        y_BLHX = _project(x_BLD, w)
        if cfg.use_short_conv:
            conv_state = None if state is None else state[name]
            y_BLC, conv_state = short_conv.forward(params[name], y_BLHX.reshape(B, L, H * dim),
                                                   state=conv_state, segment_ids=segment_ids)
            y_BLHX = y_BLC.reshape(B, L, H, dim)
            if new_state is not None:
                new_state[name] = conv_state
        return jax.nn.silu(y_BLHX.astype(jnp.float32))

    q_BLHK = _l2norm(feature("conv_q", params["wq_DHK"], K))
    k_BLHK = _l2norm(feature("conv_k", params["wk_DHK"], K))
    v_BLHV = feature("conv_v", params["wv_DHV"], V)
    beta_BLH = jax.nn.sigmoid(_project(x_BLD, params["wbeta_DH"]))
    g_BLH = None
    if cfg.gated:
        a_BLH = _project(x_BLD, params["wa_DH"]) + params["dt_bias_H"].astype(jnp.float32)[None, None]
        g_BLH = -jnp.exp(params["A_log_H"].astype(jnp.float32))[None, None] * jax.nn.softplus(a_BLH)
    reset_BL = None if segment_ids is None else segments.starts(segment_ids, L, B)
    h0 = None if state is None else state["h_BHKV"]
    o_BLHV, h_BHKV = delta_rule(q_BLHK, k_BLHK, v_BLHV, beta_BLH, g_BLH, h0, reset_BL, form=form,
                                chunk_size=cfg.chunk_size, scale=cfg.scale)
    if new_state is not None:
        new_state["h_BHKV"] = h_BHKV
    o_BLHV = norms.rms_norm(o_BLHV, params["o_norm"]["scale"], cfg.norm_eps)
    if cfg.gated:
        gate_BLHV = _project(x_BLD, params["wgate_DHV"])
        o_BLHV = o_BLHV * jax.nn.silu(gate_BLHV)
    y_BLD = jnp.einsum("BLHV,HVD->BLD", o_BLHV.astype(dtype), params["wo_HVD"].astype(dtype),
                       preferred_element_type=jnp.float32)
    return y_BLD.astype(dtype), new_state


def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: DeltaNetConfig,
            state: dict | None = None, positions: "Int[Array, 'B L'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """Mix the whole sequence (training, prefill). `positions` is unused (order is implicit);
    `segment_ids` resets the state where a packed document starts."""
    del positions
    return _apply(params, x_BLD, cfg, state, segment_ids, cfg.form)


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: DeltaNetConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token of decoding: O(1) work and memory in the sequence length."""
    y_B1D, state = _apply(params, x_BD[:, None, :], cfg, state, None, "recurrent")
    return y_B1D[:, 0], state
