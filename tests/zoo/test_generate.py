from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import generate

N_NEW = 6


def _reference_greedy(params, prompt_BL, cfg, n_new):
    """Greedy by re-running the full forward on the growing sequence (right-padded to one
    length, so one compilation; causal attention makes the padding invisible)."""
    B, L = prompt_BL.shape
    seq_BT = np.zeros((B, L + n_new), np.int32)
    seq_BT[:, :L] = prompt_BL
    out, margins = [], []
    for i in range(n_new):
        logits_BTV = np.asarray(zoo.forward(params, jnp.asarray(seq_BT), cfg=cfg))
        last_BV = logits_BTV[:, L + i - 1]
        top2 = np.sort(last_BV, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        seq_BT[:, L + i] = last_BV.argmax(-1)
        out.append(seq_BT[:, L + i].copy())
    return np.stack(out, axis=1), np.min(margins)


@pytest.mark.parametrize("preset", [
    "llama-tiny",
    pytest.param("gpt2-tiny", marks=pytest.mark.slow),
    pytest.param("mistral-tiny", marks=pytest.mark.slow),
    pytest.param("gemma2-tiny", marks=pytest.mark.slow),
])
def test_greedy_matches_full_forward_and_compiles_once(preset):
    cfg = zoo.presets.get(preset, d_model=32, n_layers=2)
    n_new = N_NEW if preset == "llama-tiny" else 24  # past the tiny sliding window of 16
    params = zoo.init(jax.random.key(3), cfg)
    rng = np.random.default_rng(0)
    prompt_a = rng.integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
    prompt_b = rng.integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)

    before = generate.greedy_jit._cache_size()
    out_a = generate.greedy(params, prompt_a, cfg, n_new)
    out_b = generate.greedy(params, prompt_b, cfg, n_new)
    assert generate.greedy_jit._cache_size() == before + 1  # same shapes: one compilation
    assert out_a.shape == (2, n_new) and out_a.dtype == jnp.int32

    for prompt, out in ((prompt_a, out_a), (prompt_b, out_b)):
        want, margin = _reference_greedy(params, prompt, cfg, n_new)
        assert margin > 1e-4, "near-tie logits: pick another seed"
        np.testing.assert_array_equal(np.asarray(out), want)


def test_greedy_validates_inputs():
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2)
    params = jax.eval_shape(lambda: zoo.init(jax.random.key(0), cfg))
    prompt = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="exceeds the model's max_len=256"):
        generate.greedy(params, prompt, cfg, 253)
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive integer, got 0"):
        generate.greedy(params, prompt, cfg, 0)
    with pytest.raises(ValueError, match="prompt_BL: expected rank 2"):
        generate.greedy(params, np.zeros((4,), np.int32), cfg, 2)
    with pytest.raises(TypeError, match="prompt_BL: expected an integer dtype"):
        generate.greedy(params, np.zeros((1, 4), np.float32), cfg, 2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=256\)"):
        generate.greedy(params, np.full((1, 4), 256, np.int32), cfg, 2)
