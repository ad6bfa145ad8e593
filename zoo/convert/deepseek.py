"""DeepSeek-V2 and V3: multi-head latent attention (layers.mla) with a mixture of experts after
the first `first_k_dense_replace` dense layers.

Routing: V3 scores experts with a sigmoid, selects with the correction bias
(`e_score_correction_bias` -> router_bias_E) inside the best `topk_group` of `n_group` groups
(each group scored by its two best biased scores), weights with the unbiased scores,
optionally renormalised, times routed_scaling_factor. V2 takes a softmax top-k times
routed_scaling_factor (transformers never renormalises it); with
topk_method="group_limited_greedy" the experts are picked inside the best `topk_group` groups,
each group scored by its best expert (MoEConfig.group_score="max").

RoPE applies to the rope part only; V2 always rotates adjacent pairs (complex multiply), V3
when rope_interleave (the default). With a scaled rope and mscale_all_dim, the softmax scale
is multiplied by yarn_mscale(factor, mscale_all_dim) ** 2, as transformers does.
"""

from __future__ import annotations

import math

import numpy as np

from layers.mla import MLAConfig, yarn_mscale
from layers.mlp import MLPConfig
from layers.moe import MoEConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, block_at, from_linear,
                                minimal_pattern, rope_from_hf, rope_parameters, rope_to_hf, stack_layers, to_linear,
                                unstack_layers, unsupported)

ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
LATENT_NORM_EPS = 1e-6  # transformers' q_a / kv_a layernorms use their default eps


def _mla(hf: dict) -> MLAConfig:
    mt = hf["model_type"]
    if hf.get("attention_bias"):
        unsupported(mt, "attention_bias", True, "layers.mla has no projection biases")
    interleaved = mt == "deepseek_v2" or hf.get("rope_interleave", True)
    rp = rope_parameters(hf)
    rope = rope_from_hf(mt, rp, hf.get("max_position_embeddings", 4096), "interleaved" if interleaved else "half")
    K = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    scale = K ** -0.5
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rp["factor"]), float(rp["mscale_all_dim"])) ** 2
    return MLAConfig(d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"], kv_lora_rank=hf["kv_lora_rank"],
                     q_lora_rank=hf.get("q_lora_rank"), qk_nope_head_dim=hf["qk_nope_head_dim"],
                     qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], rope=rope,
                     softmax_scale=scale, norm_eps=LATENT_NORM_EPS)


def _moe(hf: dict, act: str) -> MoEConfig:
    mt = hf["model_type"]
    E = hf.get("n_routed_experts") or hf.get("num_local_experts") or hf.get("num_experts")
    common = dict(d_model=hf["hidden_size"], d_ff=hf["moe_intermediate_size"], n_experts=E,
                  top_k=hf["num_experts_per_tok"], n_shared_experts=hf.get("n_shared_experts") or 0,
                  routed_scaling=float(hf.get("routed_scaling_factor", 1.0)), activation=act, gated=True,
                  load_balance_weight=0.0)
    if mt == "deepseek_v2":
        method = hf.get("topk_method", "greedy")
        if method == "greedy":  # n_group / topk_group are not read
            return MoEConfig(**common, router="softmax", renormalize=False)
        if method != "group_limited_greedy":
            unsupported(mt, "topk_method", method, "expected greedy or group_limited_greedy")
        return MoEConfig(**common, router="softmax", renormalize=False, n_groups=hf.get("n_group") or 1,
                         topk_groups=hf.get("topk_group") or 1, group_score="max")
    return MoEConfig(**common, router="sigmoid", renormalize=bool(hf.get("norm_topk_prob", True)),
                     n_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1)


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("mlp_bias"):
        unsupported(mt, "mlp_bias", True)
    act = activation(mt, "hidden_act", hf.get("hidden_act", "silu"))
    norm = NormConfig(kind="rms", eps=float(hf.get("rms_norm_eps", 1e-6)))
    mla = _mla(hf)
    dense = MLPConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], activation=act, gated=True)
    moe = _moe(hf, act) if (hf.get("n_routed_experts") or hf.get("num_local_experts") or hf.get("num_experts")) else None
    k_dense = hf.get("first_k_dense_replace", 0)
    layers = [BlockConfig(mixer=mla, ffn=dense if moe is None or i < k_dense else moe, norm=norm)
              for i in range(hf["num_hidden_layers"])]
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       pattern=minimal_pattern(layers), max_len=hf.get("max_position_embeddings", 4096),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), final_norm=norm)


def _mla_from_hf(t: Tensors, pre: str, cfg: MLAConfig) -> dict:
    D, H, C, N, R, E = (cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)
    K = N + R
    p = {}
    if cfg.q_lora_rank is None:
        p["wq_DHK"] = from_linear(t.take(pre + "q_proj.weight", (H * K, D)), H, K)
    else:
        Q = cfg.q_lora_rank
        p["wq_a_DQ"] = from_linear(t.take(pre + "q_a_proj.weight", (Q, D)))
        p["q_norm"] = {"scale": t.take(pre + "q_a_layernorm.weight", (Q,))}
        p["wq_b_QHK"] = from_linear(t.take(pre + "q_b_proj.weight", (H * K, Q)), H, K)
    kv_a = t.take(pre + "kv_a_proj_with_mqa.weight", (C + R, D))
    p["wkv_a_DC"], p["wk_pe_DR"] = from_linear(kv_a[:C]), from_linear(kv_a[C:])
    p["kv_norm"] = {"scale": t.take(pre + "kv_a_layernorm.weight", (C,))}
    kv_b_HXC = t.take(pre + "kv_b_proj.weight", (H * (N + E), C)).reshape(H, N + E, C)
    p["wk_b_CHN"] = np.ascontiguousarray(kv_b_HXC[:, :N].transpose(2, 0, 1))
    p["wv_b_CHE"] = np.ascontiguousarray(kv_b_HXC[:, N:].transpose(2, 0, 1))
    p["wo_HED"] = np.ascontiguousarray(t.take(pre + "o_proj.weight", (D, H * E)).T).reshape(H, E, D)
    return p


def _mla_to_hf(p: dict, pre: str, cfg: MLAConfig) -> dict:
    out = {}
    if cfg.q_lora_rank is None:
        out[pre + "q_proj.weight"] = to_linear(p["wq_DHK"])
    else:
        out[pre + "q_a_proj.weight"] = to_linear(p["wq_a_DQ"])
        out[pre + "q_a_layernorm.weight"] = p["q_norm"]["scale"]
        out[pre + "q_b_proj.weight"] = to_linear(p["wq_b_QHK"])
    out[pre + "kv_a_proj_with_mqa.weight"] = np.concatenate([to_linear(p["wkv_a_DC"]), to_linear(p["wk_pe_DR"])])
    out[pre + "kv_a_layernorm.weight"] = p["kv_norm"]["scale"]
    kv_b_HXC = np.concatenate([p["wk_b_CHN"].transpose(1, 2, 0), p["wv_b_CHE"].transpose(1, 2, 0)], axis=1)
    out[pre + "kv_b_proj.weight"] = np.ascontiguousarray(kv_b_HXC.reshape(-1, cfg.kv_lora_rank))
    out[pre + "o_proj.weight"] = np.ascontiguousarray(p["wo_HED"].reshape(-1, cfg.d_model).T)
    return out


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    layers = []
    for i in range(cfg.n_layers):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        p = {"mixer_norm": parts.norm_from_hf(t, pre + "input_layernorm", cfg.d_model),
             "mixer": _mla_from_hf(t, pre + "self_attn.", b.mixer),
             "ffn_norm": parts.norm_from_hf(t, pre + "post_attention_layernorm", cfg.d_model)}
        if isinstance(b.ffn, MoEConfig):
            m, mp = b.ffn, pre + "mlp."
            D, F = m.d_model, m.d_ff
            take = lambda e, n, shape: from_linear(t.take(f"{mp}experts.{e}.{n}.weight", shape))
            p["ffn"] = {"router_DE": from_linear(t.take(mp + "gate.weight", (m.n_experts, D))),
                        "experts": {"gate_EDF": np.stack([take(e, "gate_proj", (F, D)) for e in range(m.n_experts)]),
                                    "up_EDF": np.stack([take(e, "up_proj", (F, D)) for e in range(m.n_experts)]),
                                    "down_EFD": np.stack([take(e, "down_proj", (D, F)) for e in range(m.n_experts)])}}
            if m.router == "sigmoid":
                p["ffn"]["router_bias_E"] = t.take(mp + "gate.e_score_correction_bias", (m.n_experts,))
            if m.n_shared_experts:
                p["ffn"]["shared"] = parts.mlp_from_hf(t, mp + "shared_experts.", m.shared_mlp())
        else:
            p["ffn"] = parts.mlp_from_hf(t, pre + "mlp.", b.ffn)
        layers.append(p)
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "model.embed_tokens.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "model.norm", cfg.d_model)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    def no(what):
        raise UnsupportedError(f"to_hf({model_type}): {what}")

    blocks = [block_at(cfg, i) for i in range(cfg.n_layers)]
    mlas = {b.mixer for b in blocks}
    if len(mlas) != 1 or not isinstance(next(iter(mlas)), MLAConfig):
        no("needs one MLAConfig on every layer")
    mla = next(iter(mlas))
    if not mla.causal or mla.sliding_window is not None or mla.norm_eps != LATENT_NORM_EPS:
        no("MLA must be causal, without window, latent norm eps 1e-6")
    if model_type == "deepseek_v2" and mla.rope.layout != "interleaved":
        no("DeepSeek-V2 rotates interleaved pairs")
    if cfg.position != "none" or cfg.embed_scale or cfg.final_logit_softcap or cfg.final_norm.kind != "rms" \
            or cfg.final_norm.scale_offset:
        no("needs a plain RMSNorm decoder without position table, embed scale or softcap")
    kinds = [isinstance(b.ffn, MoEConfig) for b in blocks]
    k_dense = kinds.index(True) if True in kinds else len(kinds)
    if any(not k for k in kinds[k_dense:]) or any(b.norm != cfg.final_norm or b.norm_position != "pre" for b in blocks):
        no("dense layers must come first, then MoE layers, all pre-norm with the final norm's settings")
    moes = {b.ffn for b in blocks if isinstance(b.ffn, MoEConfig)}
    denses = {b.ffn for b in blocks if isinstance(b.ffn, MLPConfig)}
    if len(moes) > 1 or len(denses) > 1 or any(not d.gated or d.use_bias for d in denses):
        no("one MoE config and one gated bias-free MLP config")
    for m in moes:
        if not m.gated or m.dispatch != "dropless" or m.shared_gate:
            no("experts must be gated and dropless, shared experts ungated (shared_gate is Qwen2-MoE's)")
        if model_type == "deepseek_v3" and (m.router != "sigmoid" or (m.n_groups > 1 and m.group_score != "top2_sum")):
            no(f"DeepSeek-V3 routes with a sigmoid and ranks groups by their top-2 sum, got router={m.router!r}, "
               f"group_score={m.group_score!r}")
        if model_type == "deepseek_v2" and (m.router != "softmax" or m.renormalize or
                                            (m.n_groups > 1 and m.group_score != "max")):
            no("DeepSeek-V2 takes a softmax top-k without renormalisation, groups (if any) ranked by their "
               f"best expert; got router={m.router!r}, renormalize={m.renormalize}, group_score={m.group_score!r}")
    if not moes:
        no("needs MoE layers")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    blocks = [block_at(cfg, i) for i in range(cfg.n_layers)]
    mla = blocks[0].mixer
    moe = next(b.ffn for b in blocks if isinstance(b.ffn, MoEConfig))
    dense = next((b.ffn for b in blocks if isinstance(b.ffn, MLPConfig)), None)
    rope = rope_to_hf(mla.rope, cfg.max_len)
    default = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if abs(mla.scale - default) > 1e-9 * default:
        # Only yarn's mscale_all_dim changes transformers' softmax scale.
        mscale = math.sqrt(mla.scale / default)
        if mla.rope.scaling is None or mla.rope.factor <= 1 or mscale <= 1:
            raise UnsupportedError(f"to_hf({model_type}): softmax scale {mla.scale} needs rope scaling with "
                                   "mscale_all_dim")
        rope["mscale_all_dim"] = (mscale - 1.0) / (0.1 * math.log(mla.rope.factor))
    hf = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=mla.n_heads,
              num_key_value_heads=mla.n_heads, kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank,
              qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
              v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim, rope_parameters=rope,
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.final_norm.eps,
              hidden_act=activation_to_hf(moe.activation), intermediate_size=(dense or moe).d_ff,
              moe_intermediate_size=moe.d_ff, n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
              n_shared_experts=moe.n_shared_experts, routed_scaling_factor=moe.routed_scaling,
              first_k_dense_replace=sum(isinstance(b.ffn, MLPConfig) for b in blocks), attention_bias=False)
    if model_type == "deepseek_v3":
        hf.update(n_group=moe.n_groups, topk_group=moe.topk_groups, norm_topk_prob=moe.renormalize,
                  rope_interleave=mla.rope.layout == "interleaved")
    else:
        grouped = moe.n_groups > 1
        hf.update(topk_method="group_limited_greedy" if grouped else "greedy", n_group=moe.n_groups,
                  topk_group=moe.topk_groups)
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    out = parts.embedding_to_hf(params["embed"], "model.embed_tokens.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "model.norm"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "input_layernorm"))
        out.update(_mla_to_hf(p["mixer"], pre + "self_attn.", b.mixer))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "post_attention_layernorm"))
        if isinstance(b.ffn, MoEConfig):
            mp, f = pre + "mlp.", p["ffn"]
            out[mp + "gate.weight"] = to_linear(f["router_DE"])
            if "router_bias_E" in f:
                out[mp + "gate.e_score_correction_bias"] = f["router_bias_E"].astype(np.float32)
            for e in range(b.ffn.n_experts):
                for name, key in (("gate_proj", "gate_EDF"), ("up_proj", "up_EDF"), ("down_proj", "down_EFD")):
                    out[f"{mp}experts.{e}.{name}.weight"] = to_linear(f["experts"][key][e])
            if "shared" in f:
                out.update(parts.mlp_to_hf(f["shared"], mp + "shared_experts.", b.ffn.shared_mlp()))
        else:
            out.update(parts.mlp_to_hf(p["ffn"], pre + "mlp.", b.ffn))
    return out
