"""Gemma 2 and Gemma 3 (text): sandwich RMSNorms whose weights w apply as (1 + w), GeGLU (tanh),
embeddings scaled by sqrt(D), local (sliding window) and global layers by `layer_types`,
attention scale query_pre_attn_scalar ** -0.5, optional attention and final logit softcaps.
Gemma 3 adds (1 + w) RMSNorms on queries and keys and its own RoPE per layer type (local
theta 1e4, global 1e6 with optional scaling)."""

from __future__ import annotations

import math

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, block_at, minimal_pattern,
                                rope_from_hf, rope_parameters, rope_to_hf, stack_layers, unstack_layers,
                                unsupported)

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
QK_NORM_EPS = 1e-6  # layers.attention's q/k-norm epsilon
_THETA = {"full_attention": 1e6, "sliding_attention": 1e4}  # Gemma 3 defaults


def _layer_types(hf: dict) -> list[str]:
    n = hf["num_hidden_layers"]
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    period = 2 if hf["model_type"] == "gemma2" else hf.get("sliding_window_pattern", 6)
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]


def _rope(hf: dict, layer_type: str, max_pos: int):
    mt = hf["model_type"]
    if mt == "gemma3_text" and not isinstance(hf.get("rope_parameters"), dict):
        # older config.json: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq for local
        if layer_type == "sliding_attention":
            rp = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", _THETA[layer_type])}
        else:
            rp = rope_parameters({"rope_scaling": hf.get("rope_scaling"),
                                  "rope_theta": hf.get("rope_theta", _THETA[layer_type])})
    else:
        rp = rope_parameters(hf, layer_type if mt == "gemma3_text" else None)
    return rope_from_hf(mt, rp, max_pos)


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("use_bidirectional_attention"):
        unsupported(mt, "use_bidirectional_attention", True)
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    G, K = hf.get("num_key_value_heads") or H, hf.get("head_dim") or D // H
    eps = float(hf.get("rms_norm_eps", 1e-6))
    qk_norm = mt == "gemma3_text"
    if qk_norm and eps != QK_NORM_EPS:
        unsupported(mt, "rms_norm_eps", eps, f"the zoo's q/k RMSNorm uses eps={QK_NORM_EPS}")
    max_pos = hf.get("max_position_embeddings", 8192)
    norm = NormConfig(kind="rms", eps=eps, scale_offset=1.0)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    ffn = MLPConfig(d_model=D, d_ff=hf["intermediate_size"], activation=activation(mt, "hidden_activation", act),
                    gated=True)
    bias = bool(hf.get("attention_bias", False))
    layers = []
    for ty in _layer_types(hf):
        if ty not in ("sliding_attention", "full_attention"):
            unsupported(mt, "layer_types", ty)
        mixer = AttentionConfig(
            d_model=D, n_heads=H, n_kv_heads=G, head_dim=K, rope=_rope(hf, ty, max_pos), qk_norm=qk_norm,
            sliding_window=hf.get("sliding_window") if ty == "sliding_attention" else None,
            rolling_cache=ty == "sliding_attention" and hf.get("sliding_window") is not None,
            logit_softcap=hf.get("attn_logit_softcapping"), use_bias=bias, out_bias=bias,
            query_scale=float(hf.get("query_pre_attn_scalar", K)) ** -0.5)
        layers.append(BlockConfig(mixer=mixer, ffn=ffn, norm=norm, norm_position="sandwich"))
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       pattern=minimal_pattern(layers), max_len=max_pos,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)), final_norm=norm,
                       final_logit_softcap=hf.get("final_logit_softcapping"), embed_scale=math.sqrt(D))


_NORMS = {"mixer_norm": "input_layernorm", "mixer_post_norm": "post_attention_layernorm",
          "ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm"}


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    offset = 1.0 if cfg.pattern[0].mixer.qk_norm else 0.0
    layers = []
    for i in range(cfg.n_layers):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        p = {k: parts.norm_from_hf(t, pre + v, cfg.d_model) for k, v in _NORMS.items()}
        p["mixer"] = parts.attention_from_hf(t, pre + "self_attn.", b.mixer, qk_norm_offset=offset)
        p["ffn"] = parts.mlp_from_hf(t, pre + "mlp.", b.ffn)
        layers.append(p)
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "model.embed_tokens.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "model.norm", cfg.d_model)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    def no(what):
        raise UnsupportedError(f"to_hf({model_type}): {what}")

    if cfg.embed_scale is None or abs(cfg.embed_scale - math.sqrt(cfg.d_model)) > 1e-6 * math.sqrt(cfg.d_model):
        no(f"embed_scale={cfg.embed_scale} (Gemma scales by sqrt(d_model))")
    if cfg.position != "none" or cfg.final_norm.kind != "rms" or cfg.final_norm.scale_offset != 1.0:
        no("needs position='none' and a (1 + w) RMSNorm")
    first = cfg.pattern[0]
    qk = model_type == "gemma3_text"
    windows = set()
    for b in cfg.pattern:
        m, f = b.mixer, b.ffn
        if not isinstance(m, AttentionConfig) or not isinstance(f, MLPConfig) or not f.gated or f.use_bias:
            no("needs attention + gated MLP without biases")
        if b.norm != cfg.final_norm or b.norm_position != "sandwich" or b.parallel or f != first.ffn:
            no("needs sandwich norms and one MLP config")
        if (not m.causal or m.alibi or m.rope is None or m.rope.layout != "half" or m.qk_norm != qk
                or m.use_bias != m.out_bias or m.logit_softcap != first.mixer.logit_softcap
                or (m.n_heads, m.n_kv_heads, m.head_dim, m.use_bias) != (
                    first.mixer.n_heads, first.mixer.n_kv_heads, first.mixer.head_dim, first.mixer.use_bias)
                or abs(m.scale - first.mixer.scale) > 1e-12):
            no("attention blocks must share heads, scale, softcap, biases" + (" and have qk_norm" if qk else ""))
        if getattr(m, "attention_sinks", 0):
            no(f"attention_sinks={m.attention_sinks} (transformers' masks have no sinks)")
        windows.add(m.sliding_window)
        local = m.sliding_window is not None
        ropes = {bb.mixer.rope for bb in cfg.pattern if (bb.mixer.sliding_window is not None) == local}
        if len(ropes) > 1 or (not qk and m.rope != first.mixer.rope):
            no("one RoPE per layer type" + ("" if qk else " (Gemma 2: one for all layers)"))
    if len(windows - {None}) > 1:
        no(f"one sliding window size at most, got {windows}")
    if qk and cfg.final_norm.eps != QK_NORM_EPS:
        no(f"norm eps {cfg.final_norm.eps}: Gemma 3's q/k norms share it; the zoo's use {QK_NORM_EPS}")


def _scalar(scale: float) -> float | int:
    """query_pre_attn_scalar from the score scale; an int where it is one (the config checks)."""
    q = scale ** -2
    return round(q) if abs(q - round(q)) <= 1e-6 * q else q


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    m0, f = cfg.pattern[0].mixer, cfg.pattern[0].ffn
    blocks = [block_at(cfg, i) for i in range(cfg.n_layers)]
    types = ["sliding_attention" if b.mixer.sliding_window is not None else "full_attention" for b in blocks]
    window = next((b.mixer.sliding_window for b in blocks if b.mixer.sliding_window is not None), None)
    hf = dict(hidden_size=cfg.d_model, intermediate_size=f.d_ff, num_hidden_layers=cfg.n_layers,
              num_attention_heads=m0.n_heads, num_key_value_heads=m0.n_kv_heads, head_dim=m0.head_dim,
              hidden_activation=activation_to_hf(f.activation), max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.final_norm.eps, attention_bias=m0.use_bias, layer_types=types,
              sliding_window=window or 4096, query_pre_attn_scalar=_scalar(m0.scale),
              attn_logit_softcapping=m0.logit_softcap, final_logit_softcapping=cfg.final_logit_softcap)
    by_type = {ty: rope_to_hf(b.mixer.rope, cfg.max_len) for ty, b in zip(types, blocks)}
    hf["rope_parameters"] = by_type if model_type == "gemma3_text" else next(iter(by_type.values()))
    if model_type == "gemma3_text":
        for ty in ("sliding_attention", "full_attention"):
            hf["rope_parameters"].setdefault(ty, {"rope_type": "default", "rope_theta": _THETA[ty]})
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    offset = 1.0 if model_type == "gemma3_text" else 0.0
    out = parts.embedding_to_hf(params["embed"], "model.embed_tokens.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "model.norm"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        for k, v in _NORMS.items():
            out.update(parts.norm_to_hf(p[k], pre + v))
        out.update(parts.attention_to_hf(p["mixer"], pre + "self_attn.", b.mixer, qk_norm_offset=offset))
        out.update(parts.mlp_to_hf(p["ffn"], pre + "mlp.", b.ffn))
    return out
