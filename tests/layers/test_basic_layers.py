"""Norms, dense, MLP, embedding and ParamSpec against NumPy formulas (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import dense, embed, mlp, norms
from layers import params as P
from layers.checks import ConfigError
from layers.mlp import MLPConfig
from layers.norms import NormConfig


def _rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def np_rms(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def np_layer(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(w, np.float64) + np.asarray(b, np.float64)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norms_match_formula_values_and_grads(kind):
    cfg = NormConfig(kind=kind, eps=1e-5)
    x = _rand(0, (3, 5, 16)) * 3.0 + 1.0
    params = {k: _rand(i + 1, v.shape) for i, (k, v) in enumerate(norms.param_specs(cfg, 16).items())}
    y = norms.forward(params, x, cfg=cfg)
    want = np_rms(x, params["scale"], 1e-5) if kind == "rms" else np_layer(x, params["scale"], params["bias"], 1e-5)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # Gradient against a finite difference of the float64 formula along a random direction.
    d = np.asarray(_rand(9, x.shape), np.float64)
    cot = np.asarray(_rand(10, x.shape), np.float64)
    g = np.asarray(jax.grad(lambda x: jnp.sum(norms.forward(params, x, cfg=cfg) * jnp.asarray(cot, jnp.float32)))(x))
    f = (lambda x: np_rms(x, params["scale"], 1e-5)) if kind == "rms" else (
        lambda x: np_layer(x, params["scale"], params["bias"], 1e-5))
    eps = 1e-6
    xd = np.asarray(x, np.float64)
    fd = ((f(xd + eps * d) - f(xd - eps * d)) * cot).sum() / (2 * eps)
    np.testing.assert_allclose((g * d).sum(), fd, rtol=1e-4)


def test_norm_bf16_reduces_in_fp32():
    cfg = NormConfig(kind="rms")
    x = (_rand(0, (4, 64)) * 100.0).astype(jnp.bfloat16)
    params = {"scale": _rand(1, (64,))}
    y = norms.forward(params, x, cfg=cfg)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np_rms(np.asarray(x, np.float32), params["scale"], 1e-6),
                               rtol=2e-2, atol=2e-2)


def test_gemma_scale_offset():
    cfg = NormConfig(kind="rms", scale_offset=1.0)
    params = P.init(jax.random.key(0), norms.param_specs(cfg, 8))
    assert np.all(np.asarray(params["scale"]) == 0.0)  # stored around zero, applied as 1 + w
    x = _rand(2, (2, 8))
    w = _rand(3, (8,))
    np.testing.assert_allclose(np.asarray(norms.forward({"scale": w}, x, cfg=cfg)),
                               np_rms(x, 1.0 + np.asarray(w), 1e-6), rtol=1e-5, atol=1e-5)


def test_norm_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        NormConfig(kind="batch")
    with pytest.raises(ConfigError, match="eps"):
        NormConfig(eps=0.0)


def test_dense_with_bias():
    params = {"w": _rand(0, (6, 5)), "b": _rand(1, (5,))}
    x = _rand(2, (2, 3, 6))
    want = np.asarray(x, np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"])
    np.testing.assert_allclose(np.asarray(dense.forward(params, x)), want, rtol=1e-5, atol=1e-5)


GELU = lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))
GELU_TANH = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
NP_ACT = {"gelu": GELU, "gelu_tanh": GELU_TANH, "relu": lambda x: np.maximum(x, 0),
          "silu": lambda x: x / (1 + np.exp(-x))}


@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu_tanh", True), ("gelu", False),
                                               ("relu", False)])
def test_mlp_matches_formula(activation, gated):
    cfg = MLPConfig(d_model=8, d_ff=12, activation=activation, gated=gated, use_bias=not gated)
    params = jax.tree.map(lambda s: _rand(hash(s.shape) % 1000, s.shape),
                          mlp.param_specs(cfg), is_leaf=P.is_spec)
    x = _rand(7, (2, 3, 8))
    y = mlp.apply(params, x, cfg=cfg)
    xd = np.asarray(x, np.float64)
    lin = lambda p, h: h @ np.asarray(p["w"], np.float64) + (np.asarray(p["b"]) if "b" in p else 0.0)
    act = NP_ACT[activation]
    h = act(lin(params["gate"], xd)) * lin(params["up"], xd) if gated else act(lin(params["up"], xd))
    np.testing.assert_allclose(np.asarray(y), lin(params["down"], h), rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda x: jnp.sum(mlp.apply(params, x, cfg=cfg) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0


def test_embedding_tied_and_untied():
    tied = P.init(jax.random.key(0), embed.param_specs(10, 4, tied=True))
    untied = P.init(jax.random.key(0), embed.param_specs(10, 4, tied=False))
    assert set(tied) == {"table_VD"} and set(untied) == {"table_VD", "unembed_DV"}
    tokens = jnp.array([[1, 9, 3]], jnp.int32)
    x = embed.embed(tied, tokens)
    np.testing.assert_array_equal(np.asarray(x[0, 1]), np.asarray(tied["table_VD"][9]))
    np.testing.assert_allclose(np.asarray(embed.unembed(tied, x)),
                               np.asarray(x) @ np.asarray(tied["table_VD"]).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(embed.unembed(untied, x)),
                               np.asarray(x) @ np.asarray(untied["unembed_DV"]), rtol=1e-5, atol=1e-6)


def test_param_spec_helpers():
    specs = {"a": P.ParamSpec((3, 4), ("embed", "mlp"), P.fan_in_normal((0,)))}
    stacked = P.stack(specs, 5)
    assert stacked["a"].shape == (5, 3, 4) and stacked["a"].logical_axes == ("layers", "embed", "mlp")
    params = P.init(jax.random.key(0), stacked)
    a = np.asarray(params["a"])
    assert a.shape == (5, 3, 4) and not np.allclose(a[0], a[1])  # each layer its own draw
    assert P.count(stacked) == 60
    with pytest.raises(ValueError, match="logical_axes"):
        P.ParamSpec((3, 4), ("embed",), P.zeros)


def test_default_weight_decay_rule():
    mat = P.ParamSpec((3, 4), ("embed", "mlp"), P.zeros)
    vec = P.ParamSpec((4,), ("mlp",), P.zeros)
    pinned = P.ParamSpec((4, 16), ("mlp", "state"), P.zeros, keep_dtype=True)  # e.g. A_log
    table = P.ParamSpec((10, 4), ("vocab", "embed"), P.zeros, decay=False)
    mask = P.decay_mask(P.stack({"mat": mat, "vec": vec, "pinned": pinned, "table": table}, 2))
    # Stacking adds the "layers" axis, which does not count: a stacked vector stays undecayed.
    assert mask == {"mat": True, "vec": False, "pinned": False, "table": False}
