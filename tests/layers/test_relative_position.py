"""T5 relative position buckets against hand-computed values, and the bias gathered from them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import relative_position as relpos
from layers.checks import ConfigError
from layers.relative_position import RelativePositionConfig

# (relative position = key - query, bucket). Far buckets by hand: max_exact + floor(
# log(d / max_exact) / log(max_distance / max_exact) * (buckets - max_exact)), capped.
BIDIRECTIONAL_32_128 = [  # 16 buckets per side, max_exact 8
    (0, 0), (-1, 1), (-7, 7), (-8, 8), (-12, 9), (-20, 10), (-127, 15), (-128, 15), (-1000, 15),
    (1, 17), (3, 19), (7, 23), (20, 26), (1000, 31)]
CAUSAL_32_128 = [  # max_exact 16; keys after the query share bucket 0
    (5, 0), (0, 0), (-5, 5), (-15, 15), (-16, 16), (-40, 23), (-100, 30), (-127, 31), (-500, 31)]
BIDIRECTIONAL_8_20 = [  # 4 per side, max_exact 2
    (-1, 1), (-2, 2), (-5, 2), (-9, 3), (-25, 3), (1, 5), (2, 6), (9, 7), (25, 7)]


@pytest.mark.parametrize("bidirectional, n_buckets, max_distance, table", [
    (True, 32, 128, BIDIRECTIONAL_32_128), (False, 32, 128, CAUSAL_32_128), (True, 8, 20, BIDIRECTIONAL_8_20)])
def test_buckets_match_hand_computed_values(bidirectional, n_buckets, max_distance, table):
    rel = jnp.asarray([r for r, _ in table], jnp.int32)
    got = relpos.bucket(rel, bidirectional=bidirectional, n_buckets=n_buckets, max_distance=max_distance)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), [b for _, b in table])


def test_buckets_are_monotone_in_distance_and_cover_the_range():
    d = jnp.arange(0, 300, dtype=jnp.int32)
    back = np.asarray(relpos.bucket(-d, bidirectional=True, n_buckets=32, max_distance=128))
    fwd = np.asarray(relpos.bucket(d, bidirectional=True, n_buckets=32, max_distance=128))
    assert np.all(np.diff(back) >= 0) and np.all(np.diff(fwd[1:]) >= 0)
    assert set(back) == set(range(16)) and set(fwd[1:]) == set(range(17, 32))


def test_bias_gathers_the_table_per_head():
    cfg = RelativePositionConfig(n_heads=3, n_buckets=8, max_distance=20, bidirectional=True)
    params = {"table_NH": jax.random.normal(jax.random.key(0), (8, 3))}
    q_pos = jnp.asarray([[0, 1, 2, 9], [5, 6, 7, 8]], jnp.int32)
    k_pos = jnp.asarray([[0, 4, 30], [0, 6, 8]], jnp.int32)
    got = np.asarray(relpos.bias(params, q_pos, k_pos, cfg=cfg))
    assert got.shape == (2, 3, 4, 3) and got.dtype == np.float32
    table = np.asarray(params["table_NH"])
    rel = [[[int(k_pos[b, j]) - int(q_pos[b, i]) for j in range(3)] for i in range(4)] for b in range(2)]
    buckets = np.asarray(relpos.bucket(jnp.asarray(rel, jnp.int32), bidirectional=True, n_buckets=8,
                                       max_distance=20))
    want = np.zeros_like(got)
    for b in range(2):
        for i in range(4):
            for j in range(3):
                want[b, :, i, j] = table[buckets[b, i, j]]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_buckets=0), "n_buckets"), (dict(n_buckets=-4), "n_buckets"),
    (dict(n_buckets=3), "n_buckets"),  # bidirectional needs >= 4 (one exact bucket per side)
    (dict(max_distance=0), "max_distance"), (dict(n_buckets=32, max_distance=8), "max_distance"),
    (dict(n_heads=0), "n_heads")])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RelativePositionConfig(**{"n_heads": 2, **kwargs})
