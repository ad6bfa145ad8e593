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


def sequence_axis() -> str | None:
    """The mesh axis that the active rules put the sequence (`seq`) on, when it has more than one
    device; None without active rules, when `seq` stays unsplit, or inside a shard_map that
    already made that axis manual (a context-parallel layer calling its own local form)."""
    current = _ACTIVE.get()
    if current is None:
        return None
    mesh, table = current
    target = dict(table).get("seq")
    axes = [a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if mesh.shape.get(a, 1) > 1]
    # One sequence axis: the ring and the state scan run over a single named axis.
    if len(axes) != 1 or axes[0] in jax.sharding.get_abstract_mesh().manual_axes:
        return None
    return axes[0]


def sequence_split(batch: int, length: int, multiple: int = 1) -> "tuple[Mesh, str, tuple[str, ...]] | None":
    """(mesh, sequence axis, batch axes) for a context-parallel layer on a [batch, length] input:
    None unless `sequence_axis()` is set and `length` is a multiple of `multiple` times its size.
    The batch axes are those the rules give a batch of this size (the sequence axis excluded)."""
    axis = sequence_axis()
    if axis is None:
        return None
    mesh, table = _ACTIVE.get()
    if length % (mesh.shape[axis] * multiple):
        return None
    spec = R.spec_for(("seq", "batch"), (length, batch), mesh, table)[1]
    batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return mesh, axis, batch_axes


def check_split(name: str, mesh: Mesh, axis: str, length: int) -> int:
    """The size of mesh axis `axis`, which must exist and divide the sequence length; errors name
    the caller."""
    if axis not in mesh.shape:
        raise ValueError(f"{name}: mesh has no axis {axis!r}; its axes are {dict(mesh.shape)}")
    n = mesh.shape[axis]
    if length % n:
        raise ValueError(f"{name}: sequence length {length} must be a multiple of the '{axis}' axis size {n}")
    return n


def over_sequence(fn, like_BL: jax.Array, *args, **kwargs):
    """`fn(*args, mesh=, axis=, batch_axes=, **kwargs)` when the active rules split the sequence
    of `like_BL` (any [batch, length, ...] input of the call) and it divides over that axis, else
    None: the contract of every layer's context-parallel dispatch (None: run your own code)."""
    split = sequence_split(like_BL.shape[0], like_BL.shape[1])
    if split is None:
        return None
    mesh, axis, batch_axes = split
    return fn(*args, mesh=mesh, axis=axis, batch_axes=batch_axes, **kwargs)


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
