"""Meshes and logical-axis rules: parameters name their axes, rules map names to mesh axes.

Collective layers (expert parallelism, ring attention, the context-parallel scans) live in their
own modules (sharding.expert_parallel, sharding.ring_attention, and sharding.context_scan,
context_recurrent and context_delta, which the recurrent layers call when the rules split the
sequence) and are imported where used; sharding.cli holds the command-line flags.
"""

from sharding.context import active, constrain, constrain_tree, use_rules
from sharding.distributed import initialize
from sharding.mesh import describe, make_mesh, parse_mesh_spec
from sharding.rules import (LOGICAL_AXES, PRESETS, batch_sharding, default_rules, get_rules,
                            init_optimizer_sharded, init_sharded, like_params_shardings,
                            param_partition_specs, param_shardings, per_device_bytes, spec_for)

__all__ = ["LOGICAL_AXES", "PRESETS", "active", "batch_sharding", "constrain", "constrain_tree",
           "default_rules", "describe", "get_rules", "init_optimizer_sharded", "init_sharded",
           "initialize", "like_params_shardings", "make_mesh", "param_partition_specs",
           "param_shardings", "parse_mesh_spec", "per_device_bytes", "spec_for", "use_rules"]
