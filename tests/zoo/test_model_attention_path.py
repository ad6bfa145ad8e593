"""Which attention path a decoder takes: training on the default positions vouches for index
order (so impl="auto" may run the blocked path), given positions or a decoding state do not;
and the blocked path equals the full one through the whole model, values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers import attention_core
from zoo import model


def _cfg(**kw):
    return zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, **kw)


def _index_order_seen(monkeypatch, fn, *args):
    seen = []
    real = attention_core.attend
    monkeypatch.setattr(attention_core, "attend",
                        lambda *a, **k: seen.append((k["index_order"], k["impl"])) or real(*a, **k))
    jax.eval_shape(fn, *args)
    return seen


def _count_blocked(monkeypatch):
    from layers import blocked_attention
    calls = []
    real = blocked_attention.attend_blocked
    monkeypatch.setattr(blocked_attention, "attend_blocked", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_default_config_is_auto():
    cfg = _cfg()
    assert {b.mixer.impl for b in cfg.pattern} == {"auto"}


@pytest.mark.parametrize("call, expected", [
    ("default", True),
    ("segments", True),  # default positions with packed segments still follow token order
    ("positions", False),
    ("state", False),
])
def test_model_vouches_for_index_order_only_on_default_positions(monkeypatch, call, expected):
    cfg = _cfg()
    params = jax.eval_shape(lambda: zoo.init(jax.random.key(0), cfg))
    B, L = 2, 8
    tokens = jnp.zeros((B, L), jnp.int32)
    kwargs = {
        "default": {},
        "segments": {"segment_ids_BL": jnp.ones((B, L), jnp.int32).at[:, L // 2:].set(2)},
        "positions": {"positions_BL": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))},
        "state": {"state": jax.eval_shape(lambda: zoo.init_state(cfg, B, 2 * L))},
    }[call]
    seen = _index_order_seen(monkeypatch, lambda p, kw: model._forward(p, tokens, cfg, **kw), params, kwargs)
    # One trace of the scanned repeat body: every attention call of the model is seen.
    assert seen and all(s == (expected, "auto") for s in seen), seen


def test_default_model_traces_the_blocked_path_from_auto_min_len(monkeypatch):
    """Tracing only (no compile): at L = AUTO_BLOCKED_MIN_LEN the default model runs the blocked
    tiles on CPU, one call per traced attention layer; given positions keep the full path."""
    calls = _count_blocked(monkeypatch)
    cfg = _cfg()
    params = jax.eval_shape(lambda: zoo.init(jax.random.key(0), cfg))
    L = attention_core.AUTO_BLOCKED_MIN_LEN
    tokens = jnp.zeros((1, L), jnp.int32)
    jax.eval_shape(lambda p: model._forward(p, tokens, cfg), params)
    assert len(calls) == 1  # the scanned repeat body (one attention block) is traced once
    positions = jnp.arange(L, dtype=jnp.int32)[None]
    jax.eval_shape(lambda p: model._forward(p, tokens, cfg, positions_BL=positions), params)
    assert len(calls) == 1


@pytest.mark.slow  # two compiles of a model's gradient at L 128 (~30 s on the shared 2 cores)
def test_auto_model_equals_xla_values_and_gradients(monkeypatch):
    """The default model (blocked tiles at L = AUTO_BLOCKED_MIN_LEN) against impl="xla": the
    loss and every parameter gradient (random weights scaled up, random tokens and cotangent)."""
    calls = _count_blocked(monkeypatch)
    cfg = _cfg()
    L = attention_core.AUTO_BLOCKED_MIN_LEN
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 3 else p, zoo.init(jax.random.key(1), cfg))
    tokens = jax.random.randint(jax.random.key(2), (1, L), 0, cfg.vocab_size, jnp.int32)
    w = jax.random.normal(jax.random.key(3), (1, L, cfg.vocab_size), jnp.float32)

    def loss(p, c):
        logits, _, _ = model._forward(p, tokens, c)
        return jnp.sum(logits * w)

    xla = dataclasses.replace(cfg, pattern=tuple(
        dataclasses.replace(b, mixer=dataclasses.replace(b.mixer, impl="xla")) for b in cfg.pattern))
    both = jax.jit(lambda p: [jax.value_and_grad(loss)(p, c) for c in (cfg, xla)])
    (l_auto, g_auto), (l_xla, g_xla) = both(params)
    assert len(calls) == 1
    np.testing.assert_allclose(float(l_auto), float(l_xla), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_xla)):
        # fp32 sums over 128 tokens in another order: errors scale with the gradient's size.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
