"""Hugging Face interop for the hybrid and encoder-decoder families: Jamba, T5, BART, ...

Same checks as tests/zoo/test_convert.py: a tiny random model built by transformers itself with a
large init scale (0.2) -> zoo logits within 1e-4 of the logit scale, greedy decoding of 20 tokens
identical, and to_hf -> transformers loads -> same logits.
"""

from __future__ import annotations

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
# Four layers: Mamba + MLP, attention + MoE, repeated (attn period 2 offset 1, experts likewise);
# the 6-layer case has attention every third layer and experts every other one, which repeats
# only after 6 layers (the layer scan then runs one repeat).
_JAMBA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
              attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8)

# name -> (config class, model class, config kwargs)
CASES = {
    "jamba": ("JambaConfig", "JambaForCausalLM", _JAMBA),
    "jamba-6": ("JambaConfig", "JambaForCausalLM",
                dict(_JAMBA, num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=2, expert_layer_offset=0)),
    # recurrent, recurrent, local MQA attention (window 8 < 24 tokens), partial RoPE, soft-capped logits.
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                        dict(vocab_size=V, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=1, attention_window_size=8,
                             logits_soft_cap=2.0)),
}
GREEDY_DEFAULT = ()


def _params(names):
    return [pytest.param(n, marks=() if n in names else pytest.mark.slow) for n in CASES]


def _build(hf, name, folder):
    cfg_cls, model_cls, kwargs = CASES[name]
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

    convert.to_hf(cfg, params, tmp_path / "back", model_type=model.config.model_type)
    reloaded = getattr(transformers, CASES[name][1]).from_pretrained(tmp_path / "back").eval()
    _assert_close(_logits(hf, reloaded, tokens), want)
    cfg2, params2 = convert.from_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name", _params(GREEDY_DEFAULT))
def test_greedy_generation_matches_transformers(hf, name, tmp_path):
    model = _build(hf, name, tmp_path)
    prompt = _tokens(2, L_PROMPT, seed=1)
    want = hf_parity.hf_greedy(hf, model, prompt)
    cfg, params = convert.from_hf(tmp_path)
    got = generate.generate(params, prompt, cfg, max_new_tokens=N_NEW, cache_len=32).tokens_BN
    np.testing.assert_array_equal(got, want)


def test_jamba_layout_and_inner_norms(hf, tmp_path):
    """The scanned pattern follows the period/offset layout (6 layers: attention every third,
    experts every other); routers keep top-k weights unrenormalised; Mamba layers normalise
    dt, B, C with rms_norm_eps; to_hf infers model_type jamba."""
    from layers.moe import MoEConfig

    _build(hf, "jamba-6", tmp_path)
    cfg, params = convert.from_hf(tmp_path)
    kinds = [(type(b.mixer).__name__, type(b.ffn).__name__) for b in cfg.pattern]
    assert kinds == [("MambaConfig", "MoEConfig"), ("MambaConfig", "MLPConfig"), ("AttentionConfig", "MoEConfig"),
                     ("MambaConfig", "MLPConfig"), ("MambaConfig", "MoEConfig"), ("AttentionConfig", "MLPConfig")]
    for b in cfg.pattern:
        if isinstance(b.ffn, MoEConfig):
            assert not b.ffn.renormalize
        else:
            assert b.mixer.__class__.__name__ != "MambaConfig" or b.mixer.inner_norm_eps == cfg.final_norm.eps
    assert json_model_type(convert.to_hf(cfg, params, tmp_path / "back")) == "jamba"  # inferred


# ------------------------------------------------------------------------------ encoder-decoders

# name -> (config class, model class, config kwargs, untie the head after building)
ENCDEC = {
    # v1.0: ReLU MLP, tied head with logit scaling; small buckets so distant keys share buckets.
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=12), False),
    # v1.1: gated-GELU, separate lm_head (as the published v1.1 files store it), no scaling.
    "t5-v1.1": ("T5Config", "T5ForConditionalGeneration",
                dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False), True),
    # post-LayerNorm, learned positions (+2 offset rows), embedding LayerNorm, scaled embeddings.
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.2,
                  scale_embedding=True), False),
}



def _build_encdec(hf, name, folder):
    torch, transformers = hf
    cfg_cls, model_cls, kwargs, untie = ENCDEC[name]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(vocab_size=V, eos_token_id=None, **kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    if untie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, config.d_model))
    model.save_pretrained(folder)
    return model


def _encdec_logits(hf, model, src, dec):
    torch, _ = hf
    with torch.no_grad():
        return model(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(dec)).logits.numpy()


# Every architecture, by default: one import + round trip costs about a second.
@pytest.mark.parametrize("name", list(ENCDEC))
def test_encdec_logits_match_transformers_and_round_trip(hf, name, tmp_path):
    from zoo import encdec

    torch, transformers = hf
    model = _build_encdec(hf, name, tmp_path / "hf")
    src, dec = _tokens(2, 24), _tokens(2, 12, seed=1)
    want = _encdec_logits(hf, model, src, dec)

    cfg, params = convert.from_hf(tmp_path / "hf")
    assert cfg.tie_embeddings == (not ENCDEC[name][3])
    _assert_close(np.asarray(encdec.forward(params, jnp.asarray(src), jnp.asarray(dec), cfg=cfg)), want)

    convert.to_hf(cfg, params, tmp_path / "back")  # model_type inferred
    reloaded = getattr(transformers, ENCDEC[name][1]).from_pretrained(tmp_path / "back").eval()
    _assert_close(_encdec_logits(hf, reloaded, src, dec), want)
    cfg2, params2 = convert.from_hf(tmp_path / "back")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENCDEC))
def test_encdec_greedy_generation_matches_transformers(hf, name, tmp_path):
    from zoo import encdec

    model = _build_encdec(hf, name, tmp_path)
    src = _tokens(2, 12, seed=2)
    cfg, params = convert.from_hf(tmp_path)
    # The reference is greedy decoding by full forwards: transformers' generate() sizes its cache
    # by num_layers and fails when the decoder is deeper than the encoder (the "t5" case).
    seq = np.full((2, 1), cfg.decoder_start_id, np.int32)  # T5: the pad id 0; BART: </s> = 2
    for _ in range(N_NEW):
        seq = np.concatenate([seq, _encdec_logits(hf, model, src, seq)[:, -1].argmax(-1)[:, None]], 1)
    want = seq[:, 1:]
    got = encdec.generate(params, jnp.asarray(src), cfg, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------------------ refusals (no torch)


@pytest.mark.parametrize("config, option", [
    (dict(_JAMBA, model_type="jamba", hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="t5", vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
    (dict(model_type="bart", vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=32), "decoder_ffn_dim=32"),
    (dict(model_type="xlstm", use_bias=True), "use_bias=True"),
    (dict(model_type="recurrent_gemma", vocab_size=V, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
          num_attention_heads=4, block_types=["recurrent", "mlp"]), "block_types='mlp'"),
])
def test_unsupported_options_are_named(tmp_path, config, option):
    with pytest.raises(convert.UnsupportedError, match=option.replace("(", r"\(").replace("[", r"\[")):
        convert.from_hf(hf_parity.write_config(tmp_path, **config))


def json_model_type(folder):
    import json
    import os

    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["model_type"]
