"""Every example runs and does what it says."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_architecture_decodes_like_forward(capsys):
    ex = _load("custom_architecture")
    tokens = ex.main()
    assert "params" in capsys.readouterr().out
    # The decoded continuation is the argmax of a full forward pass over prompt + continuation.
    cfg = ex.build()
    params = zoo.init(jax.random.key(0), cfg)
    prompt = jnp.array([list(b"def main():")], jnp.int32)
    full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    logits = zoo.forward(params, full, cfg=cfg)
    want = jnp.argmax(logits[:, prompt.shape[1] - 1:], axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))


@pytest.mark.slow  # compiles the gradient of a three-family model: about a minute on 2 cores
def test_train_custom_hybrid_runs_and_learns(capsys):
    ex = _load("train_custom_hybrid")
    history = ex.main(steps=12)
    assert len(history) == 12 and np.isfinite(history).all()
    assert np.mean(history[-3:]) < history[0]
    assert "val bits/byte" in capsys.readouterr().out


@pytest.mark.slow  # trains an MoE model for a few steps (compiles its train step)
def test_train_moe_prints_an_expert_load_table(capsys):
    ex = _load("train_moe")
    history, rows = ex.main("switch-tiny", steps=8, n_layers=2)
    assert len(history) == 8 and np.isfinite(history).all()
    assert [r["layer"] for r in rows] == [0, 1]
    for row in rows:  # top-1 routing: every one of the 8 * 64 tokens is assigned once
        assert row["tokens_per_expert"].shape == (8,) and int(row["tokens_per_expert"].sum()) == 8 * 64
        assert 0.0 <= row["drop_fraction"] < 1.0
    out = capsys.readouterr().out
    assert "expert load of switch-tiny" in out and "dropped" in out
    # DeepSeek's dense first layer (prefix) has no router: only the MoE layers are listed.
    cfg = zoo.presets.get("deepseek-tiny")
    params = zoo.init(jax.random.key(0), cfg)
    rows = ex.expert_load(params, cfg, jnp.zeros((1, 8), jnp.int32))
    assert [r["layer"] for r in rows] == [1, 2]
    assert all(int(r["tokens_per_expert"].sum()) == 8 * 4 for r in rows)  # top-4 of 16
