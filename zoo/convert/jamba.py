"""Jamba: a hybrid of attention and Mamba blocks, with a mixture of experts on some blocks.

Layer i is attention when i % attn_layer_period == attn_layer_offset, otherwise Mamba; its
channel mixer is a softmax top-k MoE when num_experts > 1 and i % expert_layer_period ==
expert_layer_offset, otherwise a SwiGLU MLP. Both kinds of block are pre-RMSNorm
(input_layernorm, pre_ff_layernorm). The attention has no positional encoding (the Mamba
blocks carry order). Two details differ from Mixtral and Mamba and are kept exactly:
the router does not renormalise its top-k weights, and the Mamba mixer RMS-normalises dt, B
and C (layers.mamba's `inner_norm_eps`, which Jamba sets to rms_norm_eps).

The layer scan repeats the shortest run of layers whose repetition gives the model
(`minimal_pattern`): lcm(attn_layer_period, expert_layer_period) layers for a published Jamba.
"""

from __future__ import annotations

import math

import numpy as np

from layers.attention import AttentionConfig
from layers.mamba import MambaConfig
from layers.mlp import MLPConfig
from layers.moe import MoEConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, block_at, from_linear,
                                minimal_pattern, stack_layers, to_linear, unstack_layers, unsupported)
from zoo.convert.mamba import _mamba_from_hf, _mamba_to_hf

ARCHITECTURES = {"jamba": "JambaForCausalLM"}
_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_INNER_NORMS = (("dt_norm_R", "dt_layernorm"), ("B_norm_N", "b_layernorm"), ("C_norm_N", "c_layernorm"))


def _layer_kinds(hf: dict) -> list[tuple[bool, bool]]:
    """(is attention, is MoE) per layer, as JambaConfig.layers_block_type / layers_num_experts."""
    n = hf["num_hidden_layers"]
    ap, ao = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    ep, eo = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    n_experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    return [(i % ap == ao, n_experts > 1 and i % ep == eo) for i in range(n)]


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    G = hf.get("num_key_value_heads") or H
    eps = float(hf.get("rms_norm_eps", 1e-6))
    act = activation(mt, "hidden_act", hf.get("hidden_act", "silu"))
    if act != "silu":  # the Mamba mixer's conv and gate use hidden_act too; layers.mamba has silu
        unsupported(mt, "hidden_act", hf["hidden_act"], "Jamba's Mamba layers use it; layers.mamba has silu")
    E = hf.get("mamba_expand", 2) * D
    rank = hf.get("mamba_dt_rank", "auto")
    mamba = MambaConfig(d_model=D, d_state=hf.get("mamba_d_state", 16), d_conv=hf.get("mamba_d_conv", 4),
                        expand=E // D, dt_rank=math.ceil(D / 16) if rank == "auto" else int(rank),
                        conv_bias=bool(hf.get("mamba_conv_bias", True)),
                        proj_bias=bool(hf.get("mamba_proj_bias", False)), inner_norm_eps=eps)
    attn = AttentionConfig(d_model=D, n_heads=H, n_kv_heads=G, head_dim=D // H, rope=None)
    F = hf["intermediate_size"]
    mlp = MLPConfig(d_model=D, d_ff=F, activation=act, gated=True)
    n_experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    moe = None
    if n_experts > 1:
        moe = MoEConfig(d_model=D, d_ff=F, n_experts=n_experts, top_k=hf.get("num_experts_per_tok", 2),
                        router="softmax", renormalize=False, activation=act, gated=True,
                        load_balance_weight=float(hf.get("router_aux_loss_coef", 0.001)))
    norm = NormConfig(kind="rms", eps=eps)
    layers = [BlockConfig(mixer=attn if is_attn else mamba, ffn=moe if is_moe else mlp, norm=norm)
              for is_attn, is_moe in _layer_kinds(hf)]
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       pattern=minimal_pattern(layers), max_len=hf.get("max_position_embeddings", 262144),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), final_norm=norm)


def _router_name(t: Tensors, pre: str) -> str:
    # transformers 5 names the router `router`; files written by transformers 4 call it `gate`.
    return pre + ("gate.weight" if t.has(pre + "gate.weight") else "router.weight")


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    layers = []
    for i in range(cfg.n_layers):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        p = {"mixer_norm": parts.norm_from_hf(t, pre + "input_layernorm", cfg.d_model),
             "ffn_norm": parts.norm_from_hf(t, pre + "pre_ff_layernorm", cfg.d_model)}
        if isinstance(b.mixer, AttentionConfig):
            p["mixer"] = parts.attention_from_hf(t, pre + "self_attn.", b.mixer)
        else:
            m = b.mixer
            p["mixer"] = _mamba_from_hf(t, pre + "mamba.", m)
            for ours, theirs in _INNER_NORMS:
                dim = m.dt_rank if ours.startswith("dt") else m.d_state
                p["mixer"][ours] = t.take(f"{pre}mamba.{theirs}.weight", (dim,))
        ff = pre + "feed_forward."
        if isinstance(b.ffn, MoEConfig):
            D, F, E = cfg.d_model, b.ffn.d_ff, b.ffn.n_experts
            take = lambda e, n, shape: from_linear(t.take(f"{ff}experts.{e}.{n}.weight", shape))
            g, u, d = _EXPERT_NAMES
            p["ffn"] = {"router_DE": from_linear(t.take(_router_name(t, ff), (E, D))),
                        "experts": {"gate_EDF": np.stack([take(e, g, (F, D)) for e in range(E)]),
                                    "up_EDF": np.stack([take(e, u, (F, D)) for e in range(E)]),
                                    "down_EFD": np.stack([take(e, d, (D, F)) for e in range(E)])}}
        else:
            p["ffn"] = parts.mlp_from_hf(t, ff, b.ffn)
        layers.append(p)
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "model.embed_tokens.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "model.final_layernorm", cfg.d_model)}


# ----------------------------------------------------------------------------- export


def _period(flags: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset) for every layer, or None."""
    n = len(flags)
    if not any(flags):
        return n + 1, n  # offset < period and no layer index reaches it
    for period in range(1, n + 1):
        offset = flags.index(True)
        if offset < period and all(f == (i % period == offset) for i, f in enumerate(flags)):
            return period, offset
    return None


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    def no(option, value, why=""):
        raise UnsupportedError(f"to_hf({model_type}): {option}={value!r} cannot be written" + (f" ({why})" if why else ""))

    if cfg.prefix:
        no("ModelConfig.prefix", len(cfg.prefix), "Jamba's layout is periodic")
    if cfg.position != "none" or cfg.embed_scale is not None or cfg.final_logit_softcap is not None:
        no("ModelConfig.position/embed_scale/final_logit_softcap", (cfg.position, cfg.embed_scale, cfg.final_logit_softcap))
    if cfg.final_norm.kind != "rms" or cfg.final_norm.scale_offset:
        no("final_norm", cfg.final_norm)
    kinds: dict[type, set] = {AttentionConfig: set(), MambaConfig: set(), MoEConfig: set(), MLPConfig: set()}
    for b in cfg.pattern:
        for part in (b.mixer, b.ffn):
            if type(part) not in kinds:
                no("block part", type(part).__name__, "Jamba has attention or Mamba mixers and MLP or MoE channel mixers")
            kinds[type(part)].add(part)
        if b.norm != cfg.final_norm or b.norm_position != "pre" or b.parallel:
            no("BlockConfig norm", (b.norm, b.norm_position, b.parallel), "pre-RMSNorm with the final norm's eps")
    if not kinds[MambaConfig] and not kinds[AttentionConfig]:
        no("pattern", "no mixers")
    for kind, found in kinds.items():
        if len(found) > 1:
            no(kind.__name__, "several", "every layer of one kind must be alike")
    eps = cfg.final_norm.eps
    for m in kinds[AttentionConfig]:
        if (m.rope is not None or m.alibi or not m.causal or m.sliding_window is not None or m.logit_softcap is not None
                or m.qk_norm or m.use_bias or m.out_bias or m.attention_sinks or m.head_dim * m.n_heads != cfg.d_model
                or (m.query_scale is not None and m.query_scale != m.head_dim ** -0.5)):
            no("AttentionConfig", m, "Jamba's attention: causal, no rope/window/softcap/qk-norm/bias, head_dim = D / H")
    for m in kinds[MambaConfig]:
        if m.inner_norm_eps != eps:
            no("MambaConfig.inner_norm_eps", m.inner_norm_eps, f"Jamba normalises dt, B, C with rms_norm_eps={eps}")
    for f in kinds[MoEConfig]:
        if (f.router != "softmax" or f.renormalize or f.n_groups != 1 or f.n_shared_experts or f.routed_scaling != 1.0
                or not f.gated or f.activation != "silu" or f.n_experts < 2):
            no("MoEConfig", f, "Jamba routes softmax top-k without renormalising, over gated silu experts")
    for f in kinds[MLPConfig]:
        if not f.gated or f.use_bias or f.activation != "silu":
            no("MLPConfig", f, "Jamba's MLP is SwiGLU without biases")
    widths = {f.d_ff for f in kinds[MoEConfig] | kinds[MLPConfig]}
    if len(widths) > 1:
        no("d_ff", widths, "one intermediate_size for experts and MLPs")
    layers = [block_at(cfg, i) for i in range(cfg.n_layers)]
    if _period([isinstance(b.mixer, AttentionConfig) for b in layers]) is None:
        no("pattern", "attention layers", "not of the form i % attn_layer_period == attn_layer_offset")
    if _period([isinstance(b.ffn, MoEConfig) for b in layers]) is None:
        no("pattern", "MoE layers", "not of the form i % expert_layer_period == expert_layer_offset")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    layers = [block_at(cfg, i) for i in range(cfg.n_layers)]
    ap, ao = _period([isinstance(b.mixer, AttentionConfig) for b in layers])
    ep, eo = _period([isinstance(b.ffn, MoEConfig) for b in layers])
    attn = next((b.mixer for b in layers if isinstance(b.mixer, AttentionConfig)), None)
    mamba = next((b.mixer for b in layers if isinstance(b.mixer, MambaConfig)), None)
    moe = next((b.ffn for b in layers if isinstance(b.ffn, MoEConfig)), None)
    ffn = moe or layers[0].ffn
    hf = dict(hidden_size=cfg.d_model, intermediate_size=ffn.d_ff, num_hidden_layers=cfg.n_layers,
              hidden_act=activation_to_hf(ffn.activation), rms_norm_eps=cfg.final_norm.eps,
              max_position_embeddings=cfg.max_len, attn_layer_period=ap, attn_layer_offset=ao,
              expert_layer_period=ep, expert_layer_offset=eo, num_experts=moe.n_experts if moe else 1,
              num_experts_per_tok=moe.top_k if moe else 1,
              router_aux_loss_coef=moe.load_balance_weight if moe else 0.001)
    heads = attn or AttentionConfig(d_model=cfg.d_model, n_heads=1)
    hf.update(num_attention_heads=heads.n_heads, num_key_value_heads=heads.n_kv_heads)
    if mamba is not None:
        hf.update(mamba_d_state=mamba.d_state, mamba_d_conv=mamba.d_conv, mamba_expand=mamba.expand,
                  mamba_dt_rank=mamba.dt_rank, mamba_conv_bias=mamba.conv_bias, mamba_proj_bias=mamba.proj_bias)
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    out = parts.embedding_to_hf(params["embed"], "model.embed_tokens.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "model.final_layernorm"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "input_layernorm"))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "pre_ff_layernorm"))
        if isinstance(b.mixer, AttentionConfig):
            out.update(parts.attention_to_hf(p["mixer"], pre + "self_attn.", b.mixer))
        else:
            out.update(_mamba_to_hf(p["mixer"], pre + "mamba.", b.mixer))
            for ours, theirs in _INNER_NORMS:
                out[f"{pre}mamba.{theirs}.weight"] = p["mixer"][ours]
        ff = pre + "feed_forward."
        if isinstance(b.ffn, MoEConfig):
            ex = p["ffn"]["experts"]
            out[ff + "router.weight"] = to_linear(p["ffn"]["router_DE"])
            for e in range(b.ffn.n_experts):
                for name, key in zip(_EXPERT_NAMES, ("gate_EDF", "up_EDF", "down_EFD")):
                    out[f"{ff}experts.{e}.{name}.weight"] = to_linear(ex[key][e])
        else:
            out.update(parts.mlp_to_hf(p["ffn"], ff, b.ffn))
    return out
