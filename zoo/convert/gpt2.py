"""GPT-2: learned absolute positions, LayerNorm, biased attention and GELU (tanh) MLP, tied
embeddings. Its projections are `Conv1D` modules, stored [in, out] (not nn.Linear's
[out, in]), and q, k, v share one fused `c_attn` matrix [D, 3D]."""

from __future__ import annotations

import numpy as np

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, stack_layers,
                                unstack_layers, unsupported)

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("scale_attn_by_inverse_layer_idx"):
        unsupported(mt, "scale_attn_by_inverse_layer_idx", True, "the zoo's attention scale is per layer config, "
                    "not per layer index")
    if hf.get("add_cross_attention"):
        unsupported(mt, "add_cross_attention", True)
    D, H = hf["n_embd"], hf["n_head"]
    norm = NormConfig(kind="layer", eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    mixer = AttentionConfig(d_model=D, n_heads=H, n_kv_heads=H, rope=None, use_bias=True, out_bias=True,
                            query_scale=None if hf.get("scale_attn_weights", True) else 1.0)
    ffn = MLPConfig(d_model=D, d_ff=hf.get("n_inner") or 4 * D, gated=False, use_bias=True,
                    activation=activation(mt, "activation_function", hf.get("activation_function", "gelu_new")))
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["n_layer"],
                       pattern=(BlockConfig(mixer=mixer, ffn=ffn, norm=norm),), max_len=hf["n_positions"],
                       position="learned", tie_embeddings=bool(hf.get("tie_word_embeddings", True)), final_norm=norm)


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    D, b = cfg.d_model, cfg.pattern[0]
    H, K, F = b.mixer.n_heads, b.mixer.head_dim, b.ffn.d_ff
    layers = []
    for i in range(cfg.n_layers):
        pre = f"transformer.h.{i}."
        w_D3D = t.take(pre + "attn.c_attn.weight", (D, 3 * D))
        b_3D = t.take(pre + "attn.c_attn.bias", (3 * D,))
        wq, wk, wv = (w_D3D[:, j * D:(j + 1) * D].reshape(D, H, K) for j in range(3))
        bq, bk, bv = (b_3D[j * D:(j + 1) * D].reshape(H, K) for j in range(3))
        layers.append({
            "mixer_norm": parts.norm_from_hf(t, pre + "ln_1", D, bias=True),
            "mixer": {"wq_DHK": wq, "wk_DGK": wk, "wv_DGK": wv, "bq_HK": bq, "bk_GK": bk, "bv_GK": bv,
                      "wo_HKD": t.take(pre + "attn.c_proj.weight", (D, D)).reshape(H, K, D),
                      "bo_D": t.take(pre + "attn.c_proj.bias", (D,))},
            "ffn_norm": parts.norm_from_hf(t, pre + "ln_2", D, bias=True),
            "ffn": {"up": {"w": t.take(pre + "mlp.c_fc.weight", (D, F)), "b": t.take(pre + "mlp.c_fc.bias", (F,))},
                    "down": {"w": t.take(pre + "mlp.c_proj.weight", (F, D)),
                             "b": t.take(pre + "mlp.c_proj.bias", (D,))}},
        })
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, D, cfg.tie_embeddings, "transformer.wte.weight"),
            "pos": {"pos_PD": t.take("transformer.wpe.weight", (cfg.max_len, D))},
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "transformer.ln_f", D, bias=True)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    b = cfg.pattern[0]
    m, f = b.mixer, b.ffn
    ok = (len(cfg.pattern) == 1 and cfg.position == "learned" and cfg.final_logit_softcap is None
          and cfg.embed_scale is None and isinstance(m, AttentionConfig) and isinstance(f, MLPConfig)
          and cfg.final_norm.kind == "layer" and cfg.final_norm.use_bias and b.norm == cfg.final_norm
          and b.norm_position == "pre" and not b.parallel and m.rope is None and not m.alibi and m.causal
          and m.n_kv_heads == m.n_heads and m.head_dim * m.n_heads == cfg.d_model and m.use_bias and m.out_bias
          and m.sliding_window is None and m.logit_softcap is None and not m.qk_norm
          and m.query_scale in (None, 1.0, m.head_dim ** -0.5) and not f.gated and f.use_bias)
    if not ok:
        raise UnsupportedError(f"to_hf({model_type}): only GPT-2 blocks (learned positions, LayerNorm, biased MHA "
                               "without rope, window or softcap, biased plain MLP) can be written")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    m, f = cfg.pattern[0].mixer, cfg.pattern[0].ffn
    return dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=m.n_heads, n_inner=f.d_ff,
                n_positions=cfg.max_len, layer_norm_epsilon=cfg.final_norm.eps,
                activation_function="gelu_new" if f.activation == "gelu_tanh" else activation_to_hf(f.activation),
                scale_attn_weights=m.query_scale != 1.0, bos_token_id=None, eos_token_id=None)


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    D = cfg.d_model
    out = parts.embedding_to_hf(params["embed"], "transformer.wte.weight")
    out["transformer.wpe.weight"] = params["pos"]["pos_PD"]
    out.update(parts.norm_to_hf(params["final_norm"], "transformer.ln_f"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        pre, a, f = f"transformer.h.{i}.", p["mixer"], p["ffn"]
        out[pre + "attn.c_attn.weight"] = np.concatenate([a[k].reshape(D, -1) for k in ("wq_DHK", "wk_DGK", "wv_DGK")], 1)
        out[pre + "attn.c_attn.bias"] = np.concatenate([a[k].reshape(-1) for k in ("bq_HK", "bk_GK", "bv_GK")])
        out[pre + "attn.c_proj.weight"] = a["wo_HKD"].reshape(-1, D)
        out[pre + "attn.c_proj.bias"] = a["bo_D"]
        out[pre + "mlp.c_fc.weight"], out[pre + "mlp.c_fc.bias"] = f["up"]["w"], f["up"]["b"]
        out[pre + "mlp.c_proj.weight"], out[pre + "mlp.c_proj.bias"] = f["down"]["w"], f["down"]["b"]
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "ln_1"))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "ln_2"))
    return out
