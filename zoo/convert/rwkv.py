"""RWKV-4 (transformers' `Rwkv`): LayerNorm blocks of time mix (WKV) and channel mix, import only.

transformers applies one extra LayerNorm (`blocks.0.pre_ln`) to the embeddings. It acts on each
token's embedding row alone, so the import folds it into the table: row v becomes
pre_ln(table[v]), exactly what the first block sees. The fold cannot be undone, so a zoo RWKV-4
is not written back (`check_exportable` refuses).

In eval mode transformers halves the hidden state every `rescale_every` layers and divides the
output / value projections to match (a float16 overflow guard); the zoo computes the unscaled
network, which differs from it only through the LayerNorm epsilon.
"""

from __future__ import annotations

import numpy as np

from layers.norms import NormConfig
from layers.rwkv4 import RWKV4ChannelMixConfig, RWKV4TimeMixConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import Tensors, UnsupportedError, from_linear, stack_layers

ARCHITECTURES = {"rwkv": "RwkvForCausalLM"}


def config_from_hf(hf: dict) -> ModelConfig:
    D = hf["hidden_size"]
    norm = NormConfig(kind="layer", eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    mixer = RWKV4TimeMixConfig(d_model=D, d_att=hf.get("attention_hidden_size") or D, form="chunked", chunk_size=64)
    ffn = RWKV4ChannelMixConfig(d_model=D, d_ff=hf.get("intermediate_size") or 4 * D)
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       pattern=(BlockConfig(mixer=mixer, ffn=ffn, norm=norm),),
                       max_len=hf.get("context_length", 1024), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       final_norm=NormConfig(kind="layer", eps=1e-5))  # ln_out uses torch's default eps


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * w + b).astype(x.dtype)


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    D, b = cfg.d_model, cfg.pattern[0]
    A, F = b.mixer.d_att, b.ffn.d_ff
    mix = lambda name: t.take(name, (1, 1, D)).reshape(D)
    layers = []
    for i in range(cfg.n_layers):
        pre = f"rwkv.blocks.{i}."
        a, f = pre + "attention.", pre + "feed_forward."
        layers.append({
            "mixer_norm": parts.norm_from_hf(t, pre + "ln1", D, bias=True),
            "mixer": {"time_decay_A": t.take(a + "time_decay", (A,)), "time_first_A": t.take(a + "time_first", (A,)),
                      "time_mix_k_D": mix(a + "time_mix_key"), "time_mix_v_D": mix(a + "time_mix_value"),
                      "time_mix_r_D": mix(a + "time_mix_receptance"),
                      "key_DA": from_linear(t.take(a + "key.weight", (A, D))),
                      "value_DA": from_linear(t.take(a + "value.weight", (A, D))),
                      "receptance_DA": from_linear(t.take(a + "receptance.weight", (A, D))),
                      "output_AD": from_linear(t.take(a + "output.weight", (D, A)))},
            "ffn_norm": parts.norm_from_hf(t, pre + "ln2", D, bias=True),
            "ffn": {"time_mix_k_D": mix(f + "time_mix_key"), "time_mix_r_D": mix(f + "time_mix_receptance"),
                    "key_DF": from_linear(t.take(f + "key.weight", (F, D))),
                    "receptance_DD": from_linear(t.take(f + "receptance.weight", (D, D))),
                    "value_FD": from_linear(t.take(f + "value.weight", (D, F)))},
        })
    embed = parts.embedding_from_hf(t, cfg.vocab_size, D, cfg.tie_embeddings, "rwkv.embeddings.weight", "head.weight")
    if cfg.tie_embeddings:
        raise UnsupportedError("rwkv: config option tie_word_embeddings=True is not supported (the pre_ln fold "
                               "changes the table the head would share)")
    embed["table_VD"] = _layer_norm(embed["table_VD"], t.take("rwkv.blocks.0.pre_ln.weight", (D,)),
                                    t.take("rwkv.blocks.0.pre_ln.bias", (D,)), float(hf.get("layer_norm_epsilon", 1e-5)))
    return {"embed": embed, "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "rwkv.ln_out", D, bias=True)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    raise UnsupportedError("to_hf(rwkv): the embedding LayerNorm (pre_ln) is folded into the table on import "
                           "and cannot be split out again")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    check_exportable(cfg, model_type)


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    check_exportable(cfg, model_type)
