"""Shared checks for every sequence mixer (the protocol of DESIGN.md).

    rel_rms(a, b)                          relative RMS error ||a - b|| / ||b||
    run_steps(module, cfg, params, x, state)           step over x token by token
    check_step_equivalence(module, cfg, params, x, state0, tol)
    check_split_equivalence(module, cfg, params, x, t, state0, tol)
    check_packing(module, cfg, params, x, lengths, tol)
    check_state_constant(module, cfg)      decoding state does not grow with max_len

Tolerances from the issue: relative RMS < 1e-3 in fp32, < 5e-3 with bf16 inputs and fp32 state.
"""

from __future__ import annotations

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np

from layers import mixers

FP32_TOL = 1e-3
BF16_TOL = 5e-3


def rel_rms(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


def jaxpr_shapes(closed_jaxpr) -> set[tuple[int, ...]]:
    """Every array shape a traced program produces, nested jaxprs (scans, jits, custom VJPs)
    included: lets a test assert that a path never builds some intermediate."""
    found: set[tuple[int, ...]] = set()

    def walk(jx):
        for eqn in jx.eqns:
            found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def assert_close(a, b, tol=FP32_TOL, what=""):
    err = rel_rms(a, b)
    assert err < tol, f"{what}: relative RMS error {err:.2e} >= {tol:.0e}"


def assert_trees_close(a, b, tol=FP32_TOL, what="state"):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert_close(x, y, tol, f"{what}{jax.tree_util.keystr(path)}")


def run_steps(module, cfg, params, x_BLD, state):
    step = jax.jit(lambda p, xt, s: module.step(p, xt, s, cfg=cfg))
    ys = []
    for t in range(x_BLD.shape[1]):
        y, state = step(params, x_BLD[:, t], state)
        ys.append(y)
    return jnp.stack(ys, axis=1), state


def check_step_equivalence(module, cfg, params, x_BLD, state0, tol=FP32_TOL):
    """forward(x, state0) == step token by token from state0; final states agree."""
    y, s_fwd = module.forward(params, x_BLD, cfg=cfg, state=state0)
    y_steps, s_steps = run_steps(module, cfg, params, x_BLD, state0)
    assert_close(y_steps, y, tol, "step vs forward output")
    assert_trees_close(s_steps, s_fwd, tol, "step vs forward state")


def check_split_equivalence(module, cfg, params, x_BLD, t, state0, tol=FP32_TOL):
    """forward(x) == forward(x[:, t:], state=forward(x[:, :t]).state)."""
    y, s = module.forward(params, x_BLD, cfg=cfg, state=state0)
    y1, s1 = module.forward(params, x_BLD[:, :t], cfg=cfg, state=state0)
    y2, s2 = module.forward(params, x_BLD[:, t:], cfg=cfg, state=s1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y, tol, "split forward output")
    assert_trees_close(s2, s, tol, "split forward state")


def check_packing(module, cfg, params, x_1LD, lengths, tol=FP32_TOL):
    """One packed row with segment ids equals separate calls per document (from zero state)."""
    assert sum(lengths) == x_1LD.shape[1]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    y, _ = module.forward(params, x_1LD, cfg=cfg, segment_ids=jnp.asarray(seg))
    parts, start = [], 0
    for n in lengths:
        parts.append(module.forward(params, x_1LD[:, start:start + n], cfg=cfg)[0])
        start += n
    assert_close(y, jnp.concatenate(parts, axis=1), tol, "packed vs separate")


def check_state_constant(cfg, batch_size=2):
    """Recurrent state size is independent of the sequence length."""
    assert mixers.state_bytes(cfg, batch_size, 16) == mixers.state_bytes(cfg, batch_size, 1 << 20)


def random_state(module, cfg, batch_size, key, scale=0.5):
    """A random (non-zero) initial state shaped like init_state's; integer leaves kept."""
    zeros = module.init_state(cfg, batch_size, 1, jnp.float32)
    leaves, treedef = jax.tree.flatten(zeros)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten([
        scale * jax.random.normal(k, z.shape, z.dtype) if jnp.issubdtype(z.dtype, jnp.floating) else z
        for z, k in zip(leaves, keys)])
