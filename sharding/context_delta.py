"""Context parallelism for recurrences with a matrix transition: (Gated) DeltaNet and RWKV-7.

sharding/context_scan.py splits the sequence for diagonal decays, where a chunk's effect on the
state it receives is an elementwise product. Here each token multiplies the state by a full
K x K matrix (DeltaNet: exp(g_t) (I - beta_t k_t k_t^T); RWKV-7: diag(w_t) + a_t b_t^T), so a
chunk of tokens acts on its incoming state as an affine map S -> A S + U (DeltaNet, state
[K, V]) or S -> S A + U (RWKV-7, state [V, K]) with A a K x K matrix. Nothing closed-form
gives A, but the layer's own scan computes it for free:

  the state's value columns (DeltaNet; rows for RWKV-7) evolve independently of one another,
  each under the same transitions. So run the layer's local scan once with K extra value
  columns: values [v | 0], initial state [0 | I_K]. The first V columns then hold the chunk's
  zero-state outputs and final state U; the last K columns of the final state are A (the
  identity pushed through every transition), and the last K output columns give, per token t,
  what the incoming state contributes: o_t += scale (Abar_t^T q_t)^T S_in for DeltaNet
  (S_in Abar_t r_t for RWKV-7), with Abar_t the transition from the chunk start to t.

Then, as in context_scan: the devices all-gather their (A, U) over the sequence axis, compose
them by an associative prefix scan in sequence order, and each applies the exclusive prefix to
the global initial state to get S_in, and corrects its outputs. A document start inside a chunk
is a reset in the layer's own code: it zeroes the whole state, the identity columns included,
so A becomes 0 and the correction stops at that token, which is the packed-input semantics.

Cost: the local scan runs on V + K value columns instead of V (about twice the work for
K = V), and each device sends one [K, K + V] map per head and batch row, independent of the
sequence length. The forms ("chunked", "recurrent") and chunk sizes pass through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from layers import deltanet, rwkv7
from sharding import context
from sharding.context_scan import incoming_state

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float

_HI = jax.lax.Precision.HIGHEST


def _mm(x, y):
    """Batched matrix product over the last two axes (any leading axes), at full fp32 precision."""
    return jnp.einsum("...ij,...jk->...ik", x, y, precision=_HI)


# Composition of two chunk maps, `first` applied before `second` (both associative).
def _then_left(first, second):
    """S -> A S + U (DeltaNet): A2 (A1 S + U1) + U2."""
    (a1, u1), (a2, u2) = first, second
    return _mm(a2, a1), _mm(a2, u1) + u2


def _then_right(first, second):
    """S -> S A + U (RWKV-7): (S A1 + U1) A2 + U2."""
    (a1, u1), (a2, u2) = first, second
    return _mm(a1, a2), _mm(u1, a2) + u2


# ---------------------------------------------------------------------------------------------
# (Gated) DeltaNet: state S [K, V], S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.


def _local_delta(q_BLHK, k_BLHK, v_BLHV, beta_BLH, g_BLH, h0_BHKV, reset_BL, *, axis, form, chunk_size, scale):
    B, _, H, K = q_BLHK.shape
    V = v_BLHV.shape[-1]
    f32 = jnp.float32
    vaug_BLHW = jnp.concatenate([v_BLHV.astype(f32), jnp.zeros((*v_BLHV.shape[:3], K), f32)], axis=-1)
    eye_KW = jnp.concatenate([jnp.zeros((K, V), f32), jnp.eye(K, dtype=f32)], axis=-1)
    haug_BHKW = jnp.broadcast_to(eye_KW, (B, H, K, V + K))
    # Step 1: the layer's own scan (its reset handling included) on the augmented values.
    oaug_BLHW, saug_BHKW = deltanet.delta_rule(q_BLHK, k_BLHK, vaug_BLHW, beta_BLH, g_BLH, haug_BHKW, reset_BL,
                                               form=form, chunk_size=chunk_size, scale=scale)
    o_BLHV, qa_BLHK = oaug_BLHW[..., :V], oaug_BLHW[..., V:]  # qa_t = scale Abar_t^T q_t
    u_BHKV, a_BHKK = saug_BHKW[..., :V], saug_BHKW[..., V:]
    # Step 2: the state entering this chunk.
    s_in_BHKV, final_BHKV = incoming_state(a_BHKK, u_BHKV, h0_BHKV, axis, _then_left)
    # Step 3: its contribution to every output (zero after a document start, since Abar_t = 0).
    o_BLHV = o_BLHV + jnp.einsum("BLHK,BHKV->BLHV", qa_BLHK, s_in_BHKV, precision=_HI)
    return o_BLHV.astype(v_BLHV.dtype), final_BHKV


def delta_rule(q_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']",
               v_BLHV: "Float[Array, 'B L H V']", beta_BLH: "Float[Array, 'B L H']",
               g_BLH: "Float[Array, 'B L H'] | None" = None, h0_BHKV: "Float[Array, 'B H K V'] | None" = None,
               reset_BL: "Bool[Array, 'B L'] | None" = None, *, mesh: Mesh, axis: str = "sequence",
               batch_axes: tuple[str, ...] = (), form: str = "chunked", chunk_size: int = 64, scale: float = 1.0,
               ) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H K V']"]:
    """layers.deltanet.delta_rule with the sequence split over mesh axis `axis`: (outputs in v's
    dtype, final state fp32). reset_BL marks document starts of the whole sequence."""
    B, L, H, K = q_BLHK.shape
    context.check_split("context_delta.delta_rule", mesh, axis, L)
    V = v_BLHV.shape[-1]
    f32 = jnp.float32
    # No decay is log-decay 0: the same arithmetic as the layer's own default.
    g_BLH = jnp.zeros((B, L, H), f32) if g_BLH is None else g_BLH
    reset_BL = jnp.zeros((B, L), bool) if reset_BL is None else reset_BL.astype(bool)
    h0_BHKV = jnp.zeros((B, H, K, V), f32) if h0_BHKV is None else h0_BHKV.astype(f32)
    b = tuple(batch_axes) or None
    seq4, seq3, seq2 = PartitionSpec(b, axis, None, None), PartitionSpec(b, axis, None), PartitionSpec(b, axis)

    def body(q, k, v, beta, g, h0, r):
        return _local_delta(q, k, v, beta, g, h0, r, axis=axis, form=form, chunk_size=chunk_size, scale=scale)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(seq4, seq4, seq4, seq3, seq3, PartitionSpec(b), seq2),
                       out_specs=(seq4, PartitionSpec(b)), check_vma=False)
    return fn(q_BLHK, k_BLHK, v_BLHV, beta_BLH, g_BLH, h0_BHKV, reset_BL)


# ---------------------------------------------------------------------------------------------
# RWKV-7: state S [V, K], S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t.


def _local_rwkv7(S0_BHVK, r_BLHK, logw_BLHK, k_BLHK, v_BLHV, a_BLHK, b_BLHK, starts_BL, *, axis, form,
                 chunk_size):
    B, _, H, K = r_BLHK.shape
    V = v_BLHV.shape[-1]
    f32 = jnp.float32
    vaug_BLHW = jnp.concatenate([v_BLHV.astype(f32), jnp.zeros((*v_BLHV.shape[:3], K), f32)], axis=-1)
    eye_WK = jnp.concatenate([jnp.zeros((V, K), f32), jnp.eye(K, dtype=f32)], axis=0)
    saug_BHWK = jnp.broadcast_to(eye_WK, (B, H, V + K, K))
    yaug_BLHW, saug_BHWK = rwkv7.recurrence(saug_BHWK, r_BLHK, logw_BLHK, k_BLHK, vaug_BLHW, a_BLHK, b_BLHK,
                                            starts_BL, form=form, chunk_size=chunk_size)
    y_BLHV, ar_BLHK = yaug_BLHW[..., :V], yaug_BLHW[..., V:]  # ar_t = Abar_t r_t
    u_BHVK, a_BHKK = saug_BHWK[:, :, :V], saug_BHWK[:, :, V:]
    s_in_BHVK, final_BHVK = incoming_state(a_BHKK, u_BHVK, S0_BHVK, axis, _then_right)
    y_BLHV = y_BLHV + jnp.einsum("BHVK,BLHK->BLHV", s_in_BHVK, ar_BLHK, precision=_HI)
    return y_BLHV, final_BHVK


def rwkv7_recurrence(S0_BHVK: "Float[Array, 'B H V K']", r_BLHK: "Float[Array, 'B L H K']",
                     logw_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']",
                     v_BLHV: "Float[Array, 'B L H V']", a_BLHK: "Float[Array, 'B L H K']",
                     b_BLHK: "Float[Array, 'B L H K']", starts_BL: "Bool[Array, 'B L']", *, mesh: Mesh,
                     axis: str = "sequence", batch_axes: tuple[str, ...] = (), form: str = "recurrent",
                     chunk_size: int = 16,
                     ) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H V K']"]:
    """layers.rwkv7.recurrence with the sequence split over mesh axis `axis`: (y, final state),
    fp32. starts_BL marks document starts of the whole sequence."""
    context.check_split("context_delta.rwkv7_recurrence", mesh, axis, r_BLHK.shape[1])
    f32 = jnp.float32
    b = tuple(batch_axes) or None
    seq4, seq2 = PartitionSpec(b, axis, None, None), PartitionSpec(b, axis)

    def body(S0, r, logw, k, v, a, bb, starts):
        return _local_rwkv7(S0, r, logw, k, v, a, bb, starts, axis=axis, form=form, chunk_size=chunk_size)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(b),) + (seq4,) * 6 + (seq2,),
                       out_specs=(seq4, PartitionSpec(b)), check_vma=False)
    return fn(S0_BHVK.astype(f32), *(z.astype(f32) for z in (r_BLHK, logw_BLHK, k_BLHK, v_BLHV, a_BLHK, b_BLHK)),
              starts_BL.astype(bool))


# ---------------------------------------------------------------------------------------------
# Dispatch from the layers: each layer's public scan asks here first (same contract as
# context_scan.dispatch_linear: None unless the active rules split the sequence).


def dispatch_delta(q_BLHK, k_BLHK, v_BLHV, beta_BLH, g_BLH, h0_BHKV, reset_BL, *, form, chunk_size, scale):
    """`delta_rule` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(delta_rule, q_BLHK, q_BLHK, k_BLHK, v_BLHV, beta_BLH, g_BLH, h0_BHKV, reset_BL,
                                 form=form, chunk_size=chunk_size, scale=scale)


def dispatch_rwkv7(S0_BHVK, r_BLHK, logw_BLHK, k_BLHK, v_BLHV, a_BLHK, b_BLHK, starts_BL, *, form, chunk_size):
    """`rwkv7_recurrence` over the active sequence axis when the rules split the sequence, else None."""
    return context.over_sequence(rwkv7_recurrence, r_BLHK, S0_BHVK, r_BLHK, logw_BLHK, k_BLHK, v_BLHV, a_BLHK,
                                 b_BLHK, starts_BL, form=form, chunk_size=chunk_size)
