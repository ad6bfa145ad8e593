"""Mamba-1 selective scan in Pallas (forward and backward), with its reference.

Per batch row, channel e and state index n (fp32 state h [E, N]):

    h_t = exp(delta_t A) * h_{t-1} * (0 if reset_t else 1) + delta_t * B_t * u_t
    y_t = sum_n h_t C_t + D * u_t

the function `layers.mamba.selective_scan` computes in XLA. B_t and C_t are shared by all
channels; the [B, L, E, N] tensors of decays and inputs are never formed in memory.

Kernel design (docs/kernels.md): like the original CUDA kernel, channels are parallel and time is
sequential. A program owns a block of Eb channels; inside it a `fori_loop` walks the tokens with
the state h [N, Eb] (channels on lanes) in registers/vregs. Chunks of C tokens form a sequential
("arbitrary") grid axis with h in VMEM scratch between them (TPU); the forward saves the state
entering each chunk, nothing per token. The backward walks chunks and tokens in reverse with dh
in scratch: it first replays the chunk forward from its saved state into a [C + 1, N, Eb] scratch
buffer, then runs the reverse recurrence (dA accumulates across the chunk axis in scratch).
GPU (Triton) has neither a sequential grid axis nor scratch: one program loops over all chunks
of its channel block, and the backward recomputes h_{t-1} from the chunk's start state for each
token (O(C^2 / 2) steps per chunk instead of O(C): keep C small there). The D * u skip term and
the reductions of dB, dC and dA over channel blocks / batch are left to XLA.
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



@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    block_e: int
    backend: str
    interpret: bool


def _token(t, u_ref, d_ref, b_ref, c_ref, keep_ref, A_NE):
    """Inputs of token t (within the block): rows (1, Eb) and columns (N, 1), and its decay."""
    row = pl.ds(t, 1)
    u_1E, d_1E = u_ref[row, :], d_ref[row, :]
    a_NE = jnp.exp(A_NE * d_1E) * keep_ref[t]
    return u_1E, d_1E, b_ref[t], c_ref[t], a_NE


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(u_ref, d_ref, b_ref, c_ref, keep_ref, A_ref, h0_ref, y_ref, hs_ref, hT_ref, *scratch,
                st: _Static, grid_chunks: bool):
    C = st.chunk
    A_NE = A_ref[...]
    if grid_chunks:
        n, h_scr = pl.program_id(2), scratch[0]

        @pl.when(n == 0)
        def _():
            h_scr[...] = h0_ref[...]
        h_NE = h_scr[...]
    else:
        h_NE = h0_ref[...]

    def chunk(c, h_NE):
        hs_ref[c] = h_NE

        def token(t, h_NE):
            u_1E, d_1E, b_N1, c_N1, a_NE = _token(t, u_ref, d_ref, b_ref, c_ref, keep_ref, A_NE)
            h_NE = a_NE * h_NE + b_N1 * (d_1E * u_1E)
            y_ref[pl.ds(t, 1), :] = jnp.sum(h_NE * c_N1, axis=0, keepdims=True)
            return h_NE
        return jax.lax.fori_loop(c * C, c * C + C, token, h_NE)

    h_NE = jax.lax.fori_loop(0, u_ref.shape[0] // C, chunk, h_NE)
    if grid_chunks:
        h_scr[...] = h_NE

        @pl.when(n == pl.num_programs(2) - 1)
        def _():
            hT_ref[...] = h_NE
    else:
        hT_ref[...] = h_NE


def _bwd_kernel(u_ref, d_ref, b_ref, c_ref, keep_ref, A_ref, hs_ref, dy_ref, dhT_ref,
                du_ref, dd_ref, db_ref, dc_ref, dA_ref, dh0_ref, *scratch, st: _Static, grid_chunks: bool):
    C = st.chunk
    A_NE = A_ref[...]
    n_local = u_ref.shape[0] // C
    if grid_chunks:
        n, dh_scr, dA_scr, hbuf = pl.program_id(2), *scratch

        @pl.when(n == 0)
        def _():
            dh_scr[...] = dhT_ref[...]
            dA_scr[...] = jnp.zeros(dA_scr.shape, jnp.float32)
        carry = (dh_scr[...], dA_scr[...])
    else:
        carry = (dhT_ref[...], jnp.zeros(A_NE.shape, jnp.float32))

    def step_forward(t, h_NE):
        u_1E, d_1E, b_N1, _, a_NE = _token(t, u_ref, d_ref, b_ref, c_ref, keep_ref, A_NE)
        return a_NE * h_NE + b_N1 * (d_1E * u_1E)

    def chunk(i, carry):
        c = n_local - 1 - i
        t0 = c * C
        if grid_chunks:
            # Replay the chunk: hbuf[s] = state after token t0 + s - 1 (hbuf[0]: entering the chunk).
            hbuf[0] = hs_ref[c]

            def replay(s, h_NE):
                h_NE = step_forward(t0 + s, h_NE)
                hbuf[s + 1] = h_NE
                return h_NE
            jax.lax.fori_loop(0, C, replay, hs_ref[c])
            prev = lambda t: hbuf[t - t0]  # noqa: E731
        else:
            prev = lambda t: jax.lax.fori_loop(t0, t, step_forward, hs_ref[c])  # noqa: E731

        def token(s, carry):
            dh_NE, dA_NE = carry
            t = t0 + C - 1 - s
            u_1E, d_1E, b_N1, c_N1, a_NE = _token(t, u_ref, d_ref, b_ref, c_ref, keep_ref, A_NE)
            hp_NE = prev(t)
            h_NE = a_NE * hp_NE + b_N1 * (d_1E * u_1E)
            dy_1E = dy_ref[pl.ds(t, 1), :]
            dh_NE = dh_NE + c_N1 * dy_1E
            dc_ref[t] = jnp.sum(h_NE * dy_1E, axis=1, keepdims=True)
            db_ref[t] = jnp.sum(dh_NE * (d_1E * u_1E), axis=1, keepdims=True)
            dx_1E = jnp.sum(dh_NE * b_N1, axis=0, keepdims=True)          # d(delta * u)
            dlog_NE = dh_NE * hp_NE * a_NE                                # d(delta * A)
            du_ref[pl.ds(t, 1), :] = dx_1E * d_1E
            dd_ref[pl.ds(t, 1), :] = dx_1E * u_1E + jnp.sum(dlog_NE * A_NE, axis=0, keepdims=True)
            return dh_NE * a_NE, dA_NE + dlog_NE * d_1E
        return jax.lax.fori_loop(0, C, token, carry)

    dh_NE, dA_NE = jax.lax.fori_loop(0, n_local, chunk, carry)
    if grid_chunks:
        dh_scr[...], dA_scr[...] = dh_NE, dA_NE

        @pl.when(n == pl.num_programs(2) - 1)
        def _():
            dh0_ref[...], dA_ref[...] = dh_NE, dA_NE
    else:
        dh0_ref[...], dA_ref[...] = dh_NE, dA_NE


# ----------------------------------------------------------------------------- calls

def _layout(st: _Static, N_chunks: int, Ns: int, reverse: bool):
    grid_chunks = st.backend != "gpu"
    C, Eb = st.chunk, st.block_e
    if grid_chunks:
        cid = (lambda n: N_chunks - 1 - n) if reverse else (lambda n: n)
        rows = pl.BlockSpec((None, C, Eb), lambda b, e, n: (b, cid(n), e))
        cols = pl.BlockSpec((None, C, Ns, 1), lambda b, e, n: (b, cid(n), 0, 0))
        keep = pl.BlockSpec((None, C, 1, 1), lambda b, e, n: (b, cid(n), 0, 0))
        states = pl.BlockSpec((None, 1, Ns, Eb), lambda b, e, n: (b, cid(n), 0, e))
        state = pl.BlockSpec((None, Ns, Eb), lambda b, e, n: (b, 0, e))
        A = pl.BlockSpec((Ns, Eb), lambda b, e, n: (0, e))
        per_block_cols = pl.BlockSpec((None, None, C, Ns, 1), lambda b, e, n: (b, e, cid(n), 0, 0))
        grid = lambda B, nE: (B, nE, N_chunks)  # noqa: E731
    else:
        Lp = N_chunks * C
        rows = pl.BlockSpec((None, Lp, Eb), lambda b, e: (b, 0, e))
        cols = pl.BlockSpec((None, Lp, Ns, 1), lambda b, e: (b, 0, 0, 0))
        keep = pl.BlockSpec((None, Lp, 1, 1), lambda b, e: (b, 0, 0, 0))
        states = pl.BlockSpec((None, N_chunks, Ns, Eb), lambda b, e: (b, 0, 0, e))
        state = pl.BlockSpec((None, Ns, Eb), lambda b, e: (b, 0, e))
        A = pl.BlockSpec((Ns, Eb), lambda b, e: (0, e))
        per_block_cols = pl.BlockSpec((None, None, Lp, Ns, 1), lambda b, e: (b, e, 0, 0, 0))
        grid = lambda B, nE: (B, nE)  # noqa: E731
    if st.interpret:
        params = None
    elif st.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    else:
        from jax.experimental.pallas import triton as pl_triton
        params = pl_triton.CompilerParams(num_warps=4, num_stages=1)
    return grid_chunks, grid, rows, cols, keep, states, state, A, per_block_cols, params


def _forward(u, d, b, c, keep, A, h0, st: _Static):
    Bsz, Lp, Ep = u.shape
    Ns = A.shape[0]
    N_chunks, nE = Lp // st.chunk, Ep // st.block_e
    grid_chunks, grid, rows, cols, keepspec, states, state, Aspec, _, params = _layout(st, N_chunks, Ns, False)
    scratch = ()
    if grid_chunks:
        from jax.experimental.pallas import tpu as pltpu
        scratch = (pltpu.VMEM((Ns, st.block_e), jnp.float32),)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, grid_chunks=grid_chunks), grid=grid(Bsz, nE),
        in_specs=[rows, rows, cols, cols, keepspec, Aspec, state], out_specs=[rows, states, state],
        out_shape=[jax.ShapeDtypeStruct((Bsz, Lp, Ep), f32), jax.ShapeDtypeStruct((Bsz, N_chunks, Ns, Ep), f32),
                   jax.ShapeDtypeStruct((Bsz, Ns, Ep), f32)],
        scratch_shapes=scratch, compiler_params=params, interpret=st.interpret,
    )(u, d, b, c, keep, A, h0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scan(u, d, b, c, keep, A, h0, st):
    y, _, hT = _forward(u, d, b, c, keep, A, h0, st)
    return y, hT


def _scan_fwd(u, d, b, c, keep, A, h0, st):
    y, hs, hT = _forward(u, d, b, c, keep, A, h0, st)
    return (y, hT), (u, d, b, c, keep, A, hs)


def _scan_bwd(st, res, cts):
    u, d, b, c, keep, A, hs = res
    dy, dhT = cts
    Bsz, Lp, Ep = u.shape
    Ns = A.shape[0]
    N_chunks, nE = Lp // st.chunk, Ep // st.block_e
    grid_chunks, grid, rows, cols, keepspec, states, state, Aspec, pbc, params = _layout(st, N_chunks, Ns, True)
    scratch = ()
    if grid_chunks:
        from jax.experimental.pallas import tpu as pltpu
        scratch = (pltpu.VMEM((Ns, st.block_e), jnp.float32), pltpu.VMEM((Ns, st.block_e), jnp.float32),
                   pltpu.VMEM((st.chunk + 1, Ns, st.block_e), jnp.float32))
    f32 = jnp.float32
    # dA is accumulated per (batch row, channel block): its block is the state spec.
    du, dd, db_parts, dc_parts, dA_parts, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, st=st, grid_chunks=grid_chunks), grid=grid(Bsz, nE),
        in_specs=[rows, rows, cols, cols, keepspec, Aspec, states, rows, state],
        out_specs=[rows, rows, pbc, pbc, state, state],
        out_shape=[jax.ShapeDtypeStruct(u.shape, f32), jax.ShapeDtypeStruct(d.shape, f32),
                   jax.ShapeDtypeStruct((Bsz, nE, Lp, Ns, 1), f32), jax.ShapeDtypeStruct((Bsz, nE, Lp, Ns, 1), f32),
                   jax.ShapeDtypeStruct((Bsz, Ns, Ep), f32), jax.ShapeDtypeStruct((Bsz, Ns, Ep), f32)],
        scratch_shapes=scratch, compiler_params=params, interpret=st.interpret,
    )(u, d, b, c, keep, A, hs, dy, dhT)
    return du, dd, db_parts.sum(axis=1), dc_parts.sum(axis=1), None, dA_parts.sum(axis=0), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- public API

def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def selective_scan(u: "Float[Array, 'B L E']", delta: "Float[Array, 'B L E']", A: "Float[Array, 'E N']",
                   B: "Float[Array, 'B L N']", C: "Float[Array, 'B L N']", D: "Float[Array, 'E'] | None" = None,
                   h0: "Float[Array, 'B E N'] | None" = None, reset: "Bool[Array, 'B L'] | None" = None, *,
                   chunk_size: int = 16, block_e: int | None = None, interpret: bool | None = None,
                   backend: str | None = None) -> tuple["Float[Array, 'B L E']", "Float[Array, 'B E N']"]:
    """The Mamba-1 recurrence (module doc); same arguments and results as
    `layers.mamba.selective_scan`: (y in u's dtype, final state fp32), differentiable in every
    float input. block_e: channels per program (default 128 on TPU (lanes), 64 on GPU, 8 on CPU,
    capped by E). interpret: None = interpret on CPU."""
    from layers import checks
    backend, interpret = resolve(backend, interpret, "selective_scan")
    checks.array("u", u, rank=3, kind="f")
    Bsz, L, E = u.shape
    checks.array("A", A, rank=2, kind="f", shape=(E, None))
    N = A.shape[1]
    checks.array("delta", delta, kind="f", shape=(Bsz, L, E))
    checks.array("B", B, kind="f", shape=(Bsz, L, N))
    checks.array("C", C, kind="f", shape=(Bsz, L, N))
    if D is not None:
        checks.array("D", D, kind="f", shape=(E,))
    if h0 is not None:
        checks.array("h0", h0, kind="f", shape=(Bsz, E, N))
    if reset is not None:
        checks.array("reset", reset, shape=(Bsz, L))
    if not isinstance(chunk_size, int) or chunk_size < 8 or chunk_size & (chunk_size - 1):
        raise ValueError(f"selective_scan: chunk_size must be a power of two >= 8, got {chunk_size!r}")
    Eb = block_e or {"tpu": 128, "gpu": 64, "cpu": 8}[backend]
    if not isinstance(Eb, int) or Eb < 1 or Eb & (Eb - 1):
        raise ValueError(f"selective_scan: block_e must be a power of two, got {block_e!r}")
    Eb = min(Eb, _pow2(E))
    Ep = -(-E // Eb) * Eb
    Ns = _pow2(N) if backend == "gpu" else N
    n_chunks = -(-L // chunk_size)
    if backend == "gpu" and not interpret:
        n_chunks = _pow2(n_chunks)  # Triton tiles are powers of two
    Lp = n_chunks * chunk_size
    f32 = jnp.float32

    def pad(x, widths):
        return jnp.pad(x.astype(f32), widths)

    # Padded tokens: delta = 0 (decay 1, no input), keep = 1; padded channels and states: A = 0,
    # u = 0 and B = C = 0, so they stay zero and contribute nothing.
    u_p = pad(u, [(0, 0), (0, Lp - L), (0, Ep - E)])
    d_p = pad(delta, [(0, 0), (0, Lp - L), (0, Ep - E)])
    b_p = pad(B, [(0, 0), (0, Lp - L), (0, Ns - N)])[..., None]
    c_p = pad(C, [(0, 0), (0, Lp - L), (0, Ns - N)])[..., None]
    keep = jnp.ones((Bsz, L), f32) if reset is None else 1.0 - reset.astype(f32)
    keep_p = jnp.pad(keep, [(0, 0), (0, Lp - L)], constant_values=1.0)[:, :, None, None]
    A_NE = pad(A, [(0, Ep - E), (0, Ns - N)]).T
    if h0 is None:
        h0_NE = jnp.zeros((Bsz, Ns, Ep), f32)
    else:
        h0_NE = jnp.swapaxes(pad(h0, [(0, 0), (0, Ep - E), (0, Ns - N)]), 1, 2)
    st = _Static(chunk=chunk_size, block_e=Eb, backend=backend, interpret=interpret)
    y, hT = _scan(u_p, d_p, b_p, c_p, keep_p, A_NE, h0_NE, st)
    y = y[:, :L, :E]
    if D is not None:
        y = y + u.astype(f32) * D.astype(f32)[None, None, :]
    return y.astype(u.dtype), jnp.swapaxes(hT, 1, 2)[:, :E, :N]


def selective_scan_reference(u, delta, A, B, C, D=None, h0=None, reset=None):
    """One token at a time (lax.scan), fp32: the definition itself."""
    Bsz, L, E = u.shape
    N = A.shape[1]
    f32 = jnp.float32
    keep = jnp.ones((Bsz, L), f32) if reset is None else 1.0 - reset.astype(f32)
    h = jnp.zeros((Bsz, E, N), f32) if h0 is None else h0.astype(f32)

    def body(h, xs):
        u_t, d_t, b_t, c_t, k_t = xs
        a = jnp.exp(d_t[:, :, None] * A.astype(f32)[None]) * k_t[:, None, None]
        h = a * h + (d_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, c_t)

    xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (u, delta, B, C, keep))
    h, y = jax.lax.scan(body, h, xs)
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + u.astype(f32) * D.astype(f32)[None, None, :]
    return y.astype(u.dtype), h
