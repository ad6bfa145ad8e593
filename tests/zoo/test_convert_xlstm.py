"""transformers' xLSTM (the xLSTM-7B architecture) <-> zoo: logits, greedy decoding, round trip.

transformers' xLSTMConfig has no initializer_range and its init zeroes the gate weights, so every
parameter is redrawn at a large scale (0.2; norms around 1, gate biases spread out). Small gate
and logit soft caps (3 and 5) bend the values, and the test checks that they matter. chunk_size 8
with 21 tokens runs transformers' chunkwise kernel on 16 tokens and its recurrent kernel on the
rest. Tests that need no torch build their folders with zoo.convert.to_hf.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import convert, generate
from tests.zoo import hf_parity
from tests.zoo.hf_parity import hf  # noqa: F401  (fixture)
from tests.zoo.hf_parity import assert_close as _assert_close, logits as _logits, tokens as _tokens

V, L, L_PROMPT, N_NEW = 96, 21, 8, 20
# hidden * qk_dim_factor a multiple of 64: transformers' cache rounds the q/k width up to 64.
_XLSTM = dict(vocab_size=V, hidden_size=128, num_hidden_layers=2, num_heads=4, chunk_size=8, gate_soft_cap=3.0,
              output_logit_soft_cap=5.0)


def _randomize(torch, model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * z)
            elif name.endswith("gate_preact.bias"):
                p.copy_((1.0 if "fgate" in name else 0.0) + z)
            else:
                p.copy_(0.2 * z)


def _build(hf, folder, **overrides):
    torch, transformers = hf
    config = transformers.xLSTMConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      **{**_XLSTM, **overrides})
    model = transformers.xLSTMForCausalLM(config).eval()
    _randomize(torch, model)
    model.save_pretrained(folder)
    return model


def test_logits_match_transformers_and_round_trip(hf, tmp_path):
    torch, transformers = hf
    model = _build(hf, tmp_path / "hf")
    tokens = _tokens(2, L)
    want = _logits(hf, model, tokens)

    cfg, params = convert.from_hf(tmp_path / "hf")
    mixer = cfg.pattern[0].mixer
    assert (mixer.qk_dim, mixer.v_dim, cfg.pattern[0].ffn.d_ff) == (64, 128, 384)
    _assert_close(np.asarray(zoo.forward(params, jnp.asarray(tokens), cfg=cfg)), want)

    # The soft caps move the logits far beyond the tolerance (so the comparison above sees them).
    plain = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(
        **{**_XLSTM, "gate_soft_cap": 15.0, "output_logit_soft_cap": 30.0})).eval()
    plain.load_state_dict(model.state_dict())
    assert np.abs(_logits(hf, plain, tokens) - want).max() > 1e-2 * np.abs(want).max()

    convert.to_hf(cfg, params, tmp_path / "back")
    reloaded = transformers.xLSTMForCausalLM.from_pretrained(tmp_path / "back").eval()
    _assert_close(_logits(hf, reloaded, tokens), want)
    cfg2, params2 = convert.from_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_fused_weight_mode_imports_as_single(hf, tmp_path):
    """weight_mode "fused" stores [q|k|v|o], [i|f] and [gate|up] in one matrix each (transformers
    cannot build such a model from a config: its init fails); the same weights in either layout
    import to the same parameters."""
    from safetensors.numpy import load_file, save_file

    _build(hf, tmp_path)
    cfg, params = convert.from_hf(tmp_path)
    t = load_file(os.path.join(tmp_path, "model.safetensors"))
    for i in range(cfg.n_layers):
        m, f = f"backbone.blocks.{i}.mlstm_layer.", f"backbone.blocks.{i}.ffn."
        qkvo = ("q", "k", "v", "ogate_preact")
        t[m + "qkv_opreact.weight"] = np.concatenate([t.pop(m + n + ".weight") for n in qkvo])
        t[m + "ifgate_preact.weight"] = np.concatenate([t.pop(m + n + "gate_preact.weight") for n in "if"])
        t[m + "ifgate_preact.bias"] = np.concatenate([t.pop(m + n + "gate_preact.bias") for n in "if"])
        t[f + "proj_up_gate_z.weight"] = np.concatenate([t.pop(f + "proj_up_gate.weight"), t.pop(f + "proj_up.weight")])
    save_file(t, os.path.join(tmp_path, "model.safetensors"))
    with open(tmp_path / "config.json") as fh:
        config = json.load(fh)
    with open(tmp_path / "config.json", "w") as fh:
        json.dump({**config, "weight_mode": "fused"}, fh)
    cfg2, params2 = convert.from_hf(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.slow
def test_greedy_generation_matches_transformers(hf, tmp_path):
    model = _build(hf, tmp_path)
    prompt = _tokens(2, L_PROMPT, seed=1)
    want = hf_parity.hf_greedy(hf, model, prompt)
    cfg, params = convert.from_hf(tmp_path)
    got = generate.generate(params, prompt, cfg, max_new_tokens=N_NEW, cache_len=32).tokens_BN
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ without torch



@pytest.mark.parametrize("config, option", [
    (dict(use_bias=True), "use_bias=True"),
    (dict(inference_state_dtype="bfloat16"), "inference_state_dtype='bfloat16'"),
    (dict(norm_reduction_force_float32=False), "norm_reduction_force_float32=False"),
    (dict(embedding_dim=64), "embedding_dim=64"),
    (dict(num_heads=3), "qk_dim_factor"),
])
def test_unsupported_options_are_named(tmp_path, config, option):
    with pytest.raises(convert.UnsupportedError, match=option):
        convert.from_hf(hf_parity.write_config(tmp_path, model_type="xlstm", **{**_XLSTM, **config}))


def test_preset_exports_and_others_are_refused(tmp_path):
    """The xlstm7b-tiny preset writes a folder that imports back to itself (max_len is not part of
    transformers' config); the original-xLSTM preset is refused by name."""
    cfg = zoo.presets.get("xlstm7b-tiny", vocab_size=V, max_len=2048)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape).astype(np.float32), s.dtype),
                          zoo.param_specs(cfg), is_leaf=lambda x: hasattr(x, "logical_axes"))
    folder = convert.to_hf(cfg, params, tmp_path / "hf")  # model_type inferred
    with open(os.path.join(folder, "config.json")) as fh:
        assert json.load(fh)["model_type"] == "xlstm"
    cfg2, params2 = convert.from_hf(folder)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(convert.UnsupportedError, match="MLSTMLargeConfig"):
        convert.to_hf(zoo.presets.get("xlstm-tiny"), None, tmp_path / "no", model_type="xlstm")
    odd = dataclasses.replace(cfg, position="learned")
    with pytest.raises(convert.UnsupportedError, match="position"):
        convert.to_hf(odd, params, tmp_path / "no", model_type="xlstm")
