"""`zoo compare` packs shorter tasks into rows of the run's longest length (zoo/compare/tasks.py).
That is only a fair comparison if packing changes nothing a sequence sees: for every family, the
loss and its gradient on packed rows equal those on the same sequences one per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import tasks as ztasks
from zoo import train as ztrain
from zoo.compare import families as F
from zoo.compare import harness as H
from zoo.compare import tasks as T


def test_pack_lays_sequences_side_by_side_with_their_own_segments_and_positions():
    rng = np.random.default_rng(0)
    x_NL = rng.integers(1, 50, (6, 4)).astype(np.int32)
    y_NL = rng.integers(-1, 50, (6, 4)).astype(np.int32)
    x, y, seg, pos = T.pack(x_NL, y_NL, rows=2, row_len=14)  # 3 per row, a 2-token padding tail
    np.testing.assert_array_equal(x[1, 4:8], x_NL[4])
    np.testing.assert_array_equal(y[1, 8:12], y_NL[5])
    np.testing.assert_array_equal(seg[0], [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3] * 3 + [0, 1])
    assert (y[:, 12:] == -1).all() and (x[:, 12:] == 0).all()  # the tail is never scored
    with pytest.raises(ValueError, match=r"pack: expected 2 x 3 sequences"):
        T.pack(x_NL[:5], y_NL[:5], rows=2, row_len=14)


def test_packed_batches_hold_the_unpacked_sequences():
    task = T.mqar(32, 4)
    plain = next(T.train_batches(task, 4, 0))
    x, y, seg, pos = next(T.train_batches(task, 2, 0, row_len=64))
    np.testing.assert_array_equal(x.reshape(4, 32), plain[0])
    np.testing.assert_array_equal(y.reshape(4, 32), plain[1])
    held_out = T.eval_batches(T.lm(32), 2, 1, 0, row_len=64)[0]
    np.testing.assert_array_equal(held_out[0].reshape(4, 32), T.eval_batches(T.lm(32), 4, 1, 0)[0][0])


def test_default_run_packs_into_one_row_length_and_vocabulary():
    tasks = T.default_tasks("default")
    assert T.row_length(tasks) == 256 and T.model_vocab(tasks) == 512 and T.packed(tasks)
    quick = T.default_tasks("quick")
    assert T.row_length(quick) == 64 and not T.packed(quick)  # every task fills its rows: no segments


@pytest.mark.parametrize("name", F.names())
def test_packed_rows_give_every_family_the_loss_and_gradient_of_separate_rows(name):
    sized = F.solve(name, 6_000, vocab_size=32, max_len=64)
    cfg = F.get(name).config(vocab_size=32, max_len=64, d_model=sized.d_model, d_ff=sized.d_ff)
    params = H.sweep.init_sweep(cfg, 1, seed=0)
    params = jax.tree.map(lambda a: jnp.asarray(a[0]), params)
    task = ztasks.MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=2)
    x_NL, y_NL = ztasks.batch(task, 8, np.random.default_rng(1))
    x_NL = np.where(x_NL == 0, np.random.default_rng(2).integers(1, 32, x_NL.shape), x_NL).astype(np.int32)
    y_NL = np.where(np.arange(16) % 3 == 0, np.roll(x_NL, -1, axis=1), y_NL).astype(np.int32)  # more scored

    def loss(p, x, y, **packing):
        return ztrain.loss_fn(p, x, jnp.maximum(y, 0), cfg, (y >= 0).astype(jnp.float32), **packing)

    grad = jax.jit(jax.value_and_grad(loss))
    want, want_g = grad(params, x_NL, y_NL)
    x, y, seg, pos = T.pack(x_NL, y_NL, rows=2, row_len=64)
    got, got_g = grad(params, x, y, segment_ids=seg, positions=pos)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg=f"{name} {jax.tree_util.keystr(path)}")
