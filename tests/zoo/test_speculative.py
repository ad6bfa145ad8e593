"""Speculative decoding: greedy output == target-only greedy (attention target with a recurrent
draft and the reverse), the acceptance rule reproduces the target's distribution (hand-made
distributions, and whole sequences of toy models on a 4-token vocabulary), one compile across
lengths, the acceptance rate."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import generate, speculative
from zoo.sampling import SamplingConfig

PROMPT = [5, 17, 200, 3, 9]


def _model(preset, seed, scale=3.0, **kw):
    cfg = zoo.presets.get(preset, **kw)
    params = zoo.init(jax.random.key(seed), cfg)
    # A larger init scale keeps greedy margins clear (as tests/zoo/test_generate.py).
    return cfg, jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, params)


def _tv(a, b):
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def test_accept_rule_on_hand_made_distributions():
    """The first token a block emits is distributed as p_1 whatever q is, and a draft token is
    accepted with probability sum_v min(p_1, q_1) (Leviathan et al., eq. 1)."""
    V, G, n = 5, 2, 50_000
    p_JV = np.array([[0.05, 0.4, 0.3, 0.2, 0.05], [0.2] * 5, [0.1, 0.1, 0.1, 0.1, 0.6]], np.float32)
    q_GV = np.array([[0.5, 0.1, 0.1, 0.1, 0.2], [0.25, 0.25, 0.0, 0.25, 0.25]], np.float32)
    k_d, k_a = jax.random.split(jax.random.key(0))
    drafts_nG = jax.random.categorical(k_d, jnp.log(jnp.asarray(q_GV)), shape=(n, G)).astype(jnp.int32)
    n_B, x_B = speculative.accept(k_a, drafts_nG, jnp.broadcast_to(jnp.asarray(q_GV), (n, G, V)),
                                  jnp.broadcast_to(jnp.asarray(p_JV), (n, G + 1, V)))
    n_B, x_B, d1 = np.asarray(n_B), np.asarray(x_B), np.asarray(drafts_nG[:, 0])
    first = np.where(n_B > 0, d1, x_B)
    # n = 50k draws over 5 outcomes: the expected total variation is about 0.004.
    assert _tv(np.bincount(first, minlength=V) / n, p_JV[0]) < 0.012
    np.testing.assert_allclose((n_B > 0).mean(), np.minimum(p_JV[0], q_GV[0]).sum(), atol=0.008)
    # All accepted: the bonus comes from p_3; never beyond gamma.
    assert n_B.max() == G and _tv(np.bincount(x_B[n_B == G], minlength=V) / (n_B == G).sum(), p_JV[2]) < 0.03


@pytest.mark.slow
def test_greedy_equals_target_greedy_attention_target_recurrent_draft():
    tc, tp = _model("llama-tiny", 3, max_len=48)
    dc, dp = _model("mingru-tiny", 4, max_len=48)
    want = generate.generate(tp, [PROMPT], tc, max_new_tokens=24).tokens[0]
    out = speculative.speculative_generate(tp, dp, [PROMPT], target_cfg=tc, draft_cfg=dc, max_new_tokens=24,
                                           gamma=3)
    assert out.tokens[0] == want
    assert 0.0 <= out.acceptance_rate <= 1.0 and out.proposed == 3 * out.blocks
    # Another length reuses the program.
    compiled = speculative.speculative_jit._cache_size()
    short = speculative.speculative_generate(tp, dp, [PROMPT], target_cfg=tc, draft_cfg=dc, max_new_tokens=7,
                                             gamma=3)
    assert short.tokens[0] == want[:7] and speculative.speculative_jit._cache_size() == compiled


@pytest.mark.slow
def test_greedy_equals_target_greedy_recurrent_target_attention_draft_ragged_batch():
    tc, tp = _model("rwkv7-tiny", 3, max_len=48)
    dc, dp = _model("llama-tiny", 5, max_len=48)
    prompts = [PROMPT, [42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    want = generate.generate(tp, prompts, tc, max_new_tokens=20).tokens
    out = speculative.speculative_generate(tp, dp, prompts, target_cfg=tc, draft_cfg=dc, max_new_tokens=20,
                                           gamma=3)
    assert out.tokens == want
    # Stop tokens end rows inside a block.
    stop = want[0][5]
    cut = speculative.speculative_generate(tp, dp, prompts[:1], target_cfg=tc, draft_cfg=dc, max_new_tokens=20,
                                           gamma=3, stop_tokens=[stop])
    assert cut.tokens[0] == want[0][: want[0].index(stop) + 1]


@pytest.mark.slow
def test_draft_equal_to_target_accepts_everything():
    tc, tp = _model("llama-tiny", 3, max_len=48)
    out = speculative.speculative_generate(tp, tp, [PROMPT], target_cfg=tc, draft_cfg=tc, max_new_tokens=21,
                                           gamma=4)
    assert out.acceptance_rate == 1.0
    # The first token comes from the prefill; each block then emits gamma + 1.
    assert out.blocks == 4 and out.tokens[0] == generate.generate(tp, [PROMPT], tc, max_new_tokens=21).tokens[0]


@pytest.mark.slow
def test_sampled_sequences_follow_the_target_distribution():
    """4096 rows sample 3 tokens from 4-token-vocabulary models (64 outcomes); the empirical
    distribution is compared with the target's exact one (from full forwards). Tolerance: the
    99.9th percentile of the total variation that 4096 exact multinomial draws from the target
    distribution show (about 0.062; their mean is 0.046). The draft's own distribution is far
    (TV about 0.46), so a rule that leaked it would fail."""
    small = dict(vocab_size=4, d_model=32, n_layers=1, max_len=16)
    tc, tp = _model("llama-tiny", 1, scale=4.0, **small, n_heads=2, n_kv_heads=1, d_ff=64)
    dc, dp = _model("mingru-tiny", 2, scale=4.0, **small)
    prompt = [1, 3, 2]
    seqs = np.array([prompt + list(t) for t in itertools.product(range(4), repeat=3)], np.int32)

    def exact(params, cfg):
        logp = np.asarray(jax.nn.log_softmax(zoo.forward(params, jnp.asarray(seqs), cfg=cfg), -1), np.float64)
        P = len(prompt)
        return np.exp(sum(logp[np.arange(64), P - 1 + j, seqs[:, P + j]] for j in range(3)))

    p_target, p_draft = exact(tp, tc), exact(dp, dc)
    n = 4096
    out = speculative.speculative_generate(tp, dp, [prompt] * n, target_cfg=tc, draft_cfg=dc, max_new_tokens=3,
                                           gamma=2, sampling=SamplingConfig(temperature=1.0), seed=0)
    toks = np.asarray(out.tokens)
    emp = np.bincount(toks[:, 0] * 16 + toks[:, 1] * 4 + toks[:, 2], minlength=64) / n
    rng = np.random.default_rng(0)
    null = [_tv(rng.multinomial(n, p_target / p_target.sum()) / n, p_target) for _ in range(2000)]
    assert _tv(emp, p_target) < np.quantile(null, 0.999)
    assert _tv(p_draft, p_target) > 0.3
    assert 0.2 < out.acceptance_rate < 1.0


def test_validation():
    tc, tp = zoo.presets.get("llama-tiny", max_len=16), None  # refused before the params are used
    dc = zoo.presets.get("mingru-tiny", max_len=16, vocab_size=128)
    with pytest.raises(ValueError, match="draft_cfg.vocab_size: expected the target's vocab_size=256, got 128"):
        speculative.speculative_generate(tp, tp, [[1]], target_cfg=tc, draft_cfg=dc, max_new_tokens=2)
    with pytest.raises(ValueError, match="gamma: expected a positive integer, got 0"):
        speculative.speculative_generate(tp, tp, [[1]], target_cfg=tc, draft_cfg=tc, max_new_tokens=2, gamma=0)
    with pytest.raises(ValueError, match="exceeds the cache length 16"):
        speculative.speculative_generate(tp, tp, [[1, 2]], target_cfg=tc, draft_cfg=tc, max_new_tokens=15)
