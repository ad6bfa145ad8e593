from __future__ import annotations

import numpy as np
import pytest

from layers.checks import ConfigError
from zoo import tasks

SMALL_MQAR = tasks.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4)
CONFIGS = [
    SMALL_MQAR,
    tasks.MQARConfig(),
    tasks.SelectiveCopyConfig(vocab_size=10, seq_len=32, n_tokens_to_copy=6),
    tasks.InductionConfig(vocab_size=12, seq_len=40),
    tasks.PasskeyConfig(seq_len=128, n_digits=5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_shapes_dtypes_and_vocab_range(cfg):
    x_BL, y_BL = tasks.batch(cfg, 7, np.random.default_rng(0))
    assert x_BL.shape == y_BL.shape == (7, cfg.seq_len)
    assert x_BL.dtype == y_BL.dtype == np.int32
    assert x_BL.min() >= 0 and x_BL.max() < cfg.vocab_size
    scored = y_BL >= 0
    assert np.all((y_BL == tasks.IGNORE) | scored) and y_BL.max() < cfg.vocab_size
    assert scored.any(axis=1).all()


def _mqar_check_rows(cfg, x_BL, y_BL):
    """Every invariant of one MQAR batch, checked row by row with plain Python."""
    kv, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    for x, y in zip(x_BL.tolist(), y_BL.tolist()):
        keys, values = x[0:2 * kv:2], x[1:2 * kv:2]
        assert all(1 <= k < half for k in keys) and all(half <= v < cfg.vocab_size for v in values)
        assert len(set(keys)) == kv and len(set(values)) == kv
        pairs = dict(zip(keys, values))
        scored = [t for t in range(cfg.seq_len) if y[t] >= 0]
        assert len(scored) == kv
        assert all(t >= 2 * kv and (t - 2 * kv) % 2 == 0 for t in scored)
        assert sorted(x[t] for t in scored) == sorted(keys)  # each key queried once
        assert all(y[t] == pairs[x[t]] for t in scored)
        if not cfg.random_filler:
            assert all(x[t] == 0 for t in range(2 * kv, cfg.seq_len) if t not in scored)


def test_mqar_invariants():
    x_BL, y_BL = tasks.batch(SMALL_MQAR, 64, np.random.default_rng(1))
    _mqar_check_rows(SMALL_MQAR, x_BL, y_BL)
    # Tightest legal settings: 4kv == L, V == L + 1 (odd V), and the random filler.
    tight = tasks.MQARConfig(vocab_size=17, seq_len=16, num_kv_pairs=4)
    _mqar_check_rows(tight, *tasks.batch(tight, 32, np.random.default_rng(2)))
    noisy = tasks.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4, random_filler=True)
    x_BL, y_BL = tasks.batch(noisy, 32, np.random.default_rng(3))
    _mqar_check_rows(noisy, x_BL, y_BL)
    assert (x_BL[:, 8:] >= 64).any()  # filler now spans the whole vocabulary


def test_mqar_gaps_follow_the_power_law():
    cfg = SMALL_MQAR
    kv = cfg.num_kv_pairs
    x_BL, _ = tasks.batch(cfg, 20_000, np.random.default_rng(4))
    first_key_B = x_BL[:, 0]
    # The first key is queried at 2kv + 2*gap, where gap is the first draw: distributed as p.
    pos_B = np.argmax(x_BL[:, 2 * kv:] == first_key_B[:, None], axis=1)
    assert np.all(pos_B % 2 == 0)
    hist_G = np.bincount(pos_B // 2, minlength=cfg.n_gaps) / len(pos_B)
    p_G = cfg.gap_probs()
    assert p_G[0] > 0.2 and np.all(np.diff(p_G) < 0)  # a = 0.01: strongly skewed to small gaps
    np.testing.assert_allclose(hist_G, p_G, atol=0.012)
    # All kv gaps together: small gaps chosen far more often than large ones.
    gaps = (np.nonzero(x_BL[:, 2 * kv:])[1]) // 2
    counts_G = np.bincount(gaps, minlength=cfg.n_gaps)
    assert counts_G[0] > counts_G[cfg.n_gaps // 2] > counts_G[-1]
    # power_a = 1 is uniform.
    uniform = tasks.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4, power_a=1.0)
    np.testing.assert_allclose(uniform.gap_probs(), 1 / uniform.n_gaps)


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=64, seq_len=64), "vocab_size"),
    (dict(vocab_size=128, seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
    (dict(vocab_size=128, seq_len=63), "seq_len"),
    (dict(power_a=0.0), "power_a"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
])
def test_mqar_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"MQARConfig\.{field}: expected .*, got"):
        tasks.MQARConfig(**kwargs)


def test_other_configs_validate():
    with pytest.raises(ConfigError,
                       match=r"SelectiveCopyConfig\.seq_len: expected >= 2 \* n_tokens_to_copy = 16, got 15"):
        tasks.SelectiveCopyConfig(seq_len=15, n_tokens_to_copy=8)
    with pytest.raises(ConfigError, match=r"InductionConfig\.vocab_size: expected >= 3, got 2"):
        tasks.InductionConfig(vocab_size=2)
    with pytest.raises(ConfigError, match=r"PasskeyConfig\.seq_len: expected >= "):
        tasks.PasskeyConfig(seq_len=40)
    with pytest.raises(ConfigError, match=r"mqar_batch\.batch_size: expected a positive integer, got 0"):
        tasks.batch(SMALL_MQAR, 0, np.random.default_rng(0))
    with pytest.raises(TypeError, match="batch: cfg: expected one of"):
        tasks.batch(object(), 2, np.random.default_rng(0))


def test_sampler_determinism_and_resume():
    a = tasks.Sampler(SMALL_MQAR, 4, seed=5)
    first = [next(a) for _ in range(3)]
    assert a.step == 3
    b = tasks.Sampler(SMALL_MQAR, 4, seed=5, step=2)
    for got, want in zip(next(b), first[2]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(a.batch(1)[0], first[1][0])
    assert not np.array_equal(first[0][0], first[1][0])
    other = tasks.Sampler(SMALL_MQAR, 4, seed=6).batch(0)
    assert not np.array_equal(other[0], first[0][0])
    for cfg in CONFIGS[2:]:
        s1, s2 = tasks.Sampler(cfg, 3, seed=1), tasks.Sampler(cfg, 3, seed=1)
        np.testing.assert_array_equal(s1.batch(7)[0], s2.batch(7)[0])
    with pytest.raises(ValueError, match="Sampler: seed: expected a non-negative integer, got -1"):
        tasks.Sampler(SMALL_MQAR, 4, seed=-1)


# Hand-written solvers: read the context of one row, answer every scored position.

def _solve_selective_copy(cfg, x):
    data = [t for t in x if t >= 2]
    n = cfg.n_tokens_to_copy
    pred = [0] * len(x)
    pred[len(x) - n:] = data
    return pred


def _solve_induction(cfg, x):
    pred = [0] * len(x)
    pred[-1] = x[x.index(cfg.trigger) + 1]
    return pred


def _solve_passkey(cfg, x):
    text = bytes(x).decode("ascii")
    start = text.index("the pass key is ") + len("the pass key is ")
    key = text[start:start + cfg.n_digits]
    assert key.isdigit()
    pred = [0] * len(x)
    pred[len(x) - cfg.n_digits:] = [ord(c) for c in key]
    return pred


@pytest.mark.parametrize("cfg, solver", [
    (CONFIGS[2], _solve_selective_copy),
    (CONFIGS[3], _solve_induction),
    (CONFIGS[4], _solve_passkey),
], ids=["selective_copy", "induction", "passkey"])
def test_hand_solver_gets_full_accuracy(cfg, solver):
    x_BL, y_BL = tasks.batch(cfg, 32, np.random.default_rng(9))
    pred_BL = np.array([solver(cfg, x) for x in x_BL.tolist()])
    assert tasks.accuracy(pred_BL, y_BL) == 1.0
    # Scored-position counts per row match the task definition.
    per_row = getattr(cfg, "n_tokens_to_copy", None) or getattr(cfg, "n_digits", None) or 1
    assert np.all((y_BL >= 0).sum(axis=1) == per_row)


def test_task_specific_structure():
    ind = CONFIGS[3]
    x_BL, _ = tasks.batch(ind, 64, np.random.default_rng(10))
    assert np.all((x_BL == ind.trigger).sum(axis=1) == 2) and np.all(x_BL[:, -1] == ind.trigger)
    sc = CONFIGS[2]
    x_BL, _ = tasks.batch(sc, 64, np.random.default_rng(11))
    n = sc.n_tokens_to_copy
    assert np.all(x_BL[:, -n:] == sc.MARKER) and np.all((x_BL[:, :-n] >= 2).sum(axis=1) == n)
    pk = CONFIGS[4]
    x_BL, y_BL = tasks.batch(pk, 64, np.random.default_rng(12))
    rows = [bytes(r).decode("ascii") for r in x_BL.tolist()]
    assert all(r.count("the pass key is ") == 2 for r in rows)  # needle + query
    depths = [r.index("the pass key is ") for r in rows]
    assert min(depths) < 20 and max(depths) > 40  # the needle's depth varies
    # Teacher forcing: the answer's first n-1 digits are also inputs after the query.
    np.testing.assert_array_equal(x_BL[:, -pk.n_digits + 1:], y_BL[:, -pk.n_digits:-1])


def test_accuracy_on_hand_made_predictions():
    y_BL = np.array([[-100, 5, -100, 7], [3, -100, -100, -100]])
    pred_BL = np.array([[0, 5, 1, 2], [4, 9, 9, 9]])  # 1 of 3 scored positions right
    assert tasks.accuracy(pred_BL, y_BL) == pytest.approx(1 / 3)
    logits_BLV = np.eye(10)[pred_BL] * 3.0
    assert tasks.accuracy(logits_BLV, y_BL) == pytest.approx(1 / 3)
    assert tasks.accuracy(np.where(y_BL >= 0, y_BL, 0), y_BL) == 1.0
    with pytest.raises(ValueError, match="expected at least one scored position"):
        tasks.accuracy(pred_BL, np.full_like(y_BL, -100))
    with pytest.raises(ValueError, match="logits_or_predictions: expected"):
        tasks.accuracy(pred_BL[:, :3], y_BL)


def test_distinct_draws_cover_all_orders_uniformly():
    draws_RK = tasks._distinct_per_row(12_000, 4, 2, np.random.default_rng(13))
    assert np.all(draws_RK[:, 0] != draws_RK[:, 1]) and draws_RK.min() >= 0 and draws_RK.max() < 4
    counts = np.bincount(draws_RK[:, 0] * 4 + draws_RK[:, 1], minlength=16)
    off_diag = counts[[i * 4 + j for i in range(4) for j in range(4) if i != j]]
    assert np.all(np.abs(off_diag / 12_000 - 1 / 12) < 0.015)  # all 12 ordered pairs equally likely
    full_RK = tasks._distinct_per_row(50, 9, 9, np.random.default_rng(14))
    np.testing.assert_array_equal(np.sort(full_RK, axis=1), np.broadcast_to(np.arange(9), (50, 9)))
