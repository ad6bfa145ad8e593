"""impl="auto" on an accelerator backend (simulated: the backend query and the kernel are
replaced, tracing only): the flash kernel for head dims it supports, XLA beyond them."""

import jax
import jax.numpy as jnp
import pytest

from layers import attention_core


@pytest.mark.parametrize("K, kernel", [(8, True), (attention_core.PALLAS_MAX_HEAD_DIM + 8, False)])
def test_auto_takes_the_kernel_only_for_supported_head_dims(monkeypatch, K, kernel):
    calls = []

    def fake_kernel(q, k, v, **kw):
        calls.append(q.shape)
        return q

    monkeypatch.setitem(attention_core.KERNELS, "pallas", fake_kernel)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jax.ShapeDtypeStruct((1, 4, 2, K), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 4, 1, K), jnp.float32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    out = jax.eval_shape(lambda q, k, v: attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, impl="auto"),
                         q, kv, kv)
    assert out.shape == q.shape
    assert len(calls) == int(kernel)
