"""The MLP and attention projections run on [B * L] rows (XLA:CPU's fast matmul layouts for the
weight gradients); that must equal the [B, L] einsums, values and gradients, fp32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import attention, dense, mlp
from layers.mlp import MLPConfig

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _vjp(f, params, x, dy):
    y, back = jax.vjp(f, params, x)
    return y, back(dy.astype(y.dtype))


def _value_and_grads(f, params, x, dy):
    return jax.jit(lambda p, x: _vjp(f, p, x, dy))(params, x)


def _close(got, want, dtype):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_mlp_rows_equal_blh_einsums(dtype):
    cfg = MLPConfig(d_model=8, d_ff=12)
    params = jax.tree.map(lambda a: a.astype(dtype), mlp.init(jax.random.key(0), cfg))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8), jnp.float32).astype(dtype)
    dy = jax.random.normal(jax.random.key(2), (2, 5, 8), jnp.float32)
    rows = lambda p, x: mlp.apply(p, x, cfg=cfg)  # noqa: E731
    blh = lambda p, x: mlp._apply(p, x, cfg=cfg)  # noqa: E731  (the [B, L] einsums)
    _close(_value_and_grads(rows, params, x, dy), _value_and_grads(blh, params, x, dy), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_projections_rows_equal_blh_einsums(dtype, monkeypatch):
    ks = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(ks[0], (2, 6, 16), jnp.float32).astype(dtype)
    params = {"w_DHK": jax.random.normal(ks[1], (16, 4, 4), jnp.float32).astype(dtype),
              "b_HK": jax.random.normal(ks[2], (4, 4), jnp.float32).astype(dtype),
              "wo_HKD": jax.random.normal(ks[3], (4, 4, 16), jnp.float32).astype(dtype)}
    dy = jax.random.normal(ks[4], (2, 6, 16), jnp.float32)

    def f(p, x):  # in-projection with bias, then the output projection
        o_BLHK = attention._project(x, p["w_DHK"], p["b_HK"])
        return attention._out_project(o_BLHK, p["wo_HKD"], x.dtype).astype(x.dtype)

    def both(p, x):  # one compile: the [B * L] path traced first, then the [B, L] one
        rows = _vjp(f, p, x, dy)
        monkeypatch.setattr(dense, "flat_rows", lambda: False)
        return rows, _vjp(f, p, x, dy)

    got, want = jax.jit(both)(params, x)
    _close(got, want, dtype)
