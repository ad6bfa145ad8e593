from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo
from layers.checks import ConfigError
from zoo import data, train

CFG = zoo.presets.get("llama-tiny", d_model=32, n_layers=2)
TCFG = train.TrainConfig(steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, log_every=10,
                         eval_batches=2)


@pytest.fixture(scope="module")
def corpus():
    return data.builtin_corpus(max_bytes=40_000)


def test_train_config_validates_fields():
    with pytest.raises(ConfigError, match=r"TrainConfig.warmup_steps: expected an integer in \[0, steps=10\)"):
        train.TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="TrainConfig.lr: expected a positive finite float, got -1"):
        train.TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="TrainConfig.steps"):
        train.TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="TrainConfig.b2"):
        train.TrainConfig(b2=1.0)
    with pytest.raises(ConfigError, match="TrainConfig.on_nonfinite"):
        train.TrainConfig(on_nonfinite="ignore")
    hash(TCFG)  # frozen and hashable


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "gemma2-tiny"])
def test_decay_mask_excludes_vectors_biases_norms_and_embeddings(preset):
    cfg = zoo.presets.get(preset, d_model=32, n_layers=2)
    params = jax.eval_shape(lambda: zoo.init(jax.random.key(0), cfg))
    mask = train.decay_mask(cfg)
    decayed, kept = set(), set()
    for path, flag in jax.tree_util.tree_leaves_with_path(mask):
        leaf = jax.tree_util.keystr(path)
        (decayed if flag else kept).add(leaf)
    for leaf in kept:
        assert ("embed']['table" in leaf or "['pos']" in leaf or "norm" in leaf
                or "['scale']" in leaf or "['b" in leaf), leaf
    for leaf in decayed:
        assert "['w" in leaf or "unembed" in leaf, leaf
    shapes = dict((jax.tree_util.keystr(p), s.shape) for p, s in jax.tree_util.tree_leaves_with_path(params))
    assert all(len(shapes[leaf]) >= 2 for leaf in decayed)
    assert all(leaf in kept for leaf, shape in shapes.items() if len(shape) < 2)
    assert "['embed']['table_VD']" in kept
    assert any("['ffn']" in leaf for leaf in decayed) and any("['mixer']" in leaf for leaf in decayed)
    if not cfg.tie_embeddings:
        assert "['embed']['unembed_DV']" in decayed


def test_weight_decay_applies_only_where_masked():
    params = {"embed": {"table_VD": jnp.ones((4, 3))}, "ffn": {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))},
              "norm": {"scale": jnp.ones((2, 3))}}
    tcfg = train.TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.5)
    mask = {"embed": {"table_VD": False}, "ffn": {"w": True, "b": False}, "norm": {"scale": False}}
    opt = train.make_optimizer(tcfg, mask)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes float constants with int counts
        updates, _ = jax.jit(opt.update)(zero_grads, opt.init(params), params)
    assert float(jnp.abs(updates["ffn"]["w"]).max()) > 0  # decayed
    for leaf in (updates["embed"]["table_VD"], updates["ffn"]["b"], updates["norm"]["scale"]):
        assert float(jnp.abs(leaf).max()) == 0.0


def test_loss_fn_masked_mean_matches_manual():
    params = zoo.init(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8)).astype(np.int32)
    y = rng.integers(0, 256, (2, 8)).astype(np.int32)
    logits = np.asarray(zoo.forward(params, x, cfg=CFG), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(train.loss_fn(params, x, y, CFG)), nll.mean(), rtol=1e-5)
    mask = np.zeros((2, 8), np.float32)
    mask[0, :3] = 1
    np.testing.assert_allclose(float(train.loss_fn(params, x, y, CFG, mask)), nll[0, :3].mean(), rtol=1e-5)


def test_loss_decreases_on_fixed_batch_and_step_compiles_once(corpus):
    optimizer, step = train.train_step_for(CFG, TCFG)
    params = zoo.init(jax.random.key(0), CFG)
    opt_state = optimizer.init(params)
    x, y = data.random_windows(data.as_array(corpus), 4, 32, np.random.default_rng(0))
    losses = []
    for _ in range(TCFG.steps):
        params, opt_state, metrics = step(params, opt_state, x, y)
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"])
    assert step._cache_size() == 1
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_train_step_donates_and_keeps_params_on_nonfinite(corpus):
    optimizer, step = train.train_step_for(CFG, TCFG)
    params = zoo.init(jax.random.key(1), CFG)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    opt_state = optimizer.init(params)
    before = jax.tree.map(lambda a: np.array(a, copy=True), params)
    x, y = data.random_windows(data.as_array(corpus), 4, 32, np.random.default_rng(1))
    new_params, _, metrics = step(params, opt_state, x, y)
    assert not bool(metrics["finite"]) and not math.isfinite(float(metrics["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new_params, before)
    assert jax.tree.leaves(params)[0].is_deleted()  # donated


def test_train_loop_logs_evaluates_and_stops_on_nonfinite(corpus):
    lines = []
    params, history = train.train(CFG, TCFG, data=corpus, print_fn=lines.append)
    assert len(history) == TCFG.steps and history[-1] < history[0]
    text = "\n".join(lines)
    assert "step      1/30  loss" in text and "step     30/30  loss" in text
    bpb_line = [line for line in lines if line.startswith("val bits/byte")]
    assert len(bpb_line) == 1
    bpb = float(bpb_line[0].split()[-1])
    assert 0 < bpb < 8.5  # untrained is log2(256) = 8

    _, step = train.train_step_for(CFG, TCFG)
    assert step._cache_size() == 1  # train() reused the step compiled above

    bad = jax.tree.map(lambda a: a, params)
    bad["embed"]["table_VD"] = bad["embed"]["table_VD"].at[:, 0].set(jnp.inf)
    with pytest.raises(train.NonFiniteLossError, match="non-finite training loss at step 1/30"):
        train.train(CFG, TCFG, data=corpus, params=bad, print_fn=lines.append)
    assert np.isinf(np.asarray(bad["embed"]["table_VD"])[0, 0])  # caller's params not donated

    lines.clear()
    stop = dataclasses.replace(TCFG, on_nonfinite="stop")
    out, history = train.train(CFG, stop, data=corpus, params=bad, print_fn=lines.append)
    assert len(history) == 1 and not math.isfinite(history[0])
    assert any("stopping with the last finite params" in line for line in lines)
    np.testing.assert_array_equal(np.asarray(out["embed"]["table_VD"]), np.asarray(bad["embed"]["table_VD"]))


def test_train_rejects_seq_len_beyond_max_len(corpus):
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, max_len=16)
    with pytest.raises(ConfigError, match="seq_len=32 exceeds the model's max_len=16"):
        train.train(cfg, TCFG, data=corpus)


def test_schedule_warmup_then_cosine():
    sched = train.make_schedule(TCFG)
    with jax.numpy_dtype_promotion("standard"):
        lrs = [float(sched(i)) for i in range(TCFG.steps + 1)]
    assert lrs[0] == 0.0 and lrs[TCFG.warmup_steps] == pytest.approx(TCFG.lr)
    assert lrs[-1] == pytest.approx(TCFG.lr * TCFG.min_lr_ratio)
    assert isinstance(train.make_optimizer(TCFG), optax.GradientTransformation)


class _Interrupt(Exception):
    pass


def test_resume_is_bit_for_bit(tmp_path):
    """Interrupted after step 5 (checkpoint at 4), resumed: same losses and params as one run."""
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    tcfg = train.TrainConfig(steps=8, batch_size=2, seq_len=16, warmup_steps=1, log_every=1)
    corpus = bytes(range(256)) * 40
    full_params, full_history = train.train(cfg, tcfg, data=corpus, print_fn=lambda s: None)

    def stop_at_step_5(line):
        if line.startswith("step      5/"):
            raise _Interrupt
    with pytest.raises(_Interrupt):
        train.train(cfg, tcfg, data=corpus, print_fn=stop_at_step_5, checkpoint_dir=str(tmp_path), save_every=4)
    lines = []
    params, history = train.train(cfg, tcfg, data=corpus, print_fn=lines.append, checkpoint_dir=str(tmp_path),
                                  save_every=4, resume=True)
    assert any("resumed" in line and "step 4" in line for line in lines)
    assert history == full_history
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Other settings than the checkpoint's are refused, naming the field.
    with pytest.raises(ValueError, match="lr"):
        train.train(cfg, dataclasses.replace(tcfg, lr=1e-2), data=corpus, print_fn=lambda s: None,
                    checkpoint_dir=str(tmp_path), resume=True)


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, train returns; resuming
    completes the run with the same losses as an uninterrupted one."""
    import os
    import signal

    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    tcfg = train.TrainConfig(steps=6, batch_size=2, seq_len=16, warmup_steps=1, log_every=1)
    corpus = bytes(range(256)) * 40

    def kill_at_step_3(line):
        if line.startswith("step      3/"):
            os.kill(os.getpid(), signal.SIGTERM)
    lines = []
    before = signal.getsignal(signal.SIGTERM)
    _, history = train.train(cfg, tcfg, data=corpus, checkpoint_dir=str(tmp_path),
                             print_fn=lambda s: (lines.append(s), kill_at_step_3(s)))
    assert len(history) == 3 and any("saving and stopping" in s for s in lines)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    _, resumed = train.train(cfg, tcfg, data=corpus, checkpoint_dir=str(tmp_path), resume=True,
                             print_fn=lambda s: None)
    _, full = train.train(cfg, tcfg, data=corpus, print_fn=lambda s: None)
    assert resumed == full


@pytest.mark.parametrize("name, lr", [("lion", 3e-4), ("adafactor", 1e-2)])
def test_other_optimizers_learn_and_respect_the_mask(name, lr):
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    tcfg = train.TrainConfig(steps=15, batch_size=4, seq_len=16, warmup_steps=1, log_every=100, lr=lr,
                             optimizer=name)
    _, history = train.train(cfg, tcfg, data=bytes(range(256)) * 40, print_fn=lambda s: None)
    assert np.isfinite(history).all() and np.mean(history[-3:]) < history[0]
    # With zero gradients only decay moves a parameter: masked-out ones stay put.
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    opt = train.make_optimizer(dataclasses.replace(tcfg, weight_decay=0.5, warmup_steps=0), {"w": True, "b": False})
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) > 0 and float(jnp.abs(updates["b"]).max()) == 0.0


def test_unknown_optimizer_names_the_field():
    with pytest.raises(ConfigError, match="TrainConfig.optimizer"):
        train.TrainConfig(optimizer="sgd")
