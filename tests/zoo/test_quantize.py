"""Weight-only int8 (per output channel) and the int8 KV cache: bytes saved and logit error,
each against the full-precision model with a stated bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers.params import ParamSpec, zeros
from zoo import generate, quantize


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_input_axes_follow_the_logical_names():
    spec = lambda *axes, **kw: ParamSpec(tuple(2 for _ in axes), axes, zeros, **kw)
    assert quantize.input_axes(spec("layers", "embed", "heads", "head_dim")) == (1,)  # wq: D in
    assert quantize.input_axes(spec("layers", "heads", "head_dim", "embed")) == (1, 2)  # wo: H, K in
    assert quantize.input_axes(spec("vocab", "embed")) == (1,)  # one scale per token row
    assert quantize.input_axes(spec("embed", "vocab")) == (0,)
    assert quantize.input_axes(spec("layers", "expert", "mlp", "embed")) == (2,)  # experts keep scales
    assert quantize.input_axes(spec("layers", "kv_lora", "heads", "head_dim")) == (1,)
    assert quantize.input_axes(spec("layers", "embed")) is None  # a vector per layer
    assert quantize.input_axes(spec("mamba_inner", "ssm_state", keep_dtype=True)) is None


def test_int8_weight_rounding_is_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 16, 8)) * jnp.arange(1, 9, dtype=jnp.float32)[None, None, :]
    q = quantize.quantize_weight(w, (1,))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (3, 1, 8)
    assert float(jnp.max(jnp.abs(q.dequantize() - w) / q.scale)) <= 0.5 + 1e-6
    np.testing.assert_array_equal(np.abs(np.asarray(q.values)).max(axis=1), 127)  # absmax maps to 127


@pytest.mark.parametrize("preset", ["llama-tiny", pytest.param("mamba-tiny", marks=pytest.mark.slow),
                                    pytest.param("mla-tiny", marks=pytest.mark.slow)])
def test_weight_only_int8_bytes_and_logit_error(preset):
    cfg = zoo.presets.get(preset, max_len=32)
    params = zoo.init(jax.random.key(0), cfg)
    q = quantize.quantize_params(params, cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    full, quant = quantize.forward(params, tokens, cfg=cfg), quantize.forward(q, tokens, cfg=cfg)
    # Each matrix rounds with ~0.6% relative error; the logits of these random models move ~3%.
    assert 1e-4 < _rel(full, quant) < 0.06
    # Matrices dominate: int8 + one fp32 scale per output channel, about 0.27-0.32 of fp32.
    ratio = quantize.tree_bytes(q) / quantize.tree_bytes(params)
    assert 0.25 < ratio < 0.33


@pytest.mark.slow
def test_memory_report_sees_the_smaller_arguments():
    cfg = zoo.presets.get("llama-tiny", max_len=32)
    params = zoo.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    full, quant = (quantize.memory_report(p, tokens, cfg) for p in (params, quantize.quantize_params(params, cfg)))
    assert quant["argument_bytes"] < 0.33 * full["argument_bytes"]
    assert full["param_bytes"] == quantize.tree_bytes(params)


@pytest.mark.slow
def test_generate_accepts_quantised_weights():
    cfg = zoo.presets.get("llama-tiny", max_len=32)
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, zoo.init(jax.random.key(3), cfg))
    q = quantize.quantize_params(params, cfg)
    out = generate.generate(q, [[5, 17, 200]], cfg, max_new_tokens=8)
    # The quantised forward is the plain forward of the dequantised tree.
    tokens = jnp.asarray([[5, 17, 200]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(quantize.forward(q, tokens, cfg=cfg)),
                                  np.asarray(zoo.forward(quantize.dequantize(q), tokens, cfg=cfg)))
    # Greedy decoding of the dequantised model (same compiled program: the tree differs).
    assert out.tokens == generate.generate(quantize.dequantize(q), [[5, 17, 200]], cfg, max_new_tokens=8).tokens


@pytest.mark.slow
def test_int8_kv_cache_bytes_and_logit_error():
    cfg = zoo.presets.get("llama-tiny", max_len=48)
    c8 = quantize.with_int8_kv_cache(cfg)
    assert all(b.mixer.kv_cache_dtype == "int8" for b in c8.pattern)
    params = zoo.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)

    def prefill_and_decode(c):
        state = zoo.init_state(c, 2, 48)
        logits, state = zoo.forward(params, tokens[:, :24], cfg=c, state=state)
        outs = [logits]
        for t in range(24, 40):
            logits_t, state = zoo.step(params, tokens[:, t], state, cfg=c)
            outs.append(logits_t[:, None])
        return jnp.concatenate(outs, 1), state

    (full, s_full), (quant, s_quant) = prefill_and_decode(cfg), prefill_and_decode(c8)
    assert 1e-5 < _rel(full, quant) < 0.02
    # head_dim 16: 16 int8 + a 4-byte scale per (position, kv head) against 64 bytes in fp32.
    kv = lambda s: sum(x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(s)
                       if jax.tree_util.keystr(p).split("'")[-2][0] in "kv")
    assert kv(s_quant) / kv(s_full) == (16 + 4) / 64
