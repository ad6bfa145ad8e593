"""Beam search: beam 1 == greedy (attention and recurrent), scores equal the re-computed model
scores, never below greedy, exhaustive on a tiny vocabulary, state reordering, stop tokens, one
compile across lengths, validation."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import beam, generate

PROMPT = [5, 17, 200, 3]


def _model(preset, **kw):
    cfg = zoo.presets.get(preset, max_len=32, **kw)
    params = zoo.init(jax.random.key(3), cfg)
    # A larger init scale keeps the argmax margins clear (as tests/zoo/test_generate.py).
    return cfg, jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)


def _log_softmax(logits):
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sum_logp(params, cfg, prompt, seq):
    """Sum of the generated tokens' log-probabilities, by re-running the full forward."""
    tokens = jnp.asarray([list(prompt) + list(seq)], jnp.int32)
    logp_LV = _log_softmax(zoo.forward(params, tokens, cfg=cfg)[0])
    return float(sum(logp_LV[len(prompt) - 1 + j, t] for j, t in enumerate(seq)))


def test_reorder_state_hand_made_and_batch_axes():
    h_LBD = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    state = {"blocks": ({"mixer": {"h_BD": h_LBD, "index_B": jnp.asarray([[0, 1, 2], [3, 4, 5]], jnp.int32)},
                         "ffn": None},),
             "pos_B": jnp.asarray([7, 8, 9], jnp.int32)}
    parent_K = jnp.asarray([2, 0, 0, 1], jnp.int32)
    out = beam.reorder_state(state, parent_K)
    np.testing.assert_array_equal(out["blocks"][0]["mixer"]["h_BD"], np.asarray(h_LBD)[:, [2, 0, 0, 1]])
    np.testing.assert_array_equal(out["blocks"][0]["mixer"]["index_B"], [[2, 0, 0, 1], [5, 3, 3, 4]])
    np.testing.assert_array_equal(out["pos_B"], [9, 7, 7, 8])
    assert out["blocks"][0]["ffn"] is None
    # The axis rule agrees with the real states: the axis whose size follows the batch size.
    for preset in ("llama-tiny", "mingru-tiny", "rwkv4-tiny"):
        cfg = zoo.presets.get(preset, max_len=8)
        a, b = (jax.eval_shape(lambda n=n: zoo.init_state(cfg, n, 8)) for n in (2, 3))
        axes = beam.state_batch_axes(a)
        for la, lb, ax in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(axes)):
            assert [i for i, (x, y) in enumerate(zip(la.shape, lb.shape)) if x != y] == [ax]


@pytest.mark.parametrize("preset", ["llama-tiny", "mingru-tiny"])
def test_beam_one_equals_greedy(preset):
    cfg, params = _model(preset)
    greedy = generate.generate(params, [PROMPT], cfg, max_new_tokens=10).tokens[0]
    out = beam.beam_search(params, PROMPT, cfg, beam_size=1, max_new_tokens=10, length_penalty=0.0)
    assert out.sequences == [greedy]
    assert out.scores[0] == pytest.approx(_sum_logp(params, cfg, PROMPT, greedy), abs=1e-3)


@pytest.mark.parametrize("preset", ["llama-tiny", "rwkv4-tiny"])
def test_scores_are_model_scores_and_beat_greedy(preset):
    cfg, params = _model(preset)
    n = 8
    greedy = generate.generate(params, [PROMPT], cfg, max_new_tokens=n).tokens[0]
    out = beam.beam_search(params, PROMPT, cfg, beam_size=4, max_new_tokens=n, length_penalty=0.0)
    assert len(out.sequences) == 4 and all(len(s) == n for s in out.sequences)
    assert len({tuple(s) for s in out.sequences}) == 4
    assert out.scores == sorted(out.scores, reverse=True)
    for seq, score in zip(out.sequences, out.scores):
        assert score == pytest.approx(_sum_logp(params, cfg, PROMPT, seq), abs=1e-3)
    assert out.scores[0] >= _sum_logp(params, cfg, PROMPT, greedy) - 1e-4


def test_exhaustive_on_tiny_vocab():
    cfg, params = _model("llama-tiny", vocab_size=16)
    prompt = [3, 1, 4]
    V = 16
    # Brute force: all V^2 two-token continuations, scored with the full forward.
    batch = jnp.asarray([prompt + [a] for a in range(V)], jnp.int32)
    logp = _log_softmax(zoo.forward(params, batch, cfg=cfg))
    brute = {(a, b): logp[a, len(prompt) - 1, a] + logp[a, len(prompt), b]
             for a, b in itertools.product(range(V), range(V))}
    best = sorted(brute, key=brute.get, reverse=True)[:V]
    out = beam.beam_search(params, prompt, cfg, beam_size=V, max_new_tokens=2, length_penalty=1.0)
    assert [tuple(s) for s in out.sequences] == best
    np.testing.assert_allclose(out.scores, [brute[s] / 2 for s in best], atol=1e-4)


@pytest.mark.slow
def test_stop_tokens_finish_hypotheses_with_length_penalty():
    cfg, params = _model("llama-tiny")
    n = 8
    free = beam.beam_search(params, PROMPT, cfg, beam_size=3, max_new_tokens=n, length_penalty=0.0)
    stop = free.sequences[0][2]
    for lp, early in ((0.0, True), (1.0, False)):
        out = beam.beam_search(params, PROMPT, cfg, beam_size=3, max_new_tokens=n, length_penalty=lp,
                               stop_tokens=[stop], early_stopping=early)
        assert len(out.sequences) == 3 and out.scores == sorted(out.scores, reverse=True)
        for seq, score in zip(out.sequences, out.scores):
            assert stop not in seq[:-1] and (seq[-1] == stop or len(seq) == n)
            assert score == pytest.approx(_sum_logp(params, cfg, PROMPT, seq) / len(seq) ** lp, abs=1e-3)
        if lp == 0.0:  # unnormalised, the short finished hypothesis wins
            assert out.sequences[0][-1] == stop and len(out.sequences[0]) < n
    # Searching on (early_stopping=False) only adds hypotheses to the pool: never worse.
    eager = beam.beam_search(params, PROMPT, cfg, beam_size=3, max_new_tokens=n, length_penalty=1.0,
                             stop_tokens=[stop], early_stopping=True)
    assert out.scores[0] >= eager.scores[0] - 1e-6
    # beam 1 with a stop token == greedy cut at the stop token.
    greedy = generate.generate(params, [PROMPT], cfg, max_new_tokens=n).tokens[0]
    one = beam.beam_search(params, PROMPT, cfg, beam_size=1, max_new_tokens=n, stop_tokens=[greedy[3]])
    assert one.sequences == [greedy[: greedy.index(greedy[3]) + 1]]


def test_one_compile_across_lengths():
    cfg, params = _model("llama-tiny")
    a = beam.beam_search(params, [1, 2, 3], cfg, beam_size=2, max_new_tokens=3)
    compiled = beam.beam_jit._cache_size()
    b = beam.beam_search(params, [7, 8, 9, 10], cfg, beam_size=2, max_new_tokens=9)
    assert beam.beam_jit._cache_size() == compiled
    assert len(a.sequences[0]) == 3 and len(b.sequences[0]) == 9


def test_validation():
    cfg, params = _model("llama-tiny")
    with pytest.raises(ValueError, match="beam_size: expected a positive integer, got 0"):
        beam.beam_search(params, [1], cfg, beam_size=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive integer, got 0"):
        beam.beam_search(params, [1], cfg, beam_size=2, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt: length 30 \+ max_new_tokens 4 exceeds the cache length 32"):
        beam.beam_search(params, list(range(30)), cfg, beam_size=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="cache_len"):
        beam.beam_search(params, [1, 2], cfg, beam_size=2, max_new_tokens=4, cache_len=5)
    with pytest.raises(ValueError, match="prompt: expected at least one token"):
        beam.beam_search(params, [], cfg, beam_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"stop_tokens.*vocab_size=256"):
        beam.beam_search(params, [1], cfg, beam_size=2, max_new_tokens=2, stop_tokens=[256])
    with pytest.raises(ValueError, match="length_penalty"):
        beam.beam_search(params, [1], cfg, beam_size=2, max_new_tokens=2, length_penalty=float("nan"))
    with pytest.raises(TypeError, match="cfg"):
        beam.beam_search(params, [1], object(), beam_size=2, max_new_tokens=2)
