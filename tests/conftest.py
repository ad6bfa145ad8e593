"""Test-wide settings: 8 simulated CPU devices, XLA's CPU code generation at optimisation level 0,
strict dtype promotion, rank promotion raises."""

import os

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The suite compiles hundreds of small programs and runs most for microseconds, so compiling is
# most of its time; at backend level 0 (LLVM's optimisation passes off) that costs about half the
# CPU (docs/test_time.md). Values differ from the default level (3) by rounding; tests whose
# bounds are about the optimised code compile it themselves (tests/zoo/test_model.py). Name a
# level in XLA_FLAGS to run everything at it (--xla_backend_optimization_level=3).
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (the flags above must be set before jax initialises its backend)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
