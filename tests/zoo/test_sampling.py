"""Each sampling processor on hand-made logits, composition, and reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.checks import ConfigError
from zoo import sampling
from zoo.sampling import SamplingConfig

# probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
PROBS = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
LOGITS = jnp.asarray(np.log(PROBS)[None], jnp.float32)
NO_COUNTS = jnp.zeros((1, 5), jnp.int32)


def kept(logits):
    return np.isfinite(np.asarray(logits[0])).tolist()


def test_top_k():
    assert kept(sampling.top_k_filter(LOGITS, 2)) == [True, True, False, False, False]


# At 0.9 the 4th token reaches the mass; its tie (the 5th, equal probability) is kept with it.
@pytest.mark.parametrize("p, n_kept", [(0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.9, 5), (1.0, 5)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, n_kept):
    assert sum(kept(sampling.top_p_filter(LOGITS, p))) == n_kept


def test_min_p():
    # min_p 0.2: threshold 0.1 -> keeps 0.5, 0.25, 0.125
    assert kept(sampling.min_p_filter(LOGITS, 0.2)) == [True, True, True, False, False]


def test_penalties():
    logits = jnp.array([[2.0, -2.0, 1.0, 0.5, 0.0]], jnp.float32)
    counts = jnp.array([[1, 1, 0, 3, 0]], jnp.int32)
    out = sampling.apply_penalties(logits, counts, SamplingConfig(repetition_penalty=2.0))
    np.testing.assert_allclose(np.asarray(out), [[1.0, -4.0, 1.0, 0.25, 0.0]])
    out = sampling.apply_penalties(logits, counts, SamplingConfig(frequency_penalty=0.5, presence_penalty=0.25))
    np.testing.assert_allclose(np.asarray(out), [[1.25, -2.75, 1.0, -1.25, 0.0]])


def test_greedy_and_seeded_sampling():
    key = jax.random.key(0)
    assert int(sampling.sample(key, LOGITS, NO_COUNTS, SamplingConfig(temperature=0.0))[0]) == 0
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    batch = jnp.repeat(LOGITS, 4000, axis=0)
    draws = np.asarray(sampling.sample(key, batch, jnp.zeros((4000, 5), jnp.int32), cfg))
    np.testing.assert_array_equal(draws, np.asarray(sampling.sample(key, batch, jnp.zeros((4000, 5), jnp.int32), cfg)))
    freq = np.bincount(draws, minlength=5) / draws.size
    want = np.array([0.5, 0.25, 0.125, 0, 0]) / 0.875
    np.testing.assert_allclose(freq, want, atol=0.03)  # 4000 draws: std <= 0.008


def test_temperature_sharpens():
    cold = sampling.processed_logits(LOGITS, NO_COUNTS, SamplingConfig(temperature=0.5))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(cold)[0]), PROBS ** 2 / (PROBS ** 2).sum(), rtol=1e-5)


@pytest.mark.parametrize("kwargs, field", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                           (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                                           (dict(min_p=1.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**kwargs)
