"""Dense projections as einsums over named axes, computed in the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.norms import trailing
from layers.params import ParamSpec, fan_in_normal, zeros


def param_specs(d_in: int, d_out: int, axes: tuple[str, str], *, use_bias: bool = False,
                scale: float = 1.0) -> dict[str, ParamSpec]:
    specs = {"w": ParamSpec((d_in, d_out), axes, fan_in_normal((0,), scale))}
    if use_bias:
        specs["b"] = ParamSpec((d_out,), (axes[1],), zeros)
    return specs


def flat_rows() -> bool:
    """Whether a [B, L, ...] projection should run on [B * L] rows. With [B, L] kept apart every
    weight gradient contracts two axes, which XLA:CPU runs as Eigen dots behind transposing
    copies (one MLP layer's fwd+bwd 117 -> 89 ms at 8 x 256 x 256 -> 688; docs/performance.md).
    Not under context parallelism: the sequence axis is sharded there, and merging it with the
    batch would reshard."""
    from sharding import context  # lazy: sharding imports layers
    return context.sequence_axis() is None


def forward(params: dict, x: jax.Array) -> jax.Array:
    """x [..., d_in] -> [..., d_out]; fp32 accumulation, result in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, params["w"].astype(x.dtype),
                   preferred_element_type=jnp.float32)
    if "b" in params:
        y = y + trailing(params["b"].astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)
