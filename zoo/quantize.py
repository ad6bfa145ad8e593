"""Quantisation for decoding: weight-only int8 projections and the int8 KV cache option.

Weights: every matrix (two or more axes besides `layers` and `expert`) is stored as int8 with
one fp32 scale per output channel (absmax over its input axes / 127); vectors, norm scales,
biases and fp32-pinned parameters (`keep_dtype`: decay rates, A_log) stay as they are. The input
(contraction) axes come from the logical axis names of the specs: a leading "embed" axis is the
input of a projection out of the model width, a trailing "embed" axis marks a projection back
into it (its other axes are the input), vocabulary tables keep one scale per token (which is
per output channel for the unembedding too), and anything else contracts its first axis.

The quantised tree dequantises at the start of each jitted call (`dequantize`, used by
`zoo.generate` and `zoo.speculative`, which accept either tree): weights rest in memory at about
a quarter of their fp32 bytes (between calls, on transfer, in a checkpoint), while a call
materialises its fp32 copy once, outside the decode loop, so peak memory during the call does
not shrink. `memory_report` measures both with the compiler's memory analysis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import params as P
from zoo import model

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

BATCH_AXES = ("layers", "expert")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """values: int8, the weight's shape; scale: fp32, the same rank with the input axes of size 1;
    dtype: name of the dtype the weight is dequantised to."""

    values: jax.Array
    scale: jax.Array
    dtype: str = dataclasses.field(metadata=dict(static=True))

    def dequantize(self) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(self.dtype)


def input_axes(spec: P.ParamSpec) -> tuple[int, ...] | None:
    """The axes a weight contracts with its input (reduced for the scale), or None when the
    parameter stays unquantised."""
    names = spec.logical_axes
    body = [i for i, a in enumerate(names) if a not in BATCH_AXES]
    if len(body) < 2 or spec.keep_dtype:
        return None
    if "vocab" in names:
        return tuple(i for i in body if names[i] != "vocab")
    if names[body[0]] != "embed" and names[body[-1]] == "embed":
        return tuple(body[:-1])
    return (body[0],)


def quantize_weight(w: jax.Array, axes: tuple[int, ...]) -> Int8Weight:
    x = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    values = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(values=values, scale=scale, dtype=jnp.dtype(w.dtype).name)


def quantize_params(params: Any, cfg: Any) -> Any:
    """The same tree with every matrix replaced by an Int8Weight (per output channel)."""
    specs = model.param_specs(cfg)
    return jax.tree.map(lambda s, w: w if input_axes(s) is None else quantize_weight(w, input_axes(s)),
                        specs, params, is_leaf=P.is_spec)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, Int8Weight)


def dequantize(params: Any) -> Any:
    """Plain arrays again (a no-op on a tree without Int8Weight leaves); traceable."""
    return jax.tree.map(lambda l: l.dequantize() if is_quantized(l) else l, params, is_leaf=is_quantized)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: Any, tokens_BL: "Int[Array, 'B L']", *, cfg: Any) -> "Float[Array, 'B L V']":
    """Logits from a (possibly quantised) params tree, dequantising inside the call."""
    return model._forward(dequantize(params), tokens_BL, cfg)[0]


def memory_report(params: Any, tokens_BL: "Int[Array, 'B L']", cfg: Any) -> dict:
    """Bytes of the params as stored, and the compiled forward's argument and temporary bytes
    (XLA's memory analysis), for a plain or quantised tree."""
    mem = forward.lower(params, tokens_BL, cfg=cfg).compile().memory_analysis()
    return {"param_bytes": tree_bytes(params), "argument_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes)}


def with_int8_kv_cache(cfg: Any) -> Any:
    """`cfg` with every softmax-attention mixer caching K/V as int8 with per (position, kv head)
    scales (layers.attention, kv_cache_dtype="int8"); other mixers are unchanged."""
    from zoo.generate import replace_attention
    return replace_attention(cfg, kv_cache_dtype="int8")
