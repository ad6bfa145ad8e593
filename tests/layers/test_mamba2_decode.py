"""Mamba-2's one-token forward (what the model's decode step runs): the sequential form, never a
token padded to a chunk, with the same values and state as the chunked form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mamba2
from layers.mamba2 import Mamba2Config
from tests.layers import mixer_harness as mh

# chunk_size 5 appears in no other dimension, so any chunk-shaped array in the trace is visible.
CFG = Mamba2Config(d_model=16, d_state=8, head_dim=8, n_groups=2, chunk_size=5)


@jax.jit
def _case():
    params = mamba2.init(jax.random.key(0), CFG)
    ks = jax.random.split(jax.random.key(1), 3)
    state = jax.eval_shape(lambda: mamba2.init_state(CFG, 2, 8))
    state = {"conv_BWK": jax.random.normal(ks[0], state["conv_BWK"].shape),
             "ssm_BHPN": jax.random.normal(ks[1], state["ssm_BHPN"].shape)}
    x_B1D = jax.random.normal(ks[2], (2, 1, CFG.d_model))
    return params, x_B1D, state


def test_one_token_forward_builds_no_chunk():
    params, x_B1D, state = jax.eval_shape(_case)
    jaxpr = jax.make_jaxpr(lambda p, x, s: mamba2.forward(p, x, cfg=CFG, state=s))(params, x_B1D, state)
    shapes = mh.jaxpr_shapes(jaxpr)
    assert shapes and not [s for s in shapes if CFG.chunk_size in s], sorted(shapes)


@pytest.mark.slow  # two compiles of the mixer; test_mamba2.py's step == forward covers the default suite
def test_one_token_forward_equals_the_chunked_form():
    params, x_B1D, state = _case()
    y, s = mamba2.forward(params, x_B1D, cfg=CFG, state=state)
    y_c, s_c = mamba2._apply(params, x_B1D, state, None, cfg=CFG, mode="chunked")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_c), rtol=1e-5, atol=1e-6)
    for k in s:
        np.testing.assert_allclose(np.asarray(s[k]), np.asarray(s_c[k]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(s["ssm_BHPN"]), np.asarray(state["ssm_BHPN"]))
