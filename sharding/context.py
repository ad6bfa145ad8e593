"""Activation placement through logical names, active only inside `use_rules(mesh, rules)`.

    with sharding.use_rules(mesh, "fsdp_tp"):
        loss = jitted_step(...)           # traced here: constrain() calls take effect
    sharding.constrain(x_BLD, ("batch", "seq", "embed"))   # elsewhere: returns x unchanged

Model code calls `constrain` at the few places where the compiler's own propagation may choose
badly (the residual stream between blocks, logits); on one device, or outside the context, the
call is the identity, so the same model code serves every run. The context also enters
`jax.set_mesh(mesh)`, so the mesh is part of jit's cache key: a function traced outside the
context is not reused inside it (and vice versa).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import jax
from jax.sharding import Mesh, NamedSharding

from sharding import rules as R

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: "str | R.Rules") -> Iterator[tuple[Mesh, R.Rules]]:
    """Make (mesh, rules) the active placement for `constrain` and for layers with collectives
    (MoE expert parallelism)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"use_rules: mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    table = R.get_rules(rules)
    token = _ACTIVE.set((mesh, table))
    try:
        with jax.set_mesh(mesh):
            yield mesh, table
    finally:
        _ACTIVE.reset(token)


def active() -> "tuple[Mesh, R.Rules] | None":
    """(mesh, rules) inside `use_rules`, else None."""
    return _ACTIVE.get()


def mesh_axis_size(axis: str) -> int:
    """Size of a mesh axis of the active mesh (1 without one, or when the mesh lacks the axis)."""
    current = _ACTIVE.get()
    return 1 if current is None else current[0].shape.get(axis, 1)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """`x` placed as the active rules say for these logical axes; unchanged without active rules."""
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, table = current
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: logical_axes {logical_axes} names {len(logical_axes)} dimensions, "
                         f"x has shape {tuple(x.shape)}")
    spec = R.spec_for(logical_axes, x.shape, mesh, table)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_tree(tree: Any, logical_axes_tree: Any) -> Any:
    """`constrain` on each leaf with the matching logical axes (a tree of tuples)."""
    return jax.tree.map(lambda x, a: constrain(x, a), tree, logical_axes_tree,
                        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a))
