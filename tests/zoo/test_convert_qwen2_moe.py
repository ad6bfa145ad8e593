"""Qwen2-MoE interop: a tiny random transformers model -> zoo (logits, greedy decoding) -> back.

The shared expert's sigmoid gate, the shared width (2 x moe_intermediate_size), a dense first
layer (decoder_sparse_step=2, exported as mlp_only_layers) and unnormalised top-k weights are all
exercised; initializer_range 0.2 makes the gate vary well away from 1/2 per token.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import convert, generate
from tests.zoo import hf_parity
from tests.zoo.hf_parity import hf  # noqa: F401  (fixture)
from tests.zoo.hf_parity import assert_close as _assert_close, logits as _logits, tokens as _tokens

V, L_PROMPT, N_NEW = 96, 8, 20
CONFIG = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              shared_expert_intermediate_size=32, decoder_sparse_step=2, norm_topk_prob=False,
              max_position_embeddings=64)


def _build(hf, folder):
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                                         pad_token_id=None, **CONFIG)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def test_logits_match_transformers_and_round_trip(hf, tmp_path):
    torch, transformers = hf
    model = _build(hf, tmp_path / "hf")
    tokens = _tokens(2, 24)
    want = _logits(hf, model, tokens)

    cfg, params = convert.from_hf(tmp_path / "hf")
    dense, sparse = (cfg.pattern[i % len(cfg.pattern)].ffn for i in range(2))
    assert not hasattr(dense, "n_experts") and sparse.shared_gate and sparse.n_shared_experts == 2
    _assert_close(np.asarray(zoo.forward(params, jnp.asarray(tokens), cfg=cfg)), want)

    # The gate matters: a zero gate vector (sigmoid = 1/2 for every token) moves the logits far
    # beyond the tolerance.
    flat = tuple(dict(b, ffn=dict(b["ffn"], shared_gate_D=jnp.zeros_like(b["ffn"]["shared_gate_D"])))
                 if "shared_gate_D" in b["ffn"] else b for b in params["blocks"])
    half = np.asarray(zoo.forward(dict(params, blocks=flat), jnp.asarray(tokens), cfg=cfg))
    assert np.abs(half - want).max() > 1e-2 * np.abs(want).max()

    convert.to_hf(cfg, params, tmp_path / "back", model_type="qwen2_moe")
    written = json.load(open(tmp_path / "back" / "config.json"))
    assert written["shared_expert_intermediate_size"] == 32 and written["mlp_only_layers"] == [0]
    reloaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    _assert_close(_logits(hf, reloaded, tokens), want)
    cfg2, params2 = convert.from_hf(tmp_path / "back")
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


@pytest.mark.parametrize("shared, model_type, match", [
    (dict(n_shared_experts=1), "qwen2_moe", "shared_gate"),
    (dict(), "qwen2_moe", "shared_gate"),
    (dict(n_shared_experts=1, shared_gate=True), "qwen3_moe", "n_shared_experts"),
])
def test_export_refuses_shared_experts_the_architecture_lacks(shared, model_type, match):
    import dataclasses

    from layers.moe import MoEConfig
    from zoo.convert import moe

    cfg = zoo.presets.get("llama-tiny", vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64)
    ffn = MoEConfig(d_model=32, d_ff=16, n_experts=4, top_k=2, **shared)
    cfg = dataclasses.replace(cfg, pattern=tuple(dataclasses.replace(b, ffn=ffn) for b in cfg.pattern))
    with pytest.raises(convert.UnsupportedError, match=match):
        moe.check_exportable(cfg, model_type)


def test_shared_width_not_a_multiple_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(CONFIG, model_type="qwen2_moe",
                                                          shared_expert_intermediate_size=24)))
    with pytest.raises(convert.UnsupportedError, match="shared_expert_intermediate_size=24"):
        convert.from_hf(tmp_path)
