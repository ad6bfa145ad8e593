"""Causal depthwise 1-D convolution (Mamba, Mamba-2, DeltaNet's short convolutions).

Each channel c: y[t] = b[c] + sum_j w[j, c] * x[t - (W-1) + j]. Decoding keeps the last W-1 inputs
as state; packed documents (segment ids) never see the previous document's inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import segments
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


def param_specs(channels: int, width: int, axis: str, *, use_bias: bool = True) -> dict:
    specs = {"w_WC": ParamSpec((width, channels), ("conv_width", axis), fan_in_normal((0,)))}
    if use_bias:
        specs["b_C"] = ParamSpec((channels,), (axis,), zeros)
    return specs


def init_state(batch_size: int, channels: int, width: int, dtype=jnp.float32) -> "Float[Array, 'B W1 C']":
    return jnp.zeros((batch_size, width - 1, channels), dtype)


def forward(params: dict, x_BLC: "Float[Array, 'B L C']", *, state: "Float[Array, 'B W1 C'] | None" = None,
            segment_ids: "Int[Array, 'B L'] | None" = None):
    """-> (y_BLC, last W-1 inputs [B, W-1, C]). Math in fp32, output in x's dtype."""
    w_WC = params["w_WC"].astype(jnp.float32)
    W = w_WC.shape[0]
    B, L, C = x_BLC.shape
    prev_BW1C = jnp.zeros((B, W - 1, C), jnp.float32) if state is None else state.astype(jnp.float32)
    xp_BTC = jnp.concatenate([prev_BW1C, x_BLC.astype(jnp.float32)], axis=1)  # T = L + W - 1
    if segment_ids is not None:
        # Tap j of output t reads input t-(W-1)+j: drop it when a document starts in between.
        doc_BL = jnp.cumsum(segments.starts(segment_ids, L, B).astype(jnp.int32), axis=1)
        doc_BT = jnp.concatenate([jnp.zeros((B, W - 1), jnp.int32), doc_BL], axis=1)
    y_BLC = jnp.zeros((B, L, C), jnp.float32)
    for j in range(W):
        tap_BLC = xp_BTC[:, j:j + L]
        if segment_ids is not None:
            same_BL1 = (doc_BT[:, j:j + L] == doc_BL)[:, :, None]
            tap_BLC = jnp.where(same_BL1, tap_BLC, 0.0)
        y_BLC = y_BLC + tap_BLC * w_WC[j][None, None, :]
    if "b_C" in params:
        y_BLC = y_BLC + params["b_C"].astype(jnp.float32)[None, None, :]
    new_state = xp_BTC[:, L:].astype(x_BLC.dtype if state is None else state.dtype)
    if segment_ids is not None:
        # The window handed on must not reach back across the last document start.
        last_doc_B11 = doc_BL[:, -1:, None]
        new_state = jnp.where(doc_BT[:, L:, None] == last_doc_B11, new_state, 0)
    return y_BLC.astype(x_BLC.dtype), new_state
