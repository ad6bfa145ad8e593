"""Expert parallelism: each device of the expert axis owns E / n experts; tokens travel to them.

Inside `shard_map`, every device (holding T_l of the tokens) lays its (token, expert)
assignments out in a per-expert buffer [E, C, D]; one `all_to_all` over the expert axis sends
the slab of experts e in [j E/n, (j+1) E/n) to device j, which then holds [E/n, n C, D]: every
device's tokens for its own experts. It runs its experts, and a second `all_to_all` returns the
results to the tokens' owners. Routing, balance statistics and the final weighted combine stay
outside, in the ordinary (GSPMD) program.

Buffer size per (device, expert):
  dropless  C = T_l: top-k picks distinct experts, so an expert receives at most one assignment
            per local token; nothing is dropped and the result equals the single-device dropless
            MoE. The price is E / K times the assignments' memory in the buffers.
  capacity  C = cfg.capacity(T_l), GShard's per-device capacity (priority as in layers/moe.py:
            first choices before second choices). Equal to the single-device capacity dispatch
            whenever neither drops; under pressure the two drop different assignments, since each
            device ranks only its own tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from layers import moe
from sharding import rules as R

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int


def token_axes(mesh: Mesh, rules: "R.Rules", n_tokens: int, axis: str) -> tuple[str, ...]:
    """Mesh axes the token dimension is split over: the rules' batch axes, plus the expert axis
    (where it divides), so that each device of the expert axis sends distinct tokens."""
    spec = R.spec_for(("batch",), (n_tokens,), mesh, rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    if axis not in axes and n_tokens % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
        axes = axes + (axis,)
    return axes


def expert_outputs(experts: dict, x_TD: "Float[Array, 'T D']", experts_TK: "Int[Array, 'T K']",
                   cfg: "moe.MoEConfig", *, mesh: Mesh, axis: str, rules: "R.Rules" = (),
                   dispatch: str = "dropless") -> tuple["Float[Array, 'T K D']", "Bool[Array, 'T K']"]:
    """Every assignment's expert output (fp32, zero where dropped) and the kept mask, computed
    with the experts split over mesh axis `axis` (see module doc)."""
    n = mesh.shape[axis]
    E, K = cfg.n_experts, cfg.top_k
    if E % n:
        raise ValueError(f"expert_outputs: n_experts={E} must be a multiple of the '{axis}' axis size {n}")
    T = x_TD.shape[0]
    tok = token_axes(mesh, rules, T, axis)
    if T % math.prod(mesh.shape[a] for a in tok):
        raise ValueError(f"expert_outputs: {T} tokens do not split over mesh axes {tok}")
    t_spec = PartitionSpec(tok or None)
    w_spec = PartitionSpec(axis)

    def local(experts_l, x_TD, experts_TK):
        T_l, D = x_TD.shape
        C = T_l if dispatch == "dropless" else cfg.capacity(T_l)
        slot_TK = moe._capacity_slots(experts_TK, E)
        keep_TK = slot_TK < C
        slot_TK = jnp.where(keep_TK, slot_TK, C)
        x_TKD = jnp.broadcast_to(x_TD[:, None, :], (T_l, K, D))
        x_ECD = jnp.zeros((E, C, D), x_TD.dtype).at[experts_TK, slot_TK].set(x_TKD, mode="drop")
        # Slab j of the experts goes to device j; what arrives is stacked along the slot axis.
        x_ESD = jax.lax.all_to_all(x_ECD, axis, split_axis=0, concat_axis=1, tiled=True)
        y_ESD = moe.expert_mlps(experts_l, x_ESD, cfg)
        y_ECD = jax.lax.all_to_all(y_ESD, axis, split_axis=1, concat_axis=0, tiled=True)
        y_TKD = y_ECD.at[experts_TK, slot_TK].get(mode="fill", fill_value=0.0)
        return jnp.where(keep_TK[:, :, None], y_TKD, 0.0), keep_TK

    fn = jax.shard_map(local, mesh=mesh, in_specs=(w_spec, t_spec, t_spec), out_specs=(t_spec, t_spec),
                       check_vma=False)
    return fn(experts, x_TD, experts_TK)
