"""Mamba, FalconMamba and Mamba-2: blocks x + mixer(RMSNorm(x)) without an MLP.

Mamba's in_proj [2E, D] holds x then z; its depthwise conv1d is stored [E, 1, W]. Mamba-2 fuses
z, [x | B | C] and dt into one in_proj [2E + 2GN + H, D] and convolves [x | B | C] with one
conv1d; the zoo keeps those parts as separate tensors (layers.mamba2 explains why), so they are
split here and concatenated back on export. FalconMamba RMS-normalises dt, B and C inside the
mixer without weights (mixer_rms_eps): layers.mamba's inner norms (`inner_norm_eps`) with their
scales fixed at 1; export checks that they still are.
"""

from __future__ import annotations

import math

import numpy as np

from layers.mamba import MambaConfig
from layers.mamba2 import Mamba2Config
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, from_linear, stack_layers, to_linear, unstack_layers,
                                unsupported)

ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "falcon_mamba": "FalconMambaForCausalLM"}


def _expand(hf: dict) -> int:
    D, E = hf["hidden_size"], hf.get("intermediate_size") or hf.get("expand", 2) * hf["hidden_size"]
    if E % D:
        unsupported(hf["model_type"], "intermediate_size", E, f"layers.mamba needs a multiple of hidden_size={D}")
    return E // D


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        unsupported(mt, "hidden_act", hf["hidden_act"], "layers.mamba uses silu")
    D = hf["hidden_size"]
    if mt == "mamba":
        rank = hf.get("time_step_rank", "auto")
        mixer = MambaConfig(d_model=D, d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=_expand(hf),
                            dt_rank=math.ceil(D / 16) if rank == "auto" else rank,
                            conv_bias=bool(hf.get("use_conv_bias", True)), proj_bias=bool(hf.get("use_bias", False)))
    elif mt == "falcon_mamba":
        rank = hf.get("time_step_rank", "auto")
        mixer = MambaConfig(d_model=D, d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=_expand(hf),
                            dt_rank=math.ceil(D / 16) if rank == "auto" else rank,
                            conv_bias=bool(hf.get("use_conv_bias", True)), proj_bias=bool(hf.get("use_bias", False)),
                            inner_norm_eps=float(hf.get("mixer_rms_eps", 1e-6)))
    else:
        if hf.get("use_bias"):
            unsupported(mt, "use_bias", True, "layers.mamba2 has no in/out projection biases")
        limit = tuple(hf.get("time_step_limit", (0.0, float("inf"))))
        if limit != (0.0, float("inf")):
            unsupported(mt, "time_step_limit", list(limit), "layers.mamba2 does not clamp dt")
        expand = hf.get("expand", 2)
        if hf["num_heads"] * hf["head_dim"] != expand * D:
            unsupported(mt, "num_heads", hf["num_heads"], f"num_heads * head_dim must equal expand * hidden_size")
        mixer = Mamba2Config(d_model=D, d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=expand,
                             head_dim=hf["head_dim"], n_groups=hf.get("n_groups", 1),
                             norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                             conv_bias=bool(hf.get("use_conv_bias", True)))
    norm = NormConfig(kind="rms", eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       pattern=(BlockConfig(mixer=mixer, ffn=None, norm=norm),),
                       max_len=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)), final_norm=norm)


def _conv_from_hf(t: Tensors, pre: str, channels: int, width: int, bias: bool) -> dict:
    p = {"w_WC": np.ascontiguousarray(t.take(pre + "conv1d.weight", (channels, 1, width))[:, 0, :].T)}
    if bias:
        p["b_C"] = t.take(pre + "conv1d.bias", (channels,))
    return p


def _mamba_from_hf(t: Tensors, pre: str, c: MambaConfig) -> dict:
    D, E, N, R, W = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv
    p = {"win_D2E": from_linear(t.take(pre + "in_proj.weight", (2 * E, D)), 2, E),
         "conv": _conv_from_hf(t, pre, E, W, c.conv_bias),
         "wx_EP": from_linear(t.take(pre + "x_proj.weight", (R + 2 * N, E))),
         "wdt_RE": from_linear(t.take(pre + "dt_proj.weight", (E, R))),
         "bdt_E": t.take(pre + "dt_proj.bias", (E,)),
         "A_log_EN": t.take(pre + "A_log", (E, N)),
         "D_E": t.take(pre + "D", (E,)),
         "wout_ED": from_linear(t.take(pre + "out_proj.weight", (D, E)))}
    if c.proj_bias:
        p["bin_2E"] = t.take(pre + "in_proj.bias", (2 * E,)).reshape(2, E)
        p["bout_D"] = t.take(pre + "out_proj.bias", (D,))
    return p


def _mamba_to_hf(p: dict, pre: str, c: MambaConfig) -> dict:
    out = {pre + "in_proj.weight": to_linear(p["win_D2E"]),
           pre + "conv1d.weight": np.ascontiguousarray(p["conv"]["w_WC"].T[:, None, :]),
           pre + "x_proj.weight": to_linear(p["wx_EP"]), pre + "dt_proj.weight": to_linear(p["wdt_RE"]),
           pre + "dt_proj.bias": p["bdt_E"], pre + "A_log": p["A_log_EN"], pre + "D": p["D_E"],
           pre + "out_proj.weight": to_linear(p["wout_ED"])}
    if "b_C" in p["conv"]:
        out[pre + "conv1d.bias"] = p["conv"]["b_C"]
    if c.proj_bias:
        out[pre + "in_proj.bias"], out[pre + "out_proj.bias"] = p["bin_2E"].reshape(-1), p["bout_D"]
    return out


def _mamba2_from_hf(t: Tensors, pre: str, c: Mamba2Config) -> dict:
    D, E, H, P, G, N, W = c.d_model, c.d_inner, c.n_heads, c.head_dim, c.n_groups, c.d_state, c.d_conv
    w = t.take(pre + "in_proj.weight", (2 * E + 2 * G * N + H, D))
    cuts = np.cumsum([E, E, G * N, G * N])
    z, x, B, C, dt = np.split(w, cuts)
    conv = _conv_from_hf(t, pre, E + 2 * G * N, W, c.conv_bias)
    conv_cuts = np.cumsum([E, G * N])
    conv_w = np.split(conv["w_WC"], conv_cuts, axis=1)
    conv_b = np.split(conv["b_C"], conv_cuts) if c.conv_bias else [None] * 3
    convs = [{"w_WC": cw} | ({"b_C": cb} if cb is not None else {}) for cw, cb in zip(conv_w, conv_b)]
    return {"wz_DHP": from_linear(z, H, P), "wx_DHP": from_linear(x, H, P), "wB_DGN": from_linear(B, G, N),
            "wC_DGN": from_linear(C, G, N), "wdt_DH": from_linear(dt),
            "conv_x": convs[0], "conv_B": convs[1], "conv_C": convs[2],
            "dt_bias_H": t.take(pre + "dt_bias", (H,)), "A_log_H": t.take(pre + "A_log", (H,)),
            "D_H": t.take(pre + "D", (H,)), "norm_scale_HP": t.take(pre + "norm.weight", (E,)).reshape(H, P),
            "wo_HPD": np.ascontiguousarray(t.take(pre + "out_proj.weight", (D, E)).T).reshape(H, P, D)}


def _mamba2_to_hf(p: dict, pre: str, c: Mamba2Config) -> dict:
    ws = [to_linear(p[k]) for k in ("wz_DHP", "wx_DHP", "wB_DGN", "wC_DGN", "wdt_DH")]
    convs = [p[k] for k in ("conv_x", "conv_B", "conv_C")]
    out = {pre + "in_proj.weight": np.concatenate(ws),
           pre + "conv1d.weight": np.ascontiguousarray(np.concatenate([cv["w_WC"] for cv in convs], 1).T[:, None, :]),
           pre + "dt_bias": p["dt_bias_H"], pre + "A_log": p["A_log_H"], pre + "D": p["D_H"],
           pre + "norm.weight": p["norm_scale_HP"].reshape(-1),
           pre + "out_proj.weight": np.ascontiguousarray(p["wo_HPD"].reshape(-1, c.d_model).T)}
    if c.conv_bias:
        out[pre + "conv1d.bias"] = np.concatenate([cv["b_C"] for cv in convs])
    return out


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    c = cfg.pattern[0].mixer
    mixer = _mamba_from_hf if isinstance(c, MambaConfig) else _mamba2_from_hf
    layers = [{"mixer_norm": parts.norm_from_hf(t, f"backbone.layers.{i}.norm", cfg.d_model),
               "mixer": mixer(t, f"backbone.layers.{i}.mixer.", c)} for i in range(cfg.n_layers)]
    if hf["model_type"] == "falcon_mamba":  # weightless norms: scales of 1
        for p in layers:
            p["mixer"].update(dt_norm_R=np.ones(c.dt_rank, np.float32), B_norm_N=np.ones(c.d_state, np.float32),
                              C_norm_N=np.ones(c.d_state, np.float32))
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "backbone.embeddings.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "backbone.norm_f", cfg.d_model)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    kind = {"mamba": MambaConfig, "falcon_mamba": MambaConfig, "mamba2": Mamba2Config}.get(model_type)
    b = cfg.pattern[0]
    if kind is MambaConfig and isinstance(b.mixer, MambaConfig) and (
            (getattr(b.mixer, "inner_norm_eps", None) is not None) != (model_type == "falcon_mamba")):
        raise UnsupportedError(f"to_hf({model_type}): inner dt/B/C norms (inner_norm_eps) are FalconMamba's "
                               "and only FalconMamba's")
    if (kind is None or len(cfg.pattern) != 1 or not isinstance(b.mixer, kind) or b.ffn is not None
            or b.norm != cfg.final_norm or cfg.final_norm.kind != "rms" or cfg.final_norm.scale_offset
            or b.norm_position != "pre" or cfg.position != "none" or cfg.embed_scale or cfg.final_logit_softcap):
        raise UnsupportedError(f"to_hf({model_type}): needs one {getattr(kind, '__name__', model_type)} block "
                               "without ffn, pre-RMSNorm, no position table, embed scale or softcap")
    if kind is Mamba2Config and b.mixer.norm_eps != cfg.final_norm.eps:
        raise UnsupportedError(f"to_hf(mamba2): the gated norm's eps {b.mixer.norm_eps} must equal the block "
                               f"norms' {cfg.final_norm.eps} (one layer_norm_epsilon)")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    c = cfg.pattern[0].mixer
    hf = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=c.d_state,
              conv_kernel=c.d_conv, expand=c.expand, layer_norm_epsilon=cfg.final_norm.eps,
              use_conv_bias=c.conv_bias, hidden_act="silu")
    if model_type in ("mamba", "falcon_mamba"):
        hf.update(intermediate_size=c.d_inner, time_step_rank=c.dt_rank, use_bias=c.proj_bias)
        if model_type == "falcon_mamba":
            hf["mixer_rms_eps"] = c.inner_norm_eps
    else:
        hf.update(num_heads=c.n_heads, head_dim=c.head_dim, n_groups=c.n_groups, use_bias=False,
                  chunk_size=c.chunk_size, time_step_limit=[0.0, float("inf")])
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    c = cfg.pattern[0].mixer
    mixer = _mamba2_to_hf if model_type == "mamba2" else _mamba_to_hf
    out = parts.embedding_to_hf(params["embed"], "backbone.embeddings.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "backbone.norm_f"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        if model_type == "falcon_mamba":
            for k in ("dt_norm_R", "B_norm_N", "C_norm_N"):
                if not np.all(p["mixer"][k].astype(np.float32) == 1.0):
                    raise UnsupportedError(f"to_hf(falcon_mamba): layer {i} {k} is not all ones "
                                           "(FalconMamba's inner norms have no weights)")
        out.update(parts.norm_to_hf(p["mixer_norm"], f"backbone.layers.{i}.norm"))
        out.update(mixer(p["mixer"], f"backbone.layers.{i}.mixer.", c))
    return out
