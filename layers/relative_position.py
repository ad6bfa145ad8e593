"""T5's relative position bias: a learned scalar per (head, distance bucket) added to the scores.

Distances (key position - query position) fall into `n_buckets` buckets: small distances get a
bucket each, larger ones share log-spaced buckets up to `max_distance`, beyond which everything
lands in the last bucket. Bidirectional attention (the encoder) spends half the buckets on keys
after the query; causal attention (the decoder) only sees keys at or before the query.

T5 computes the bias in its first layer and reuses it in every other layer of the same stack, so
one table per stack is a model-level parameter; `bias` is called once per forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks
from layers.params import ParamSpec, normal

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelativePositionConfig:
    """Attributes:
    n_heads: H, one bias per head.
    n_buckets: number of distance buckets (T5: 32).
    max_distance: distances at or beyond this share the last bucket (T5: 128).
    bidirectional: True for encoder self-attention (keys on both sides), False for causal.
    init_std: std of the table's initialisation.
    """

    n_heads: int
    n_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        name = "RelativePositionConfig"
        checks.positive(name, "n_heads", self.n_heads)
        checks.positive(name, "n_buckets", self.n_buckets)
        checks.positive(name, "max_distance", self.max_distance)
        # The exact range holds half of the (per-direction) buckets; it needs at least one bucket
        # and must stay below max_distance for the log spacing to be defined.
        exact = (self.n_buckets // 2 if self.bidirectional else self.n_buckets) // 2
        if exact < 1:
            checks.fail(name, "n_buckets", f"at least {4 if self.bidirectional else 2} "
                        f"(bidirectional={self.bidirectional})", self.n_buckets)
        if self.max_distance <= exact:
            checks.fail(name, "max_distance", f"more than the exact range {exact}", self.max_distance)


def bucket(rel_pos: "Int[Array, '...']", *, bidirectional: bool, n_buckets: int,
           max_distance: int) -> "Int[Array, '...']":
    """Bucket index in [0, n_buckets) of each relative position (key minus query)."""
    rel_pos = jnp.asarray(rel_pos, jnp.int32)
    if bidirectional:
        n_buckets //= 2
        offset = jnp.where(rel_pos > 0, n_buckets, 0)
        dist = jnp.abs(rel_pos)
    else:
        offset = jnp.zeros_like(rel_pos)
        dist = jnp.maximum(-rel_pos, 0)  # keys after the query share bucket 0 (masked anyway)
    max_exact = n_buckets // 2
    # log(dist / max_exact) / log(max_distance / max_exact) spans [0, 1) over the log range;
    # max(dist, 1) keeps log finite where the exact branch is taken.
    ratio = jnp.log(jnp.maximum(dist, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (ratio * (n_buckets - max_exact)).astype(jnp.int32)
    far = jnp.minimum(far, n_buckets - 1)
    return offset + jnp.where(dist < max_exact, dist, far)


def param_specs(cfg: RelativePositionConfig) -> dict:
    return {"table_NH": ParamSpec((cfg.n_buckets, cfg.n_heads), ("relpos_buckets", "heads"),
                                  normal(cfg.init_std), decay=False)}


def bias(params: dict, q_pos_BL: "Int[Array, 'B L']", k_pos_BS: "Int[Array, 'B S']", *,
         cfg: RelativePositionConfig) -> "Float[Array, 'B H L S']":
    """The additive score bias (fp32) for queries and keys at the given positions."""
    checks.array("q_pos_BL", q_pos_BL, rank=2, kind="i")
    checks.array("k_pos_BS", k_pos_BS, rank=2, kind="i")
    rel_BLS = k_pos_BS[:, None, :] - q_pos_BL[:, :, None]
    bucket_BLS = bucket(rel_BLS, bidirectional=cfg.bidirectional, n_buckets=cfg.n_buckets,
                        max_distance=cfg.max_distance)
    bias_BLSH = jnp.take(params["table_NH"].astype(jnp.float32), bucket_BLS, axis=0)
    return jnp.transpose(bias_BLSH, (0, 3, 1, 2))


def init(key: jax.Array, cfg: RelativePositionConfig) -> dict:
    from layers import params as P
    return P.init(key, param_specs(cfg))
