"""Flash attention in Pallas: tiled online-softmax forward, dq and dk/dv backward kernels.

Layout as `jax.nn.dot_product_attention`: q [B, L, H, K], k/v [B, S, G, K] with G key/value heads
shared by R = H / G query heads. Inside, heads move before the sequence ([B, H, L, K]) so that a
block is a [rows, K] tile.

Design (one program per (batch, head, q block); see docs/kernels.md):
- Forward: a q tile stays resident; a `fori_loop` walks the key blocks with the running max, the
  running sum and an fp32 accumulator (FlashAttention-2). It writes the output and the per-row
  log-sum-exp, the only residual saved for backward besides the output.
- Backward: a dq kernel (same grid, walks key blocks) and a dk/dv kernel (one program per
  (batch, kv head, key block), walks the R query heads of its group and the q blocks). GQA is the
  index map `h -> h // R` (forward, dq) and a q block of R heads (dk/dv): K/V are never repeated.
- Masks are comparisons of per-token positions and segment ids (key position < 0 = padding), the
  convention of `layers.attention_core`. With default positions (token index), the loops run only
  over the blocks inside the causal/window band: blocks wholly outside it are never loaded or
  computed. With explicit positions (caches, left padding) every block is visited and masked.
- Odd lengths are padded to the block size (padded keys get position -1) and head dims to a
  power of two >= 16 (zero columns change no dot product); both are sliced off again.

Backends: GPU lowers through Triton (`jax.experimental.pallas.triton.CompilerParams`); TPU through
Mosaic (`pltpu.CompilerParams`, grid axes all "parallel": no program depends on another). On CPU
the same kernels run in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import BACKENDS, resolve

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

# Finite "minus infinity": exp(NEG - m) underflows to 0 without inf - inf = NaN.
NEG = -1e30
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes.

    block_q: query rows per program (forward, dq) and per inner step (dk/dv).
    block_k: key rows per inner step (forward, dq) and per program (dk/dv).
    num_warps, num_stages: Triton launch parameters (GPU only; ignored elsewhere).
    """
    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BlockSizes.{name}: expected a positive integer, got {value!r}")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value & (value - 1) or value < 8:
                raise ValueError(f"BlockSizes.{name}: expected a power of two >= 8 "
                                 f"(Triton tiles; TPU sublanes), got {value}")

    @classmethod
    def default(cls, backend: str) -> "BlockSizes":
        """GPU: 64x64 tiles fit the shared memory of fwd and bwd at K=128 on A100/H100.
        TPU: 128 matches the lane width (key-side metadata is laid out along lanes).
        CPU (interpret): small tiles so that tests exercise many blocks."""
        if backend not in BACKENDS:
            raise ValueError(f"BlockSizes.default: backend must be one of {BACKENDS}, got {backend!r}")
        return {"gpu": cls(block_q=64, block_k=64, num_warps=4, num_stages=2),
                "tpu": cls(block_q=128, block_k=128),
                "cpu": cls(block_q=16, block_k=16)}[backend]


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: a nondiff argument of the custom_vjp)."""
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    band: bool          # positions are token indices: loops may skip blocks outside the band
    block_q: int
    block_k: int
    group: int          # R = H / G
    backend: str
    interpret: bool
    num_warps: int
    num_stages: int


def _ceil_div(a, b):
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- band bounds
# Block ranges that can hold an allowed (query, key) pair when positions are token indices.
# Arguments may be traced int32 scalars (program ids); numerators are kept >= 0 before dividing.

def _div(a, b: int):
    """a // b for a >= 0: lax.div (truncation) lowers everywhere, while jnp's floor division
    emits a sign op whose TPU lowering asks the attached device for its generation."""
    return jax.lax.div(a, b) if isinstance(a, jax.Array) else a // b


def _key_range(i, st: _Static, n_k):
    """Key blocks [lo, hi) that query block i can see."""
    bq, bk = st.block_q, st.block_k
    lo, hi = 0, n_k
    q_first, q_last = i * bq, i * bq + bq - 1
    if st.causal:
        hi = jnp.minimum(n_k, _div(q_last, bk) + 1)
    elif st.window is not None:
        hi = jnp.minimum(n_k, _div(q_last + st.window - 1, bk) + 1)
    if st.window is not None:
        lo = _div(jnp.maximum(q_first - st.window + 1, 0), bk)
    return lo, hi


def _query_range(j, st: _Static, n_q):
    """Query blocks [lo, hi) that can see key block j."""
    bq, bk = st.block_q, st.block_k
    lo, hi = 0, n_q
    k_first, k_last = j * bk, j * bk + bk - 1
    if st.causal:
        lo = _div(k_first, bq)
    elif st.window is not None:
        lo = _div(jnp.maximum(k_first - st.window + 1, 0), bq)
    if st.window is not None:
        hi = jnp.minimum(n_q, _div(k_last + st.window - 1, bq) + 1)
    return lo, hi


# ----------------------------------------------------------------------------- shared math

def _mask(qpos_Q1, qseg_Q1, kpos_1C, kseg_1C, st: _Static):
    mask_QC = (kpos_1C >= 0) & (qseg_Q1 == kseg_1C)
    if st.causal:
        mask_QC = mask_QC & (kpos_1C <= qpos_Q1)
    if st.window is not None:
        dist_QC = (qpos_Q1 - kpos_1C) if st.causal else jnp.abs(qpos_Q1 - kpos_1C)
        mask_QC = mask_QC & (dist_QC < st.window)
    return mask_QC


def _logits(q_QK, k_CK, st: _Static):
    """Scaled (and soft-capped) logits in fp32; also returns tanh(s / cap) for the backward."""
    s_QC = jax.lax.dot_general(q_QK, k_CK, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * st.scale
    if st.softcap is None:
        return s_QC, None
    th_QC = jnp.tanh(s_QC / st.softcap)
    return st.softcap * th_QC, th_QC


def _skip_empty(mask_QC, update, carry, st: _Static):
    """update(carry) unless the block's mask is all False. With index positions the loop bounds
    already exclude such blocks; with explicit positions (caches, padding) this branch is what
    skips their loads and matmuls."""
    if st.band:
        return update(carry)
    live = jnp.max(mask_QC.astype(jnp.float32)) > 0.0
    return jax.lax.cond(live, update, lambda c: c, carry)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a^T b without materialising the transpose."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, o_ref, lse_ref, *,
                st: _Static):
    i = pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    n_k = k_ref.shape[0] // bk
    q_QK = q_ref[...]
    qpos_Q1, qseg_Q1 = qpos_ref[...], qseg_ref[...]

    def body(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        mask_QC = _mask(qpos_Q1, qseg_Q1, kpos_ref[:, ks], kseg_ref[:, ks], st)
        return _skip_empty(mask_QC, functools.partial(update, ks, mask_QC), carry, st)

    def update(ks, mask_QC, carry):
        acc_QK, m_Q1, l_Q1 = carry
        t_QC, _ = _logits(q_QK, k_ref[ks, :], st)
        t_QC = jnp.where(mask_QC, t_QC, NEG)
        m_new_Q1 = jnp.maximum(m_Q1, jnp.max(t_QC, axis=1, keepdims=True))
        p_QC = jnp.where(mask_QC, jnp.exp(t_QC - m_new_Q1), 0.0)
        alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
        l_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QC, axis=1, keepdims=True)
        v_CK = v_ref[ks, :]
        acc_QK = alpha_Q1 * acc_QK + _dot(p_QC.astype(v_CK.dtype), v_CK)
        return acc_QK, m_new_Q1, l_Q1

    lo, hi = _key_range(i, st, n_k) if st.band else (0, n_k)
    init = (jnp.zeros(q_QK.shape, jnp.float32), jnp.full((bq, 1), NEG, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc_QK, m_Q1, l_Q1 = jax.lax.fori_loop(lo, hi, body, init)
    seen_Q1 = l_Q1 > 0
    # Rows that see no key output 0; their lse of +big makes every backward p exactly 0.
    o_ref[...] = (acc_QK / jnp.where(seen_Q1, l_Q1, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen_Q1, m_Q1 + jnp.log(jnp.where(seen_Q1, l_Q1, 1.0)), -NEG)


def _probs_and_dlogits(q_QK, k_CK, v_CK, do_QK, lse_Q1, delta_Q1, mask_QC, st: _Static):
    """Recompute p from the saved lse; return p and dL/ds (through the softcap)."""
    t_QC, th_QC = _logits(q_QK, k_CK, st)
    p_QC = jnp.where(mask_QC, jnp.exp(t_QC - lse_Q1), 0.0)
    dp_QC = jax.lax.dot_general(do_QK, v_CK, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    ds_QC = p_QC * (dp_QC - delta_Q1)
    if th_QC is not None:
        ds_QC = ds_QC * (1.0 - th_QC * th_QC)
    return p_QC, ds_QC


def _dq_kernel(q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, st: _Static):
    i = pl.program_id(2)
    bk = st.block_k
    n_k = k_ref.shape[0] // bk
    q_QK, do_QK = q_ref[...], do_ref[...]
    lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]
    qpos_Q1, qseg_Q1 = qpos_ref[...], qseg_ref[...]

    def body(j, dq_QK):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        mask_QC = _mask(qpos_Q1, qseg_Q1, kpos_ref[:, ks], kseg_ref[:, ks], st)
        return _skip_empty(mask_QC, functools.partial(update, ks, mask_QC), dq_QK, st)

    def update(ks, mask_QC, dq_QK):
        k_CK = k_ref[ks, :]
        _, ds_QC = _probs_and_dlogits(q_QK, k_CK, v_ref[ks, :], do_QK, lse_Q1, delta_Q1, mask_QC, st)
        return dq_QK + _dot(ds_QC.astype(k_CK.dtype), k_CK)

    lo, hi = _key_range(i, st, n_k) if st.band else (0, n_k)
    dq_QK = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q_QK.shape, jnp.float32))
    dq_ref[...] = (dq_QK * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, st: _Static):
    j = pl.program_id(2)
    bq = st.block_q
    n_q = q_ref.shape[1] // bq
    k_CK, v_CK = k_ref[...], v_ref[...]
    kpos_1C, kseg_1C = kpos_ref[...], kseg_ref[...]
    lo, hi = _query_range(j, st, n_q) if st.band else (0, n_q)
    dk_CK = jnp.zeros(k_CK.shape, jnp.float32)
    dv_CK = jnp.zeros(v_CK.shape, jnp.float32)
    # The R query heads of this kv head accumulate into one dk/dv tile (GQA without repeats).
    for r in range(st.group):
        def body(i, carry, r=r):
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            mask_QC = _mask(qpos_ref[qs, :], qseg_ref[qs, :], kpos_1C, kseg_1C, st)
            return _skip_empty(mask_QC, functools.partial(update, r, qs, mask_QC), carry, st)

        def update(r, qs, mask_QC, carry):
            dk_CK, dv_CK = carry
            q_QK, do_QK = q_ref[r, qs, :], do_ref[r, qs, :]
            p_QC, ds_QC = _probs_and_dlogits(q_QK, k_CK, v_CK, do_QK, lse_ref[r, qs, :],
                                             delta_ref[r, qs, :], mask_QC, st)
            dv_CK = dv_CK + _dot_tn(p_QC.astype(do_QK.dtype), do_QK)
            dk_CK = dk_CK + _dot_tn(ds_QC.astype(q_QK.dtype), q_QK)
            return dk_CK, dv_CK
        dk_CK, dv_CK = jax.lax.fori_loop(lo, hi, body, (dk_CK, dv_CK))
    dk_ref[...] = (dk_CK * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CK.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls

def _compiler_params(st: _Static):
    if st.interpret:
        return None
    if st.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _call(kernel, grid, in_specs, out_specs, out_shape, st: _Static, *args):
    return pl.pallas_call(
        functools.partial(kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(st), interpret=st.interpret,
    )(*args)


def _row_specs(st: _Static, L, S, K):
    """BlockSpecs for a program (b, h, i) of the forward / dq grid."""
    R, bq = st.group, st.block_q
    q = pl.BlockSpec((None, None, bq, K), lambda b, h, i: (b, h, i, 0))
    kv = pl.BlockSpec((None, None, S, K), lambda b, h, i: (b, jax.lax.div(h, R), 0, 0))
    qmeta = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
    kmeta = pl.BlockSpec((None, 1, S), lambda b, h, i: (b, 0, 0))
    row = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    return q, kv, qmeta, kmeta, row


def _forward(q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, st: _Static):
    B, H, L, K = q_BHLK.shape
    S = k_BGSK.shape[2]
    q, kv, qmeta, kmeta, row = _row_specs(st, L, S, K)
    return _call(
        _fwd_kernel, (B, H, L // st.block_q), [q, kv, kv, qmeta, qmeta, kmeta, kmeta], [q, row],
        [jax.ShapeDtypeStruct(q_BHLK.shape, q_BHLK.dtype), jax.ShapeDtypeStruct((B, H, L, 1), jnp.float32)],
        st, q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S)


def _backward(st: _Static, res, do_BHLK):
    q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, o_BHLK, lse_BHL1 = res
    B, H, L, K = q_BHLK.shape
    G, S = k_BGSK.shape[1], k_BGSK.shape[2]
    R, bq, bk = st.group, st.block_q, st.block_k
    # delta = rowsum(dO * O): a cheap elementwise pass, not worth a kernel.
    delta_BHL1 = jnp.sum(do_BHLK.astype(jnp.float32) * o_BHLK.astype(jnp.float32), axis=-1, keepdims=True)
    metas = (qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S)

    q, kv, qmeta, kmeta, row = _row_specs(st, L, S, K)
    dq_BHLK = _call(
        _dq_kernel, (B, H, L // bq), [q, kv, kv, qmeta, qmeta, kmeta, kmeta, q, row, row], q,
        jax.ShapeDtypeStruct(q_BHLK.shape, q_BHLK.dtype),
        st, q_BHLK, k_BGSK, v_BGSK, *metas, do_BHLK, lse_BHL1, delta_BHL1)

    # dk/dv: program (b, g, j) holds key block j and all L rows of the R query heads of group g.
    q_grp = pl.BlockSpec((None, R, L, K), lambda b, g, j: (b, g, 0, 0))
    row_grp = pl.BlockSpec((None, R, L, 1), lambda b, g, j: (b, g, 0, 0))
    kv_blk = pl.BlockSpec((None, None, bk, K), lambda b, g, j: (b, g, j, 0))
    qmeta_all = pl.BlockSpec((None, L, 1), lambda b, g, j: (b, 0, 0))
    kmeta_blk = pl.BlockSpec((None, 1, bk), lambda b, g, j: (b, 0, j))
    dk_BGSK, dv_BGSK = _call(
        _dkv_kernel, (B, G, S // bk),
        [q_grp, kv_blk, kv_blk, qmeta_all, qmeta_all, kmeta_blk, kmeta_blk, q_grp, row_grp, row_grp],
        [kv_blk, kv_blk],
        [jax.ShapeDtypeStruct(k_BGSK.shape, k_BGSK.dtype), jax.ShapeDtypeStruct(v_BGSK.shape, v_BGSK.dtype)],
        st, q_BHLK, k_BGSK, v_BGSK, *metas, do_BHLK, lse_BHL1, delta_BHL1)
    return dq_BHLK, dk_BGSK, dv_BGSK, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, st):
    return _forward(q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, st)[0]


def _flash_fwd(q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, st):
    o_BHLK, lse_BHL1 = _forward(q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, st)
    return o_BHLK, (q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, o_BHLK, lse_BHL1)


_flash.defvjp(_flash_fwd, _backward)


# ----------------------------------------------------------------------------- public API

def _validate(q, k, v, segment_ids, q_positions, kv_positions, window, softcap, block_sizes):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or x.ndim != 4:
            raise ValueError(f"flash_attention: {name} must be [B, L|S, heads, K], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"flash_attention: {name} must be floating, got {x.dtype}")
    B, L, H, K = q.shape
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k shape {k.shape} must equal v shape {v.shape}")
    if k.shape[0] != B or k.shape[3] != K:
        raise ValueError(f"flash_attention: k must be [B={B}, S, G, K={K}], got {k.shape}")
    G = k.shape[2]
    if H % G:
        raise ValueError(f"flash_attention: query heads H={H} must be a multiple of kv heads G={G}")
    if K > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim K must be <= {MAX_HEAD_DIM}, got {K}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"flash_attention: window must be a positive int or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap must be > 0 or None, got {softcap!r}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"flash_attention: block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    S = k.shape[1]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        for name, x, n in (("q segment ids", q_seg, L), ("kv segment ids", kv_seg, S)):
            if x.shape != (B, n) or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"flash_attention: {name} must be integer [B={B}, {n}], got "
                                 f"{x.shape} {x.dtype}")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("flash_attention: give both q_positions and kv_positions or neither")
    for name, x, n in (("q_positions", q_positions, L), ("kv_positions", kv_positions, S)):
        if x is not None and (x.shape != (B, n) or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(f"flash_attention: {name} must be integer [B={B}, {n}], got {x.shape} {x.dtype}")


def flash_attention(
        q: "Float[Array, 'B L H K']", k: "Float[Array, 'B S G K']", v: "Float[Array, 'B S G K']", *,
        causal: bool = True, window: int | None = None, softcap: float | None = None,
        segment_ids: "Int[Array, 'B L'] | tuple | None" = None, sm_scale: float | None = None,
        block_sizes: BlockSizes | None = None, interpret: bool | None = None,
        q_positions: "Int[Array, 'B L'] | None" = None, kv_positions: "Int[Array, 'B S'] | None" = None,
        backend: str | None = None,
) -> "Float[Array, 'B L H K']":
    """softmax(softcap(q k^T * sm_scale) masked) v, differentiable in q, k, v.

    causal: key position <= query position. window: W keys including the current one
      (|distance| < W when not causal). softcap: cap * tanh(logits / cap) before the mask.
    segment_ids: [B, L] for self-attention (L == S), or a (q_ids [B, L], kv_ids [B, S]) pair;
      tokens attend only within equal ids.
    q_positions / kv_positions: optional [B, L] / [B, S] token positions (default: the index);
      a key position < 0 marks an empty slot. Given them, no block is skipped.
    sm_scale: default K ** -0.5. block_sizes: default `BlockSizes.default(backend)`.
    interpret: None = interpret on CPU, compiled on GPU/TPU. backend: "gpu" | "tpu" | "cpu"
      (default: `pallas_kernels.backend.lowering_for`'s target, else the running backend);
      naming one lets a CPU machine cross-lower for it.
    """
    backend, interpret = resolve(backend, interpret, "flash_attention")
    _validate(q, k, v, segment_ids, q_positions, kv_positions, window, softcap, block_sizes)
    B, L, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    bs = block_sizes or BlockSizes.default(backend)
    # A block never exceeds the (padded-to-8) sequence: short sequences get one block.
    bq = min(bs.block_q, max(8, 1 << (L - 1).bit_length()))
    bk = min(bs.block_k, max(8, 1 << (S - 1).bit_length()))
    Lp, Sp = _ceil_div(L, bq) * bq, _ceil_div(S, bk) * bk
    Kp = max(16, 1 << (K - 1).bit_length())
    st = _Static(causal=bool(causal), window=window, softcap=None if softcap is None else float(softcap),
                 scale=float(K ** -0.5 if sm_scale is None else sm_scale), band=q_positions is None,
                 block_q=bq, block_k=bk, group=H // G, backend=backend, interpret=interpret,
                 num_warps=bs.num_warps, num_stages=bs.num_stages)

    if segment_ids is None:
        q_seg, kv_seg = jnp.zeros((B, L), jnp.int32), jnp.zeros((B, S), jnp.int32)
    elif isinstance(segment_ids, tuple):
        q_seg, kv_seg = segment_ids
    else:
        if L != S:
            raise ValueError(f"flash_attention: one segment_ids array needs L == S, got L={L}, S={S}; "
                             "pass a (q_ids, kv_ids) pair")
        q_seg = kv_seg = segment_ids
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        kv_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))

    def pad_seq(x, n, value=0):
        return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    q_BHLK = jnp.swapaxes(jnp.pad(pad_seq(q, Lp), [(0, 0)] * 3 + [(0, Kp - K)]), 1, 2)
    k_BGSK = jnp.swapaxes(jnp.pad(pad_seq(k, Sp), [(0, 0)] * 3 + [(0, Kp - K)]), 1, 2)
    v_BGSK = jnp.swapaxes(jnp.pad(pad_seq(v, Sp), [(0, 0)] * 3 + [(0, Kp - K)]), 1, 2)
    qpos_BL1 = pad_seq(q_positions.astype(jnp.int32), Lp)[:, :, None]
    qseg_BL1 = pad_seq(q_seg.astype(jnp.int32), Lp)[:, :, None]
    # Padded keys get position -1: masked for every query.
    kpos_B1S = pad_seq(kv_positions.astype(jnp.int32), Sp, -1)[:, None, :]
    kseg_B1S = pad_seq(kv_seg.astype(jnp.int32), Sp)[:, None, :]
    o_BHLK = _flash(q_BHLK, k_BGSK, v_BGSK, qpos_BL1, qseg_BL1, kpos_B1S, kseg_B1S, st)
    return jnp.swapaxes(o_BHLK, 1, 2)[:, :L, :, :K]


def flash_attention_reference(
        q: "Float[Array, 'B L H K']", k: "Float[Array, 'B S G K']", v: "Float[Array, 'B S G K']", *,
        causal: bool = True, window: int | None = None, softcap: float | None = None,
        segment_ids: "Int[Array, 'B L'] | tuple | None" = None, sm_scale: float | None = None,
        q_positions: "Int[Array, 'B L'] | None" = None, kv_positions: "Int[Array, 'B S'] | None" = None,
) -> "Float[Array, 'B L H K']":
    """The same function written plainly: K/V repeated per head, the full [L, S] matrix, fp32."""
    B, L, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    scale = K ** -0.5 if sm_scale is None else sm_scale
    qp = jnp.broadcast_to(jnp.arange(L), (B, L)) if q_positions is None else q_positions
    kp = jnp.broadcast_to(jnp.arange(S), (B, S)) if kv_positions is None else kv_positions
    k32 = jnp.repeat(k.astype(jnp.float32), H // G, axis=2)
    v32 = jnp.repeat(v.astype(jnp.float32), H // G, axis=2)
    s_BHLS = jnp.einsum("BLHK,BSHK->BHLS", q.astype(jnp.float32), k32) * scale
    if softcap is not None:
        s_BHLS = softcap * jnp.tanh(s_BHLS / softcap)
    mask_BLS = jnp.broadcast_to(kp[:, None, :] >= 0, (B, L, S))
    if causal:
        mask_BLS = mask_BLS & (kp[:, None, :] <= qp[:, :, None])
    if window is not None:
        d = qp[:, :, None] - kp[:, None, :]
        mask_BLS = mask_BLS & ((d if causal else jnp.abs(d)) < window)
    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        mask_BLS = mask_BLS & (qs[:, :, None] == ks[:, None, :])
    s_BHLS = jnp.where(mask_BLS[:, None], s_BHLS, -jnp.inf)
    m = jnp.max(s_BHLS, axis=-1, keepdims=True)
    p = jnp.exp(s_BHLS - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("BHLS,BSHK->BLHK", p, v32).astype(q.dtype)
