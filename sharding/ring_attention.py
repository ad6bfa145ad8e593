"""Ring attention: context parallelism for softmax attention over a `sequence` mesh axis.

Each of the n devices holds a block of the queries and of the keys / values (with their
positions and segment ids). For n rounds a device attends its queries to the K/V block it holds,
folding the result into a running (max, sum, output) online softmax, then passes that block to
its ring neighbour with `ppermute`; after n rounds every query has seen every key, and no device
ever held more than two K/V blocks. Masks are comparisons of the positions carried with the
blocks (layers.attention_core.make_mask), so causal order, sliding windows and packed segments
need no special cases; a block whose mask is empty for this device is skipped (`lax.cond`).

Load balance (causal): with contiguous blocks, device 0's queries see one block and device n-1's
see n. `zigzag` reorders the sequence into 2n chunks so that device i holds chunks i and
2n-1-i: every device then has the same number of unmasked (query, key) pairs. Since masks follow
positions, the reordered tokens need no other change; `unzigzag` restores the output's order.
`ring_attention(..., balance=True)` does this reordering itself, inside the shard_map: device i
holds contiguous chunks 2i and 2i+1, and chunk c belongs to device c (c < n) or 2n-1-c; every
device receives one even and one odd chunk, so two `ppermute`s move the inputs into the zigzag
layout and two move the output back. This is what layers.attention_core.attend uses under the
`cp` rules, so the model keeps its tokens in order (the recurrent layers of a hybrid need that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from layers import attention_core

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


def zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Reorder `axis` (length divisible by 2n) into chunks 0, 2n-1, 1, 2n-2, ...: split into n
    equal blocks, block i holds chunks i and 2n-1-i."""
    L = x.shape[axis]
    if L % (2 * n):
        raise ValueError(f"zigzag: length {L} along axis {axis} must be a multiple of 2 * {n}")
    chunks = jnp.split(x, 2 * n, axis=axis)
    return jnp.concatenate([c for i in range(n) for c in (chunks[i], chunks[2 * n - 1 - i])], axis=axis)


def unzigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Inverse of `zigzag`."""
    chunks = jnp.split(x, 2 * n, axis=axis)
    out = [None] * (2 * n)
    for i in range(n):
        out[i], out[2 * n - 1 - i] = chunks[2 * i], chunks[2 * i + 1]
    return jnp.concatenate(out, axis=axis)


def _block(q_BLGRK, k_BSGK, v_BSGK, mask_BLS, carry, *, scale, softcap):
    """Fold one K/V block into the running (max, denominator, output) of the online softmax."""
    m_BGRL, l_BGRL, o_BGRLK = carry
    logits = jnp.einsum("BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = mask_BLS[:, None, None]
    # The running max only stabilises the exponentials; the result does not depend on it, so it
    # carries no gradient (that also keeps -inf out of the backward pass for fully masked rows).
    blk_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1)
    m_new = jax.lax.stop_gradient(jnp.maximum(m_BGRL, blk_max))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m_safe[..., None]), 0.0)
    rescale = jnp.where(jnp.isfinite(m_BGRL), jnp.exp(m_BGRL - m_safe), 0.0)
    l_new = l_BGRL * rescale + jnp.sum(p, axis=-1)
    o_new = o_BGRLK * rescale[..., None] + jnp.einsum("BGRLS,BSGK->BGRLK", p, v_BSGK.astype(jnp.float32))
    return m_new, l_new, o_new


def _zigzag_perms(n):
    """ppermute pairs moving each device's (first, second) half-block to its zigzag owner."""
    owner = [c if c < n else 2 * n - 1 - c for c in range(2 * n)]
    return [(i, owner[2 * i]) for i in range(n)], [(i, owner[2 * i + 1]) for i in range(n)]


def _to_zigzag(x, axis, n):
    """Local contiguous block (chunks 2i, 2i+1) -> this device's zigzag pair, [even, odd] order
    (positions travel with the tokens, so the order inside a device does not matter)."""
    first, second = jnp.split(x, 2, axis=1)
    to_even, to_odd = _zigzag_perms(n)
    return jnp.concatenate([jax.lax.ppermute(first, axis, to_even), jax.lax.ppermute(second, axis, to_odd)], axis=1)


def _from_zigzag(x, axis, n):
    even, odd = jnp.split(x, 2, axis=1)
    to_even, to_odd = _zigzag_perms(n)
    back = lambda perm: [(dst, src) for src, dst in perm]
    return jnp.concatenate([jax.lax.ppermute(even, axis, back(to_even)), jax.lax.ppermute(odd, axis, back(to_odd))],
                           axis=1)


def _ring(q_BLHK, k_BSGK, v_BSGK, q_pos_BL, k_pos_BS, q_seg_BL, k_seg_BS, *, axis, n, causal, window, scale,
          softcap):
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    R = H // G
    q_BLGRK = q_BLHK.astype(jnp.float32).reshape(B, L, G, R, K)
    perm = [(i, (i + 1) % n) for i in range(n)]
    carry = (jnp.full((B, G, R, L), -jnp.inf, jnp.float32), jnp.zeros((B, G, R, L), jnp.float32),
             jnp.zeros((B, G, R, L, K), jnp.float32))

    def round_(r, state):
        carry, kv = state
        k, v, k_pos, k_seg = kv
        mask = attention_core.make_mask(q_pos_BL, k_pos, causal=causal, window=window, q_seg_BL=q_seg_BL,
                                        k_seg_BS=k_seg)
        carry = jax.lax.cond(jnp.any(mask), lambda c: _block(q_BLGRK, k, v, mask, c, scale=scale, softcap=softcap),
                             lambda c: c, carry)
        # The last round's block needs no further trip.
        kv = jax.lax.cond(r < n - 1, lambda t: jax.lax.ppermute(t, axis, perm), lambda t: t, kv)
        return carry, kv

    carry, _ = jax.lax.fori_loop(0, n, round_, (carry, (k_BSGK, v_BSGK, k_pos_BS, k_seg_BS)))
    _, l_BGRL, o_BGRLK = carry
    o_BGRLK = o_BGRLK / jnp.where(l_BGRL > 0, l_BGRL, 1.0)[..., None]
    return jnp.transpose(o_BGRLK, (0, 3, 1, 2, 4)).reshape(B, L, H, K).astype(q_BLHK.dtype)


def ring_attention(q_BLHK: "Float[Array, 'B L H K']", k_BSGK: "Float[Array, 'B S G K']",
                   v_BSGK: "Float[Array, 'B S G K']", *, q_pos_BL: "Int[Array, 'B L']",
                   k_pos_BS: "Int[Array, 'B S']", q_seg_BL: "Int[Array, 'B L'] | None" = None,
                   k_seg_BS: "Int[Array, 'B S'] | None" = None, mesh: Mesh, axis: str = "sequence",
                   batch_axes: tuple[str, ...] = (), causal: bool = True, window: int | None = None,
                   scale: float | None = None, softcap: float | None = None,
                   balance: bool = False) -> "Float[Array, 'B L H K']":
    """Attention with the sequence split over mesh axis `axis` (and the batch over `batch_axes`);
    same arguments and result as layers.attention_core.attend (no ALiBi). Inputs are in the
    sequence order the caller chose (e.g. `zigzag`-ed); positions say where each token really is.
    balance: move the blocks into the zigzag layout inside the call and the output back (causal
      load balance for inputs in sequence order; lengths a multiple of 2 * the axis size).
    """
    if mesh.shape.get(axis, 1) < 1 or axis not in mesh.shape:
        raise ValueError(f"ring_attention: mesh has no axis {axis!r}; its axes are {dict(mesh.shape)}")
    n = mesh.shape[axis]
    for name, a, dim in (("q_BLHK", q_BLHK, 1), ("k_BSGK", k_BSGK, 1)):
        if a.shape[dim] % n:
            raise ValueError(f"ring_attention: {name} length {a.shape[dim]} must be a multiple of the "
                             f"'{axis}' axis size {n}")
    if q_BLHK.shape[2] % k_BSGK.shape[2]:
        raise ValueError(f"ring_attention: query heads {q_BLHK.shape[2]} must be a multiple of key/value "
                         f"heads {k_BSGK.shape[2]}")
    if balance and (q_BLHK.shape[1] % (2 * n) or k_BSGK.shape[1] % (2 * n)):
        raise ValueError(f"ring_attention: balance=True needs lengths that are multiples of 2 * {n}, got "
                         f"{q_BLHK.shape[1]} and {k_BSGK.shape[1]}")
    scale = q_BLHK.shape[-1] ** -0.5 if scale is None else scale
    if q_seg_BL is None or k_seg_BS is None:
        q_seg_BL = jnp.zeros(q_pos_BL.shape, jnp.int32)
        k_seg_BS = jnp.zeros(k_pos_BS.shape, jnp.int32)
    b = tuple(batch_axes) or None
    seq4, seq2 = PartitionSpec(b, axis, None, None), PartitionSpec(b, axis)

    def body(q, k, v, qp, kp, qs, ks):
        if balance:
            q, k, v, qp, kp, qs, ks = (_to_zigzag(a, axis, n) for a in (q, k, v, qp, kp, qs, ks))
        out = _ring(q, k, v, qp, kp, qs, ks, axis=axis, n=n, causal=causal, window=window, scale=scale,
                    softcap=softcap)
        return _from_zigzag(out, axis, n) if balance else out

    fn = jax.shard_map(body, mesh=mesh, in_specs=(seq4, seq4, seq4, seq2, seq2, seq2, seq2), out_specs=seq4,
                       check_vma=False)
    return fn(q_BLHK, k_BSGK, v_BSGK, q_pos_BL, k_pos_BS, q_seg_BL, k_seg_BS)
