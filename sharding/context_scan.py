"""Context parallelism for the linear-time families: split the sequence, scan locally, pass states.

A decayed linear recurrence S_t = diag(a_t) S_{t-1} + k_t^T v_t is affine in its state, so a
chunk of the sequence acts on the state it receives as S -> A S + U, with A the product of the
chunk's decays (zero if a document starts inside it) and U the state the chunk builds from zero.
With the sequence split over n devices:

  1. each device scans its own chunk from a zero state (any form: chunked, recurrent, a kernel),
     getting its outputs and its (A, U);
  2. the n pairs are all-gathered over the sequence axis and combined by an associative
     (prefix) scan, (A1, U1) then (A2, U2) = (A2 A1, A2 U1 + U2); device i takes the exclusive
     prefix: the state entering its chunk;
  3. each device adds what that state contributes to its outputs: for a token t before the
     chunk's first document start, scale * (q_t * exp(sum of g up to t)) S_in.

The exchanged data per device is one [B, H, K, V] state (plus the decay), independent of the
sequence length, so the sequence can grow with the number of devices (million-token training of
RetNet, GLA, linear attention, Mamba-2-like models). The result equals the unsharded
recurrence, packed inputs (resets) included. `selective_scan` does the same for Mamba-1, whose
per-(channel, state) decay over a stretch of tokens is exp(A * sum of delta).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from layers import linear_recurrence, mamba
from sharding import context

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float


def _combine(first, second):
    """Compose two affine state maps S -> a S + u, `first` applied before `second` (associative;
    a broadcasts against u)."""
    a1, u1 = first
    a2, u2 = second
    return a2 * a1, a2 * u1 + u2


def incoming_state(a, u, h0, axis, then=_combine):
    """(state entering this device's chunk, state after the whole sequence) from every device's
    map (a, u), gathered over `axis` and composed by a prefix scan in sequence order with `then`
    (`first`, `second` -> their composition; `_combine` for diagonal decays), applied to the
    initial state h0 (the same on every device of the axis)."""
    pa, pu = jax.lax.associative_scan(then, (jax.lax.all_gather(a, axis), jax.lax.all_gather(u, axis)))
    i = jax.lax.axis_index(axis)
    prev = jnp.maximum(i - 1, 0)
    # h0 as the constant map (A = 0, U = h0) followed by a prefix: that prefix applied to h0.
    _, s_prev = then((jnp.zeros_like(a), h0), (pa[prev], pu[prev]))
    _, final = then((jnp.zeros_like(a), h0), (pa[-1], pu[-1]))
    return jnp.where(i > 0, s_prev, h0), final


def _local(q_BLHK, k_BLHK, v_BLHV, g_BLHk, h0_BHKV, reset_BL, *, axis, scale, form, chunk_size, impl):
    o_BLHV, u_BHKV = linear_recurrence.decayed_linear_attention(
        q_BLHK, k_BLHK, v_BLHV, g_BLHk[..., 0] if g_BLHk.shape[-1] == 1 else g_BLHk, None, reset_BL,
        scale=scale, form=form, chunk_size=chunk_size, impl=impl)
    g32_BLHk = g_BLHk.astype(jnp.float32)
    # The chunk's decay of an incoming state; a document start inside the chunk erases it.
    no_reset_B = 1.0 - jnp.any(reset_BL, axis=1).astype(jnp.float32)
    a_BHk = jnp.exp(jnp.sum(g32_BLHk, axis=1)) * no_reset_B[:, None, None]
    a_BHK1 = jnp.broadcast_to(a_BHk, u_BHKV.shape[:3])[..., None]
    # Step 2: every device's map, composed in sequence order; exclusive prefix for this device.
    s_in_BHKV, final_BHKV = incoming_state(a_BHK1, u_BHKV, h0_BHKV, axis)
    # Step 3: the incoming state reaches token t decayed by exp(g_1 + ... + g_t), and only until
    # the chunk's first document start.
    first_doc_BL = (jnp.cumsum(reset_BL.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)
    qdec_BLHK = q_BLHK.astype(jnp.float32) * scale * jnp.exp(jnp.cumsum(g32_BLHk, axis=1))
    o_BLHV = o_BLHV.astype(jnp.float32) + jnp.einsum("BLHK,BHKV->BLHV", qdec_BLHK, s_in_BHKV) * first_doc_BL[
        :, :, None, None]
    return o_BLHV.astype(q_BLHK.dtype), final_BHKV


def decayed_linear_attention(
        q_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']", v_BLHV: "Float[Array, 'B L H V']",
        g: "Float[Array, 'B L H K'] | Float[Array, 'B L H'] | None" = None,
        reset_BL: "Bool[Array, 'B L'] | None" = None, *, scale: float, mesh: Mesh, axis: str = "sequence",
        batch_axes: tuple[str, ...] = (), form: str = "chunked", chunk_size: int = 64, impl: str = "auto",
        h0_BHKV: "Float[Array, 'B H K V'] | None" = None,
) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H K V']"]:
    """layers.linear_recurrence.decayed_linear_attention with the sequence split over mesh axis
    `axis`: (outputs, final state). reset_BL marks document starts of the whole sequence
    (layers.segments.starts of the global segment ids); h0_BHKV: initial state (zeros if None)."""
    B, L, H, K = q_BLHK.shape
    context.check_split("context_scan", mesh, axis, L)
    if g is None:
        g_BLHk = jnp.zeros((B, L, H, 1), jnp.float32)
    else:
        g_BLHk = g[..., None] if g.ndim == 3 else g
    reset_BL = jnp.zeros((B, L), bool) if reset_BL is None else reset_BL.astype(bool)
    V = v_BLHV.shape[-1]
    h0_BHKV = jnp.zeros((B, H, K, V), jnp.float32) if h0_BHKV is None else h0_BHKV.astype(jnp.float32)
    b = tuple(batch_axes) or None
    seq4, seq2 = PartitionSpec(b, axis, None, None), PartitionSpec(b, axis)

    def body(q, k, v, g_, h0, r):
        return _local(q, k, v, g_, h0, r, axis=axis, scale=scale, form=form, chunk_size=chunk_size, impl=impl)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(seq4, seq4, seq4, seq4, PartitionSpec(b), seq2),
                       out_specs=(seq4, PartitionSpec(b)), check_vma=False)
    return fn(q_BLHK, k_BLHK, v_BLHV, g_BLHk, h0_BHKV, reset_BL)


def _local_selective(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL, *, axis, mode, chunk_size):
    y_BLE, u_BEN = mamba.selective_scan(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, None, reset_BL, mode=mode,
                                        chunk_size=chunk_size)
    A32_EN = A_EN.astype(jnp.float32)
    # exp(A * sum of delta) is the decay over a stretch of tokens (A < 0, delta > 0: exponent <= 0).
    cum_BLE = jnp.cumsum(delta_BLE.astype(jnp.float32), axis=1)
    no_reset_B = 1.0 - jnp.any(reset_BL, axis=1).astype(jnp.float32)
    a_BEN = jnp.exp(cum_BLE[:, -1, :, None] * A32_EN[None]) * no_reset_B[:, None, None]
    s_in_BEN, final_BEN = incoming_state(a_BEN, u_BEN, h0_BEN, axis)
    first_doc_BL = (jnp.cumsum(reset_BL.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)
    decay_BLEN = jnp.exp(cum_BLE[..., None] * A32_EN[None, None])
    extra_BLE = jnp.einsum("BLN,BLEN,BEN->BLE", C_BLN.astype(jnp.float32), decay_BLEN, s_in_BEN)
    y_BLE = y_BLE.astype(jnp.float32) + extra_BLE * first_doc_BL[:, :, None]
    return y_BLE.astype(u_BLE.dtype), final_BEN


def selective_scan(u_BLE: "Float[Array, 'B L E']", delta_BLE: "Float[Array, 'B L E']", A_EN: "Float[Array, 'E N']",
                   B_BLN: "Float[Array, 'B L N']", C_BLN: "Float[Array, 'B L N']",
                   D_E: "Float[Array, 'E'] | None" = None, reset_BL: "Bool[Array, 'B L'] | None" = None, *,
                   mesh: Mesh, axis: str = "sequence", batch_axes: tuple[str, ...] = (), mode: str = "chunked",
                   chunk_size: int = 64, h0_BEN: "Float[Array, 'B E N'] | None" = None,
                   ) -> tuple["Float[Array, 'B L E']", "Float[Array, 'B E N']"]:
    """layers.mamba.selective_scan with the sequence split over mesh axis `axis`: the same three
    steps, with the chunk map S -> exp(A sum(delta)) S + U per (channel, state index).
    h0_BEN: initial state (zeros if None). Returns (y, final state)."""
    B, L, E = u_BLE.shape
    context.check_split("context_scan", mesh, axis, L)
    reset_BL = jnp.zeros((B, L), bool) if reset_BL is None else reset_BL.astype(bool)
    D_E = jnp.zeros((E,), u_BLE.dtype) if D_E is None else D_E
    h0_BEN = jnp.zeros((B, E, A_EN.shape[1]), jnp.float32) if h0_BEN is None else h0_BEN.astype(jnp.float32)
    b = tuple(batch_axes) or None
    seq3, seq2, rep = PartitionSpec(b, axis, None), PartitionSpec(b, axis), PartitionSpec()

    def body(u, d, A, Bm, Cm, D, h0, r):
        return _local_selective(u, d, A, Bm, Cm, D, h0, r, axis=axis, mode=mode, chunk_size=chunk_size)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(seq3, seq3, rep, seq3, seq3, rep, PartitionSpec(b), seq2),
                       out_specs=(seq3, PartitionSpec(b)), check_vma=False)
    return fn(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL)


# ---------------------------------------------------------------------------------------------
# Dispatch from the layers: each layer's public entry point asks here first.


def dispatch_linear(q_BLHK, k_BLHK, v_BLHV, g, h0_BHKV, reset_BL, *, scale, form, chunk_size, impl):
    """`decayed_linear_attention` over the active sequence axis when the rules split the sequence
    (sharding.context.over_sequence), else None (the caller runs its own code). impl "reference"
    stays unsplit: the yardstick."""
    if impl == "reference":
        return None
    return context.over_sequence(decayed_linear_attention, q_BLHK, q_BLHK, k_BLHK, v_BLHV, g, reset_BL,
                                 scale=scale, form=form, chunk_size=chunk_size, impl=impl, h0_BHKV=h0_BHKV)


def dispatch_selective(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN, reset_BL, *, mode, chunk_size):
    """`selective_scan` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(selective_scan, u_BLE, u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E, reset_BL,
                                 mode=mode, chunk_size=chunk_size, h0_BEN=h0_BEN)
