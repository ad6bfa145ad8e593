"""Block-sparse attention for XLA: skip the score blocks that the mask empties.

Causal self-attention spends half of the `[L, S]` score square on entries the mask throws away,
and a sliding window throws away more. `attend_blocked` cuts the queries into blocks of `block`
rows and lets each block see only the key range that can reach it (keys up to the block's end
when causal; no further back than the window), so the skipped blocks are never computed,
stored for the backward pass, or copied through layout transposes, and each tile's scores
stay small enough for the CPU caches (the larger of the two gains; docs/performance.md). Inside a block the mask is
the usual position-based one, so packed segments, padding and odd lengths stay exact.

The key ranges are chosen from token *indices* (self-attention, L == S), while the mask comes
from *positions*. The result equals `attention_core.attend(impl="xla")` whenever the mask is
already empty outside the tiles (the index-order contract): a key later in the row is masked
for an earlier query, and with a window a key more than W - 1 indices back is masked. That
holds for training rows with the default positions 0..L-1 and for packed documents (positions
restart in each contiguous segment, as `zoo.packing` makes them); it does not hold for
arbitrary position arrays (e.g. shuffled orders, or padding that shares a segment id and
position 0), which must use impl="xla". A `lax.cond`
that checked the contract at run time and fell back cost more than the skipping saved on CPU
(docs/performance.md), so the contract is the caller's: `impl="auto"` picks this path only
when the caller passes `attend(index_order=True)` (the attention layer does with its default
positions). `covered` gives the tiles as a mask, for tests and assertions.

Pure functions; `attention_core.attend(impl="xla_blocked")` dispatches here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from layers import attention_core

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float

DEFAULT_BLOCK = 64  # measured on CPU (docs/performance.md): 64 beat 128 and 32 at L 256
# Every tile is its own pair of einsums in the program, so compile time grows with their count
# (llama-tiny's loss + grad at L 1024: 3.5 s CPU for "xla", 13.7 s with 16 tiles). Longer
# sequences get longer tiles instead of more of them; 8 tiles still skip 7/16 of the square.
MAX_TILES = 8


def key_ranges(L: int, S: int, *, block: int, causal: bool, window: int | None,
               sinks: int = 0) -> tuple[tuple[int, int, int, int], ...]:
    """Static `(q_start, q_stop, k_start, k_stop)` per query block: the keys that block may see
    when indices stand for positions. Rows past L (an odd last block) are simply shorter."""
    if block < 1:
        raise ValueError(f"key_ranges: block must be a positive int, got {block!r}")
    ranges = []
    for q0 in range(0, L, block):
        q1 = min(q0 + block, L)
        k0, k1 = 0, S
        if causal:
            k1 = min(q1, S)
        elif window is not None:
            k1 = min(q1 + window - 1, S)
        if window is not None and not sinks:
            # Mistral convention: W keys including the current one, so dist <= W - 1.
            k0 = max(q0 - window + 1, 0)
        ranges.append((q0, q1, k0, k1))
    return tuple(ranges)


def default_block(L: int) -> int:
    """Query rows per tile for a length-L call: DEFAULT_BLOCK, or longer so that there are at
    most MAX_TILES tiles."""
    return max(DEFAULT_BLOCK, -(-L // MAX_TILES))


def covered(ranges, L: int, S: int) -> np.ndarray:
    """The `[L, S]` entries the blocks compute (a static numpy mask)."""
    out = np.zeros((L, S), bool)
    for q0, q1, k0, k1 in ranges:
        out[q0:q1, k0:k1] = True
    return out


# One softmax for every XLA path (its custom derivative is the cheaper one; attention_core).
masked_softmax = attention_core.masked_softmax


def _blocks(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS, *, ranges, scale, softcap):
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    R = H // G
    q_BLGRK = q_BLHK.reshape(B, L, G, R, K)
    outs = []
    for q0, q1, k0, k1 in ranges:
        n = q1 - q0
        logits_BGRNT = jnp.einsum("BNGRK,BTGK->BGRNT", q_BLGRK[:, q0:q1], k_BSGK[:, k0:k1],
                                  preferred_element_type=jnp.float32) * scale
        logits_BGRNT = attention_core._softcap(logits_BGRNT, softcap)
        if bias_BHLS is not None:
            logits_BGRNT = logits_BGRNT + bias_BHLS[:, :, q0:q1, k0:k1].reshape(B, G, R, n, k1 - k0)
        mask_BGRNT = jnp.broadcast_to(mask_BLS[:, None, None, q0:q1, k0:k1], logits_BGRNT.shape)
        p_BGRNT = masked_softmax(logits_BGRNT, mask_BGRNT)
        outs.append(jnp.einsum("BGRNT,BTGK->BNGRK", p_BGRNT.astype(v_BSGK.dtype), v_BSGK[:, k0:k1],
                               preferred_element_type=jnp.float32))
    o_BLGRK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o_BLGRK.reshape(B, L, H, K).astype(q_BLHK.dtype)


def attend_blocked(q_BLHK: "Float[Array, 'B L H K']", k_BSGK: "Float[Array, 'B S G K']",
                   v_BSGK: "Float[Array, 'B S G K']", mask_BLS: "Bool[Array, 'B L S']",
                   bias_BHLS: "Float[Array, 'B H L S'] | None" = None, *, scale: float,
                   softcap: float | None = None, causal: bool = True, window: int | None = None,
                   sinks: int = 0, block: int | None = None) -> "Float[Array, 'B L H K']":
    """Attention with `mask_BLS` (True = may attend) computing only the tiles of `key_ranges`.
    causal / window / sinks choose the tiles, the mask decides within them; the result equals
    `attention_core.attend(impl="xla")` whenever the mask is empty outside the tiles (the
    index-order contract of the module note). With L != S (a cache) every key is one tile.
    block: query rows per tile; default DEFAULT_BLOCK, longer when L needs more than MAX_TILES."""
    B, L, H, K = q_BLHK.shape
    S = k_BSGK.shape[1]
    if block is None:
        block = default_block(L)
    if L == S:
        ranges = key_ranges(L, S, block=block, causal=causal, window=window, sinks=sinks)
    else:
        ranges = ((0, L, 0, S),)
    return _blocks(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS, ranges=ranges, scale=scale, softcap=softcap)
