"""Under rules that split the sequence (the `cp` preset on a mesh with a `sequence` axis), the
layers themselves switch to context parallelism: attention_core.attend to ring attention (zigzag
balanced inside the call), the decayed linear recurrence and Mamba's selective scan to the
context-parallel scans; the results equal the unsharded ones (values and gradients, packed
rows, windows, initial states), a decode step keeps the gathered path, and the helper that
decides says None outside the rules and inside the scan's own shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import sharding
from layers import attention_core, linear_recurrence, mamba, segments
from sharding import context

B, L, H, G, K = 2, 16, 4, 2, 8
MESH = "data=2,sequence=4"
# Row 0: documents start at 3 and 11 (inside device blocks of 4 tokens); row 1: one document.
SEG = jnp.asarray([[1] * 3 + [2] * 8 + [3] * 5, [1] * L], jnp.int32)


def _positions(seg):
    starts_BL = segments.starts(seg)
    idx = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return idx - jax.lax.cummax(jnp.where(starts_BL, idx, 0), axis=1)


def test_sequence_axis_follows_rules_and_manual_axes():
    assert context.sequence_axis() is None
    with sharding.use_rules(sharding.make_mesh("fsdp=8"), "cp"):
        assert context.sequence_axis() is None  # no sequence axis on this mesh
    mesh = sharding.make_mesh(MESH)
    with sharding.use_rules(mesh, "fsdp"):
        assert context.sequence_axis() is None  # seq not split by these rules
    with sharding.use_rules(mesh, "cp"):
        assert context.sequence_axis() == "sequence"
        assert context.sequence_split(4, 16) == (mesh, "sequence", ("data",))
        assert context.sequence_split(4, 6) is None  # 6 tokens do not divide over 4 devices
        seen = []

        def body(x):
            seen.append(context.sequence_axis())
            return x

        jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(None, "sequence"),
                              out_specs=PartitionSpec(None, "sequence")))(jnp.ones((2, 8)))
        assert seen == [None]


# The default run covers the same dispatch through the cp train step of a Llama + GLA model
# (tests/sharding/test_train_step.py); these two add windows, gradients per input, and h0.
@pytest.mark.slow
def test_attend_is_ring_attention_under_cp_rules():
    window = 6
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, L, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, L, G, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, L, G, K), jnp.float32)
    w = jax.random.normal(ks[3], (B, L, H, K), jnp.float32)
    pos = _positions(SEG)

    def loss(q, k, v, impl):
        out = attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, q_seg_BL=SEG, k_seg_BS=SEG, causal=True,
                                    window=window, impl=impl)
        return jnp.sum(out * w), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, want), want_g = grad(q, k, v, "reference")
    with sharding.use_rules(sharding.make_mesh(MESH), "cp"):
        run = jax.jit(grad, static_argnums=3).lower(q, k, v, "xla").compile()
    (_, got), got_g = run(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # K/V blocks (and the zigzag exchange) travel by ppermute.
    assert "collective-permute" in run.as_text()


def test_decode_step_keeps_the_gathered_path_under_cp_rules():
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, 1, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, L, G, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, L, G, K), jnp.float32)
    k_pos = jnp.where(jnp.arange(L) < 11, jnp.arange(L), -1)[None].repeat(B, 0).astype(jnp.int32)
    q_pos = jnp.full((B, 1), 10, jnp.int32)

    def one(q, k, v):
        return attention_core.attend(q, k, v, q_pos_BL=q_pos, k_pos_BS=k_pos)

    want = jax.jit(one)(q, k, v)
    with sharding.use_rules(sharding.make_mesh(MESH), "cp"):
        run = jax.jit(one).lower(q, k, v).compile()
    np.testing.assert_allclose(np.asarray(run(q, k, v)), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert "collective-permute" not in run.as_text()


@pytest.mark.slow
def test_linear_recurrence_is_context_parallel_under_cp_rules():
    Hl, Kl, V = 2, 4, 3
    ks = jax.random.split(jax.random.key(2), 6)
    q = jax.random.normal(ks[0], (B, L, Hl, Kl), jnp.float32)
    k = jax.random.normal(ks[1], (B, L, Hl, Kl), jnp.float32)
    v = jax.random.normal(ks[2], (B, L, Hl, V), jnp.float32)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, L, Hl, Kl), jnp.float32)) * 0.3
    h0 = jax.random.normal(ks[4], (B, Hl, Kl, V), jnp.float32)
    w = jax.random.normal(ks[5], (B, L, Hl, V), jnp.float32)
    reset = segments.starts(SEG)

    def loss(q, k, v, g, h0, form):
        o, h = linear_recurrence.decayed_linear_attention(q, k, v, g, h0, reset, scale=0.5, form=form, chunk_size=2)
        return jnp.sum(o * w) + jnp.sum(h * h), (o, h)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    (_, (want_o, want_h)), want_g = grad(q, k, v, g, h0, "recurrent")
    with sharding.use_rules(sharding.make_mesh(MESH), "cp"):
        run = jax.jit(grad, static_argnums=5).lower(q, k, v, g, h0, "chunked").compile()
    (_, (o, h)), grads = run(q, k, v, g, h0)
    np.testing.assert_allclose(np.asarray(o), np.asarray(want_o), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # The devices exchange chunk-end states ([B, H, K, V] per device), not the sequence.
    hlo = run.as_text()
    assert "all-gather" in hlo or "all-reduce" in hlo


def test_selective_scan_is_context_parallel_under_cp_rules():
    E, N = 6, 4
    ks = jax.random.split(jax.random.key(3), 7)
    u = jax.random.normal(ks[0], (B, L, E), jnp.float32)
    delta = jax.nn.softplus(jax.random.normal(ks[1], (B, L, E), jnp.float32))
    A = -jnp.exp(jax.random.normal(ks[2], (E, N), jnp.float32))
    Bm = jax.random.normal(ks[3], (B, L, N), jnp.float32)
    Cm = jax.random.normal(ks[4], (B, L, N), jnp.float32)
    D = jax.random.normal(ks[5], (E,), jnp.float32)
    h0 = jax.random.normal(ks[6], (B, E, N), jnp.float32)
    reset = segments.starts(SEG)

    def scan(u, delta, Bm, Cm, h0, mode):
        return mamba.selective_scan(u, delta, A, Bm, Cm, D, h0, reset, mode=mode, chunk_size=2)

    want_y, want_h = scan(u, delta, Bm, Cm, h0, "sequential")
    with sharding.use_rules(sharding.make_mesh(MESH), "cp"):
        run = jax.jit(scan, static_argnums=5).lower(u, delta, Bm, Cm, h0, "chunked").compile()
    y, h = run(u, delta, Bm, Cm, h0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), rtol=1e-5, atol=1e-5)
    assert "all-gather" in run.as_text() or "all-reduce" in run.as_text()
