"""Token embedding and unembedding (tied to the embedding table or a separate projection)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers.params import ParamSpec, normal

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


def param_specs(vocab_size: int, d_model: int, *, tied: bool, init_std: float = 0.02) -> dict[str, ParamSpec]:
    specs = {"table_VD": ParamSpec((vocab_size, d_model), ("vocab", "embed"), normal(init_std), decay=False)}
    if not tied:
        specs["unembed_DV"] = ParamSpec((d_model, vocab_size), ("embed", "vocab"), normal(init_std))
    return specs


def embed(params: dict, tokens_BL: "Int[Array, 'B L']", dtype=jnp.float32) -> "Float[Array, 'B L D']":
    return jnp.take(params["table_VD"], tokens_BL, axis=0).astype(dtype)


def unembed(params: dict, x_BLD: "Float[Array, 'B L D']") -> "Float[Array, 'B L V']":
    """Logits in fp32 (softmax and loss need the range)."""
    if "unembed_DV" in params:
        w_DV = params["unembed_DV"].astype(x_BLD.dtype)
        return jnp.einsum("...D,DV->...V", x_BLD, w_DV, preferred_element_type=jnp.float32)
    w_VD = params["table_VD"].astype(x_BLD.dtype)
    return jnp.einsum("...D,VD->...V", x_BLD, w_VD, preferred_element_type=jnp.float32)
