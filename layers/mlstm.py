"""mLSTM (xLSTM's matrix-memory LSTM) as a sequence mixer.

The cell (Beck et al. 2024, "xLSTM", eqs. 19-27; NX-AI/mlstm_kernels), per head, with
q scaled by K^-0.5, exponential input gate i (pre-activation) and log f = logsigmoid(f_pre):

    m_t = max(log f_t + m_{t-1}, i_t)                      stabiliser
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      [K, V]
    n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t             [K]
    h_t = (q_t C_t) / (max(|q_t . n_t|, exp(-m_t)) + eps)

C and n are stored divided by exp(m). The floor exp(-m_t) is 1 in unstabilised units, so it
cancels, but eps does not: the output depends (slightly) on m. Choice: the empty state is
C = 0, n = 0, m = 0 (as mlstm_kernels' recurrent and chunkwise kernels), and a packed document
starts from that state. Every form here includes the m_0 term in the stabiliser
(m_t = max(F_t + m_0, max_s D_ts)), so the three forms compute the same function; the
reference parallel kernel has no state and so behaves as m_0 = -inf (same values up to eps).

Forms ("form" field), all equal:
  parallel   stabilised quadratic form over the whole sequence, O(L^2) memory;
  chunkwise  lax.scan over chunks carrying (C, n, m), the parallel form inside each chunk;
  recurrent  lax.scan over tokens (decoding uses it).

The layer is the mixer part of xLSTM's mLSTM block (NX-AI/xlstm blocks/mlstm/layer.py):
up-projection to x_mlstm and z (width E = proj_factor * D), causal depthwise conv + silu feeding
q and k (v from the un-convolved branch), gates i, f from a linear map of [q, k, v], per-head
LayerNorm of h, learnable skip from the conv branch, output gated by silu(z), down-projection.
Simplification: q, k, v are dense per-head projections [E, H, K] instead of the reference's
block-diagonal (blocksize 4) maps; the down-projection uses a fan-in init instead of Wang's
depth-dependent one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import checks, norms, params as P, segments, short_conv
from layers.params import ParamSpec, fan_in_normal, linspace, normal, ones, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

FORMS = ("parallel", "chunkwise", "recurrent")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLSTMConfig:
    """Attributes:
    d_model: model width D.
    n_heads: heads H; the head dim K = E // H serves queries, keys and values.
    proj_factor: inner width E = round(proj_factor * d_model) (xLSTM: 2).
    conv_width: causal conv width feeding q and k (xLSTM: 4); 1 is a per-channel scale.
    form: "parallel" | "chunkwise" | "recurrent" (see the module docstring); all agree.
    chunk_size: tokens per chunk of the chunkwise form (any length; padded internally).
    gate_soft_cap: gate pre-activations become cap * tanh(x / cap) (xLSTM-7B: 15); None: off.
    eps: added to the normaliser max(|q.n|, exp(-m)) (mlstm_kernels: 1e-6).
    norm_eps: eps of the per-head LayerNorm of h.
    use_bias: biases on the up-, q/k/v- and down-projections.
    """

    d_model: int
    n_heads: int = 4
    proj_factor: float = 2.0
    conv_width: int = 4
    form: str = "chunkwise"
    chunk_size: int = 64
    gate_soft_cap: float | None = None
    eps: float = 1e-6
    norm_eps: float = 1e-5
    use_bias: bool = False

    def __post_init__(self):
        name = "MLSTMConfig"
        checks.positive(name, "d_model", self.d_model)
        checks.positive(name, "n_heads", self.n_heads)
        if not (isinstance(self.proj_factor, (int, float)) and self.proj_factor > 0):
            checks.fail(name, "proj_factor", "a positive number", self.proj_factor)
        checks.positive(name, "conv_width", self.conv_width)
        checks.one_of(name, "form", self.form, FORMS)
        checks.positive(name, "chunk_size", self.chunk_size)
        if self.gate_soft_cap is not None and not self.gate_soft_cap > 0:
            checks.fail(name, "gate_soft_cap", "a positive float or None", self.gate_soft_cap)
        if not self.eps > 0:
            checks.fail(name, "eps", "a positive float", self.eps)
        if not self.norm_eps > 0:
            checks.fail(name, "norm_eps", "a positive float", self.norm_eps)
        if self.d_inner % self.n_heads:
            checks.fail(name, "n_heads", f"a divisor of the inner width {self.d_inner} "
                        f"(= round(proj_factor * d_model))", self.n_heads)

    @property
    def d_inner(self) -> int:
        return int(round(self.proj_factor * self.d_model))

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_heads


def param_specs(cfg: MLSTMConfig) -> dict:
    D, E, H, K = cfg.d_model, cfg.d_inner, cfg.n_heads, cfg.head_dim
    # xLSTM's "small init" std sqrt(2 / (5 D)) for the projections fed by the residual stream.
    small = normal(math.sqrt(2.0 / (5.0 * D)))
    specs: dict[str, Any] = {
        "wx_DE": ParamSpec((D, E), ("embed", "inner"), small),
        "wz_DE": ParamSpec((D, E), ("embed", "inner"), small),
        "conv": short_conv.param_specs(E, cfg.conv_width, "inner"),
        "wq_EHK": ParamSpec((E, H, K), ("inner", "heads", "head_dim"), small),
        "wk_EHK": ParamSpec((E, H, K), ("inner", "heads", "head_dim"), small),
        "wv_EHK": ParamSpec((E, H, K), ("inner", "heads", "head_dim"), small),
        # Gates read [q, k, v] (3 blocks of E); zero weights and these biases as the reference:
        # forget biases 3..6 across heads keep early memory, input biases near 0.
        "wi_3EH": ParamSpec((3, E, H), (None, "inner", "heads"), zeros),
        "wf_3EH": ParamSpec((3, E, H), (None, "inner", "heads"), zeros),
        "bi_H": ParamSpec((H,), ("heads",), normal(0.1), keep_dtype=True),
        "bf_H": ParamSpec((H,), ("heads",), linspace(3.0, 6.0), keep_dtype=True),
        "norm_HK": ParamSpec((H, K), ("heads", "head_dim"), ones),
        "skip_E": ParamSpec((E,), ("inner",), ones),
        "wo_ED": ParamSpec((E, D), ("inner", "embed"), fan_in_normal((0,))),
    }
    if cfg.use_bias:
        specs["bx_E"] = ParamSpec((E,), ("inner",), zeros)
        specs["bz_E"] = ParamSpec((E,), ("inner",), zeros)
        for n in ("bq_HK", "bk_HK", "bv_HK"):
            specs[n] = ParamSpec((H, K), ("heads", "head_dim"), zeros)
        specs["bo_D"] = ParamSpec((D,), ("embed",), zeros)
    return specs


def init(key: jax.Array, cfg: MLSTMConfig) -> dict:
    return P.init(key, param_specs(cfg))


def init_state(cfg: MLSTMConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Memory C [B, H, K, V], normaliser n [B, H, K], stabiliser m [B, H] (all zero: the empty
    state, see the module docstring) and the conv window [B, W-1, E]; fp32, whatever `dtype`,
    and independent of max_len."""
    del max_len, dtype
    checks.positive("init_state", "batch_size", batch_size)
    B, H, K, E = batch_size, cfg.n_heads, cfg.head_dim, cfg.d_inner
    return {
        "C_BHKV": jnp.zeros((B, H, K, K), jnp.float32),
        "n_BHK": jnp.zeros((B, H, K), jnp.float32),
        "m_BH": jnp.zeros((B, H), jnp.float32),
        "conv_BWE": short_conv.init_state(B, E, cfg.conv_width, jnp.float32),
    }


# ----- the cell -----

def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _block(q_BTHK, k_BTHK, v_BTHV, i_BTH, logf_BTH, starts_BT, C_BHKV, n_BHK, m_BH, eps):
    """Stabilised parallel form over one block of T tokens, continuing from (C, n, m).

    D[t, s] = F_t - F_s + i_s (F = cumulative log forget in the block) for s <= t in the same
    document; the incoming state enters with log weight F_t + m_0, for tokens of the block's
    first document only. A later document starts from the empty state (m = 0), which enters the
    stabiliser with log weight sum_{r=start..t} log f_r and contributes nothing else.
    Returns h [B, T, H, V] and the state after the last token.
    """
    B, T, H, _ = q_BTHK.shape
    F_BTH = jnp.cumsum(logf_BTH, axis=1)
    doc_BT = jnp.cumsum(starts_BT.astype(jnp.int32), axis=1)
    t_T = jnp.arange(T, dtype=jnp.int32)
    # F just before the latest document start at or before t (used only where doc > 0).
    start_idx_BT = jax.lax.cummax(jnp.where(starts_BT, t_T[None, :], 0), axis=1)
    Fprev_BTH = jnp.take_along_axis(F_BTH - logf_BTH, start_idx_BT[:, :, None], axis=1)
    first_BT1 = (doc_BT == 0)[:, :, None]
    base_BTH = jnp.where(first_BT1, F_BTH + m_BH[:, None, :], F_BTH - Fprev_BTH)

    F_BHT = F_BTH.transpose(0, 2, 1)
    i_BHT = i_BTH.transpose(0, 2, 1)
    logD_BHTS = F_BHT[:, :, :, None] - F_BHT[:, :, None, :] + i_BHT[:, :, None, :]
    allowed_BTS = (t_T[None, :, None] >= t_T[None, None, :]) & (doc_BT[:, :, None] == doc_BT[:, None, :])
    # Mask before exp: entries above the diagonal can be large and positive.
    logD_BHTS = jnp.where(allowed_BTS[:, None], logD_BHTS, -jnp.inf)
    # The row max is read at its argmax: reduce_max's derivative compares the operand with the
    # max, and XLA may recompute logD in fusions that round differently (no match: a wrong
    # gradient under jit, NaN unoptimised). A gather has no such comparison.
    rowmax_BHT = jnp.take_along_axis(logD_BHTS, jnp.argmax(logD_BHTS, axis=-1)[..., None], axis=-1)[..., 0]
    m_BHT = jnp.maximum(base_BTH.transpose(0, 2, 1), rowmax_BHT)
    W_BHTS = jnp.exp(logD_BHTS - m_BHT[:, :, :, None])
    g_BHT = jnp.where(first_BT1[:, :, 0][:, None, :],
                      jnp.exp(base_BTH.transpose(0, 2, 1) - m_BHT), 0.0)

    S_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q_BTHK, k_BTHK) * W_BHTS
    num_BTHV = (jnp.einsum("BHTS,BSHV->BTHV", S_BHTS, v_BTHV)
                + jnp.einsum("BTHK,BHKV->BTHV", q_BTHK, C_BHKV) * g_BHT.transpose(0, 2, 1)[..., None])
    den_BHT = jnp.sum(S_BHTS, axis=-1) + jnp.einsum("BTHK,BHK->BHT", q_BTHK, n_BHK) * g_BHT
    den_BHT = jnp.maximum(jnp.abs(den_BHT), jnp.exp(-m_BHT)) + eps
    h_BTHV = num_BTHV / den_BHT.transpose(0, 2, 1)[..., None]

    # The state after the last token is row T-1 of the same weights.
    W_BHS, g_BH = W_BHTS[:, :, -1], g_BHT[:, :, -1]
    C_new = g_BH[:, :, None, None] * C_BHKV + jnp.einsum("BHS,BSHK,BSHV->BHKV", W_BHS, k_BTHK, v_BTHV)
    n_new = g_BH[:, :, None] * n_BHK + jnp.einsum("BHS,BSHK->BHK", W_BHS, k_BTHK)
    return h_BTHV, (C_new, n_new, m_BHT[:, :, -1])


def _recurrent(q_BLHK, k_BLHK, v_BLHV, i_BLH, logf_BLH, starts_BL, C_BHKV, n_BHK, m_BH, eps):
    """One token at a time (lax.scan), the equations of the module docstring."""

    def one(carry, xs):
        C, n, m = carry
        q, k, v, i, logf, start = xs
        keep_B = 1.0 - start.astype(jnp.float32)   # a document start sees the empty state
        C, n, m = C * keep_B[:, None, None, None], n * keep_B[:, None, None], m * keep_B[:, None]
        m_new = jnp.maximum(logf + m, i)
        fa_BH = jnp.exp(logf + m - m_new)
        ia_BH = jnp.exp(i - m_new)
        C = fa_BH[:, :, None, None] * C + ia_BH[:, :, None, None] * jnp.einsum("BHK,BHV->BHKV", k, v)
        n = fa_BH[:, :, None] * n + ia_BH[:, :, None] * k
        num_BHV = jnp.einsum("BHK,BHKV->BHV", q, C)
        den_BH = jnp.maximum(jnp.abs(jnp.einsum("BHK,BHK->BH", q, n)), jnp.exp(-m_new)) + eps
        return (C, n, m_new), num_BHV / den_BH[:, :, None]

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q_BLHK, k_BLHK, v_BLHV, i_BLH, logf_BLH, starts_BL))
    state, h_LBHV = jax.lax.scan(one, (C_BHKV, n_BHK, m_BH), xs)
    return jnp.moveaxis(h_LBHV, 0, 1), state


def _chunkwise(q_BLHK, k_BLHK, v_BLHV, i_BLH, logf_BLH, starts_BL, C_BHKV, n_BHK, m_BH, eps, chunk):
    B, L, H, K = q_BLHK.shape
    N = -(-L // chunk)
    pad = N * chunk - L
    if pad:
        # Padding tokens keep the state: f = 1 (log 0), no input (i = -inf), no document start.
        def padded(a, value):
            widths = [(0, 0)] * a.ndim
            widths[1] = (0, pad)
            return jnp.pad(a, widths, constant_values=value)

        q_BLHK, k_BLHK, v_BLHV = padded(q_BLHK, 0.0), padded(k_BLHK, 0.0), padded(v_BLHV, 0.0)
        i_BLH, logf_BLH = padded(i_BLH, -jnp.inf), padded(logf_BLH, 0.0)
        starts_BL = padded(starts_BL, False)

    def chunks(a):  # [B, N*T, ...] -> [N, B, T, ...]
        return jnp.moveaxis(a.reshape(B, N, chunk, *a.shape[2:]), 1, 0)

    def one(carry, xs):
        h, carry = _block(*xs, *carry, eps)
        return carry, h

    xs = tuple(chunks(a) for a in (q_BLHK, k_BLHK, v_BLHV, i_BLH, logf_BLH, starts_BL))
    state, h_NBTHV = jax.lax.scan(one, (C_BHKV, n_BHK, m_BH), xs)
    h_BLHV = jnp.moveaxis(h_NBTHV, 0, 1).reshape(B, N * chunk, H, -1)[:, :L]
    return h_BLHV, state


@functools.partial(jax.jit, static_argnames=("form", "chunk_size", "eps", "gate_soft_cap"))
def cell(q_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']",
         v_BLHV: "Float[Array, 'B L H V']", i_BLH: "Float[Array, 'B L H']",
         f_BLH: "Float[Array, 'B L H']", state: tuple | None = None, *, form: str = "chunkwise",
         chunk_size: int = 64, eps: float = 1e-6, gate_soft_cap: float | None = None,
         starts_BL: "Array | None" = None) -> tuple["Float[Array, 'B L H V']", tuple]:
    """The mLSTM cell on pre-activations (i, f), in fp32. q is scaled by K^-0.5 here.

    state: (C [B,H,K,V], n [B,H,K], m [B,H]) or None (the empty state). starts_BL: True where a
    packed document begins (the state resets to empty). Returns h and the final (C, n, m).
    """
    # -- context parallelism (logic in sharding/context_recurrent.py): None unless the rules split seq --
    from sharding import context_recurrent
    split = context_recurrent.dispatch_mlstm(q_BLHK, k_BLHK, v_BLHV, i_BLH, f_BLH, state, starts_BL, form=form,
                                             chunk_size=chunk_size, eps=eps, gate_soft_cap=gate_soft_cap)
    if split is not None:
        return split
    # -- end context parallelism --
    B, L, H, K = q_BLHK.shape
    V = v_BLHV.shape[-1]
    f32 = jnp.float32
    q_BLHK = q_BLHK.astype(f32) * (K ** -0.5)
    k_BLHK, v_BLHV = k_BLHK.astype(f32), v_BLHV.astype(f32)
    i_BLH = soft_cap(i_BLH.astype(f32), gate_soft_cap)
    logf_BLH = jax.nn.log_sigmoid(soft_cap(f_BLH.astype(f32), gate_soft_cap))
    if state is None:
        state = (jnp.zeros((B, H, K, V), f32), jnp.zeros((B, H, K), f32), jnp.zeros((B, H), f32))
    state = tuple(s.astype(f32) for s in state)
    if starts_BL is None:
        starts_BL = jnp.zeros((B, L), bool)
    args = (q_BLHK, k_BLHK, v_BLHV, i_BLH, logf_BLH, starts_BL, *state, eps)
    if form == "parallel":
        return _block(*args)
    if form == "chunkwise":
        return _chunkwise(*args, chunk_size)
    if form == "recurrent":
        return _recurrent(*args)
    raise ValueError(f"cell: form must be one of {FORMS}, got {form!r}")


# ----- the layer -----

def _proj(x, w, dtype, b=None):
    """x [B, L, E] times w [E, ...] with both in `dtype` (the activation dtype) and fp32
    accumulation; the result stays fp32 (the cell and the gating run in fp32 anyway)."""
    y = jnp.einsum("BLE,E...->BL...", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)[None, None]
    return y


@functools.partial(jax.jit, static_argnames=("cfg", "form"))
def forward(params: dict, x_BLD: "Float[Array, 'B L D']", *, cfg: MLSTMConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None, segment_ids: "Int[Array, 'B L'] | None" = None,
            form: str | None = None) -> tuple["Float[Array, 'B L D']", dict | None]:
    """The mLSTM mixer over a sequence; continues from `state` when given (else from empty).
    Jitted with cfg static (one compilation per shape when called eagerly; inlined under jit).

    positions are unused (order is the recurrence); segment_ids reset the memory and the conv
    window at each packed document start. `form` overrides cfg.form (step uses "recurrent").
    """
    del positions
    B, L, _ = x_BLD.shape
    dt = x_BLD.dtype
    f32 = jnp.float32
    # Projections take activation-dtype inputs; their fp32 results are not rounded back, which
    # keeps bf16 runs within a few 1e-3 of fp32.
    xm_BLE = _proj(x_BLD, params["wx_DE"], dt, params.get("bx_E"))
    z_BLE = _proj(x_BLD, params["wz_DE"], dt, params.get("bz_E"))
    conv_BLE, conv_state = short_conv.forward(params["conv"], xm_BLE,
                                              state=None if state is None else state["conv_BWE"],
                                              segment_ids=segment_ids)
    c_BLE = jax.nn.silu(conv_BLE)
    q_BLHK = _proj(c_BLE, params["wq_EHK"], dt, params.get("bq_HK"))
    k_BLHK = _proj(c_BLE, params["wk_EHK"], dt, params.get("bk_HK"))
    v_BLHK = _proj(xm_BLE, params["wv_EHK"], dt, params.get("bv_HK"))
    # Gate pre-activations in fp32: they are exponentiated.
    qkv_3BLE = jnp.stack([a.reshape(B, L, -1) for a in (q_BLHK, k_BLHK, v_BLHK)])
    i_BLH = (jnp.einsum("CBLE,CEH->BLH", qkv_3BLE, params["wi_3EH"].astype(f32))
             + params["bi_H"].astype(f32)[None, None])
    f_BLH = (jnp.einsum("CBLE,CEH->BLH", qkv_3BLE, params["wf_3EH"].astype(f32))
             + params["bf_H"].astype(f32)[None, None])

    cell_state = None if state is None else (state["C_BHKV"], state["n_BHK"], state["m_BH"])
    starts_BL = None if segment_ids is None else segments.starts(segment_ids, L, B)
    h_BLHK, (C, n, m) = cell(q_BLHK, k_BLHK, v_BLHK, i_BLH, f_BLH, cell_state, form=form or cfg.form,
                             chunk_size=cfg.chunk_size, eps=cfg.eps, gate_soft_cap=cfg.gate_soft_cap,
                             starts_BL=starts_BL)
    # Per-head LayerNorm (no bias, as the reference's MultiHeadLayerNorm), in fp32.
    h_BLHK = norms.layer_norm(h_BLHK, params["norm_HK"], None, cfg.norm_eps)
    h_BLE = h_BLHK.reshape(B, L, -1) + params["skip_E"].astype(f32)[None, None] * c_BLE
    out_BLE = h_BLE * jax.nn.silu(z_BLE)
    y_BLD = _proj(out_BLE, params["wo_ED"], dt, params.get("bo_D")).astype(dt)
    if state is None:
        return y_BLD, None
    return y_BLD, {"C_BHKV": C, "n_BHK": n, "m_BH": m, "conv_BWE": conv_state.astype(f32)}


def step(params: dict, x_BD: "Float[Array, 'B D']", state: dict, *,
         cfg: MLSTMConfig) -> tuple["Float[Array, 'B D']", dict]:
    """One token: the recurrent form on a length-1 sequence (O(1) in generated length)."""
    y_B1D, state = forward(params, x_BD[:, None, :], cfg=cfg, state=state, form="recurrent")
    return y_B1D[:, 0], state
