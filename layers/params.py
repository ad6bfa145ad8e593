"""Parameter specifications: shape, dtype, logical axes and initialiser declared in one place.

Every layer describes its parameters as a pytree of `ParamSpec`. From the specs alone come
abstract shapes (`abstract`), logical axis names for sharding rules (`logical_axes`) and
concrete arrays (`init`), so a model's size and layout are known before any memory is spent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter.

    Attributes:
      shape: array shape.
      dtype: storage dtype (float32 by default; compute dtype is the caller's concern).
      logical_axes: one logical axis name per dimension, e.g. ("embed", "mlp"); the sharding
        rules map these names to mesh axes.
      init: initialiser called as `init(key, shape, dtype)`.
      keep_dtype: a model-wide param_dtype does not apply (e.g. Mamba's A_log and dt bias stay
        fp32 under a bf16 policy, as the papers require).
      decay: whether AdamW decays it; None applies the default rule (see `decay_mask`).
    """

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: Initializer
    dtype: Any = jnp.float32
    keep_dtype: bool = False
    decay: bool | None = None

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(
                f"ParamSpec: logical_axes {self.logical_axes} has {len(self.logical_axes)} names "
                f"but shape {self.shape} has {len(self.shape)} dimensions"
            )


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


# Initialisers. Fan-in is the product of the dimensions named in `in_axes` (by position).
def normal(stddev: float) -> Initializer:
    def init(key, shape, dtype):
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def fan_in_normal(in_dims: tuple[int, ...] = (0,), scale: float = 1.0) -> Initializer:
    """Normal with std scale / sqrt(fan_in), fan_in = product of the dimensions at `in_dims`."""

    def init(key, shape, dtype):
        fan_in = math.prod(shape[d] for d in in_dims)
        return normal(scale / math.sqrt(fan_in))(key, shape, dtype)

    return init


def constant(value: float) -> Initializer:
    def init(key, shape, dtype):
        del key
        return jnp.full(shape, value, dtype)

    return init


zeros = constant(0.0)
ones = constant(1.0)


def linspace(lo: float, hi: float) -> Initializer:
    """lo..hi evenly along the last axis (e.g. per-head gate biases), the same in every row."""
    def init(key, shape, dtype):
        del key
        return jnp.broadcast_to(jnp.linspace(lo, hi, shape[-1], dtype=jnp.float32), shape).astype(dtype)

    return init


def abstract(specs: Any) -> Any:
    """ShapeDtypeStructs with the same tree structure as `specs`."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)


def logical_axes(specs: Any) -> Any:
    """The logical axis names of each parameter, as a tree of tuples (leaves are tuples)."""
    return jax.tree.map(lambda s: s.logical_axes, specs, is_leaf=is_spec)


def init(key: jax.Array, specs: Any) -> Any:
    """Materialise every spec with its own key (folded from the parameter's index)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten([s.init(k, s.shape, s.dtype) for s, k in zip(leaves, keys)])


def stack(specs: Any, n: int, axis_name: str = "layers") -> Any:
    """Specs for `n` independent copies stacked on a new leading axis (scanned layers)."""

    def stack_one(s: ParamSpec) -> ParamSpec:
        def init_stacked(key, shape, dtype):
            keys = jax.random.split(key, shape[0])
            return jax.vmap(lambda k: s.init(k, shape[1:], dtype))(keys)

        return dataclasses.replace(s, shape=(n, *s.shape), logical_axes=(axis_name, *s.logical_axes),
                                   init=init_stacked)

    return jax.tree.map(stack_one, specs, is_leaf=is_spec)


def count(specs_or_params: Any) -> int:
    """Number of scalars in a tree of specs or arrays."""
    leaves = jax.tree.leaves(specs_or_params, is_leaf=is_spec)
    return sum(math.prod(x.shape) for x in leaves)


def decays(spec: ParamSpec) -> bool:
    """Default weight-decay rule: matrices (two or more axes besides "layers") are decayed;
    vectors, norm scales, biases, and parameters pinned to fp32 (decay rates, A_log, dt bias:
    keep_dtype) are not. A spec's explicit `decay` wins (embedding tables set False)."""
    if spec.decay is not None:
        return spec.decay
    return sum(a != "layers" for a in spec.logical_axes) >= 2 and not spec.keep_dtype


def decay_mask(specs: Any) -> Any:
    """True where AdamW applies weight decay, for a tree of specs."""
    return jax.tree.map(decays, specs, is_leaf=is_spec)
