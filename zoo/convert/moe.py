"""Mixtral, Qwen2-MoE, Qwen3-MoE: Llama-style attention blocks whose MLP is a softmax top-k
mixture of SwiGLU experts. The attention side is `zoo.convert.llama`'s (Mixtral as Mistral,
Qwen2-MoE as Qwen2, Qwen3-MoE as Qwen3); this module adds the router and the experts, which
safetensors files store one expert at a time (`experts.N.w1` or `experts.N.gate_proj`), whatever
fused layout transformers uses in memory.

Qwen2-MoE adds one shared expert of width shared_expert_intermediate_size, scaled per token by
sigmoid(shared_expert_gate(x)): layers.moe's shared experts (n_shared_experts * d_ff wide) with
`shared_gate`, so the width must be a multiple of moe_intermediate_size (it is in the released
checkpoints); other widths are refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from layers.mlp import MLPConfig
from layers.moe import MoEConfig
from zoo.config import ModelConfig
from zoo.convert import llama, parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, block_at, from_linear, minimal_pattern,
                                stack_layers, to_linear, unstack_layers, unsupported)

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
_ATTENTION_TWIN = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
# On-disk names of an expert's gate / up / down projections and of the MoE module.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                 "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
_MOE_MODULE = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}


def _is_sparse(hf: dict, i: int) -> bool:
    if hf["model_type"] == "mixtral":
        return True
    step = hf.get("decoder_sparse_step", 1) or 1
    return i not in (hf.get("mlp_only_layers") or []) and _n_experts(hf) > 0 and (i + 1) % step == 0


def _n_experts(hf: dict) -> int:
    # transformers 5 names it num_local_experts everywhere; older Qwen files say num_experts
    return hf.get("num_local_experts", hf.get("num_experts", 0))


def _qwen2_moe_layer_types(hf: dict) -> list[str]:
    """Qwen2-MoE's default when config.json has no layer_types (older files): windows on every
    other layer below max_window_layers, the even-indexed ones, unlike Qwen2's rule (llama.layer_windows)."""
    use, top = hf.get("use_sliding_window", False), hf.get("max_window_layers", 28)
    return ["sliding_attention" if use and (i + 1) % 2 and i < top else "full_attention"
            for i in range(hf["num_hidden_layers"])]


def _qwen2_moe_shared(hf: dict, d_ff: int) -> int:
    """n_shared_experts that gives shared_expert_intermediate_size, refusing widths that are no
    multiple of the routed experts' (layers.moe makes the shared MLP n_shared_experts * d_ff wide)."""
    width = hf.get("shared_expert_intermediate_size", 5632)  # Qwen2MoeConfig's default
    if not isinstance(width, int) or width <= 0 or width % d_ff:
        unsupported("qwen2_moe", "shared_expert_intermediate_size", width,
                    f"the zoo's shared experts are a positive multiple of moe_intermediate_size={d_ff} wide")
    return width // d_ff


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    shared = {}
    if mt == "qwen2_moe":
        if hf.get("qkv_bias", True) is not True:
            unsupported(mt, "qkv_bias", hf["qkv_bias"], "the Qwen2 attention converter expects q/k/v biases")
        if hf.get("layer_types") is None:
            hf = {**hf, "layer_types": _qwen2_moe_layer_types(hf)}
        shared = dict(n_shared_experts=_qwen2_moe_shared(hf, hf["moe_intermediate_size"]), shared_gate=True)
    twin = llama.config_from_hf({**hf, "model_type": _ATTENTION_TWIN[mt]})
    act = activation(mt, "hidden_act", hf.get("hidden_act", "silu"))
    n_experts = _n_experts(hf)
    d_ff = hf["intermediate_size"] if mt == "mixtral" else hf["moe_intermediate_size"]
    moe = MoEConfig(d_model=twin.d_model, d_ff=d_ff, n_experts=n_experts, top_k=hf["num_experts_per_tok"],
                    router="softmax", renormalize=True if mt == "mixtral" else bool(hf.get("norm_topk_prob", False)),
                    activation=act, gated=True, load_balance_weight=float(hf.get("router_aux_loss_coef", 0.0)),
                    **shared)
    layers = [dataclasses.replace(block_at(twin, i), ffn=moe) if _is_sparse(hf, i) else block_at(twin, i)
              for i in range(twin.n_layers)]
    return dataclasses.replace(twin, pattern=minimal_pattern(layers))


def _experts_from_hf(t: Tensors, pre: str, cfg: MoEConfig, names) -> dict:
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    g, u, d = names
    take = lambda e, n, shape: from_linear(t.take(f"{pre}experts.{e}.{n}.weight", shape))
    return {"gate_EDF": np.stack([take(e, g, (F, D)) for e in range(E)]),
            "up_EDF": np.stack([take(e, u, (F, D)) for e in range(E)]),
            "down_EFD": np.stack([take(e, d, (D, F)) for e in range(E)])}


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    mt = hf["model_type"]
    layers = []
    for i in range(cfg.n_layers):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        p = {"mixer_norm": parts.norm_from_hf(t, pre + "input_layernorm", cfg.d_model),
             "mixer": parts.attention_from_hf(t, pre + "self_attn.", b.mixer),
             "ffn_norm": parts.norm_from_hf(t, pre + "post_attention_layernorm", cfg.d_model)}
        if isinstance(b.ffn, MoEConfig):
            moe_pre = f"{pre}{_MOE_MODULE[mt]}."
            p["ffn"] = {"router_DE": from_linear(t.take(moe_pre + "gate.weight", (b.ffn.n_experts, cfg.d_model))),
                        "experts": _experts_from_hf(t, moe_pre, b.ffn, _EXPERT_NAMES[mt])}
            if b.ffn.n_shared_experts:  # Qwen2-MoE: one shared expert and its Linear(D, 1) gate
                p["ffn"]["shared"] = parts.mlp_from_hf(t, moe_pre + "shared_expert.", b.ffn.shared_mlp())
                p["ffn"]["shared_gate_D"] = t.take(moe_pre + "shared_expert_gate.weight", (1, cfg.d_model))[0]
        else:
            p["ffn"] = parts.mlp_from_hf(t, pre + "mlp.", b.ffn)
        layers.append(p)
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "model.embed_tokens.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "model.norm", cfg.d_model)}


def _moe_configs(cfg: ModelConfig) -> list[MoEConfig]:
    return [b.ffn for b in cfg.pattern if isinstance(b.ffn, MoEConfig)]


def _twin(cfg: ModelConfig) -> ModelConfig:
    """The same model with every channel mixer replaced by one expert-sized MLP: what llama's
    attention-side checks and config writer read (the MoE side is this module's)."""
    m = _moe_configs(cfg)[0]
    mlp = MLPConfig(d_model=m.d_model, d_ff=m.d_ff, activation=m.activation, gated=True)
    return dataclasses.replace(cfg, pattern=tuple(dataclasses.replace(b, ffn=mlp) for b in cfg.pattern))


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    moes = _moe_configs(cfg)
    if not moes or len(set(moes)) > 1:
        raise UnsupportedError(f"to_hf({model_type}): needs MoE channel mixers, all alike")
    m = moes[0]
    if (m.router != "softmax" or m.n_groups != 1 or m.routed_scaling != 1.0 or not m.gated
            or m.dispatch != "dropless"):
        raise UnsupportedError(f"to_hf({model_type}): needs softmax top-k routing over gated experts without "
                               f"groups or scaling, dropless; got {m}")
    # Qwen2-MoE always has one sigmoid-gated shared expert; the other two have none.
    if model_type == "qwen2_moe" and not (m.n_shared_experts and m.shared_gate):
        raise UnsupportedError("to_hf(qwen2_moe): needs n_shared_experts > 0 with shared_gate=True, "
                               f"got n_shared_experts={m.n_shared_experts}, shared_gate={m.shared_gate}")
    if model_type != "qwen2_moe" and m.n_shared_experts:
        raise UnsupportedError(f"to_hf({model_type}): n_shared_experts={m.n_shared_experts} cannot be written "
                               "(no shared experts in this architecture; qwen2_moe has gated ones)")
    if model_type == "mixtral" and (not m.renormalize or len(moes) != len(cfg.pattern)):
        raise UnsupportedError("to_hf(mixtral): every layer must be MoE with renormalised top-k weights")
    dense = {b.ffn for b in cfg.pattern if isinstance(b.ffn, MLPConfig)}
    if len(dense) > 1 or any(not d.gated or d.use_bias or d.activation != m.activation for d in dense):
        raise UnsupportedError(f"to_hf({model_type}): dense layers must share one gated MLP without biases")
    llama.check_exportable(_twin(cfg), _ATTENTION_TWIN[model_type])


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    hf = llama.config_to_hf(_twin(cfg), _ATTENTION_TWIN[model_type])
    m = _moe_configs(cfg)[0]
    hf.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.load_balance_weight)
    if model_type == "mixtral":
        hf.update(num_local_experts=m.n_experts, intermediate_size=m.d_ff)
    else:
        dense = [b.ffn for b in cfg.pattern if isinstance(b.ffn, MLPConfig)]
        hf.update(num_local_experts=m.n_experts, moe_intermediate_size=m.d_ff, norm_topk_prob=m.renormalize,
                  decoder_sparse_step=1, intermediate_size=dense[0].d_ff if dense else m.d_ff,
                  mlp_only_layers=[i for i in range(cfg.n_layers) if not isinstance(block_at(cfg, i).ffn, MoEConfig)])
    if model_type == "qwen2_moe":
        # Qwen2MoeConfig has no num_local_experts alias (Qwen3MoeConfig maps it to num_experts).
        del hf["num_local_experts"]
        hf.update(num_experts=m.n_experts, shared_expert_intermediate_size=m.n_shared_experts * m.d_ff,
                  qkv_bias=True)
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    out = parts.embedding_to_hf(params["embed"], "model.embed_tokens.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "model.norm"))
    gate, up, down = _EXPERT_NAMES[model_type]
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "input_layernorm"))
        out.update(parts.attention_to_hf(p["mixer"], pre + "self_attn.", b.mixer))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "post_attention_layernorm"))
        if isinstance(b.ffn, MoEConfig):
            moe_pre, ex = f"{pre}{_MOE_MODULE[model_type]}.", p["ffn"]["experts"]
            out[moe_pre + "gate.weight"] = to_linear(p["ffn"]["router_DE"])
            for e in range(b.ffn.n_experts):
                out[f"{moe_pre}experts.{e}.{gate}.weight"] = to_linear(ex["gate_EDF"][e])
                out[f"{moe_pre}experts.{e}.{up}.weight"] = to_linear(ex["up_EDF"][e])
                out[f"{moe_pre}experts.{e}.{down}.weight"] = to_linear(ex["down_EFD"][e])
            if "shared" in p["ffn"]:
                out.update(parts.mlp_to_hf(p["ffn"]["shared"], moe_pre + "shared_expert.", b.ffn.shared_mlp()))
                out[moe_pre + "shared_expert_gate.weight"] = np.asarray(p["ffn"]["shared_gate_D"])[None, :]
        else:
            out.update(parts.mlp_to_hf(p["ffn"], pre + "mlp.", b.ffn))
    return out
