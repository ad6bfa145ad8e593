"""Hugging Face interop gaps of issue 9: Llama with longrope RoPE (both factor regimes), Phi-3
(fused tensors), DeepSeek-V2 group-limited greedy routing, RWKV-4 export with its embedding norm.

Same checks as tests/zoo/test_convert.py: a tiny random model built by transformers itself with a
large init scale (0.2) -> zoo logits within 1e-4 of the logit scale in float32, greedy decoding of
20 tokens identical, and to_hf -> transformers loads -> same logits (plus from_hf of the export
gives back the same config and parameters).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import convert, generate
from tests.zoo.hf_parity import hf  # noqa: F401  (fixture)
from tests.zoo.hf_parity import assert_close as _assert_close, logits as _logits, tokens as _tokens
from tests.zoo import hf_parity

V, L_PROMPT, N_NEW = 96, 8, 20
_LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
# Phi-3 style: no `factor`, so transformers takes max_position_embeddings / original (4) for the
# attention factor sqrt(1 + ln 4 / ln 16). Head dim 8 -> 4 rotated pairs, one factor each.
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
                 short_factor=[1.0, 1.3, 2.1, 3.7], long_factor=[1.5, 4.0, 9.0, 20.0])
# 3 of 8 experts from the 2 best of 4 groups: with 2 experts greedy top-k always lies in the
# groups of the two best experts, so the group limit would never show.
_DEEPSEEK_V2 = dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                    num_experts_per_tok=3, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                    kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                    n_shared_experts=1, routed_scaling_factor=2.0, topk_method="group_limited_greedy", n_group=4,
                    topk_group=2)
# rescale_every=0: transformers' eval-mode fp16 guard changes logits through the LayerNorm eps.
_RWKV = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
             rescale_every=0)

# name -> (config class, model class, config kwargs, config changes that remove the feature)
CASES = {
    "llama-longrope": ("LlamaConfig", "LlamaForCausalLM",
                       dict(_LLAMA, max_position_embeddings=64, rope_parameters=_LONGROPE),
                       dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Phi-3: fused qkv_proj / gate_up_proj, window on every layer, Phi3Config's top-level
    # original_max_position_embeddings.
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM",
                      dict(_LLAMA, max_position_embeddings=64, original_max_position_embeddings=16, sliding_window=8,
                           rope_parameters=_LONGROPE),
                      dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Phi-4-mini style: partial rotary (half of each head: 2 pairs, 2 factors each), tied head.
    "phi3-partial": ("Phi3Config", "Phi3ForCausalLM",
                     dict(_LLAMA, max_position_embeddings=64, original_max_position_embeddings=16,
                          partial_rotary_factor=0.5, tie_word_embeddings=True,
                          rope_parameters=dict(_LONGROPE, short_factor=[1.0, 2.5], long_factor=[3.0, 7.0])),
                     dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "deepseek_v2-group": ("DeepseekV2Config", "DeepseekV2ForCausalLM", _DEEPSEEK_V2, dict(topk_method="greedy")),
    "rwkv": ("RwkvConfig", "RwkvForCausalLM", _RWKV, None),
    "rwkv-tied": ("RwkvConfig", "RwkvForCausalLM", dict(_RWKV, tie_word_embeddings=True), None),
}



def _build(hf, name, folder):
    cfg_cls, model_cls, kwargs, _ = CASES[name]
    return hf_parity.build(hf, cfg_cls, model_cls, kwargs, folder)


# Every architecture, by default: one import + round trip costs about a second.
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_and_round_trip(hf, name, tmp_path):
    torch, transformers = hf
    model = _build(hf, name, tmp_path / "hf")
    # 24 tokens: past longrope's original 16 positions (long factors); 12 stay within (short).
    batches = [_tokens(2, 24)] + ([_tokens(2, 12, seed=3)] if "longrope" in name else [])
    wants = [_logits(hf, model, t) for t in batches]

    cfg, params = convert.from_hf(tmp_path / "hf")
    for tokens, want in zip(batches, wants):
        _assert_close(np.asarray(zoo.forward(params, jnp.asarray(tokens), cfg=cfg)), want)

    without = CASES[name][3]
    if without is not None:  # the feature under test moves the logits far beyond the tolerance
        cfg_cls, model_cls, kwargs, _ = CASES[name]
        plain_cfg = getattr(transformers, cfg_cls)(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                                   **{**kwargs, **without})
        plain = getattr(transformers, model_cls)(plain_cfg).eval()
        plain.load_state_dict(model.state_dict())
        for tokens, want in zip(batches, wants):
            assert np.abs(_logits(hf, plain, tokens) - want).max() > 1e-2 * np.abs(want).max()

    convert.to_hf(cfg, params, tmp_path / "back", model_type=model.config.model_type)
    reloaded = getattr(transformers, CASES[name][1]).from_pretrained(tmp_path / "back").eval()
    for tokens, want in zip(batches, wants):
        _assert_close(_logits(hf, reloaded, tokens), want)
    cfg2, params2 = convert.from_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_longrope_regimes_differ_and_embed_norm_is_unfused(hf, tmp_path):
    """The two longrope regimes give different logits for the same 12 leading tokens (the
    zoo picks the factors per call, as transformers does)."""
    _build(hf, "llama-longrope", tmp_path / "llama")
    cfg, params = convert.from_hf(tmp_path / "llama")
    rope = cfg.pattern[0].mixer.rope
    assert rope.scaling == "longrope" and rope.factor == 4.0 and rope.original_max_len == 16
    tokens = _tokens(2, 24)
    long_head = np.asarray(zoo.forward(params, jnp.asarray(tokens), cfg=cfg))[:, :12]
    short = np.asarray(zoo.forward(params, jnp.asarray(tokens[:, :12]), cfg=cfg))
    assert np.abs(long_head - short).max() > 1e-2 * np.abs(short).max()

    # RWKV-4 with a tied head: the table stays the file's table, pre_ln its own parameters, and the
    # export is the same network for transformers (the zoo's logits: the slow parity cases).
    torch, transformers = hf
    model = _build(hf, "rwkv-tied", tmp_path / "rwkv")
    cfg, params = convert.from_hf(tmp_path / "rwkv")
    assert cfg.embed_norm == cfg.pattern[0].norm and cfg.tie_embeddings and "unembed_DV" not in params["embed"]
    np.testing.assert_array_equal(params["embed"]["table_VD"], model.rwkv.embeddings.weight.detach().numpy())
    np.testing.assert_array_equal(params["embed_norm"]["bias"], model.rwkv.blocks[0].pre_ln.bias.detach().numpy())
    convert.to_hf(cfg, params, tmp_path / "back")  # model_type inferred
    reloaded = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_array_equal(_logits(hf, reloaded, tokens), _logits(hf, model, tokens))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(hf, name, tmp_path):
    """8-token prompt + 20 new tokens: Llama longrope decoding crosses the 16-position boundary,
    where transformers (and the zoo) switch new tokens to the long factors while cached keys keep
    their short-factor rotation. transformers' Phi-3 generate() instead re-encodes the whole
    sequence once at the boundary, which zoo.generate does not do, so its prompt (18 tokens)
    starts past the boundary: every call then uses the long factors in both."""
    torch, _ = hf
    model = _build(hf, name, tmp_path)
    prompt = _tokens(2, 18 if name.startswith("phi3") else L_PROMPT, seed=1)
    with torch.no_grad():
        if name.startswith("rwkv"):
            # transformers' RWKV generate() drifts from its own full-sequence forward, so the
            # reference is greedy decoding by full forwards (as in test_convert.py).
            seq = prompt
            for _ in range(N_NEW):
                seq = np.concatenate([seq, _logits(hf, model, seq)[:, -1].argmax(-1)[:, None]], 1)
            want = seq[:, prompt.shape[1]:]
        else:
            want = model.generate(torch.tensor(prompt), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                  do_sample=False)[:, prompt.shape[1]:].numpy()
    cfg, params = convert.from_hf(tmp_path)
    got = generate.generate(params, prompt, cfg, max_new_tokens=N_NEW, cache_len=48).tokens_BN
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ without torch


def test_config_mapping_and_export_refusals():
    """group_limited_greedy becomes group_score="max" and is written back as such; a DeepSeek
    config ranking groups the other family's way, and an RWKV-4 without the embedding norm,
    have no transformers equivalent and are refused naming the option."""
    import dataclasses

    from zoo.convert import deepseek, rwkv

    cfg = deepseek.config_from_hf(dict(_DEEPSEEK_V2, model_type="deepseek_v2"))
    moe = cfg.pattern[-1].ffn
    assert (moe.router, moe.n_groups, moe.topk_groups, moe.top_k, moe.group_score) == ("softmax", 4, 2, 3, "max")
    deepseek.check_exportable(cfg, "deepseek_v2")
    hf_cfg = deepseek.config_to_hf(cfg, "deepseek_v2")
    assert (hf_cfg["topk_method"], hf_cfg["n_group"], hf_cfg["topk_group"]) == ("group_limited_greedy", 4, 2)
    top2 = dataclasses.replace(moe, group_score="top2_sum")
    other = dataclasses.replace(cfg, pattern=tuple(dataclasses.replace(b, ffn=top2) if b.ffn == moe else b
                                                   for b in cfg.pattern))
    with pytest.raises(convert.UnsupportedError, match="group_score='top2_sum'"):
        deepseek.check_exportable(other, "deepseek_v2")
    v3 = dataclasses.replace(cfg, pattern=tuple(
        dataclasses.replace(b, ffn=dataclasses.replace(moe, router="sigmoid")) if b.ffn == moe else b
        for b in cfg.pattern))
    with pytest.raises(convert.UnsupportedError, match="group_score='max'"):
        deepseek.check_exportable(v3, "deepseek_v3")

    cfg = rwkv.config_from_hf(dict(_RWKV, model_type="rwkv"))
    rwkv.check_exportable(cfg, "rwkv")
    # The new config fields survive the zoo checkpoint's config JSON (`zoo convert --from-hf`).
    from zoo.convert import ckpt, llama

    phi3 = llama.config_from_hf(dict(_LLAMA, model_type="phi3", max_position_embeddings=64,
                                     original_max_position_embeddings=16, rope_parameters=_LONGROPE))
    assert phi3.pattern[0].mixer.rope.short_factor == tuple(_LONGROPE["short_factor"])
    for c in (cfg, phi3):
        assert ckpt.config_from_json(json.loads(json.dumps(ckpt.config_to_json(c)))) == c
    assert rwkv.config_to_hf(cfg, "rwkv")["rescale_every"] == 0
    with pytest.raises(convert.UnsupportedError, match="embed_norm=None"):
        rwkv.check_exportable(dataclasses.replace(cfg, embed_norm=None), "rwkv")
    # Families that do not write an embedding norm refuse it instead of dropping it.
    normed = dataclasses.replace(phi3, embed_norm=phi3.final_norm)
    params = {"embed_norm": {"scale": np.ones(32, np.float32)}}
    with pytest.raises(convert.UnsupportedError, match="embed_norm"):
        convert.to_hf(normed, params, "/nonexistent-folder-not-written", model_type="llama")
