"""T5 (v1.0: ReLU MLP, tied head with d_model ** -0.5 logit scaling) and T5 v1.1 (gated-GELU,
separate head, no scaling) -> zoo.encdec.EncDecConfig.

Layout: `shared` embedding; per stack `block.i.layer.0` self-attention (+ `layer.1` cross-attention
in the decoder) and the MLP in the last layer, each behind its own RMSNorm (`layer_norm`);
`final_layer_norm` per stack. Attention has no biases and no 1/sqrt(d) (query_scale 1.0); the
relative position table lives in block 0 of each stack and serves every layer (zoo.encdec
computes the bias once per stack for the same reason).

transformers 5 always ties lm_head to `shared` unless the file stores its own lm_head, and keeps
logit scaling as `scale_decoder_outputs` (older files: implied by tie_word_embeddings). The zoo
scales only tied logits, so an untied head with scaling is refused.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from layers.norms import NormConfig
from zoo.convert import parts
from zoo.convert.common import Tensors, UnsupportedError, activation, activation_to_hf, from_linear, to_linear, unsupported
from zoo.encdec import EncDecConfig

ARCHITECTURES = {"t5": "T5ForConditionalGeneration"}


def _mlp_kind(hf: dict) -> tuple[str, bool]:
    proj = hf.get("feed_forward_proj", "relu")
    pieces = proj.split("-")
    gated = pieces[0] == "gated"
    if len(pieces) > 2 or (len(pieces) == 2 and not gated):
        unsupported("t5", "feed_forward_proj", proj, "expected ACT or gated-ACT")
    # transformers maps gated-gelu to gelu_new (tanh approximation) for T5 v1.1.
    name = "gelu_new" if proj == "gated-gelu" else pieces[-1]
    return activation("t5", "feed_forward_proj", name), gated


def config_from_hf(hf: dict, *, untied: bool = False) -> EncDecConfig:
    mt = hf["model_type"]
    act, gated = _mlp_kind(hf)
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    if untied and scale:
        unsupported(mt, "scale_decoder_outputs", True, "with a separate lm_head; the zoo scales tied logits only")
    n_enc = hf["num_layers"]
    return EncDecConfig(vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_heads=hf["num_heads"],
                        head_dim=hf["d_kv"], d_ff=hf["d_ff"], n_encoder_layers=n_enc,
                        n_decoder_layers=hf.get("num_decoder_layers") or n_enc, activation=act, gated=gated,
                        norm=NormConfig(kind="rms", eps=float(hf.get("layer_norm_epsilon", 1e-6))),
                        norm_position="pre", final_norm=True, position="relative",
                        n_buckets=hf.get("relative_attention_num_buckets", 32),
                        max_distance=hf.get("relative_attention_max_distance", 128),
                        max_len=hf.get("n_positions", 512), query_scale=1.0, use_bias=False,
                        tie_embeddings=not untied, scale_tied_logits=bool(scale),
                        decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0)


def config_options(names: set[str]) -> dict:
    # The head is separate only when the file stores it (and it is not a copy: see params_from_hf).
    return {"untied": "lm_head.weight" in names}


_ATTN = ("q", "k", "v", "o")


def _attn_from_hf(t: Tensors, pre: str, cfg: EncDecConfig) -> dict:
    D, H, K = cfg.d_model, cfg.n_heads, cfg.attention.head_dim
    q, k, v, o = (t.take(f"{pre}{n}.weight", (D, H * K) if n == "o" else (H * K, D)) for n in _ATTN)
    return {"wq_DHK": from_linear(q, H, K), "wk_DHK": from_linear(k, H, K), "wv_DHK": from_linear(v, H, K),
            "wo_HKD": np.ascontiguousarray(o.T).reshape(H, K, D)}


def _attn_to_hf(p: dict, pre: str) -> dict:
    H, K, D = p["wo_HKD"].shape
    return {f"{pre}q.weight": to_linear(p["wq_DHK"]), f"{pre}k.weight": to_linear(p["wk_DHK"]),
            f"{pre}v.weight": to_linear(p["wv_DHK"]), f"{pre}o.weight": np.ascontiguousarray(p["wo_HKD"].reshape(H * K, D).T)}


def _mlp_names(cfg: EncDecConfig) -> dict:
    return {"gate": "wi_0", "up": "wi_1", "down": "wo"} if cfg.gated else {"up": "wi", "down": "wo"}


def _stack_from_hf(t: Tensors, cfg: EncDecConfig, decoder: bool) -> dict:
    side = "decoder" if decoder else "encoder"
    n = cfg.n_decoder_layers if decoder else cfg.n_encoder_layers
    layers = []
    for i in range(n):
        pre = f"{side}.block.{i}.layer."
        p = {"self_attn": _attn_from_hf(t, pre + "0.SelfAttention.", cfg),
             "self_attn_norm": parts.norm_from_hf(t, pre + "0.layer_norm", cfg.d_model)}
        if decoder:
            p["cross_attn"] = _attn_from_hf(t, pre + "1.EncDecAttention.", cfg)
            p["cross_attn_norm"] = parts.norm_from_hf(t, pre + "1.layer_norm", cfg.d_model)
        f = 2 if decoder else 1
        p["ffn"] = parts.mlp_from_hf(t, f"{pre}{f}.DenseReluDense.", cfg.mlp, _mlp_names(cfg))
        p["ffn_norm"] = parts.norm_from_hf(t, f"{pre}{f}.layer_norm", cfg.d_model)
        layers.append(p)
    table = t.take(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (cfg.n_buckets, cfg.n_heads))
    return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers), "rel_bias": {"table_NH": table},
            "final_norm": parts.norm_from_hf(t, f"{side}.final_layer_norm", cfg.d_model)}


def params_from_hf(cfg: EncDecConfig, hf: dict, t: Tensors) -> dict:
    table = t.take("shared.weight", (cfg.vocab_size, cfg.d_model))
    for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        t.discard(copy)  # tied to `shared` (some writers store them)
    embed: dict[str, Any] = {"table_VD": table}
    if not cfg.tie_embeddings:
        embed["unembed_DV"] = np.ascontiguousarray(t.take("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T)
    return {"embed": embed, "encoder": _stack_from_hf(t, cfg, False), "decoder": _stack_from_hf(t, cfg, True)}


def check_exportable(cfg: Any, model_type: str) -> None:
    if not isinstance(cfg, EncDecConfig):
        raise UnsupportedError(f"to_hf({model_type}): needs a zoo.encdec.EncDecConfig, got {type(cfg).__name__}")
    bad = {"norm": cfg.norm.kind != "rms" or cfg.norm.scale_offset, "norm_position": cfg.norm_position != "pre",
           "final_norm": not cfg.final_norm, "embed_norm": cfg.embed_norm, "position": cfg.position != "relative",
           "query_scale": cfg.query_scale != 1.0, "use_bias": cfg.use_bias, "embed_scale": cfg.embed_scale is not None}
    for option, wrong in bad.items():
        if wrong:
            raise UnsupportedError(f"to_hf({model_type}): EncDecConfig.{option}={getattr(cfg, option)!r} "
                                   "cannot be written (T5: pre-RMSNorm, final norms, relative buckets, "
                                   "unscaled scores, no biases)")
    if cfg.gated and cfg.activation != "gelu_tanh" and cfg.activation not in ("relu", "silu"):
        raise UnsupportedError(f"to_hf({model_type}): gated activation {cfg.activation!r} (gated-gelu is the "
                               "tanh approximation in transformers)")


def config_to_hf(cfg: EncDecConfig, model_type: str) -> dict:
    if cfg.gated:
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{cfg.activation}"
    else:
        proj = activation_to_hf(cfg.activation)
    return dict(d_model=cfg.d_model, d_kv=cfg.attention.head_dim, d_ff=cfg.d_ff, num_heads=cfg.n_heads,
                num_layers=cfg.n_encoder_layers, num_decoder_layers=cfg.n_decoder_layers, feed_forward_proj=proj,
                layer_norm_epsilon=cfg.norm.eps, relative_attention_num_buckets=cfg.n_buckets,
                relative_attention_max_distance=cfg.max_distance, n_positions=cfg.max_len,
                scale_decoder_outputs=bool(cfg.tie_embeddings and cfg.scale_tied_logits),
                decoder_start_token_id=cfg.decoder_start_id, pad_token_id=cfg.decoder_start_id,
                is_encoder_decoder=True)


def _stack_to_hf(p: dict, cfg: EncDecConfig, decoder: bool) -> dict:
    side = "decoder" if decoder else "encoder"
    n = cfg.n_decoder_layers if decoder else cfg.n_encoder_layers
    out = {f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight": p["rel_bias"]["table_NH"]}
    out.update(parts.norm_to_hf(p["final_norm"], f"{side}.final_layer_norm"))
    for i in range(n):
        layer = jax.tree.map(lambda a: np.asarray(a[i]), p["blocks"])
        pre = f"{side}.block.{i}.layer."
        out.update(_attn_to_hf(layer["self_attn"], pre + "0.SelfAttention."))
        out.update(parts.norm_to_hf(layer["self_attn_norm"], pre + "0.layer_norm"))
        if decoder:
            out.update(_attn_to_hf(layer["cross_attn"], pre + "1.EncDecAttention."))
            out.update(parts.norm_to_hf(layer["cross_attn_norm"], pre + "1.layer_norm"))
        f = 2 if decoder else 1
        out.update(parts.mlp_to_hf(layer["ffn"], f"{pre}{f}.DenseReluDense.", cfg.mlp, _mlp_names(cfg)))
        out.update(parts.norm_to_hf(layer["ffn_norm"], f"{pre}{f}.layer_norm"))
    return out


def params_to_hf(cfg: EncDecConfig, params: dict, model_type: str) -> dict:
    out = {"shared.weight": params["embed"]["table_VD"]}
    if "unembed_DV" in params["embed"]:
        out["lm_head.weight"] = np.ascontiguousarray(params["embed"]["unembed_DV"].T)
    out.update(_stack_to_hf(params["encoder"], cfg, False))
    out.update(_stack_to_hf(params["decoder"], cfg, True))
    return out
