"""BART -> zoo.encdec.EncDecConfig: post-norm LayerNorm blocks with biases everywhere, a learned
position table per stack, a LayerNorm on each stack's embeddings (layernorm_embedding), GELU MLP
(fc1, fc2), the head tied to `shared`.

BART's position tables have two extra leading rows (BartLearnedPositionalEmbedding looks up
position + 2; rows 0 and 1 are never read), so the zoo keeps rows 2.. and export writes two zero
rows back. `final_logits_bias` is a buffer of zeros in every BART checkpoint we know of; a
non-zero one is refused (the zoo's heads have no logit bias).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from layers.norms import NormConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, from_linear, to_linear,
                                unsupported)
from zoo.encdec import EncDecConfig

ARCHITECTURES = {"bart": "BartForConditionalGeneration"}
_OFFSET = 2  # BartLearnedPositionalEmbedding.offset
_MLP_NAMES = {"up": "fc1", "down": "fc2"}


def config_from_hf(hf: dict) -> EncDecConfig:
    mt = hf["model_type"]
    for ours, (a, b) in {"n_heads": ("encoder_attention_heads", "decoder_attention_heads"),
                         "d_ff": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():
        if hf[a] != hf[b]:
            unsupported(mt, b, hf[b], f"zoo.encdec has one {ours} for both stacks ({a}={hf[a]})")
    if hf.get("add_final_layer_norm") or hf.get("normalize_before"):  # mBART-style options of older files
        unsupported(mt, "normalize_before/add_final_layer_norm", True, "BART is post-norm without final norms")
    D = hf["d_model"]
    return EncDecConfig(vocab_size=hf["vocab_size"], d_model=D, n_heads=hf["encoder_attention_heads"],
                        d_ff=hf["encoder_ffn_dim"], n_encoder_layers=hf["encoder_layers"],
                        n_decoder_layers=hf["decoder_layers"],
                        activation=activation(mt, "activation_function", hf.get("activation_function", "gelu")),
                        gated=False, norm=NormConfig(kind="layer", eps=1e-5), norm_position="post",
                        final_norm=False, embed_norm=True, position="learned",
                        max_len=hf.get("max_position_embeddings", 1024), query_scale=None, use_bias=True,
                        tie_embeddings=True, scale_tied_logits=False,
                        embed_scale=math.sqrt(D) if hf.get("scale_embedding", False) else None,
                        decoder_start_id=hf.get("decoder_start_token_id", 2))


_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}


def _attn_from_hf(t: Tensors, pre: str, cfg: EncDecConfig) -> dict:
    D, H, K = cfg.d_model, cfg.n_heads, cfg.attention.head_dim
    p = {}
    for x, name in _ATTN.items():
        p[f"w{x}_DHK"] = from_linear(t.take(f"{pre}{name}.weight", (H * K, D)), H, K)
        p[f"b{x}_HK"] = t.take(f"{pre}{name}.bias", (H * K,)).reshape(H, K)
    p["wo_HKD"] = np.ascontiguousarray(t.take(pre + "out_proj.weight", (D, H * K)).T).reshape(H, K, D)
    p["bo_D"] = t.take(pre + "out_proj.bias", (D,))
    return p


def _attn_to_hf(p: dict, pre: str) -> dict:
    H, K, D = p["wo_HKD"].shape
    out = {}
    for x, name in _ATTN.items():
        out[f"{pre}{name}.weight"] = to_linear(p[f"w{x}_DHK"])
        out[f"{pre}{name}.bias"] = np.asarray(p[f"b{x}_HK"]).reshape(-1)
    out[pre + "out_proj.weight"] = np.ascontiguousarray(p["wo_HKD"].reshape(H * K, D).T)
    out[pre + "out_proj.bias"] = p["bo_D"]
    return out


def _stack_from_hf(t: Tensors, cfg: EncDecConfig, decoder: bool) -> dict:
    side = "decoder" if decoder else "encoder"
    n = cfg.n_decoder_layers if decoder else cfg.n_encoder_layers
    D = cfg.d_model
    layers = []
    for i in range(n):
        pre = f"model.{side}.layers.{i}."
        p = {"self_attn": _attn_from_hf(t, pre + "self_attn.", cfg),
             "self_attn_norm": parts.norm_from_hf(t, pre + "self_attn_layer_norm", D, bias=True)}
        if decoder:
            p["cross_attn"] = _attn_from_hf(t, pre + "encoder_attn.", cfg)
            p["cross_attn_norm"] = parts.norm_from_hf(t, pre + "encoder_attn_layer_norm", D, bias=True)
        p["ffn"] = parts.mlp_from_hf(t, pre, cfg.mlp, _MLP_NAMES)
        p["ffn_norm"] = parts.norm_from_hf(t, pre + "final_layer_norm", D, bias=True)
        layers.append(p)
    table = t.take(f"model.{side}.embed_positions.weight", (cfg.max_len + _OFFSET, D))
    t.discard(f"model.{side}.embed_tokens.weight")  # tied to model.shared
    return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers), "pos": {"pos_PD": table[_OFFSET:]},
            "embed_norm": parts.norm_from_hf(t, f"model.{side}.layernorm_embedding", D, bias=True)}


def params_from_hf(cfg: EncDecConfig, hf: dict, t: Tensors) -> dict:
    if t.has("final_logits_bias"):
        bias = t.take("final_logits_bias")
        if np.any(np.asarray(bias, np.float32) != 0):
            unsupported("bart", "final_logits_bias", "non-zero", "zoo.encdec's head has no logit bias")
    t.discard("lm_head.weight")  # tied to model.shared
    return {"embed": {"table_VD": t.take("model.shared.weight", (cfg.vocab_size, cfg.d_model))},
            "encoder": _stack_from_hf(t, cfg, False), "decoder": _stack_from_hf(t, cfg, True)}


def check_exportable(cfg: Any, model_type: str) -> None:
    if not isinstance(cfg, EncDecConfig):
        raise UnsupportedError(f"to_hf({model_type}): needs a zoo.encdec.EncDecConfig, got {type(cfg).__name__}")
    D = cfg.d_model
    bad = {"norm": cfg.norm.kind != "layer" or not cfg.norm.use_bias or cfg.norm.eps != 1e-5 or cfg.norm.scale_offset,
           "norm_position": cfg.norm_position != "post", "final_norm": cfg.final_norm, "embed_norm": not cfg.embed_norm,
           "position": cfg.position != "learned", "use_bias": not cfg.use_bias, "gated": cfg.gated,
           "query_scale": cfg.query_scale not in (None, cfg.attention.head_dim ** -0.5),
           "head_dim": cfg.attention.head_dim * cfg.n_heads != D, "tie_embeddings": not cfg.tie_embeddings,
           "embed_scale": cfg.embed_scale not in (None, math.sqrt(D))}
    for option, wrong in bad.items():
        if wrong:
            raise UnsupportedError(f"to_hf({model_type}): EncDecConfig.{option}={getattr(cfg, option)!r} cannot be "
                                   "written (BART: post-LayerNorm eps 1e-5 with biases, embedding norm, learned "
                                   "positions, ungated MLP, tied head)")


def config_to_hf(cfg: EncDecConfig, model_type: str) -> dict:
    return dict(d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
                encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=activation_to_hf(cfg.activation),
                max_position_embeddings=cfg.max_len, scale_embedding=cfg.embed_scale is not None,
                decoder_start_token_id=cfg.decoder_start_id, is_encoder_decoder=True)


def _stack_to_hf(p: dict, cfg: EncDecConfig, decoder: bool) -> dict:
    side = "decoder" if decoder else "encoder"
    n = cfg.n_decoder_layers if decoder else cfg.n_encoder_layers
    table = np.asarray(p["pos"]["pos_PD"])
    out = {f"model.{side}.embed_positions.weight": np.concatenate([np.zeros((_OFFSET, table.shape[1]), table.dtype), table])}
    out.update(parts.norm_to_hf(p["embed_norm"], f"model.{side}.layernorm_embedding"))
    for i in range(n):
        layer = jax.tree.map(lambda a: np.asarray(a[i]), p["blocks"])
        pre = f"model.{side}.layers.{i}."
        out.update(_attn_to_hf(layer["self_attn"], pre + "self_attn."))
        out.update(parts.norm_to_hf(layer["self_attn_norm"], pre + "self_attn_layer_norm"))
        if decoder:
            out.update(_attn_to_hf(layer["cross_attn"], pre + "encoder_attn."))
            out.update(parts.norm_to_hf(layer["cross_attn_norm"], pre + "encoder_attn_layer_norm"))
        out.update(parts.mlp_to_hf(layer["ffn"], pre, cfg.mlp, _MLP_NAMES))
        out.update(parts.norm_to_hf(layer["ffn_norm"], pre + "final_layer_norm"))
    return out


def params_to_hf(cfg: EncDecConfig, params: dict, model_type: str) -> dict:
    table = params["embed"]["table_VD"]
    out = {"model.shared.weight": table, "final_logits_bias": np.zeros((1, cfg.vocab_size), table.dtype)}
    out.update(_stack_to_hf(params["encoder"], cfg, False))
    out.update(_stack_to_hf(params["decoder"], cfg, True))
    return out
