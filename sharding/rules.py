"""Logical-axis rules: from a parameter's (or activation's) logical axis names to a PartitionSpec.

A rule table is an ordered tuple of (logical name, mesh axis or tuple of mesh axes). A logical
name maps to the mesh axes that the mesh has, that are larger than 1 and that divide the
dimension; two dimensions of one array never share a mesh axis (the earlier dimension keeps it).
Names without a rule (head_dim, ssm_state, conv_width, q_lora, kv_lora, gate_rank, layers, ...)
stay replicated. Layers never see the mesh: they name their axes in their ParamSpecs, and the
rules decide.

Presets (mesh axes: data, fsdp, tensor, expert, sequence):

  dp       batch over every data-like axis; parameters replicated.
  fsdp     ZeRO-3: each large parameter split over fsdp along its model-width (embed) or
           vocabulary axis; gathered per layer in the forward pass, gradients reduce-scattered.
  tp       Megatron: heads, hidden units (mlp, inner) and the vocabulary split over tensor
           (column-parallel in, row-parallel out); the residual stream is replicated.
  fsdp_tp  both: embed over fsdp, heads / hidden over tensor.
  ep       fsdp plus MoE experts split over the expert axis (which also carries batch).
  cp       context parallelism: activations' sequence axis over `sequence`; parameters split
           over fsdp and sequence (the sequence devices hold the same weights otherwise).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers import params as P
from sharding.mesh import make_mesh  # noqa: F401  (re-exported: sharding.make_mesh)

Rules = tuple[tuple[str, Any], ...]

_BATCH = ("data", "fsdp", "expert")
_TP = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("inner", "tensor"))

PRESETS: dict[str, Rules] = {
    "dp": (("batch", _BATCH),),
    "fsdp": (("batch", _BATCH), ("embed", "fsdp"), ("vocab", "fsdp")),
    "tp": (("batch", ("data", "fsdp", "expert")), *_TP, ("vocab", "tensor")),
    "fsdp_tp": (("batch", _BATCH), ("embed", "fsdp"), *_TP, ("vocab", "tensor")),
    "ep": (("batch", _BATCH), ("expert", "expert"), ("embed", "fsdp"), ("vocab", "fsdp")),
    "cp": (("batch", ("data", "fsdp")), ("seq", "sequence"), ("embed", ("fsdp", "sequence")),
           ("vocab", ("fsdp", "sequence"))),
}

# Every logical name a layer or the model uses, so that docs and tests can list what each preset
# does with each (parameters: see layers/*.py param_specs; activations: batch, seq).
LOGICAL_AXES = ("batch", "seq", "embed", "vocab", "positions", "layers", "heads", "kv_heads", "head_dim",
                "mlp", "inner", "expert", "q_lora", "kv_lora", "gate_rank", "ssm_state", "ssm_groups",
                "conv_width", "dt_rank", "embed_out", "relpos_buckets", "token_types")


def get_rules(rules: "str | Rules") -> Rules:
    """A preset's table by name, or a table given directly (validated)."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"rules: unknown preset {rules!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[rules]
    try:
        table = tuple((name, target) for name, target in rules)
    except (TypeError, ValueError):
        raise TypeError(f"rules: expected a preset name or (logical name, mesh axes) pairs, got {rules!r}") from None
    seen = set()
    for name, target in table:
        if name in seen:
            raise ValueError(f"rules: logical axis {name!r} has two rules")
        seen.add(name)
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if not all(isinstance(t, str) for t in targets):
            raise TypeError(f"rules: {name!r} must map to a mesh axis name or a tuple of them, got {target!r}")
    return table


def spec_for(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             rules: "str | Rules") -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes and shape (see module doc)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"spec_for: logical_axes {logical_axes} has {len(logical_axes)} names but shape "
                         f"{tuple(shape)} has {len(shape)} dimensions")
    table = dict(get_rules(rules))
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape):
        target = table.get(name)
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen: list[str] = []
        for axis in targets:
            size = mesh.shape.get(axis, 1)
            if axis not in used and size > 1 and dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def param_shardings(specs: Any, mesh: Mesh, rules: "str | Rules") -> Any:
    """NamedShardings for a tree of ParamSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.logical_axes, s.shape, mesh, rules)),
                        specs, is_leaf=P.is_spec)


def param_partition_specs(specs: Any, mesh: Mesh, rules: "str | Rules") -> Any:
    """PartitionSpecs (no mesh attached) for a tree of ParamSpecs: golden files, reports."""
    return jax.tree.map(lambda s: spec_for(s.logical_axes, s.shape, mesh, rules), specs, is_leaf=P.is_spec)


def init_sharded(key: jax.Array, specs: Any, mesh: Mesh, rules: "str | Rules") -> Any:
    """Parameters materialised directly in their sharded layout: each device computes only its
    own shards (jit with out_shardings), so no device or host ever holds the whole model."""
    return jax.jit(lambda k: P.init(k, specs), out_shardings=param_shardings(specs, mesh, rules))(key)


def batch_sharding(mesh: Mesh, rules: "str | Rules", shape: tuple[int, ...],
                   logical_axes: tuple[str | None, ...] = ("batch", "seq")) -> NamedSharding:
    """Where a [batch, seq] input goes under these rules."""
    return NamedSharding(mesh, spec_for(logical_axes, shape, mesh, rules))


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` (sharded arrays) that the first device holds."""
    dev = None
    total = 0
    for x in jax.tree.leaves(tree):
        shards = x.addressable_shards
        dev = dev or shards[0].device
        total += sum(s.data.nbytes for s in shards if s.device == dev)
    return total


def like_params_shardings(abstract_tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds copies of the params tree (optimizer state: Adam's mu
    and nu, momentum traces): a leaf whose key path ends with a parameter's path and has that
    parameter's shape is placed like it; every other leaf (step counts, scalars) is replicated."""
    by_path = {tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            s = by_path.get(path[start:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(place, abstract_tree)


def init_optimizer_sharded(optimizer: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """`optimizer.init(params)` with every moment placed like its parameter (never gathered)."""
    with jax.numpy_dtype_promotion("standard"):
        abstract = jax.eval_shape(optimizer.init, params)
        shardings = like_params_shardings(abstract, params_shardings, mesh)
        return jax.jit(optimizer.init, out_shardings=shardings)(params)


def default_rules(mesh: Mesh) -> str:
    """The preset that uses the mesh's axes: fsdp_tp, tp, ep, cp, fsdp or dp."""
    has = {a for a, s in mesh.shape.items() if s > 1}
    if {"fsdp", "tensor"} <= has:
        return "fsdp_tp"
    for axis, name in (("tensor", "tp"), ("expert", "ep"), ("sequence", "cp"), ("fsdp", "fsdp")):
        if axis in has:
            return name
    return "dp"
