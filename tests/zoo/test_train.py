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
from zoo import checkpoint, data, train

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


# ---------------------------------------------------------------- accumulation, precision, loss terms

SMALL = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)


def _random_batch(b, l, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (b, l + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def test_accumulated_micro_batches_equal_one_big_batch_weighted_by_tokens():
    """4 rows as 2 micro-batches of 2: same objective and gradient as one batch; the mask puts
    far more scored tokens in the first micro-batch, so a mean of per-micro-batch means differs."""
    params = zoo.init(jax.random.key(0), SMALL)
    x, y = _random_batch(4, 16)
    mask = np.zeros((4, 16), np.float32)
    mask[:2, :] = 1
    mask[2, :3] = 1
    y = y.copy()
    y[3, 5] = -100  # ignored target: not scored
    mask[3, 4:9] = 1
    batch = {"inputs": x, "targets": y, "mask": mask}

    def grads(k):
        tcfg = train.TrainConfig(batch_size=4, grad_accum=k)
        return jax.jit(lambda p, b: train._grads(p, b, SMALL, tcfg))(params, batch)

    obj1, ce1, n1, _, g1 = grads(1)
    obj2, ce2, n2, _, g2 = grads(2)
    assert float(n1) == float(n2) == 32 + 3 + 4
    np.testing.assert_allclose(float(obj2), float(obj1), rtol=1e-6)
    np.testing.assert_allclose(float(ce2), float(ce1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    logits = np.asarray(zoo.forward(params, x, cfg=SMALL), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, np.maximum(y, 0)[..., None], -1)[..., 0]
    w = mask * (y >= 0)
    full = (nll * w).sum() / w.sum()
    np.testing.assert_allclose(float(obj1), full, rtol=1e-5)
    halves = [(nll[s] * w[s]).sum() / w[s].sum() for s in (slice(0, 2), slice(2, 4))]
    assert abs(np.mean(halves) - full) > 1e-4  # 20x the tolerance above: the weighting matters here


def test_z_loss_and_label_smoothing_match_the_formula():
    params = zoo.init(jax.random.key(1), SMALL)
    x, y = _random_batch(2, 8, seed=1)
    logits = np.asarray(zoo.forward(params, x, cfg=SMALL), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = logits - lse[..., None]
    s, z = 0.1, 1e-3
    smooth = (1 - s) * np.eye(256)[y] + s / 256
    expected = (-(smooth * logp).sum(-1) + z * lse ** 2).mean()
    got = float(train.loss_fn(params, x, y, SMALL, z_loss=z, label_smoothing=s))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with jax.numpy_dtype_promotion("standard"):  # and optax's own smoothing agrees
        ref = optax.softmax_cross_entropy(jnp.asarray(logits, jnp.float32),
                                          optax.smooth_labels(jax.nn.one_hot(y, 256), s))
    np.testing.assert_allclose(float(train.loss_fn(params, x, y, SMALL, label_smoothing=s)),
                               float(jnp.mean(ref)), rtol=1e-5)


@pytest.mark.slow
def test_bf16_compute_step_runs_and_matches_fp32_loosely():
    x, y = _random_batch(2, 16, seed=2)
    tcfg = train.TrainConfig(steps=5, batch_size=2, seq_len=16, warmup_steps=1)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = train.with_precision(SMALL, precision)
        optimizer, step = train.train_step_for(cfg, tcfg)
        params = zoo.init(jax.random.key(0), cfg)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(params)
        params, _, m = step(params, opt_state, x, y)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # fp32 master params
        out[precision] = (float(m["loss"]), float(m["grad_norm"]), params)
    assert train.with_precision(SMALL, "bf16").compute_dtype == jnp.bfloat16
    np.testing.assert_allclose(out["bf16"][0], out["fp32"][0], rtol=2e-2)
    np.testing.assert_allclose(out["bf16"][1], out["fp32"][1], rtol=1e-1)
    for a, b in zip(jax.tree.leaves(out["bf16"][2]), jax.tree.leaves(out["fp32"][2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3)


@pytest.mark.slow
def test_sigmoid_router_bias_moves_with_the_load_outside_the_gradient():
    """DeepSeek-V3 balancing: after one step each layer's router_bias_E moved by +rate where the
    expert got fewer than the mean tokens, -rate where more; the rest of the update unchanged."""
    cfg = zoo.presets.get("deepseek-tiny", d_model=32, n_layers=3, max_len=32)
    sites = train._moe_bias_sites(cfg)
    assert sites == (("blocks", 0),)
    rate = cfg.pattern[0].ffn.router_bias_rate
    tcfg = train.TrainConfig(steps=5, batch_size=2, seq_len=16, warmup_steps=1)
    optimizer, step = train.train_step_for(cfg, tcfg)
    params = zoo.init(jax.random.key(0), cfg)
    # start from a non-zero bias so the test sees the selection use it
    params["blocks"][0]["ffn"]["router_bias_E"] = 0.01 * jax.random.normal(
        jax.random.key(1), params["blocks"][0]["ffn"]["router_bias_E"].shape)
    x, y = _random_batch(2, 16, seed=3)
    _, aux = zoo.forward(params, x, cfg=cfg, return_aux=True)
    load_RE = np.asarray(aux["blocks"][0]["ffn"]["tokens_per_expert"])
    bias_before = np.asarray(params["blocks"][0]["ffn"]["router_bias_E"]).copy()
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    new, _, m = step(params, opt_state, x, y)
    assert bool(m["finite"])
    moved = np.asarray(new["blocks"][0]["ffn"]["router_bias_E"]) - bias_before
    expected = rate * np.sign(load_RE.mean(axis=1, keepdims=True) - load_RE)
    assert load_RE.shape == moved.shape and np.abs(expected).sum() > 0
    np.testing.assert_allclose(moved, expected, atol=1e-7)


# ---------------------------------------------------------------- data sources, metrics, skip

def test_train_on_packed_documents_writes_metrics_and_evaluates(tmp_path):
    from zoo import packing

    rng = np.random.default_rng(0)
    # each document counts up from a random letter: learnable within a few steps
    docs = [bytes((rng.integers(0, 26) + np.arange(rng.integers(8, 40))) % 26 + 97) for _ in range(60)]
    train_docs, val_docs = packing.split_documents(docs, 0.1)
    tcfg = train.TrainConfig(steps=8, batch_size=4, seq_len=16, warmup_steps=1, log_every=2, eval_every=4,
                             eval_batches=1, optimizer="muon", schedule="wsd", lr=2e-2)
    sampler = packing.PackedSampler(train_docs, 4, 16, seed=0)
    val = packing.PackedSampler(val_docs, 4, 16, seed=0)
    path = tmp_path / "m.jsonl"
    lines = []
    _, history = train.train(SMALL, tcfg, data=sampler, val_data=val, print_fn=lines.append,
                             metrics_jsonl=str(path), peak_flops=1e11)
    assert len(history) == 8 and np.isfinite(history).all()
    assert np.mean(history[-2:]) < 0.8 * history[0], history  # Muon + WSD learns
    import json
    records = [json.loads(s) for s in path.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 3, 4, 5, 7, 8]  # every log_every=2 from step 1, the evaluation at 4, the last
    for r in records[:-1]:
        assert {"loss", "ce", "bits", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"]
    assert "val_bits" in records[2] and 0 < records[2]["val_bits"] < 9
    assert records[-1]["step"] == 8 and "val_bits" in records[-1]
    assert any("val bits" in s for s in lines)


def test_skip_nonfinite_reports_and_continues(tmp_path, corpus):
    params = zoo.init(jax.random.key(0), CFG)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    tcfg = dataclasses.replace(TCFG, on_nonfinite="skip")  # the step compiled for TCFG serves
    lines = []
    out, history = train.train(CFG, tcfg, data=corpus, params=params, print_fn=lines.append,
                               metrics_jsonl=str(tmp_path / "m.jsonl"), peak_flops=1e11)
    n = tcfg.steps
    assert len(history) == n and not np.isfinite(history).any()
    assert sum("skipping this batch" in s for s in lines) == n and any(f"skipped {n} " in s for s in lines)
    np.testing.assert_array_equal(np.asarray(out["embed"]["table_VD"]), np.asarray(params["embed"]["table_VD"]))
    assert (tmp_path / "m.jsonl").read_text().count('"skipped": true') == n


def test_new_train_config_fields_are_validated():
    with pytest.raises(ConfigError, match="TrainConfig.grad_accum: expected a divisor of batch_size=16"):
        train.TrainConfig(grad_accum=3)
    with pytest.raises(ConfigError, match="TrainConfig.schedule"):
        train.TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="TrainConfig.label_smoothing"):
        train.TrainConfig(label_smoothing=1.0)
    with pytest.raises(ConfigError, match="TrainConfig.z_loss"):
        train.TrainConfig(z_loss=-1e-4)
    with pytest.raises(ConfigError, match="TrainConfig.precision"):
        train.TrainConfig(precision="fp8")


@pytest.mark.slow
def test_train_on_a_mesh_places_params_and_matches_one_device():
    import sharding

    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
    tcfg = train.TrainConfig(steps=3, batch_size=8, seq_len=16, warmup_steps=1)
    corpus = bytes(range(256)) * 20
    p1, h1 = train.train(cfg, tcfg, data=corpus, print_fn=lambda s: None, peak_flops=1e11)
    mesh = sharding.make_mesh({"fsdp": 8})
    p2, h2 = train.train(cfg, tcfg, data=corpus, print_fn=lambda s: None, peak_flops=1e11, mesh=mesh, rules="fsdp")
    specs = zoo.param_specs(cfg)
    for got, want in zip(jax.tree.leaves(p2), jax.tree.leaves(sharding.param_shardings(specs, mesh, "fsdp"))):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    np.testing.assert_allclose(h2, h1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_keep_best_keeps_the_lowest_validation_step_and_the_newest(tmp_path):
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    tcfg = train.TrainConfig(steps=8, batch_size=2, seq_len=16, warmup_steps=1, log_every=1, eval_every=2,
                             eval_batches=1)
    corpus = bytes(range(256)) * 40
    lines = []
    train.train(cfg, tcfg, data=corpus, print_fn=lines.append, checkpoint_dir=str(tmp_path), save_every=2,
                keep_last=1, keep_best=1)
    val = {int(line.split()[1].split("/")[0]): float(line.split()[-1]) for line in lines if "val bits " in line
           and line.startswith("step")}
    assert sorted(val) == [2, 4, 6]
    best = min(val, key=val.get)
    with checkpoint.Checkpointer(tmp_path) as c:
        assert c.all_steps() == sorted({best, 8})
