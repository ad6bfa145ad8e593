"""Meshes and logical-axis rules: parameters name their axes, rules map names to mesh axes."""

from sharding.rules import PRESETS, make_mesh, param_shardings, spec_for

__all__ = ["PRESETS", "make_mesh", "param_shardings", "spec_for"]
