"""The decode loop: greedy == argmax of the full forward, one compile across lengths, ragged
prompts == each prompt alone, stop tokens, seeded sampling, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import generate
from zoo.sampling import SamplingConfig


def _reference_greedy(params, prompt, cfg, n_new):
    """Greedy by re-running the full forward on the growing sequence, right-padded to one length
    (causal models ignore what follows, and one shape means one compile)."""
    seq = np.zeros((1, len(prompt) + n_new), np.int32)
    seq[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n_new):
        logits = np.asarray(zoo.forward(params, jnp.asarray(seq), cfg=cfg))[0, i - 1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "near-tie logits: pick another seed"
        seq[0, i] = int(logits.argmax())
    return seq[0, len(prompt):].tolist()


def _model(preset, **kw):
    cfg = zoo.presets.get(preset, **kw)
    params = zoo.init(jax.random.key(3), cfg)
    # A larger init scale makes windows and softcaps matter and keeps argmax margins clear.
    return cfg, jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)


@pytest.mark.parametrize("preset", ["llama-tiny", pytest.param("gemma2-tiny", marks=pytest.mark.slow),
                                    pytest.param("gpt2-tiny", marks=pytest.mark.slow)])
def test_greedy_matches_full_forward(preset):
    cfg, params = _model(preset, max_len=64)
    prompt = [5, 17, 200, 3, 9]
    out = generate.generate(params, [prompt], cfg, max_new_tokens=20)
    assert out.tokens[0] == _reference_greedy(params, prompt, cfg, 20)


def test_one_compile_across_lengths_and_prompts():
    cfg, params = _model("llama-tiny", max_len=64)
    a = generate.generate(params, [[1, 2, 3]], cfg, max_new_tokens=4)
    compiled = generate.decode_jit._cache_size()
    b = generate.generate(params, [[7, 8, 9, 10, 11]], cfg, max_new_tokens=40)
    assert generate.decode_jit._cache_size() == compiled
    assert len(a.tokens[0]) == 4 and len(b.tokens[0]) == 40


def test_ragged_batch_equals_each_prompt_alone():
    cfg, params = _model("mistral-tiny", max_len=64)
    prompts = [[4, 8, 15], [16, 23, 42, 99, 100, 7, 1], [250]]
    together = generate.generate(params, prompts, cfg, max_new_tokens=12)
    for p, row in zip(prompts, together.tokens):
        assert row == generate.generate(params, [p], cfg, max_new_tokens=12).tokens[0]


def test_stop_tokens_end_rows_independently():
    cfg, params = _model("llama-tiny", max_len=64)
    free = generate.generate(params, [[1, 2], [3, 4]], cfg, max_new_tokens=10)
    stop = free.tokens[0][3]
    out = generate.generate(params, [[1, 2], [3, 4]], cfg, max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    assert np.all(out.tokens_BN[0, len(out.tokens[0]):] == -1)
    if stop not in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1]


def test_sampling_is_seeded():
    cfg, params = _model("llama-tiny", max_len=64)
    s = SamplingConfig(temperature=1.0, top_p=0.9)
    a = generate.generate(params, [[1, 2, 3]] * 2, cfg, max_new_tokens=16, sampling=s, seed=1)
    b = generate.generate(params, [[1, 2, 3]] * 2, cfg, max_new_tokens=16, sampling=s, seed=1)
    c = generate.generate(params, [[1, 2, 3]] * 2, cfg, max_new_tokens=16, sampling=s, seed=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_greedy_wrapper_and_validation():
    cfg, params = _model("llama-tiny", max_len=32)
    out = generate.greedy(params, np.array([[1, 2, 3]], np.int32), cfg, 5)
    assert out.shape == (1, 5) and out.dtype == jnp.int32
    with pytest.raises(ValueError, match="exceeds the cache length 32"):
        generate.generate(params, [[1, 2]], cfg, max_new_tokens=31)
    # A prompt whose bucket would not fit still runs when prompt + new tokens fit.
    assert len(generate.generate(params, [list(range(1, 18))], cfg, max_new_tokens=15).tokens[0]) == 15
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive integer, got 0"):
        generate.generate(params, [[1]], cfg, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompts\[1\].*vocab_size=256"):
        generate.generate(params, [[1], [256]], cfg, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(params, [[]], cfg, max_new_tokens=2)
    with pytest.raises(TypeError, match="integer dtype"):
        generate.greedy(params, np.zeros((1, 4), np.float32), cfg, 2)


@pytest.mark.slow
def test_rolling_cache_generates_past_the_cache_with_constant_state():
    """Sinks 4 + window 8 = 12 cache slots, 40 new tokens: greedy equals the argmax of the full
    forward under the same sink + window mask, and the state does not grow with the length."""
    cfg, params = _model("llama-tiny", max_len=64)
    rolling = generate.with_rolling_cache(cfg, sinks=4, window=8)
    prompt = [5, 17, 200, 3, 9, 11]
    out = generate.generate(params, [prompt], rolling, max_new_tokens=40, cache_len=64)
    assert out.tokens[0] == _reference_greedy(params, prompt, rolling, 40)
    size = lambda c, n: sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(jax.eval_shape(lambda: zoo.init_state(c, 1, n))))
    assert size(rolling, 64) == size(rolling, 1 << 16) < size(cfg, 64)


def test_prompt_longer_than_the_cache_is_refused():
    cfg = zoo.presets.get("llama-tiny", max_len=16)
    with pytest.raises(ValueError, match="prompts: the longest prompt has 20 tokens.*cache length 16"):
        generate.generate(None, [list(range(20))], cfg, max_new_tokens=1)


# switch-tiny routes with capacity dispatch: which tokens an expert drops depends on how many
# tokens share the call, so a one-token step and a full forward legitimately differ.
EVERY_TINY_DECODER = [n for n in zoo.presets.names("decoder") if n.endswith("-tiny") and n != "switch-tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", EVERY_TINY_DECODER)
def test_every_preset_generates_its_full_forward_argmax(preset):
    """The one decode loop serves every family: KV caches, latent caches, recurrent states,
    hybrids and MoE all give the argmax of a full forward rerun on the growing sequence."""
    cfg, params = _model(preset, max_len=32)
    prompt = [5, 17, 200, 3, 9]
    out = generate.generate(params, [prompt], cfg, max_new_tokens=8)
    assert out.tokens[0] == _reference_greedy(params, prompt, cfg, 8)
