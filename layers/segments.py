"""Packed sequences for recurrent mixers: where a new document starts, the state resets.

Convention (all mixers): token t starts a new document when segment_ids[t] != segment_ids[t-1];
the state carried into it is zero (the conv window too). Token 0 of a call always continues from
the `state` given to `forward` (or from zeros when none is given).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Int


def starts(segment_ids_BL: "Int[Array, 'B L'] | None", length: int | None = None,
           batch: int | None = None) -> "Bool[Array, 'B L']":
    """True where a token begins a new document (never at t = 0). All False without segment ids."""
    if segment_ids_BL is None:
        return jnp.zeros((batch, length), bool)
    first_B1 = jnp.zeros_like(segment_ids_BL[:, :1], dtype=bool)
    return jnp.concatenate([first_B1, segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)


def keep(segment_ids_BL: "Int[Array, 'B L'] | None", length: int, batch: int, dtype=jnp.float32
         ) -> "Array":
    """1.0 where the incoming state is kept, 0.0 where it resets: multiply it into the decay."""
    return 1.0 - starts(segment_ids_BL, length, batch).astype(dtype)
