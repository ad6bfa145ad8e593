"""RWKV-4 (transformers' `Rwkv`): LayerNorm blocks of time mix (WKV) and channel mix.

transformers applies one extra LayerNorm (`blocks.0.pre_ln`, the original code's ln0) to the
embeddings before the first block; it becomes the decoder's `ModelConfig.embed_norm`, kept as
its own parameters, so the embedding table stays the file's table (a tied head shares it) and
the model can be written back.

In eval mode transformers halves the hidden state every `rescale_every` layers and divides the
output / value projections to match (a float16 overflow guard); the zoo computes the unscaled
network, which differs from it only through the LayerNorm epsilon. Export writes
`rescale_every=0`, so transformers computes exactly the zoo's network.
"""

from __future__ import annotations

import numpy as np

from layers.norms import NormConfig
from layers.rwkv4 import RWKV4ChannelMixConfig, RWKV4TimeMixConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import Tensors, UnsupportedError, from_linear, stack_layers, to_linear, unstack_layers

ARCHITECTURES = {"rwkv": "RwkvForCausalLM"}
WRITES_EMBED_NORM = True  # zoo.convert.to_hf refuses embed_norm for families without this
# ln_out is built without an eps argument: torch's LayerNorm default.
OUT_NORM_EPS = 1e-5
# Token-shift mixing vectors are stored as [1, 1, D] (broadcast over batch and time).
_TIME_MIX = ("time_mix_k_D", "time_mix_key"), ("time_mix_v_D", "time_mix_value"), ("time_mix_r_D", "time_mix_receptance")
_CHANNEL_MIX = ("time_mix_k_D", "time_mix_key"), ("time_mix_r_D", "time_mix_receptance")


def config_from_hf(hf: dict) -> ModelConfig:
    D = hf["hidden_size"]
    norm = NormConfig(kind="layer", eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    mixer = RWKV4TimeMixConfig(d_model=D, d_att=hf.get("attention_hidden_size") or D, form="chunked", chunk_size=64)
    ffn = RWKV4ChannelMixConfig(d_model=D, d_ff=hf.get("intermediate_size") or 4 * D)
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       pattern=(BlockConfig(mixer=mixer, ffn=ffn, norm=norm),),
                       max_len=hf.get("context_length", 1024), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       embed_norm=norm, final_norm=NormConfig(kind="layer", eps=OUT_NORM_EPS))


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    D, b = cfg.d_model, cfg.pattern[0]
    A, F = b.mixer.d_att, b.ffn.d_ff
    layers = []
    for i in range(cfg.n_layers):
        pre = f"rwkv.blocks.{i}."
        a, f = pre + "attention.", pre + "feed_forward."
        mixer = {zoo: t.take(a + name, (1, 1, D)).reshape(D) for zoo, name in _TIME_MIX}
        mixer.update({"time_decay_A": t.take(a + "time_decay", (A,)), "time_first_A": t.take(a + "time_first", (A,)),
                      "key_DA": from_linear(t.take(a + "key.weight", (A, D))),
                      "value_DA": from_linear(t.take(a + "value.weight", (A, D))),
                      "receptance_DA": from_linear(t.take(a + "receptance.weight", (A, D))),
                      "output_AD": from_linear(t.take(a + "output.weight", (D, A)))})
        ffn = {zoo: t.take(f + name, (1, 1, D)).reshape(D) for zoo, name in _CHANNEL_MIX}
        ffn.update({"key_DF": from_linear(t.take(f + "key.weight", (F, D))),
                    "receptance_DD": from_linear(t.take(f + "receptance.weight", (D, D))),
                    "value_FD": from_linear(t.take(f + "value.weight", (D, F)))})
        layers.append({"mixer_norm": parts.norm_from_hf(t, pre + "ln1", D, bias=True), "mixer": mixer,
                       "ffn_norm": parts.norm_from_hf(t, pre + "ln2", D, bias=True), "ffn": ffn})
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, D, cfg.tie_embeddings, "rwkv.embeddings.weight",
                                             "head.weight"),
            "embed_norm": parts.norm_from_hf(t, "rwkv.blocks.0.pre_ln", D, bias=True),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "rwkv.ln_out", D, bias=True)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    def no(option, value, why=""):
        raise UnsupportedError(f"to_hf({model_type}): {option}={value!r} cannot be written" + (f" ({why})" if why else ""))

    if len(cfg.pattern) != 1 or cfg.prefix:
        no("pattern/prefix", (len(cfg.pattern), len(cfg.prefix)), "RWKV-4 repeats one block")
    b = cfg.pattern[0]
    if not isinstance(b.mixer, RWKV4TimeMixConfig) or not isinstance(b.ffn, RWKV4ChannelMixConfig):
        no("pattern mixer/ffn", (type(b.mixer).__name__, type(b.ffn).__name__), "needs RWKV-4 time mix + channel mix")
    layer_norm = NormConfig(kind="layer", eps=b.norm.eps)
    if b.norm != layer_norm or b.norm_position != "pre" or b.parallel:
        no("BlockConfig norm", (b.norm, b.norm_position, b.parallel), "pre-LayerNorm with bias")
    if cfg.embed_norm != layer_norm:
        no("embed_norm", cfg.embed_norm, "transformers' pre_ln: a LayerNorm with bias and the blocks' eps")
    if cfg.final_norm != NormConfig(kind="layer", eps=OUT_NORM_EPS):
        no("final_norm", cfg.final_norm, f"ln_out is a LayerNorm with bias and eps={OUT_NORM_EPS}")
    if cfg.position != "none" or cfg.embed_scale is not None or cfg.final_logit_softcap is not None:
        no("ModelConfig.position/embed_scale/final_logit_softcap", (cfg.position, cfg.embed_scale, cfg.final_logit_softcap))


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    b = cfg.pattern[0]
    return dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, attention_hidden_size=b.mixer.d_att,
                intermediate_size=b.ffn.d_ff, layer_norm_epsilon=b.norm.eps, context_length=cfg.max_len,
                rescale_every=0)


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    D = cfg.d_model
    out = parts.embedding_to_hf(params["embed"], "rwkv.embeddings.weight", "head.weight")
    out.update(parts.norm_to_hf(params["embed_norm"], "rwkv.blocks.0.pre_ln"))
    out.update(parts.norm_to_hf(params["final_norm"], "rwkv.ln_out"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        pre = f"rwkv.blocks.{i}."
        a, f, m, c = pre + "attention.", pre + "feed_forward.", p["mixer"], p["ffn"]
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "ln1"))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "ln2"))
        out.update({a + name: np.reshape(m[zoo], (1, 1, D)) for zoo, name in _TIME_MIX})
        out.update({f + name: np.reshape(c[zoo], (1, 1, D)) for zoo, name in _CHANNEL_MIX})
        out.update({a + "time_decay": m["time_decay_A"], a + "time_first": m["time_first_A"],
                    a + "key.weight": to_linear(m["key_DA"]), a + "value.weight": to_linear(m["value_DA"]),
                    a + "receptance.weight": to_linear(m["receptance_DA"]), a + "output.weight": to_linear(m["output_AD"]),
                    f + "key.weight": to_linear(c["key_DF"]), f + "receptance.weight": to_linear(c["receptance_DD"]),
                    f + "value.weight": to_linear(c["value_FD"])})
    return out
