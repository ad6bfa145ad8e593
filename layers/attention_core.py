"""The attention math, in one function that every attention layer calls.

`attend` takes queries, keys and values with their token positions (and optional segment ids)
and builds the mask from them: causal order, sliding window, packed-sequence segments and empty
cache slots (position < 0) are all comparisons of positions, so a training batch, a prefill and a
one-token decode step go through the same code. `impl` picks the implementation:

- "xla": grouped einsums; K/V heads are never repeated to the query heads (GQA/MQA for free).
- "reference": the slow obvious version (K/V repeated per head); the yardstick in tests.
- "pallas": the flash-attention kernel registered by `pallas_kernels` (interpret mode on CPU).
- "auto": "pallas" on GPU/TPU when there is no score bias and K <= 256; elsewhere "xla_blocked" when the
  caller vouches for index order (`index_order=True`), the attention is causal or windowed and
  L == S >= AUTO_BLOCKED_MIN_LEN; else "xla".
- "xla_blocked": "xla" computing only the score blocks the mask can keep (layers/blocked_attention.py).

Context parallelism: when the active sharding rules split the sequence over a mesh axis
(`sharding.use_rules(mesh, "cp")`), a full-sequence call (keys as long as queries, no score
bias, ALiBi or sinks, impl other than "reference") runs as ring attention over that axis
(sharding.ring_attention); everything else keeps the paths above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

IMPLS = ("xla", "reference", "pallas", "auto", "xla_blocked")
# "auto" takes the blocked path from this length on (at least two 64-row tiles): measured
# 57 -> 24.5 ms per layer's core fwd+bwd at L 256 on CPU (docs/performance.md); below two
# tiles it is the "xla" path anyway.
AUTO_BLOCKED_MIN_LEN = 128
# The flash kernel's largest head dim (pallas_kernels.flash_attention.MAX_HEAD_DIM, not imported
# here to keep kernels off the layer's import path): "auto" keeps larger heads on XLA.
PALLAS_MAX_HEAD_DIM = 256

# Kernels register themselves here (pallas_kernels imports stay out of the layer's import path).
KERNELS: dict[str, Callable] = {}


def make_mask(q_pos_BL: "Int[Array, 'B L']", k_pos_BS: "Int[Array, 'B S']", *,
              causal: bool, window: int | None,
              q_seg_BL: "Int[Array, 'B L'] | None" = None,
              k_seg_BS: "Int[Array, 'B S'] | None" = None, sinks: int = 0) -> "Bool[Array, 'B L S']":
    """True where query l may attend key s. Keys with negative position are empty slots.
    sinks: with a window, keys at positions < sinks stay visible beyond it (StreamingLLM)."""
    q = q_pos_BL[:, :, None]
    k = k_pos_BS[:, None, :]
    mask = jnp.broadcast_to(k >= 0, (q.shape[0], q.shape[1], k.shape[2]))
    if causal:
        mask = mask & (k <= q)
    if window is not None:
        # Mistral convention: W keys including the current one.
        dist = (q - k) if causal else jnp.abs(q - k)
        mask = mask & ((dist < window) | (k < sinks))
    if q_seg_BL is not None and k_seg_BS is not None:
        mask = mask & (q_seg_BL[:, :, None] == k_seg_BS[:, None, :])
    return mask


def alibi_bias(slopes_H: "Float[Array, 'H']", q_pos_BL, k_pos_BS, *, causal: bool) -> "Float[Array, 'B H L S']":
    dist_BLS = (q_pos_BL[:, :, None] - k_pos_BS[:, None, :]).astype(jnp.float32)
    if not causal:
        dist_BLS = jnp.abs(dist_BLS)
    return -slopes_H.astype(jnp.float32)[None, :, None, None] * dist_BLS[:, None, :, :]


def masked_softmax_autodiff(logits: "Float[Array, '*b S']", mask: "Bool[Array, '*b S']") -> "Float[Array, '*b S']":
    """fp32 softmax over the last axis where `mask`; rows with no allowed key give zeros, not NaN.
    Differentiated by autodiff: the reference path's yardstick for `masked_softmax`."""
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(logits - row_max)  # exp(-inf) = 0 at masked keys
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


@jax.custom_jvp
def masked_softmax(logits: "Float[Array, '*b S']", mask: "Bool[Array, '*b S']") -> "Float[Array, '*b S']":
    """`masked_softmax_autodiff` with the softmax's own derivative. Autodiff through the
    where / max / exp / divide chain keeps and revisits several score-sized tensors, while
    dp = p * (dx - sum(p * dx)) needs only p (81 -> 57 ms per layer's attention core on CPU,
    docs/performance.md). Used by the "xla" and "xla_blocked" paths."""
    return masked_softmax_autodiff(logits, mask)


@masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
    logits, mask = primals
    dlogits = tangents[0]
    p = masked_softmax(logits, mask)
    # Masked entries have p = 0, so their (meaningless) tangents drop out.
    return p, p * (dlogits - jnp.sum(p * dlogits, axis=-1, keepdims=True))


def _softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def attend(q_BLHK: "Float[Array, 'B L H K']", k_BSGK: "Float[Array, 'B S G K']",
           v_BSGK: "Float[Array, 'B S G K']", *,
           q_pos_BL: "Int[Array, 'B L']", k_pos_BS: "Int[Array, 'B S']",
           q_seg_BL: "Int[Array, 'B L'] | None" = None, k_seg_BS: "Int[Array, 'B S'] | None" = None,
           causal: bool = True, window: int | None = None, softcap: float | None = None,
           scale: float | None = None, alibi_slopes_H: "Float[Array, 'H'] | None" = None,
           bias_BHLS: "Float[Array, 'B H L S'] | None" = None,
           sinks: int = 0, impl: str = "xla", index_order: bool = False) -> "Float[Array, 'B L H K']":
    """Scaled dot-product attention; H query heads share G = H / R key/value heads.
    bias_BHLS: an additive score bias (e.g. T5's relative position bias), added after scaling.
    index_order: the caller guarantees the index-order contract of layers/blocked_attention.py
      (e.g. positions 0..L-1 in each row, segments or not), so "auto" may pick "xla_blocked"."""
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    if H % G:
        raise ValueError(f"attend: query heads H={H} must be a multiple of key/value heads G={G}")
    if k_BSGK.shape != v_BSGK.shape:
        raise ValueError(f"attend: k shape {k_BSGK.shape} != v shape {v_BSGK.shape}")
    if impl not in IMPLS:
        raise ValueError(f"attend: impl must be one of {IMPLS}, got {impl!r}")
    scale = K ** -0.5 if scale is None else scale
    if impl != "reference" and bias_BHLS is None and alibi_slopes_H is None and not sinks:
        ring = _context_parallel(q_BLHK, k_BSGK, v_BSGK, q_pos_BL, k_pos_BS, q_seg_BL, k_seg_BS,
                                 causal=causal, window=window, softcap=softcap, scale=scale)
        if ring is not None:
            return ring
    mask_BLS = make_mask(q_pos_BL, k_pos_BS, causal=causal, window=window,
                         q_seg_BL=q_seg_BL, k_seg_BS=k_seg_BS, sinks=sinks)
    if sinks and impl == "auto":
        impl = "xla"  # the kernel builds its own masks and knows no attention sinks
    if sinks and impl == "pallas":
        raise ValueError("attend: impl='pallas' does not support attention sinks; use impl='xla'")
    if alibi_slopes_H is not None:
        alibi_BHLS = alibi_bias(alibi_slopes_H, q_pos_BL, k_pos_BS, causal=causal)
        bias_BHLS = alibi_BHLS if bias_BHLS is None else alibi_BHLS + bias_BHLS.astype(jnp.float32)
    if impl == "auto":  # the kernel where it runs natively and supports the case
        if jax.default_backend() in ("gpu", "tpu") and bias_BHLS is None and K <= PALLAS_MAX_HEAD_DIM:
            impl = "pallas"
        elif (index_order and L == k_BSGK.shape[1] >= AUTO_BLOCKED_MIN_LEN
              and (causal or window is not None)):
            impl = "xla_blocked"
        else:
            impl = "xla"
    if impl == "pallas":
        if "pallas" not in KERNELS:
            import pallas_kernels  # noqa: F401  (importing it registers its kernels here)
        # The kernel builds its masks from positions and segment ids per block, never [B, L, S].
        return KERNELS["pallas"](q_BLHK, k_BSGK, v_BSGK, q_pos_BL=q_pos_BL, k_pos_BS=k_pos_BS,
                                 q_seg_BL=q_seg_BL, k_seg_BS=k_seg_BS, causal=causal, window=window,
                                 bias_BHLS=bias_BHLS, scale=scale, softcap=softcap)
    if impl == "xla_blocked":  # skips fully masked score blocks; layers/blocked_attention.py
        from layers import blocked_attention
        return blocked_attention.attend_blocked(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS, scale=scale,
                                                softcap=softcap, causal=causal, window=window, sinks=sinks)
    if impl == "reference":
        return attend_reference(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS, scale=scale, softcap=softcap)
    return _attend_grouped(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS, scale=scale, softcap=softcap)


def _context_parallel(q_BLHK, k_BSGK, v_BSGK, q_pos_BL, k_pos_BS, q_seg_BL, k_seg_BS, *, causal, window,
                      softcap, scale):
    """Ring attention when the active sharding rules split the sequence over a mesh axis (the
    one place this layer looks at the mesh; sharding.context.sequence_split), else None.
    Queries and keys of equal length only: a decode step against a longer cache keeps the
    gathered path. Causal inputs are load-balanced (zigzag) inside the ring call."""
    B, L = q_BLHK.shape[:2]
    if k_BSGK.shape[1] != L:
        return None
    from sharding import context  # lazy: sharding imports layers
    split = context.sequence_split(B, L)
    if split is None:
        return None
    from sharding.ring_attention import ring_attention
    mesh, axis, batch_axes = split
    balance = causal and L % (2 * mesh.shape[axis]) == 0
    return ring_attention(q_BLHK, k_BSGK, v_BSGK, q_pos_BL=q_pos_BL, k_pos_BS=k_pos_BS, q_seg_BL=q_seg_BL,
                          k_seg_BS=k_seg_BS, mesh=mesh, axis=axis, batch_axes=batch_axes, causal=causal,
                          window=window, scale=scale, softcap=softcap, balance=balance)


def _attend_grouped(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS, *, scale, softcap):
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    R = H // G
    q_BLGRK = q_BLHK.reshape(B, L, G, R, K)
    logits_BGRLS = jnp.einsum("BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK,
                              preferred_element_type=jnp.float32) * scale
    logits_BGRLS = _softcap(logits_BGRLS, softcap)
    if bias_BHLS is not None:
        logits_BGRLS = logits_BGRLS + bias_BHLS.reshape(B, G, R, L, -1)
    p_BGRLS = masked_softmax(logits_BGRLS, mask_BLS[:, None, None, :, :])
    o_BLGRK = jnp.einsum("BGRLS,BSGK->BLGRK", p_BGRLS.astype(v_BSGK.dtype), v_BSGK,
                         preferred_element_type=jnp.float32)
    return o_BLGRK.reshape(B, L, H, K).astype(q_BLHK.dtype)


def attend_reference(q_BLHK, k_BSGK, v_BSGK, mask_BLS, bias_BHLS=None, *, scale, softcap=None):
    """Materialise the per-head K/V and the full score matrix; all math in fp32."""
    H, G = q_BLHK.shape[2], k_BSGK.shape[2]
    k_BSHK = jnp.repeat(k_BSGK.astype(jnp.float32), H // G, axis=2)
    v_BSHK = jnp.repeat(v_BSGK.astype(jnp.float32), H // G, axis=2)
    logits_BHLS = jnp.einsum("BLHK,BSHK->BHLS", q_BLHK.astype(jnp.float32), k_BSHK) * scale
    logits_BHLS = _softcap(logits_BHLS, softcap)
    if bias_BHLS is not None:
        logits_BHLS = logits_BHLS + bias_BHLS
    p_BHLS = masked_softmax_autodiff(logits_BHLS, mask_BLS[:, None, :, :])
    return jnp.einsum("BHLS,BSHK->BLHK", p_BHLS, v_BSHK).astype(q_BLHK.dtype)


def _write(cache_BT, new_BL, index_B):
    """Write each row's new entries at that row's own offset."""
    def one(c, n, i):
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, axis=0)
    return jax.vmap(one)(cache_BT, new_BL, index_B)


def cache_append(state: dict, entries: dict, positions_BL, segment_ids_BL=None) -> dict:
    """The KV-cache update shared by every attention mixer: write `entries` (name -> [B, L, ...])
    at each row's next slot, record each slot's logical position (-1 for padding, segment id 0)
    in `pos_BT`, and advance `index_B`. Masks are then built from `pos_BT` alone."""
    slot_pos_BL = positions_BL if segment_ids_BL is None else jnp.where(segment_ids_BL > 0, positions_BL, -1)
    index_B = state["index_B"]
    new_state = {name: _write(state[name], value, index_B) for name, value in entries.items()}
    new_state["pos_BT"] = _write(state["pos_BT"], slot_pos_BL, index_B)
    new_state["index_B"] = index_B + positions_BL.shape[1]
    return new_state


def ring_slots(positions_BL, *, sinks: int, window: int):
    """Rolling-cache slot of each logical position: the first `sinks` positions keep their own
    slots, later ones cycle through `window` slots after them."""
    return jnp.where(positions_BL < sinks, positions_BL, sinks + (positions_BL - sinks) % window)


def cache_write_rolling(state: dict, entries: dict, positions_BL, segment_ids_BL=None, *, sinks: int,
                        window: int) -> dict:
    """The rolling-cache update (attention sinks + recent window, `sinks + window` slots): a token
    is written at its ring slot when it is real (segment id != 0) and stays visible to later
    queries (a sink, or among its row's last `window` positions); others are dropped, so slots
    never collide. `pos_BT` records each slot's logical position; `next_pos_B` the next one."""
    T = state["pos_BT"].shape[1]
    real_BL = positions_BL >= 0 if segment_ids_BL is None else (segment_ids_BL > 0) & (positions_BL >= 0)
    last_B1 = jnp.max(jnp.where(real_BL, positions_BL, -1), axis=1, keepdims=True)
    keep_BL = real_BL & ((positions_BL < sinks) | (positions_BL > last_B1 - window))
    slot_BL = jnp.where(keep_BL, ring_slots(positions_BL, sinks=sinks, window=window), T)
    rows_B1 = jnp.arange(positions_BL.shape[0])[:, None]
    new_state = {name: state[name].at[rows_B1, slot_BL].set(value.astype(state[name].dtype), mode="drop")
                 for name, value in entries.items()}
    new_state["pos_BT"] = state["pos_BT"].at[rows_B1, slot_BL].set(positions_BL, mode="drop")
    new_state["next_pos_B"] = jnp.maximum(state["next_pos_B"], last_B1[:, 0] + 1)
    return new_state
