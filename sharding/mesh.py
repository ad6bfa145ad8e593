"""Device meshes from a spec: "data=2,fsdp=2,tensor=2" or {"data": 2, "fsdp": -1}.

One axis may be -1: it takes whatever devices the others leave. Multi-slice / multi-node meshes
give each axis a fast inner part (ICI, NVLink: within a slice or host) and a slow outer part
(DCN: across slices or hosts); `make_mesh(ici, dcn=...)` builds that layout with jax's
`create_hybrid_device_mesh`, so that an axis with a DCN part crosses the slow network only in
its outermost stride.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

# Names the rule presets know; others are allowed (custom rules) but these are the usual ones.
KNOWN_AXES = ("data", "fsdp", "tensor", "expert", "sequence", "stage")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mesh_spec(spec: "str | Mapping[str, int]", *, argument: str = "mesh") -> dict[str, int]:
    """{"data": 2, "tensor": -1} from "data=2,tensor=-1" (or a mapping, validated the same way).

    Sizes are positive integers or -1 (at most one); names are identifiers, each used once.
    """
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if part.count("=") != 1:
                raise ValueError(f"{argument}: expected 'name=size' entries separated by commas "
                                 f"(e.g. 'fsdp=4,tensor=2'), got {part!r} in {spec!r}")
            name, size = (s.strip() for s in part.split("="))
            try:
                items.append((name, int(size)))
            except ValueError:
                raise ValueError(f"{argument}: size of axis {name!r}: expected an integer, got {size!r}") from None
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        raise TypeError(f"{argument}: expected a string like 'fsdp=4,tensor=2' or a dict, "
                        f"got {type(spec).__name__}")
    if not items:
        raise ValueError(f"{argument}: expected at least one axis, got {spec!r}")
    out: dict[str, int] = {}
    for name, size in items:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{argument}: axis names must be identifiers, got {name!r}")
        if name in out:
            raise ValueError(f"{argument}: axis {name!r} appears twice in {spec!r}")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"{argument}: size of axis {name!r}: expected a positive integer or -1, got {size!r}")
        out[name] = int(size)
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError(f"{argument}: at most one axis may be -1, got {spec!r}")
    return out


def _fill(sizes: dict[str, int], total: int, argument: str) -> dict[str, int]:
    """Resolve the -1 entry so that the sizes multiply to `total`."""
    known = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    out = dict(sizes)
    if free:
        if total % known:
            raise ValueError(f"{argument}: the fixed axes {sizes} multiply to {known}, which does not "
                             f"divide the {total} devices")
        out[free[0]] = total // known
    if math.prod(out.values()) != total:
        raise ValueError(f"{argument}: axes {sizes} need {math.prod(out.values())} devices, have {total}")
    return out


def make_mesh(axes: "str | Mapping[str, int]", devices: Sequence[Any] | None = None, *,
              dcn: "str | Mapping[str, int] | None" = None, process_is_granule: bool | None = None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes).

    axes: per-slice (ICI) sizes; without `dcn` they cover all devices.
    dcn: sizes of the outer (cross-slice / cross-host) part of each axis; an axis named only here
      is added (outermost) with inner size 1. A mesh axis's size is its ICI size times its DCN
      size. Slices are the devices' `slice_index` (TPU multi-slice) or, when devices have none
      or `process_is_granule` is True, their `process_index` (GPU / CPU multi-node).
    """
    devices = list(jax.devices() if devices is None else devices)
    ici = parse_mesh_spec(axes)
    if dcn is None:
        sizes = _fill(ici, len(devices), "mesh")
        return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))
    outer = parse_mesh_spec(dcn, argument="dcn")
    if process_is_granule is None:
        process_is_granule = getattr(devices[0], "slice_index", None) is None
    key = "process_index" if process_is_granule else "slice_index"
    n_granules = len({getattr(d, key) for d in devices})
    outer = _fill(outer, n_granules, "dcn")
    names = [a for a in outer if a not in ici] + list(ici)
    inner = _fill({a: ici.get(a, 1) for a in names}, len(devices) // n_granules, "mesh")
    grid = mesh_utils.create_hybrid_device_mesh(
        [inner[a] for a in names], [outer.get(a, 1) for a in names], devices,
        process_is_granule=process_is_granule, allow_split_physical_axes=True)
    return Mesh(grid, tuple(names))


def describe(mesh: Mesh) -> str:
    """'data=2,fsdp=2,tensor=2' (the spec string that rebuilds this mesh's shape)."""
    return ",".join(f"{k}={v}" for k, v in mesh.shape.items())
