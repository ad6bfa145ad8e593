"""RMSNorm and LayerNorm with fp32 reductions, whatever the activation dtype."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp

from layers import checks
from layers.params import ParamSpec, ones, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Float


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormConfig:
    """Attributes:
    kind: "rms" (RMSNorm) or "layer" (LayerNorm, mean-centred).
    eps: added to the variance before the square root.
    use_bias: LayerNorm only: learn an additive bias.
    scale_offset: the applied scale is `scale_offset + weight`; Gemma stores weight around 0 and
      uses offset 1, so its parameters start at zeros.
    """

    kind: Literal["rms", "layer"] = "rms"
    eps: float = 1e-6
    use_bias: bool = True
    scale_offset: float = 0.0

    def __post_init__(self):
        checks.one_of("NormConfig", "kind", self.kind, ("rms", "layer"))
        if not self.eps > 0:
            checks.fail("NormConfig", "eps", "a positive float", self.eps)


def trailing(w: jax.Array, ndim: int) -> jax.Array:
    """View a [D] vector as [1, ..., 1, D] so it broadcasts without rank promotion."""
    return w.reshape((1,) * (ndim - w.ndim) + w.shape)


def rms_norm(x: "Float[Array, '... D']", scale: "Float[Array, 'D']", eps: float) -> "Float[Array, '... D']":
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * inv * trailing(scale.astype(jnp.float32), x.ndim)).astype(x.dtype)


def layer_norm(x: "Float[Array, '... D']", scale: "Float[Array, 'D']", bias: "Float[Array, 'D'] | None",
               eps: float) -> "Float[Array, '... D']":
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * trailing(scale.astype(jnp.float32), x.ndim)
    if bias is not None:
        y = y + trailing(bias.astype(jnp.float32), x.ndim)
    return y.astype(x.dtype)


def param_specs(cfg: NormConfig, dim: int, axis: str = "embed") -> dict[str, ParamSpec]:
    specs = {"scale": ParamSpec((dim,), (axis,), zeros if cfg.scale_offset else ones)}
    if cfg.kind == "layer" and cfg.use_bias:
        specs["bias"] = ParamSpec((dim,), (axis,), zeros)
    return specs


def forward(params: dict, x: "Float[Array, '... D']", *, cfg: NormConfig) -> "Float[Array, '... D']":
    scale = params["scale"] + cfg.scale_offset if cfg.scale_offset else params["scale"]
    if cfg.kind == "rms":
        return rms_norm(x, scale, cfg.eps)
    return layer_norm(x, scale, params.get("bias"), cfg.eps)
