"""Logical-axis rules: from a parameter's logical axis names to a PartitionSpec on a mesh.

A rule table is an ordered tuple of (logical name, mesh axis or tuple of mesh axes). A logical
name maps to the mesh axes that the mesh has and that divide the dimension; two dimensions of one
array never share a mesh axis (the first keeps it). Layers never see the mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers import params as P

Rules = tuple[tuple[str, Any], ...]

PRESETS: dict[str, Rules] = {
    "dp": (("batch", ("data", "fsdp")),),
    # ZeRO-3 style: every large parameter split over fsdp along its model-width axis.
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "fsdp")),
    # Megatron style: heads and hidden units split over tensor, the residual stream replicated.
    "tp": (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor")),
    "fsdp_tp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")),
}


def make_mesh(axes: dict[str, int], devices=None) -> Mesh:
    """A mesh from {"data": 2, "fsdp": -1, ...}; one -1 takes the remaining devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = dict(axes)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh axes: at most one -1, got {axes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        sizes[free[0]] = devices.size // known
    if math.prod(sizes.values()) != devices.size:
        raise ValueError(f"mesh axes {axes} need {math.prod(sizes.values())} devices, have {devices.size}")
    return Mesh(devices.reshape(tuple(sizes.values())), tuple(sizes))


def spec_for(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape):
        target = table.get(name)
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in targets:
            size = mesh.shape.get(axis, 1)
            if axis in mesh.shape and axis not in used and size > 1 and dim % (math.prod(
                    mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def param_shardings(specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of ParamSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.logical_axes, s.shape, mesh, rules)),
                        specs, is_leaf=P.is_spec)
