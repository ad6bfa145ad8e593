"""RecurrentGemma (Griffin): Griffin recurrent blocks (layers.rglru: conv1d + RG-LRU times a GELU
branch) and local attention (sliding-window MQA/GQA, RoPE on the first half of each head) in the
repeating order of `block_types` (default recurrent, recurrent, attention), each followed by a
GeGLU MLP with biases of width intermediate_size // 2.

Gemma conventions: RMSNorm applies (1 + w); embeddings are scaled by sqrt(hidden_size) rounded
to bfloat16 (transformers keeps that normaliser as a bfloat16 buffer); logits are soft-capped
(logits_soft_cap); the head is tied to the embedding.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from layers.rglru import RGLRUConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, block_at, from_linear,
                                minimal_pattern, rope_from_hf, rope_parameters, rope_to_hf, stack_layers, to_linear,
                                unstack_layers, unsupported)

ARCHITECTURES = {"recurrent_gemma": "RecurrentGemmaForCausalLM"}
_MAX_LEN = 8192  # RecurrentGemma has no position table; the zoo's default cache length


def _embed_scale(d_model: int) -> float:
    return float(np.asarray(math.sqrt(d_model), ml_dtypes.bfloat16))


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    D, H, n = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    G = hf.get("num_key_value_heads") or H
    eps = float(hf.get("rms_norm_eps", 1e-6))
    act = activation(mt, "hidden_activation", hf.get("hidden_activation", "gelu_pytorch_tanh"))
    types = list(hf.get("block_types") or ("recurrent", "recurrent", "attention"))
    for ty in set(types) - {"recurrent", "attention"}:
        unsupported(mt, "block_types", ty, "expected recurrent or attention")
    rp = rope_parameters(hf)
    rp.setdefault("partial_rotary_factor", 0.5)
    rope = rope_from_hf(mt, rp, _MAX_LEN)
    attn = AttentionConfig(d_model=D, n_heads=H, n_kv_heads=G, head_dim=D // H, rope=rope,
                           sliding_window=hf.get("attention_window_size", 2048),
                           use_bias=bool(hf.get("attention_bias", False)), out_bias=True)
    rec = RGLRUConfig(d_model=D, width=hf.get("lru_width") or D, n_heads=H, conv_width=hf.get("conv1d_width", 4),
                      activation=act)
    ffn = MLPConfig(d_model=D, d_ff=hf["intermediate_size"] // 2, activation=act, gated=True, use_bias=True)
    norm = NormConfig(kind="rms", eps=eps, scale_offset=1.0)
    layers = [BlockConfig(mixer=attn if types[i % len(types)] == "attention" else rec, ffn=ffn, norm=norm)
              for i in range(n)]
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=n, pattern=minimal_pattern(layers),
                       max_len=_MAX_LEN, tie_embeddings=bool(hf.get("tie_word_embeddings", True)), final_norm=norm,
                       final_logit_softcap=hf.get("logits_soft_cap", 30.0), embed_scale=_embed_scale(D))


def _rglru_from_hf(t: Tensors, pre: str, c: RGLRUConfig) -> dict:
    D, E, H, K, W = c.d_model, c.width, c.n_heads, c.block_width, c.conv_width
    lru = pre + "rg_lru."
    return {"wx_DE": from_linear(t.take(pre + "linear_x.weight", (E, D))), "bx_E": t.take(pre + "linear_x.bias", (E,)),
            "wy_DE": from_linear(t.take(pre + "linear_y.weight", (E, D))), "by_E": t.take(pre + "linear_y.bias", (E,)),
            "conv": {"w_WC": np.ascontiguousarray(t.take(pre + "conv_1d.weight", (E, 1, W))[:, 0, :].T),
                     "b_C": t.take(pre + "conv_1d.bias", (E,))},
            "wi_HKK": t.take(lru + "input_gate_weight", (H, K, K)), "bi_HK": t.take(lru + "input_gate_bias", (H, K)),
            "wr_HKK": t.take(lru + "recurrent_gate_weight", (H, K, K)),
            "br_HK": t.take(lru + "recurrent_gate_bias", (H, K)),
            "lambda_E": t.take(lru + "recurrent_param", (E,)),
            "wout_ED": from_linear(t.take(pre + "linear_out.weight", (D, E))),
            "bout_D": t.take(pre + "linear_out.bias", (D,))}


def _rglru_to_hf(p: dict, pre: str) -> dict:
    lru = pre + "rg_lru."
    return {pre + "linear_x.weight": to_linear(p["wx_DE"]), pre + "linear_x.bias": p["bx_E"],
            pre + "linear_y.weight": to_linear(p["wy_DE"]), pre + "linear_y.bias": p["by_E"],
            pre + "conv_1d.weight": np.ascontiguousarray(p["conv"]["w_WC"].T[:, None, :]),
            pre + "conv_1d.bias": p["conv"]["b_C"],
            lru + "input_gate_weight": p["wi_HKK"], lru + "input_gate_bias": p["bi_HK"],
            lru + "recurrent_gate_weight": p["wr_HKK"], lru + "recurrent_gate_bias": p["br_HK"],
            lru + "recurrent_param": p["lambda_E"],
            pre + "linear_out.weight": to_linear(p["wout_ED"]), pre + "linear_out.bias": p["bout_D"]}


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    layers = []
    for i in range(cfg.n_layers):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        tb = pre + "temporal_block."
        mixer = (parts.attention_from_hf(t, tb, b.mixer) if isinstance(b.mixer, AttentionConfig)
                 else _rglru_from_hf(t, tb, b.mixer))
        layers.append({"mixer_norm": parts.norm_from_hf(t, pre + "temporal_pre_norm", cfg.d_model), "mixer": mixer,
                       "ffn_norm": parts.norm_from_hf(t, pre + "channel_pre_norm", cfg.d_model),
                       "ffn": parts.mlp_from_hf(t, pre + "mlp_block.", b.ffn)})
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "model.embed_tokens.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "model.final_norm", cfg.d_model)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    def no(option, value, why=""):
        raise UnsupportedError(f"to_hf({model_type}): {option}={value!r} cannot be written" + (f" ({why})" if why else ""))

    if cfg.prefix:
        no("ModelConfig.prefix", len(cfg.prefix))
    if cfg.position != "none" or cfg.embed_scale != _embed_scale(cfg.d_model) or cfg.final_logit_softcap is None:
        no("ModelConfig.position/embed_scale/final_logit_softcap", (cfg.position, cfg.embed_scale, cfg.final_logit_softcap),
           "RecurrentGemma: no position table, bf16 sqrt(d_model) embedding scale, soft-capped logits")
    if cfg.final_norm.kind != "rms" or cfg.final_norm.scale_offset != 1.0 or not cfg.tie_embeddings:
        no("final_norm/tie_embeddings", (cfg.final_norm, cfg.tie_embeddings))
    kinds: dict[type, set] = {AttentionConfig: set(), RGLRUConfig: set(), MLPConfig: set()}
    for b in cfg.pattern:
        for part in (b.mixer, b.ffn):
            if type(part) not in kinds:
                no("block part", type(part).__name__, "RecurrentGemma has RG-LRU or attention mixers and MLPs")
            kinds[type(part)].add(part)
        if b.norm != cfg.final_norm or b.norm_position != "pre" or b.parallel:
            no("BlockConfig norm", (b.norm, b.norm_position, b.parallel))
    for kind, found in kinds.items():
        if len(found) > 1:
            no(kind.__name__, "several", "every layer of one kind must be alike")
    (f,) = kinds[MLPConfig]
    if not f.gated or not f.use_bias:
        no("MLPConfig", f, "a gated MLP with biases")
    for m in kinds[AttentionConfig]:
        if (m.rope is None or m.rope.layout != "half" or m.sliding_window is None or not m.out_bias or m.alibi
                or m.logit_softcap is not None or m.qk_norm or m.attention_sinks or m.head_dim * m.n_heads != cfg.d_model
                or (m.query_scale is not None and m.query_scale != m.head_dim ** -0.5)):
            no("AttentionConfig", m, "local attention with half-rotation RoPE, an output bias and head_dim = D / H")
    for r in kinds[RGLRUConfig]:
        if r.c != 8.0 or r.activation != f.activation:
            no("RGLRUConfig c/activation", (r.c, r.activation), "c = 8 and the MLP's activation")
        if kinds[AttentionConfig] and r.n_heads != next(iter(kinds[AttentionConfig])).n_heads:
            no("RGLRUConfig.n_heads", r.n_heads, "num_attention_heads sets both")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    attn = next((b.mixer for b in cfg.pattern if isinstance(b.mixer, AttentionConfig)), None)
    rec = next((b.mixer for b in cfg.pattern if isinstance(b.mixer, RGLRUConfig)), None)
    f = cfg.pattern[0].ffn
    hf = dict(hidden_size=cfg.d_model, intermediate_size=2 * f.d_ff, num_hidden_layers=cfg.n_layers,
              num_attention_heads=(attn or rec).n_heads, rms_norm_eps=cfg.final_norm.eps,
              hidden_activation=activation_to_hf(f.activation), logits_soft_cap=cfg.final_logit_softcap,
              block_types=["attention" if isinstance(b.mixer, AttentionConfig) else "recurrent" for b in cfg.pattern])
    if rec is not None:
        hf.update(lru_width=rec.width, conv1d_width=rec.conv_width)
    if attn is not None:
        hf.update(num_key_value_heads=attn.n_kv_heads, attention_window_size=attn.sliding_window,
                  attention_bias=attn.use_bias, rope_parameters=rope_to_hf(attn.rope, cfg.max_len),
                  partial_rotary_factor=attn.rope.fraction)
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    out = parts.embedding_to_hf(params["embed"], "model.embed_tokens.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "model.final_norm"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        tb = pre + "temporal_block."
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "temporal_pre_norm"))
        out.update(parts.attention_to_hf(p["mixer"], tb, b.mixer) if isinstance(b.mixer, AttentionConfig)
                   else _rglru_to_hf(p["mixer"], tb))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "channel_pre_norm"))
        out.update(parts.mlp_to_hf(p["ffn"], pre + "mlp_block.", b.ffn))
    return out
