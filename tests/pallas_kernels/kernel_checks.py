"""Helpers shared by the kernel tests: one jitted (outputs, input gradients) per function, a
random cotangent so every output element matters, and relative error checks.

Tolerances (max |a - b| / max |b|): fp32 inputs 1e-5 (the kernels compute in fp32 with another
summation order); bf16 inputs 2e-2 for values and 4e-2 for gradients (bf16 keeps 8 bits: the
kernel and the fp32 reference round q, k, v and p at different points)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FP32 = dict(value=1e-5, grad=1e-5)
BF16 = dict(value=2e-2, grad=4e-2)


# Interpret-mode kernels are large XLA loops: the CPU backend's optimisations roughly double
# their compile time and buy nothing at test sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def values_and_grads(fn, args, argnums, key):
    """fn(*args) -> array or tuple of arrays; returns (outputs, grads wrt args[argnums]) from one
    compiled program (forward and backward together)."""
    argnums = tuple(argnums)

    def with_diff(*diff):
        full = list(args)
        for i, x in zip(argnums, diff):
            full[i] = x
        res = fn(*full)
        return res if isinstance(res, tuple) else (res,)

    diff_args = tuple(args[i] for i in argnums)
    shapes = jax.eval_shape(with_diff, *diff_args)
    keys = jax.random.split(key, len(shapes))
    cots = tuple(jax.random.normal(k, o.shape, jnp.float32).astype(o.dtype) for k, o in zip(keys, shapes))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(*diff):
        outs, vjp = jax.vjp(with_diff, *diff)
        return outs, vjp(cots)

    return run(*diff_args)


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    scale = np.max(np.abs(b))
    assert scale > 0, "reference is identically zero: the comparison would prove nothing"
    return float(np.max(np.abs(a - b)) / scale)


def assert_match(got, want, tol: float, what: str):
    for i, (a, b) in enumerate(zip(got, want)):
        err = rel_err(a, b)
        assert err < tol, f"{what}[{i}]: max relative error {err:.2e} >= {tol:.0e}"


def lowers(fn, args, platform: str) -> str:
    """Lower fn for `platform` ("tpu" | "cuda") from this CPU machine; returns the module text."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
