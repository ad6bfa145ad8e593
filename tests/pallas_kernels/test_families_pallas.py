"""Family layers with their Pallas kernels (interpret mode): forward == step token by token
(tests/layers/mixer_harness.py), and a full model train step with the kernels lowers for TPU
(Mosaic) and CUDA (Triton) from this CPU machine.

The step path decodes one token with the XLA forms (attention with the kernel too), so these
compare the kernels' forward against independent code."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
import zoo
from layers import attention, gla, linear_recurrence, mamba, retnet
from layers.attention import AttentionConfig
from tests.layers import mixer_harness as mh
from zoo import presets, train


@pytest.fixture
def scans_use_pallas(monkeypatch):
    """Family configs leave `impl="auto"` to linear_recurrence; make "auto" pick the kernel here."""
    monkeypatch.setattr(linear_recurrence, "_auto_impl", lambda chunk_size: "pallas")


def _x(key, B, L, D):
    return jax.random.normal(key, (B, L, D))


@pytest.mark.slow
def test_gla_forward_equals_step(scans_use_pallas):
    cfg = gla.GLAConfig(d_model=16, n_heads=2, gate_low_rank_dim=4, chunk_size=8)
    params = gla.init(jax.random.key(0), cfg)
    params["bgk_HK"] = jax.random.normal(jax.random.key(1), params["bgk_HK"].shape)
    state = mh.random_state(gla, cfg, 2, jax.random.key(2))
    mh.check_step_equivalence(gla, cfg, params, _x(jax.random.key(3), 2, 13, 16), state)


@pytest.mark.slow
def test_mamba_forward_equals_step():
    cfg = mamba.MambaConfig(d_model=8, d_state=4, scan="pallas", chunk_size=8)
    params = mamba.init(jax.random.key(0), cfg)
    params["D_E"] = params["D_E"] + jax.random.normal(jax.random.key(1), params["D_E"].shape)
    state = mh.random_state(mamba, cfg, 2, jax.random.key(2))
    mh.check_step_equivalence(mamba, cfg, params, _x(jax.random.key(3), 2, 11, 8), state)


@pytest.mark.slow
def test_retnet_forward_equals_step(scans_use_pallas):
    cfg = retnet.RetNetConfig(d_model=16, n_heads=2, form="chunkwise", chunk_size=8)
    params = retnet.init(jax.random.key(0), cfg)
    state = mh.random_state(retnet, cfg, 2, jax.random.key(2))
    mh.check_step_equivalence(retnet, cfg, params, _x(jax.random.key(3), 2, 13, 16), state)


@pytest.mark.slow
def test_attention_forward_equals_step_and_xla():
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, sliding_window=5, logit_softcap=8.0,
                          impl="pallas")
    params = attention.init(jax.random.key(0), cfg)
    x = _x(jax.random.key(1), 2, 9, 32)
    y, _ = attention.forward(params, x, cfg=cfg)
    y_xla, _ = attention.forward(params, x, cfg=dataclasses.replace(cfg, impl="xla"))
    mh.assert_close(y, y_xla, what="pallas vs xla forward")
    mh.check_step_equivalence(attention, cfg, params, x, attention.init_state(cfg, 2, 12))


def _lower_train_step(cfg, backend, platform):
    params = jax.eval_shape(lambda: zoo.init(jax.random.key(0), cfg))
    opt = train.make_optimizer(train.TrainConfig())
    opt_state = jax.eval_shape(opt.init, params)
    step = train.make_train_step(cfg, opt)
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    # Inner jitted functions cache their traces without the lowering target in the key: start clean.
    jax.clear_caches()
    with pallas_kernels.lowering_for(backend):
        return step.trace(params, opt_state, tokens, tokens).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "triton")])
def test_llama_train_step_lowers(platform, backend, marker):
    cfg = presets.get("llama-tiny", impl="pallas", n_layers=2)
    text = _lower_train_step(cfg, backend, platform)
    # forward, dq and dk/dv kernels, inside the scanned layer body
    assert text.count(marker) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "triton")])
def test_recurrent_train_steps_lower(platform, backend, marker, scans_use_pallas):
    gla_cfg = presets.get("gla-tiny", n_layers=2)
    mamba_cfg = presets.get("mamba-tiny", n_layers=2)
    mamba_cfg = dataclasses.replace(mamba_cfg, pattern=tuple(
        dataclasses.replace(b, mixer=dataclasses.replace(b.mixer, scan="pallas")) for b in mamba_cfg.pattern))
    for cfg in (gla_cfg, mamba_cfg):
        assert _lower_train_step(cfg, backend, platform).count(marker) >= 2


def test_auto_resolves_to_xla_on_cpu():
    assert jax.default_backend() == "cpu"
    assert linear_recurrence._auto_impl(64) == "xla"
    assert mamba.MambaConfig(d_model=8, scan="auto").scan == "auto"
