"""The decayed linear recurrence: every form against a per-token NumPy loop, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import linear_recurrence
from layers.checks import ConfigError
from tests.layers.mixer_harness import BF16_TOL, FP32_TOL, assert_close

FORMS = ["recurrent", "chunked", "parallel"]
# Jitted: one compile per shape instead of op-by-op dispatch (validation still runs at trace time).
decayed_linear_attention = jax.jit(linear_recurrence.decayed_linear_attention,
                                   static_argnames=("scale", "form", "chunk_size"))


def loop_reference(q, k, v, g, h0, reset, scale):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, token by token in float64."""
    q, k, v, h0 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v, h0))
    B, L, H, K = q.shape
    if g is None:
        g = np.zeros((B, L, H, K))
    g = np.asarray(g, np.float64)
    if g.ndim == 3:
        g = np.repeat(g[..., None], K, axis=-1)
    reset = np.zeros((B, L), bool) if reset is None else np.asarray(reset)
    o = np.zeros(v.shape[:3] + (v.shape[-1],))
    h = h0.copy()
    for b in range(B):
        for t in range(L):
            if reset[b, t]:
                h[b] = 0.0
            for hh in range(H):
                h[b, hh] = np.exp(g[b, t, hh])[:, None] * h[b, hh] + np.outer(k[b, t, hh], v[b, t, hh])
                o[b, t, hh] = scale * q[b, t, hh] @ h[b, hh]
    return o, h


def make(key, B, L, H, K, V, gate="key", temp=1.0, dtype=jnp.float32):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, L, H, K)).astype(dtype)
    k = jax.random.normal(ks[1], (B, L, H, K)).astype(dtype)
    v = jax.random.normal(ks[2], (B, L, H, V)).astype(dtype)
    # fla's gate recipe: logsigmoid(randn) / temperature.
    if gate == "key":
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, L, H, K))) / temp
    elif gate == "head":
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, L, H))) / temp
    else:
        g = None
    h0 = jax.random.normal(ks[4], (B, H, K, V))
    return q, k, v, g, h0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("L, gate", [(63, "key"), (15, "head")])  # 63: 4 chunks, padded
def test_forms_match_loop(form, gate, L):
    q, k, v, g, h0 = make(jax.random.key(L), 2, L, 2, 8, 6, gate=gate)
    o, h = decayed_linear_attention(q, k, v, g, h0, scale=0.3, form=form, chunk_size=16)
    o_ref, h_ref = loop_reference(q, k, v, g, h0, None, 0.3)
    assert_close(o, o_ref, FP32_TOL, f"{form} output")
    assert_close(h, h_ref, FP32_TOL, f"{form} state")


def test_no_decay_matches_loop():
    q, k, v, g, h0 = make(jax.random.key(2), 2, 15, 2, 8, 6, gate="none")
    o, h = decayed_linear_attention(q, k, v, None, h0, scale=0.3, form="chunked", chunk_size=4)
    o_ref, h_ref = loop_reference(q, k, v, None, h0, None, 0.3)
    assert_close(o, o_ref, FP32_TOL, "output")
    assert_close(h, h_ref, FP32_TOL, "state")


@pytest.mark.parametrize("form, temp", [("chunked", 0.1), ("chunked", 10.0), ("parallel", 0.1)])
def test_gate_temperatures(form, temp):
    q, k, v, g, h0 = make(jax.random.key(3), 1, 40, 2, 8, 8, temp=temp)
    o, h = decayed_linear_attention(q, k, v, g, h0, scale=0.5, form=form, chunk_size=16)
    o_ref, h_ref = loop_reference(q, k, v, g, h0, None, 0.5)
    assert_close(o, o_ref, FP32_TOL, "output")
    assert_close(h, h_ref, FP32_TOL, "state")


@pytest.mark.parametrize("form", FORMS)
def test_resets_match_loop(form):
    q, k, v, g, h0 = make(jax.random.key(4), 2, 37, 2, 4, 4)
    reset = np.zeros((2, 37), bool)
    reset[0, [5, 16, 17, 30]] = True  # 16: first token of a chunk; 17 right after
    reset[1, [0, 36]] = True          # 0: the carried state itself is dropped
    o, h = decayed_linear_attention(q, k, v, g, h0, jnp.asarray(reset), scale=1.0, form=form,
                                    chunk_size=8)
    o_ref, h_ref = loop_reference(q, k, v, g, h0, reset, 1.0)
    assert_close(o, o_ref, FP32_TOL, "output")
    assert_close(h, h_ref, FP32_TOL, "state")


@pytest.mark.parametrize("form, gate", [("chunked", "key"), ("parallel", "head")])
def test_gradients_match_recurrent(form, gate):
    """Gradients of every input against the scan form (itself checked against the loop above)."""
    q, k, v, g, h0 = make(jax.random.key(5), 2, 21, 2, 4, 4, gate=gate)
    reset = jnp.zeros((2, 21), bool).at[1, 9].set(True)
    cot_o = jax.random.normal(jax.random.key(6), (2, 21, 2, 4))
    cot_h = jax.random.normal(jax.random.key(7), h0.shape)

    def loss(form, *args):
        o, h = decayed_linear_attention(*args, reset, scale=0.7, form=form, chunk_size=8)
        return jnp.sum(o * cot_o) + jnp.sum(h * cot_h)

    want = jax.grad(lambda *a: loss("recurrent", *a), argnums=range(5))(q, k, v, g, h0)
    got = jax.grad(lambda *a: loss(form, *a), argnums=range(5))(q, k, v, g, h0)
    for name, a, b in zip("qkvgh", got, want):
        assert_close(a, b, FP32_TOL, f"d{name}")


def test_recurrent_gradient_matches_finite_differences():
    q, k, v, g, h0 = make(jax.random.key(8), 1, 6, 1, 3, 2)

    def f(g):
        return decayed_linear_attention(q, k, v, g, h0, scale=1.0, form="recurrent")[0].sum()

    def f_ref(g):
        return loop_reference(q, k, v, g, h0, None, 1.0)[0].sum()

    grad = np.asarray(jax.grad(f)(g))
    g64 = np.asarray(g, np.float64)
    eps = 1e-5
    idx = [(0, 0, 0, 0), (0, 3, 0, 2), (0, 5, 0, 1)]
    for i in idx:
        up, dn = g64.copy(), g64.copy()
        up[i] += eps
        dn[i] -= eps
        fd = (f_ref(up) - f_ref(dn)) / (2 * eps)
        np.testing.assert_allclose(grad[i], fd, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("form", ["chunked"])
def test_bf16_inputs_fp32_state(form):
    q, k, v, g, h0 = make(jax.random.key(9), 2, 31, 2, 8, 8, dtype=jnp.bfloat16)
    o, h = decayed_linear_attention(q, k, v, g, h0, scale=0.35, form=form, chunk_size=16)
    assert o.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    o_ref, h_ref = loop_reference(q, k, v, g, h0, None, 0.35)
    assert_close(o, o_ref, BF16_TOL, "output")
    assert_close(h, h_ref, BF16_TOL, "state")


def test_bad_arguments_name_themselves():
    q, k, v, g, h0 = make(jax.random.key(11), 1, 5, 2, 4, 4)
    with pytest.raises(ConfigError, match="form"):
        decayed_linear_attention(q, k, v, g, scale=1.0, form="scan")
    with pytest.raises(ConfigError, match="chunk_size"):
        decayed_linear_attention(q, k, v, g, scale=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="k_BLHK"):
        decayed_linear_attention(q, k[:, :4], v, g, scale=1.0)
    with pytest.raises(ValueError, match="h0_BHKV"):
        decayed_linear_attention(q, k, v, g, h0[:, :1], scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("L", [500, 1000])
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("temp", [0.1, 1.0, 10.0])
def test_long_odd_lengths(L, chunk, temp):
    q, k, v, g, h0 = make(jax.random.key(L + chunk), 1, L, 2, 8, 8, temp=temp)
    o, h = decayed_linear_attention(q, k, v, g, h0, scale=8 ** -0.5, form="chunked", chunk_size=chunk)
    o_r, h_r = decayed_linear_attention(q, k, v, g, h0, scale=8 ** -0.5, form="recurrent")
    assert_close(o, o_r, FP32_TOL, "output")
    assert_close(h, h_r, FP32_TOL, "state")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_stress_extreme_decays_8192(form):
    q, k, v, g, h0 = make(jax.random.key(12), 1, 8192, 2, 16, 16, temp=0.1)

    def loss(q, k, v, g, h0):
        o, h = decayed_linear_attention(q, k, v, g, h0, scale=0.25, form=form, chunk_size=64)
        return jnp.mean(o ** 2) + jnp.mean(h ** 2)

    val, grads = jax.jit(jax.value_and_grad(loss, argnums=range(5)))(q, k, v, g, h0)
    assert np.isfinite(float(val))
    for gr in grads:
        assert np.all(np.isfinite(np.asarray(gr)))
