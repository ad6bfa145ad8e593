"""zoo.optimizers: schedules, Muon's matrices and their shapes from the specs, every optimizer
learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo
from layers import params as P
from zoo import optimizers as O
from zoo import train

MuonDims = optax.contrib.MuonDimensionNumbers


def _lrs(tcfg, n):
    with jax.numpy_dtype_promotion("standard"):
        return np.array([float(O.make_schedule(tcfg)(i)) for i in range(n)])


def test_schedules_warmup_then_linear_cosine_or_wsd():
    base = dict(steps=20, warmup_steps=4, lr=1.0, min_lr_ratio=0.1)
    lin = _lrs(train.TrainConfig(schedule="linear", **base), 21)
    np.testing.assert_allclose(lin[:5], [0, 0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(lin[4:], np.linspace(1.0, 0.1, 17), rtol=1e-5)
    cos = _lrs(train.TrainConfig(schedule="cosine", **base), 21)
    t = np.arange(17) / 16
    np.testing.assert_allclose(cos[4:], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)), rtol=1e-5, atol=1e-6)
    wsd = _lrs(train.TrainConfig(schedule="wsd", decay_fraction=0.25, **base), 21)
    np.testing.assert_allclose(wsd[:5], [0, 0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert (wsd[4:16] == 1.0).all()  # stable
    np.testing.assert_allclose(wsd[16:], np.linspace(1.0, 0.1, 5), rtol=1e-5)  # last quarter decays


def test_muon_matrices_and_their_shapes_come_from_logical_axes():
    cfg = zoo.presets.get("deepseek-tiny", d_model=32, n_layers=2)
    dims = O.muon_dimension_numbers(zoo.param_specs(cfg))
    block = dims["blocks"][0]
    assert dims["embed"]["table_VD"] is None and dims["embed"]["unembed_DV"] is None
    assert dims["final_norm"]["scale"] is None and block["ffn"]["router_bias_E"] is None
    assert block["ffn"]["router_DE"] is None  # fp32-pinned router: AdamW
    # stacked [layers, E, D, F] experts: one D x F matrix per layer and expert
    assert block["ffn"]["experts"]["gate_EDF"] == MuonDims((2,), (3,))
    assert block["ffn"]["experts"]["down_EFD"] == MuonDims((2,), (3,))
    # MLA: latent -> heads x head_dim, and heads x head_dim -> embed
    assert block["mixer"]["wq_b_QHK"] == MuonDims((1,), (2, 3))
    assert block["mixer"]["wo_HED"] == MuonDims((1, 2), (3,))
    llama = O.muon_dimension_numbers(zoo.param_specs(zoo.presets.get("llama-tiny", d_model=32, n_layers=2)))
    assert llama["blocks"][0]["mixer"]["wq_DHK"] == MuonDims((1,), (2, 3))
    conv = P.ParamSpec((2, 4, 8), ("layers", "conv_width", "mlp"), P.zeros)
    unnamed = P.ParamSpec((2, 8, 3, 8), ("layers", "embed", None, "mlp"), P.zeros)
    assert O.matrix_dims(conv) is None and O.matrix_dims(unnamed) is None


def test_muon_orthogonalises_each_layer_of_a_stacked_projection_as_one_matrix():
    """A [layers, D, H, K] weight's Muon update equals, per layer, optax's Muon on the D x (H*K)
    matrix; a vector in the same tree gets AdamW."""
    specs = {"w": P.ParamSpec((2, 6, 2, 4), ("layers", "embed", "heads", "head_dim"), P.zeros),
             "b": P.ParamSpec((2, 6), ("layers", "embed"), P.zeros)}
    tcfg = train.TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.0, optimizer="muon")
    opt = O.make_optimizer(tcfg, P.decay_mask(specs), specs)
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(keys[0], (2, 6, 2, 4)), "b": jax.random.normal(keys[1], (2, 6))}
    grads = {"w": jax.random.normal(keys[2], (2, 6, 2, 4)), "b": jax.random.normal(keys[3], (2, 6))}
    ref_muon = optax.contrib.muon(O.make_schedule(tcfg), consistent_rms=0.2)
    ref_adam = optax.adamw(O.make_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, weight_decay=0.0)
    clip = optax.clip_by_global_norm(tcfg.clip_norm)

    @jax.jit
    def both(params, grads):
        updates, _ = opt.update(grads, opt.init(params), params)
        clipped, _ = clip.update(grads, clip.init(grads))
        per_layer = []
        for layer in range(2):
            p2 = {"m": params["w"][layer].reshape(6, 8)}
            u2, _ = ref_muon.update({"m": clipped["w"][layer].reshape(6, 8)}, ref_muon.init(p2), p2)
            per_layer.append(u2["m"].reshape(6, 2, 4))
        ub, _ = ref_adam.update(clipped["b"], ref_adam.init(params["b"]), params["b"])
        return updates, {"w": jnp.stack(per_layer), "b": ub}

    with jax.numpy_dtype_promotion("standard"):
        updates, expected = both(params, grads)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected["w"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["b"]), np.asarray(expected["b"]), rtol=1e-6)


def test_muon_needs_specs():
    with pytest.raises(ValueError, match="specs"):
        O.make_optimizer(train.TrainConfig(optimizer="muon"), None, None)


@pytest.mark.slow  # default runs: Muon learns in test_train.py::test_train_on_packed_documents_...
@pytest.mark.parametrize("name, lr", [("adamw", 2e-2), ("muon", 2e-2)])
def test_optimizer_reduces_loss_on_a_fixed_batch(name, lr):
    """(lion and adafactor: tests/zoo/test_train.py::test_other_optimizers_learn_and_respect_the_mask)"""
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    tcfg = train.TrainConfig(steps=12, batch_size=4, seq_len=16, warmup_steps=1, lr=lr, optimizer=name)
    optimizer, step = train.train_step_for(cfg, tcfg)
    params = zoo.init(jax.random.key(0), cfg)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    # rows counting up from random starts: learnable in a few steps
    tokens = ((np.random.default_rng(0).integers(0, 256, (4, 1)) + np.arange(17)) % 256).astype(np.int32)
    losses = []
    for _ in range(tcfg.steps):
        params, opt_state, m = step(params, opt_state, tokens[:, :-1], tokens[:, 1:])
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.75 * losses[0], losses
