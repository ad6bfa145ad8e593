"""The context-parallel decayed linear recurrence (sequence over 4 devices, states passed by a
prefix scan) equals the unsharded recurrence: outputs, final state and gradients, per-key and
per-head decays, packed rows whose documents cross device boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from layers import linear_recurrence, segments
from sharding import context_scan

B, L, H, K, V = 2, 32, 2, 4, 3


def _inputs(per_key):
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, L, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, L, H, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, L, H, V), jnp.float32)
    shape = (B, L, H, K) if per_key else (B, L, H)
    g = -jax.nn.softplus(jax.random.normal(ks[3], shape, jnp.float32)) * 0.3
    w = jax.random.normal(ks[4], (B, L, H, V), jnp.float32)
    # Row 0: documents start at 5, 8 (device 0 / device 1 boundary) and 21; row 1: one document.
    seg = jnp.asarray([[1] * 5 + [2] * 3 + [3] * 13 + [4] * 11, [1] * L], jnp.int32)
    return q, k, v, g, w, segments.starts(seg)


@pytest.mark.parametrize("per_key", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_context_parallel_scan_matches_unsharded(per_key):
    q, k, v, g, w, reset = _inputs(per_key)
    mesh = sharding.make_mesh("data=2,sequence=4")

    def ref(q, k, v, g):
        o, h = linear_recurrence.decayed_linear_attention(q, k, v, g, None, reset, scale=0.5, form="recurrent")
        return jnp.sum(o * w) + jnp.sum(h), (o, h)

    def cp(q, k, v, g):
        o, h = context_scan.decayed_linear_attention(q, k, v, g, reset, scale=0.5, mesh=mesh, axis="sequence",
                                                     batch_axes=("data",), chunk_size=4)
        return jnp.sum(o * w) + jnp.sum(h), (o, h)

    (_, (want_o, want_h)), want_g = jax.value_and_grad(ref, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, g)
    run = jax.jit(jax.value_and_grad(cp, argnums=(0, 1, 2, 3), has_aux=True)).lower(q, k, v, g).compile()
    (_, (o, h)), grads = run(q, k, v, g)
    np.testing.assert_allclose(np.asarray(o), np.asarray(want_o), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # Devices exchange states (all-gather of [B, H, K, V]), never the sequence.
    assert "all-gather" in run.as_text()


def test_context_scan_rejects_indivisible_length():
    q, k, v, g, _, reset = _inputs(True)
    mesh = sharding.make_mesh("sequence=8")
    with pytest.raises(ValueError, match="multiple of the 'sequence' axis size 8"):
        context_scan.decayed_linear_attention(q[:, :12], k[:, :12], v[:, :12], g[:, :12], reset[:, :12],
                                              scale=1.0, mesh=mesh)


@pytest.mark.slow  # a second shard_map'd scan with gradients: ~20 s on a loaded 2-core machine
def test_context_parallel_selective_scan_matches_unsharded():
    from layers import mamba

    E, Nst = 6, 4
    ks = jax.random.split(jax.random.key(3), 7)
    u = jax.random.normal(ks[0], (B, L, E), jnp.float32)
    delta = jax.nn.softplus(jax.random.normal(ks[1], (B, L, E), jnp.float32))
    A = -jnp.exp(jax.random.normal(ks[2], (E, Nst), jnp.float32))
    Bm = jax.random.normal(ks[3], (B, L, Nst), jnp.float32)
    Cm = jax.random.normal(ks[4], (B, L, Nst), jnp.float32)
    D = jax.random.normal(ks[5], (E,), jnp.float32)
    w = jax.random.normal(ks[6], (B, L, E), jnp.float32)
    reset = _inputs(True)[-1]
    mesh = sharding.make_mesh("data=2,sequence=4")

    def ref(u, delta, Bm, Cm):
        y, h = mamba.selective_scan(u, delta, A, Bm, Cm, D, None, reset, mode="sequential")
        return jnp.sum(y * w) + jnp.sum(h), (y, h)

    def cp(u, delta, Bm, Cm):
        y, h = context_scan.selective_scan(u, delta, A, Bm, Cm, D, reset, mesh=mesh, batch_axes=("data",),
                                           chunk_size=4)
        return jnp.sum(y * w) + jnp.sum(h), (y, h)

    (_, (want_y, want_h)), want_g = jax.value_and_grad(ref, argnums=(0, 1, 2, 3), has_aux=True)(u, delta, Bm, Cm)
    (_, (y, h)), grads = jax.jit(jax.value_and_grad(cp, argnums=(0, 1, 2, 3), has_aux=True))(u, delta, Bm, Cm)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
