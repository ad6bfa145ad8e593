"""Context parallelism for the recurrent families whose state update is affine in the state:
mLSTM, Mamba-2 (SSD), minGRU / minLSTM, RG-LRU and RWKV-4's WKV.

The pattern of sharding.context_scan (read its docstring first): the sequence is split over a
mesh axis, each device scans its own chunk from the empty state, the devices all-gather one
summary of their chunk (the map "state in -> state out", never the tokens), compose the maps by
a prefix scan in sequence order, and each device applies the state entering its chunk. A
document start inside a chunk erases what enters it (the map's decay is zero there), and the
initial state h0 enters at device 0. Only the scan core runs under shard_map; the projections,
short convolutions and token shifts around it stay ordinary GSPMD code.

Two kinds of map:

  affine, plain decay (Mamba-2, minGRU/minLSTM, RG-LRU): S -> a S + u with a the product of the
    chunk's decays; the incoming state reaches token t scaled by the product of decays up to t,
    so each device adds that term to its outputs (one pass);
  affine, stabilised in log space (mLSTM's (C, n, m), RWKV-4's (aa, bb, pp)): the stored state
    x means exp(m) * x. A chunk is summarised by (F, m, x): its total log decay F (very negative
    when a document starts inside it) and the state it builds from "no state at all" (m = -big),
    and two summaries compose like one step of the recurrence:
        m = max(F2 + m1, m2),  x = exp(F2 + m1 - m) x1 + exp(m2 - m) x2,  F = F1 + F2.
    The outputs divide by a normaliser (mLSTM: max(|q n|, exp(-m)); RWKV-4: the weight sum),
    which no additive correction reproduces, so each device reruns its chunk from the incoming
    state (two passes; the first pass's outputs are dropped by XLA).

sLSTM is absent on purpose: its gates read h_{t-1}, so its state update is not affine and a
chunk cannot be summarised without the state it receives (it keeps the gathered path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from layers import mamba2, mingru, mlstm, rglru, rwkv4
from sharding import context
from sharding.context_scan import incoming_state

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float

# "Minus infinity" of the log-space summaries: finite, so sums and differences of a few of them
# stay finite (no inf - inf in values or gradients), and exp() of it is exactly 0.
NEG = -1e30


def _seq(b, axis, rank):
    """PartitionSpec of a [B, L, ...] array of this rank: batch over b, sequence over axis."""
    return PartitionSpec(b, axis, *([None] * (rank - 2)))


def _bc(w, x):
    """w [..] times x [.., more]: w gets trailing unit axes (rank promotion is off)."""
    return w.reshape(w.shape + (1,) * (x.ndim - w.ndim)) * x


def _first_doc(reset_BL):
    """1.0 for the tokens before the chunk's first document start (those the incoming state reaches)."""
    return (jnp.cumsum(reset_BL.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)


def _erased(total_B, reset_BL):
    """The chunk's total log decay, NEG where a document starts inside it."""
    mask = jnp.any(reset_BL, axis=1).reshape(reset_BL.shape[:1] + (1,) * (total_B.ndim - 1))
    return jnp.where(mask, NEG, total_B)


# ---------------------------------------------------------------------------------------------
# Log-space summaries (mLSTM, RWKV-4)


def _log_compose(first, second):
    """(F, m, xs) of `first` followed by `second` (associative); see the module docstring."""
    F1, m1, xs1 = first
    F2, m2, xs2 = second
    m = jnp.maximum(F2 + m1, m2)
    w1, w2 = jnp.exp(F2 + m1 - m), jnp.exp(m2 - m)
    return F1 + F2, m, tuple(_bc(w1, x1) + _bc(w2, x2) for x1, x2 in zip(xs1, xs2))


def _log_incoming(F, m, xs, m0, xs0, axis):
    """(state entering this device's chunk, state after the whole sequence), each as (m, xs),
    from every device's summary (F, m, xs) and the initial state (m0, xs0)."""
    gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, axis), (F, m, xs))
    pF, pm, pxs = jax.lax.associative_scan(_log_compose, gathered)
    i = jax.lax.axis_index(axis)
    prev = jnp.maximum(i - 1, 0)

    def after(k):
        return _log_compose((jnp.zeros_like(m0), m0, xs0), (pF[k], pm[k], tuple(x[k] for x in pxs)))[1:]

    m_prev, xs_prev = after(prev)
    m_in = jnp.where(i > 0, m_prev, m0)
    xs_in = tuple(jnp.where(i > 0, a, b) for a, b in zip(xs_prev, xs0))
    return (m_in, xs_in), after(-1)


# ----- mLSTM -----


def _local_mlstm(q, k, v, i_pre, f_pre, C0, n0, m0, starts, *, axis, form, chunk_size, eps, gate_soft_cap):
    B, T, H, K = q.shape
    kw = dict(form=form, chunk_size=chunk_size, eps=eps, gate_soft_cap=gate_soft_cap, starts_BL=starts)
    # Pass 1: the chunk's summary, from no state at all (m = NEG, so the incoming m decides the
    # stabiliser exactly as in the unsplit run); its outputs are unused.
    empty = (jnp.zeros_like(C0), jnp.zeros_like(n0), jnp.full_like(m0, NEG))
    _, (C_l, n_l, m_l) = mlstm.cell(q, k, v, i_pre, f_pre, empty, **kw)
    logf_BTH = jax.nn.log_sigmoid(mlstm.soft_cap(f_pre.astype(jnp.float32), gate_soft_cap))
    F_BH = _erased(jnp.sum(logf_BTH, axis=1), starts)
    (m_in, (C_in, n_in)), (m_T, (C_T, n_T)) = _log_incoming(F_BH, m_l, (C_l, n_l), m0, (C0, n0), axis)
    # Pass 2: the exact outputs from the incoming state (the cell resets it at document starts).
    h, _ = mlstm.cell(q, k, v, i_pre, f_pre, (C_in, n_in, m_in), **kw)
    return h, (C_T, n_T, m_T)


def mlstm_cell(q_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']",
               v_BLHV: "Float[Array, 'B L H V']", i_BLH: "Float[Array, 'B L H']", f_BLH: "Float[Array, 'B L H']",
               state: tuple | None = None, starts_BL: "Bool[Array, 'B L'] | None" = None, *, mesh: Mesh,
               axis: str = "sequence", batch_axes: tuple[str, ...] = (), form: str = "chunkwise",
               chunk_size: int = 64, eps: float = 1e-6, gate_soft_cap: float | None = None,
               ) -> tuple["Float[Array, 'B L H V']", tuple]:
    """layers.mlstm.cell with the sequence split over mesh axis `axis` (two passes of the cell per
    device, see the module docstring): (h, final (C, n, m))."""
    B, L, H, K = q_BLHK.shape
    V = v_BLHV.shape[-1]
    context.check_split("context_recurrent.mlstm_cell", mesh, axis, L)
    f32 = jnp.float32
    if state is None:
        state = (jnp.zeros((B, H, K, V), f32), jnp.zeros((B, H, K), f32), jnp.zeros((B, H), f32))
    C0, n0, m0 = (s.astype(f32) for s in state)
    starts_BL = jnp.zeros((B, L), bool) if starts_BL is None else starts_BL.astype(bool)
    b = tuple(batch_axes) or None
    s4, s3, s2, rep = _seq(b, axis, 4), _seq(b, axis, 3), _seq(b, axis, 2), PartitionSpec(b)

    def body(q, k, v, i, f, C0, n0, m0, r):
        return _local_mlstm(q, k, v, i, f, C0, n0, m0, r, axis=axis, form=form, chunk_size=chunk_size, eps=eps,
                            gate_soft_cap=gate_soft_cap)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(s4, s4, s4, s3, s3, rep, rep, rep, s2),
                       out_specs=(s4, (rep, rep, rep)), check_vma=False)
    return fn(q_BLHK, k_BLHK, v_BLHV, i_BLH, f_BLH, C0, n0, m0, starts_BL)


# ----- RWKV-4 WKV -----


def _local_wkv4(w_A, u_A, k, v, starts, aa0, bb0, pp0, *, axis, form, chunk_size):
    B, T, A = k.shape

    def run(state):
        if form == "recurrent":
            return rwkv4._wkv_recurrent(w_A, u_A, k, v, starts, state)
        return rwkv4._wkv_chunked(w_A, u_A, k, v, starts, state, T if form == "parallel" else chunk_size)

    # Pass 1 from the empty state (pp = EMPTY_LOG: no log-weight at all), as for mLSTM.
    _, (aa_l, bb_l, pp_l) = run((jnp.zeros_like(aa0), jnp.zeros_like(bb0), jnp.full_like(pp0, rwkv4.EMPTY_LOG)))
    W_BA = _erased(jnp.broadcast_to(T * w_A[None, :], (B, A)), starts)
    (pp_in, (aa_in, bb_in)), (pp_T, (aa_T, bb_T)) = _log_incoming(W_BA, pp_l, (aa_l, bb_l), pp0, (aa0, bb0), axis)
    wkv, _ = run((aa_in, bb_in, pp_in))
    return wkv, (aa_T, bb_T, pp_T)


def wkv4(w_A: "Float[Array, 'A']", u_A: "Float[Array, 'A']", k_BLA: "Float[Array, 'B L A']",
         v_BLA: "Float[Array, 'B L A']", starts_BL: "Bool[Array, 'B L']", state: tuple, *, mesh: Mesh,
         axis: str = "sequence", batch_axes: tuple[str, ...] = (), form: str = "chunked", chunk_size: int = 64,
         ) -> tuple["Float[Array, 'B L A']", tuple]:
    """RWKV-4's WKV (layers.rwkv4 forms) with the sequence split over `axis`: (wkv, final
    (aa, bb, pp)). w_A: log decay per token (< 0), u_A: the bonus; state (aa, bb, pp) fp32."""
    B, L, A = k_BLA.shape
    context.check_split("context_recurrent.wkv4", mesh, axis, L)
    b = tuple(batch_axes) or None
    s3, s2, rep, full = _seq(b, axis, 3), _seq(b, axis, 2), PartitionSpec(b), PartitionSpec()

    def body(w, u, k, v, r, aa, bb, pp):
        return _local_wkv4(w, u, k, v, r, aa, bb, pp, axis=axis, form=form, chunk_size=chunk_size)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(full, full, s3, s3, s2, rep, rep, rep),
                       out_specs=(s3, (rep, rep, rep)), check_vma=False)
    aa0, bb0, pp0 = (s.astype(jnp.float32) for s in state)
    return fn(w_A.astype(jnp.float32), u_A.astype(jnp.float32), k_BLA.astype(jnp.float32),
              v_BLA.astype(jnp.float32), starts_BL.astype(bool), aa0, bb0, pp0)


# ---------------------------------------------------------------------------------------------
# Plain affine maps with an output correction (Mamba-2, minGRU / minLSTM, RG-LRU)


def _ssd_local(x, log_a, Bm, Cm, h0, reset, *, axis, chunk_size, mode):
    Bsz, T, H, Pd = x.shape
    G = Bm.shape[2]
    # fp32 x: the local outputs stay fp32 until the correction is added (one rounding, as unsplit).
    y_l, u_BHPN = mamba2.ssd(x.astype(jnp.float32), log_a, Bm, Cm, None, reset, chunk_size=chunk_size, mode=mode)
    cum_BTH = jnp.cumsum(log_a.astype(jnp.float32), axis=1)
    a_BH = jnp.exp(cum_BTH[:, -1]) * (1.0 - jnp.any(reset, axis=1).astype(jnp.float32))[:, None]
    s_in_BHPN, final_BHPN = incoming_state(a_BH[:, :, None, None], u_BHPN, h0, axis)
    # The incoming state reaches token t decayed by exp(a_1 + ... + a_t), before the first start.
    s_in_BGRPN = s_in_BHPN.reshape(Bsz, G, H // G, Pd, -1)
    extra_BTGRP = jnp.einsum("BTGN,BGRPN->BTGRP", Cm.astype(jnp.float32), s_in_BGRPN).reshape(Bsz, T, H, Pd)
    scale_BTH = jnp.exp(cum_BTH) * _first_doc(reset)[:, :, None]
    return (y_l + _bc(scale_BTH, extra_BTGRP)).astype(x.dtype), final_BHPN


def ssd(x_BLHP: "Float[Array, 'B L H P']", log_a_BLH: "Float[Array, 'B L H']", B_BLGN: "Float[Array, 'B L G N']",
        C_BLGN: "Float[Array, 'B L G N']", h0_BHPN: "Float[Array, 'B H P N'] | None" = None,
        reset_BL: "Bool[Array, 'B L'] | None" = None, *, mesh: Mesh, axis: str = "sequence",
        batch_axes: tuple[str, ...] = (), chunk_size: int = 64, mode: str = "chunked",
        ) -> tuple["Float[Array, 'B L H P']", "Float[Array, 'B H P N']"]:
    """layers.mamba2.ssd with the sequence split over `axis`: (y, final state)."""
    Bsz, L, H, Pd = x_BLHP.shape
    N = B_BLGN.shape[-1]
    context.check_split("context_recurrent.ssd", mesh, axis, L)
    reset_BL = jnp.zeros((Bsz, L), bool) if reset_BL is None else reset_BL.astype(bool)
    h0_BHPN = jnp.zeros((Bsz, H, Pd, N), jnp.float32) if h0_BHPN is None else h0_BHPN.astype(jnp.float32)
    b = tuple(batch_axes) or None
    s4, s3, s2, rep = _seq(b, axis, 4), _seq(b, axis, 3), _seq(b, axis, 2), PartitionSpec(b)

    def body(x, la, Bm, Cm, h0, r):
        return _ssd_local(x, la, Bm, Cm, h0, r, axis=axis, chunk_size=chunk_size, mode=mode)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(s4, s3, s4, s4, rep, s2), out_specs=(s4, rep), check_vma=False)
    return fn(x_BLHP, log_a_BLH, B_BLGN, C_BLGN, h0_BHPN, reset_BL)


def _elementwise_correct(h_BTE, log_a_BTE, reset_BT, h0_BE, axis):
    """h (from a zero start) of h_t = a_t h_{t-1} + b_t on this device's chunk -> the exact h and
    the state after the whole sequence: add prod(a up to t) * (incoming state) before the
    chunk's first document start."""
    cum_BTE = jnp.cumsum(log_a_BTE.astype(jnp.float32), axis=1)
    keep_B1 = 1.0 - jnp.any(reset_BT, axis=1, keepdims=True).astype(jnp.float32)
    s_in_BE, final_BE = incoming_state(jnp.exp(cum_BTE[:, -1]) * keep_B1, h_BTE[:, -1], h0_BE, axis)
    decay_BTE = jnp.exp(cum_BTE) * _first_doc(reset_BT)[:, :, None]
    return h_BTE + decay_BTE * s_in_BE[:, None, :], final_BE


def _elementwise(local, h0_BE, reset_BL, seq_args, rep_args, *, mesh, axis, batch_axes):
    """Run `local(*seq_chunks, *rep_args, reset_chunk) -> (h from zero, log a)` per device and
    correct it (see `_elementwise_correct`): (h [B, L, E], final [B, E])."""
    b = tuple(batch_axes) or None

    def body(h0, r, *args):
        h_l, log_a = local(*args, r)
        return _elementwise_correct(h_l, log_a, r, h0, axis)

    in_specs = ((PartitionSpec(b), _seq(b, axis, 2)) + tuple(_seq(b, axis, a.ndim) for a in seq_args)
                + tuple(PartitionSpec() for _ in rep_args))
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(_seq(b, axis, 3), PartitionSpec(b)),
                       check_vma=False)
    return fn(h0_BE.astype(jnp.float32), reset_BL.astype(bool), *seq_args, *rep_args)


def mingru_scan(h0_BE: "Float[Array, 'B E']", log_a_BLE: "Float[Array, 'B L E']",
                log_b_BLE: "Float[Array, 'B L E']", reset_BL: "Bool[Array, 'B L'] | None", *, mesh: Mesh,
                axis: str = "sequence", batch_axes: tuple[str, ...] = (), form: str = "log_scan",
                chunk_size: int | None = None) -> "Float[Array, 'B L E']":
    """minGRU / minLSTM's scan h_t = a_t h_{t-1} + b_t (layers.mingru forms, same arguments)
    with the sequence split over `axis`: h for every token."""
    B, L, E = log_a_BLE.shape
    context.check_split("context_recurrent.mingru_scan", mesh, axis, L)
    packed = reset_BL is not None
    reset_BL = reset_BL if packed else jnp.zeros((B, L), bool)

    def local(la, lb, r):
        zero = jnp.zeros(la.shape[:1] + la.shape[2:], jnp.float32)
        r = r if packed else None  # the unsegmented log-space scan is the cheaper one
        if form == "sequential":
            return mingru.sequential_scan(zero, la, lb, r), la
        if chunk_size is None:
            return mingru.log_scan(zero, la, lb, r), la
        return mingru.chunked_log_scan(zero, la, lb, r, chunk_size), la

    return _elementwise(local, h0_BE, reset_BL, (log_a_BLE, log_b_BLE), (), mesh=mesh, axis=axis,
                        batch_axes=batch_axes)[0]


def rg_lru(u_BLE: "Float[Array, 'B L E']", r_BLE: "Float[Array, 'B L E']", i_BLE: "Float[Array, 'B L E']",
           lambda_E: "Float[Array, 'E']", reset_BL: "Bool[Array, 'B L']", h0_BE: "Float[Array, 'B E'] | None", *,
           c: float, mesh: Mesh, axis: str = "sequence", batch_axes: tuple[str, ...] = (),
           ) -> tuple["Float[Array, 'B L E']", "Float[Array, 'B E']"]:
    """layers.rglru.rg_lru with the sequence split over `axis`: (h for every token, last h)."""
    B, L, E = u_BLE.shape
    context.check_split("context_recurrent.rg_lru", mesh, axis, L)
    h0_BE = jnp.zeros((B, E), jnp.float32) if h0_BE is None else h0_BE

    def local(u, r, i, lam, reset):
        h, _ = rglru.rg_lru(u, r, i, lam, reset, None, c=c)
        return h, -c * r.astype(jnp.float32) * jax.nn.softplus(lam.astype(jnp.float32))[None, None, :]

    return _elementwise(local, h0_BE, reset_BL, (u_BLE, r_BLE, i_BLE), (lambda_E,), mesh=mesh, axis=axis,
                        batch_axes=batch_axes)


# ---------------------------------------------------------------------------------------------
# Dispatch from the layers: each layer's scan entry point asks here first (None: run your own).


def dispatch_mlstm(q_BLHK, k_BLHK, v_BLHV, i_BLH, f_BLH, state, starts_BL, *, form, chunk_size, eps,
                   gate_soft_cap):
    """`mlstm_cell` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(mlstm_cell, q_BLHK, q_BLHK, k_BLHK, v_BLHV, i_BLH, f_BLH, state, starts_BL,
                                 form=form, chunk_size=chunk_size, eps=eps, gate_soft_cap=gate_soft_cap)


def dispatch_ssd(x_BLHP, log_a_BLH, B_BLGN, C_BLGN, h0_BHPN, reset_BL, *, chunk_size, mode):
    """`ssd` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(ssd, x_BLHP, x_BLHP, log_a_BLH, B_BLGN, C_BLGN, h0_BHPN, reset_BL,
                                 chunk_size=chunk_size, mode=mode)


def dispatch_mingru(h0_BE, log_a_BLE, log_b_BLE, reset_BL, *, form, chunk_size):
    """`mingru_scan` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(mingru_scan, log_a_BLE, h0_BE, log_a_BLE, log_b_BLE, reset_BL, form=form,
                                 chunk_size=chunk_size)


def dispatch_rglru(u_BLE, r_BLE, i_BLE, lambda_E, reset_BL, h0_BE, *, c):
    """`rg_lru` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(rg_lru, u_BLE, u_BLE, r_BLE, i_BLE, lambda_E, reset_BL, h0_BE, c=c)


def dispatch_wkv4(w_A, u_A, k_BLA, v_BLA, starts_BL, state, *, form, chunk_size):
    """`wkv4` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(wkv4, k_BLA, w_A, u_A, k_BLA, v_BLA, starts_BL, state, form=form,
                                 chunk_size=chunk_size)
