"""Chunked decayed linear recurrence in Pallas (forward and backward), with its reference.

Per batch row and head, with an fp32 state h of shape [K, V]:

    h_t = diag(exp(g_t)) h_{t-1} + k_t^T v_t        o_t = scale * q_t h_t

g is a log-decay per key dim ([B, L, H, K]: GLA, mLSTM-like), per head ([B, L, H]: RetNet,
Mamba-2 SSD) or absent (linear attention). `reset` marks document starts (the state carried
into such a token is zero), the convention of `layers.linear_recurrence`, whose XLA chunked form
computes the same numbers.

Kernel design (docs/kernels.md):
- Sequence in chunks of C tokens. Inside a chunk the attention-like [C, C] matrix carries its
  decays as an explicit masked [C, C, K] tensor exp(b_i - b_j) (b = in-chunk prefix of g), so
  every exponent is <= 0 for g <= 0: no exp(+b) factor that overflows under strong decays.
- The fp32 state lives in scratch (TPU: VMEM) across a sequential ("arbitrary") chunk axis of
  the grid; the forward writes the state entering every chunk, which is all the backward needs.
- The backward walks the chunks in reverse (index maps n -> N-1-n) with dh in scratch and
  recomputes each chunk's [C, C] terms from the saved boundary state. It returns gradients for
  q, k, v, the in-chunk prefix b (the cumsum's own backward is left to XLA) and h0.
- GPU (Triton) has no sequential grid axis or scratch: there one program per (batch, head) loops
  over the chunks with the state in registers, reusing the same chunk math. Triton needs power-
  of-two tile dims, so on GPU the chunk count is padded to a power of two (no-op chunks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import resolve

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    backend: str
    interpret: bool


def _mm(a, b, ca: int, cb: int):
    """Contract dim ca of a with dim cb of b (2-D), fp32 accumulate at full precision."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def _structure(r_C1):
    """Masks of one chunk from its reset flags r (1.0 at a document start):
    valid[i, j]: j <= i with no reset in (j, i]; first[i]: no reset in [0, i] (the carried state
    reaches token i); last[j]: no reset in (j, C) (token j reaches the next chunk);
    keep: no reset at all (the carried state survives the chunk)."""
    C = r_C1.shape[0]
    i_CC = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j_CC = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    upto_CC = (j_CC <= i_CC).astype(jnp.float32)      # [i, m] = m <= i
    after_CC = (j_CC > i_CC).astype(jnp.float32)      # [j, m] = m > j
    # resets strictly after j and up to i: sum_m [m <= i] [m > j] r_m.
    between_CC = _mm(upto_CC, (i_CC > j_CC).astype(jnp.float32) * r_C1, 1, 0)
    valid_CC = (j_CC <= i_CC) & (between_CC == 0.0)
    first_C1 = _mm(upto_CC, r_C1, 1, 0) == 0.0
    last_C1 = _mm(after_CC, r_C1, 1, 0) == 0.0
    keep_11 = jnp.sum(r_C1, axis=0, keepdims=True) == 0.0
    return valid_CC, first_C1, last_C1, keep_11


def _decays(b_CK, valid_CC):
    diff_CCK = b_CK[:, None, :] - b_CK[None, :, :]
    return jnp.where(valid_CC[:, :, None], jnp.exp(jnp.where(valid_CC[:, :, None], diff_CCK, 0.0)), 0.0)


def _chunk_fwd(q_CK, k_CK, v_CV, b_CK, bl_1K, r_C1, h_VK):
    """One chunk given h entering it; bl_1K is b's last row (read from the ref: Triton has no slice)."""
    valid_CC, first_C1, last_C1, keep_11 = _structure(r_C1)
    d_CCK = _decays(b_CK, valid_CC)
    a_CC = jnp.sum(q_CK[:, None, :] * k_CK[None, :, :] * d_CCK, axis=2)
    qe_CK = q_CK * jnp.exp(b_CK) * first_C1.astype(jnp.float32)
    o_CV = _mm(a_CC, v_CV, 1, 0) + _mm(qe_CK, h_VK, 1, 1)
    kd_CK = k_CK * jnp.exp(bl_1K - b_CK) * last_C1.astype(jnp.float32)
    h_VK = h_VK * (jnp.exp(bl_1K) * keep_11.astype(jnp.float32)) + _mm(v_CV, kd_CK, 0, 0)
    return o_CV, h_VK


def _chunk_bwd(q_CK, k_CK, v_CV, b_CK, bl_1K, r_C1, h_VK, do_CV, dh_VK):
    """Gradients of one chunk given h entering it and dh of the state leaving it."""
    C = q_CK.shape[0]
    valid_CC, first_C1, last_C1, keep_11 = _structure(r_C1)
    first, last, keep = (x.astype(jnp.float32) for x in (first_C1, last_C1, keep_11))
    d_CCK = _decays(b_CK, valid_CC)
    a_CC = jnp.sum(q_CK[:, None, :] * k_CK[None, :, :] * d_CCK, axis=2)
    eb_CK = jnp.exp(b_CK)
    tail_CK = jnp.exp(bl_1K - b_CK) * last
    kd_CK = k_CK * tail_CK

    da_CC = _mm(do_CV, v_CV, 1, 1)
    dv_CV = _mm(a_CC, do_CV, 0, 0) + _mm(kd_CK, dh_VK, 1, 1)
    t_CCK = da_CC[:, :, None] * d_CCK
    dq_CK = jnp.sum(t_CCK * k_CK[None, :, :], axis=1) + _mm(do_CV, h_VK, 1, 0) * eb_CK * first
    dks_CK = _mm(v_CV, dh_VK, 1, 0) * tail_CK
    dk_CK = jnp.sum(t_CCK * q_CK[:, None, :], axis=0) + dks_CK
    # b enters as +b_i and -b_j in every exponent, so db = q dq - k dk; the chunk's last prefix
    # b_C also scales the carried state and every state contribution.
    extra_1K = (jnp.sum(k_CK * dks_CK, axis=0, keepdims=True)
                + keep * jnp.exp(bl_1K) * jnp.sum(h_VK * dh_VK, axis=0, keepdims=True))
    row_C1 = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    db_CK = q_CK * dq_CK - k_CK * dk_CK + jnp.where(row_C1 == C - 1, extra_1K, 0.0)
    dh_VK = dh_VK * (keep * jnp.exp(bl_1K)) + _mm(do_CV, q_CK * eb_CK * first, 0, 0)
    return dq_CK, dk_CK, dv_CV, db_CK, dh_VK


# ----------------------------------------------------------------------------- kernels
# `grid_chunks`: TPU/interpret layout, one chunk per program along a sequential grid axis with the
# state in scratch. Otherwise (GPU) one program loops over all chunks of its (batch, head).

def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, r_ref, h0_ref, o_ref, hs_ref, hT_ref, *scratch,
                st: _Static, grid_chunks: bool):
    C = st.chunk
    if grid_chunks:
        n, h_scr = pl.program_id(2), scratch[0]

        @pl.when(n == 0)
        def _():
            h_scr[...] = h0_ref[...]
        h_VK = h_scr[...]
    else:
        h_VK = h0_ref[...]

    def body(c, h_VK):
        s = pl.ds(pl.multiple_of(c * C, C), C)
        hs_ref[c] = h_VK
        last = pl.ds(c * C + C - 1, 1)
        o_CV, h_VK = _chunk_fwd(q_ref[s, :], k_ref[s, :], v_ref[s, :], b_ref[s, :], b_ref[last, :],
                                r_ref[s, :], h_VK)
        o_ref[s, :] = o_CV
        return h_VK

    h_VK = jax.lax.fori_loop(0, q_ref.shape[0] // C, body, h_VK)
    if grid_chunks:
        h_scr[...] = h_VK

        @pl.when(n == pl.num_programs(2) - 1)
        def _():
            hT_ref[...] = h_VK
    else:
        hT_ref[...] = h_VK


def _bwd_kernel(q_ref, k_ref, v_ref, b_ref, r_ref, hs_ref, do_ref, dhT_ref,
                dq_ref, dk_ref, dv_ref, db_ref, dh0_ref, *scratch, st: _Static, grid_chunks: bool):
    C = st.chunk
    n_local = q_ref.shape[0] // C
    if grid_chunks:
        n, dh_scr = pl.program_id(2), scratch[0]

        @pl.when(n == 0)
        def _():
            dh_scr[...] = dhT_ref[...]
        dh_VK = dh_scr[...]
    else:
        dh_VK = dhT_ref[...]

    def body(t, dh_VK):
        c = n_local - 1 - t
        s = pl.ds(pl.multiple_of(c * C, C), C)
        last = pl.ds(c * C + C - 1, 1)
        dq, dk, dv, db, dh_VK = _chunk_bwd(q_ref[s, :], k_ref[s, :], v_ref[s, :], b_ref[s, :], b_ref[last, :],
                                           r_ref[s, :], hs_ref[c], do_ref[s, :], dh_VK)
        dq_ref[s, :], dk_ref[s, :], dv_ref[s, :], db_ref[s, :] = dq, dk, dv, db
        return dh_VK

    dh_VK = jax.lax.fori_loop(0, n_local, body, dh_VK)
    if grid_chunks:
        dh_scr[...] = dh_VK

        @pl.when(n == pl.num_programs(2) - 1)
        def _():
            dh0_ref[...] = dh_VK
    else:
        dh0_ref[...] = dh_VK


def _layout(st: _Static, N: int, reverse: bool):
    """(grid, spec builder, scratch, compiler params) for the two program layouts."""
    grid_chunks = st.backend != "gpu"
    if grid_chunks:
        def chunk_of(n):
            return N - 1 - n if reverse else n

        def seq(width):
            return pl.BlockSpec((None, None, st.chunk, width), lambda b, h, n: (b, h, chunk_of(n), 0))

        def per_chunk(V, K):
            return pl.BlockSpec((None, None, 1, V, K), lambda b, h, n: (b, h, chunk_of(n), 0, 0))

        def state(V, K):
            return pl.BlockSpec((None, None, V, K), lambda b, h, n: (b, h, 0, 0))
        grid = lambda B, H: (B, H, N)  # noqa: E731
    else:
        def seq(width):
            return pl.BlockSpec((None, None, N * st.chunk, width), lambda b, h: (b, h, 0, 0))

        def per_chunk(V, K):
            return pl.BlockSpec((None, None, N, V, K), lambda b, h: (b, h, 0, 0, 0))

        def state(V, K):
            return pl.BlockSpec((None, None, V, K), lambda b, h: (b, h, 0, 0))
        grid = lambda B, H: (B, H)  # noqa: E731
    if st.interpret:
        params = None
    elif st.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    else:
        from jax.experimental.pallas import triton as pl_triton
        params = pl_triton.CompilerParams(num_warps=4, num_stages=1)
    return grid_chunks, grid, seq, per_chunk, state, params


def _scratch(grid_chunks, V, K):
    if not grid_chunks:
        return ()
    from jax.experimental.pallas import tpu as pltpu
    return (pltpu.VMEM((V, K), jnp.float32),)


def _forward(q, k, v, b, r, h0, st: _Static):
    B, H, L, K = q.shape
    V = v.shape[-1]
    N = L // st.chunk
    grid_chunks, grid, seq, per_chunk, state, params = _layout(st, N, reverse=False)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, grid_chunks=grid_chunks), grid=grid(B, H),
        in_specs=[seq(K), seq(K), seq(V), seq(K), seq(1), state(V, K)],
        out_specs=[seq(V), per_chunk(V, K), state(V, K)],
        out_shape=[jax.ShapeDtypeStruct((B, H, L, V), f32), jax.ShapeDtypeStruct((B, H, N, V, K), f32),
                   jax.ShapeDtypeStruct((B, H, V, K), f32)],
        scratch_shapes=_scratch(grid_chunks, V, K), compiler_params=params, interpret=st.interpret,
    )(q, k, v, b, r, h0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan(q, k, v, b, r, h0, st):
    o, _, hT = _forward(q, k, v, b, r, h0, st)
    return o, hT


def _scan_fwd(q, k, v, b, r, h0, st):
    o, hs, hT = _forward(q, k, v, b, r, h0, st)
    return (o, hT), (q, k, v, b, r, hs)


def _scan_bwd(st, res, cts):
    q, k, v, b, r, hs = res
    do, dhT = cts
    B, H, L, K = q.shape
    V = v.shape[-1]
    N = L // st.chunk
    grid_chunks, grid, seq, per_chunk, state, params = _layout(st, N, reverse=True)
    f32 = jnp.float32
    dq, dk, dv, db, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, st=st, grid_chunks=grid_chunks), grid=grid(B, H),
        in_specs=[seq(K), seq(K), seq(V), seq(K), seq(1), per_chunk(V, K), seq(V), state(V, K)],
        out_specs=[seq(K), seq(K), seq(V), seq(K), state(V, K)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(k.shape, f32),
                   jax.ShapeDtypeStruct(v.shape, f32), jax.ShapeDtypeStruct(b.shape, f32),
                   jax.ShapeDtypeStruct((B, H, V, K), f32)],
        scratch_shapes=_scratch(grid_chunks, V, K), compiler_params=params, interpret=st.interpret,
    )(q, k, v, b, r, hs, do, dhT)
    return dq, dk, dv, db, None, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- public API

def _validate(q, k, v, g, h0, reset, chunk_size):
    from layers import checks
    checks.array("q_BLHK", q, rank=4, kind="f")
    B, L, H, K = q.shape
    checks.array("k_BLHK", k, shape=(B, L, H, K), kind="f")
    checks.array("v_BLHV", v, rank=4, shape=(B, L, H, None), kind="f")
    V = v.shape[-1]
    if g is not None:
        checks.array("g", g, shape=(B, L, H, K) if g.ndim == 4 else (B, L, H), kind="f")
    if h0 is not None:
        checks.array("h0_BHKV", h0, shape=(B, H, K, V), kind="f")
    if reset is not None:
        checks.array("reset_BL", reset, shape=(B, L))
    if not isinstance(chunk_size, int) or chunk_size < 8 or chunk_size & (chunk_size - 1):
        raise ValueError(f"linear_scan: chunk_size must be a power of two >= 8 (kernel tiles), got {chunk_size!r}")


def linear_scan(
        q: "Float[Array, 'B L H K']", k: "Float[Array, 'B L H K']", v: "Float[Array, 'B L H V']",
        g: "Float[Array, 'B L H K'] | Float[Array, 'B L H'] | None" = None,
        h0: "Float[Array, 'B H K V'] | None" = None, reset: "Bool[Array, 'B L'] | None" = None, *,
        scale: float = 1.0, chunk_size: int = 16, interpret: bool | None = None, backend: str | None = None,
) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H K V']"]:
    """o_t = scale * q_t h_t, h_t = diag(exp(g_t)) h_{t-1} + k_t^T v_t (module doc); differentiable
    in q, k, v, g and h0. Returns (o in q's dtype, final state fp32). Assumes g <= 0 (decays).
    interpret: None = interpret on CPU. backend: "gpu" | "tpu" | "cpu" (default: the running one)."""
    backend, interpret = resolve(backend, interpret, "linear_scan")
    _validate(q, k, v, g, h0, reset, chunk_size)
    B, L, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    C = chunk_size
    N = -(-L // C)
    Kp, Vp = K, V
    if backend == "gpu" and not interpret:
        # Triton tiles are powers of two: pad the chunk count and the head dims (zero columns of
        # q, k, v and g add nothing and keep padded state entries at zero).
        N, Kp, Vp = (1 << (n - 1).bit_length() for n in (N, K, V))
    Lp = N * C
    g_BLHK = jnp.zeros((B, L, H, K), f32) if g is None else jnp.broadcast_to(
        g.astype(f32) if g.ndim == 4 else g.astype(f32)[..., None], (B, L, H, K))
    reset_BL = jnp.zeros((B, L), f32) if reset is None else reset.astype(f32)

    def prep(x, width):  # [B, L, H, X] -> padded [B, H, Lp, width] fp32; padded tokens add and decay nothing
        x = jnp.pad(x.astype(f32), [(0, 0), (0, Lp - L), (0, 0), (0, width - x.shape[-1])])
        return jnp.swapaxes(x, 1, 2)

    g_BHNCK = prep(g_BLHK, Kp).reshape(B, H, N, C, Kp)
    b_BHLK = jnp.cumsum(g_BHNCK, axis=3).reshape(B, H, Lp, Kp)
    r_BHL1 = jnp.broadcast_to(jnp.pad(reset_BL, [(0, 0), (0, Lp - L)])[:, None, :, None], (B, H, Lp, 1))
    h0_BHKV = jnp.zeros((B, H, K, V), f32) if h0 is None else h0.astype(f32)
    h0_BHVK = jnp.swapaxes(jnp.pad(h0_BHKV, [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)]), 2, 3)
    st = _Static(chunk=C, backend=backend, interpret=interpret)
    o_BHLV, hT_BHVK = _scan(prep(q, Kp) * scale, prep(k, Kp), prep(v, Vp), b_BHLK, r_BHL1, h0_BHVK, st)
    return (jnp.swapaxes(o_BHLV, 1, 2)[:, :L, :, :V].astype(q.dtype),
            jnp.swapaxes(hT_BHVK, 2, 3)[:, :, :K, :V])


def linear_scan_reference(q, k, v, g=None, h0=None, reset=None, *, scale: float = 1.0):
    """One token at a time (lax.scan), fp32: the definition itself."""
    B, L, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    g_BLHK = jnp.zeros((B, L, H, K), f32) if g is None else jnp.broadcast_to(
        g.astype(f32) if g.ndim == 4 else g.astype(f32)[..., None], (B, L, H, K))
    keep_BL = jnp.ones((B, L), f32) if reset is None else 1.0 - reset.astype(f32)
    h = jnp.zeros((B, H, K, V), f32) if h0 is None else h0.astype(f32)

    def body(h, xs):
        q_t, k_t, v_t, g_t, keep_t = xs
        h = h * jnp.exp(g_t)[..., None] * keep_t[:, None, None, None] + jnp.einsum("BHK,BHV->BHKV", k_t, v_t)
        return h, jnp.einsum("BHK,BHKV->BHV", q_t, h) * scale

    xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g_BLHK, keep_BL))
    h, o_LBHV = jax.lax.scan(body, h, xs)
    return jnp.moveaxis(o_LBHV, 0, 1).astype(q.dtype), h
