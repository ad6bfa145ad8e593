"""transformers' xLSTM (`model_type` "xlstm", the xLSTM-7B architecture) <-> zoo.

A block is x + mLSTM(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); after the last block an RMSNorm,
the (untied by default) head and a tanh soft cap on the logits. The mLSTM is layers.mlstm_large
(q, k, v, the output gate and the i/f gates straight from the normalised input; per-head
LayerNorm; sigmoid output gate). `model_config` builds that ModelConfig; the `xlstm7b-*`
presets call it.

Config mapping (transformers -> zoo):
  hidden_size, num_hidden_layers, num_heads      d_model, n_layers, n_heads
  int(hidden_size * qk_dim_factor), ... v_...    MLSTMLargeConfig.qk_dim, v_dim (as the layer does;
                                                 the cache's rounding up to 64 is not the model's)
  round_up(hidden_size * ffn_proj_factor,
           ffn_round_up_to_multiple_of)          MLPConfig.d_ff (SwiGLU)
  gate_soft_cap, eps, norm_eps, chunk_size       the mixer's fields (norm_eps also the RMSNorms')
  output_logit_soft_cap                          ModelConfig.final_logit_softcap
Kernel choices (mode, chunkwise/sequence/step kernels, autocast_kernel_dtype,
max_inference_chunksize, return_last_states) change how transformers evaluates the same
function, so they are accepted and not stored. transformers applies its output norm whatever
add_out_norm says, and so does the zoo. Refused: use_bias (RMSNorms with biases), a state dtype
other than float32, norms reduced in the activation dtype, embedding_dim != hidden_size.

weight_mode "fused" checkpoints (qkv_opreact = [q | k | v | o], ifgate_preact = [i | f],
proj_up_gate_z = [gate | up]) are split on import; export always writes "single".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from layers.mlp import MLPConfig
from layers.mlstm_large import MLSTMLargeConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, from_linear, stack_layers, to_linear, to_linear_in,
                                unstack_layers, unsupported)

ARCHITECTURES = {"xlstm": "xLSTMForCausalLM"}
_MT = "xlstm"
_FFN_NAMES = {"gate": "proj_up_gate", "up": "proj_up", "down": "proj_down"}


def round_up(x: float, multiple: int) -> int:
    """transformers' round_up_to_next_multiple_of, float arithmetic included."""
    return int(((x + multiple - 1) // multiple) * multiple)


def model_config(*, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int = 2048,
                 qk_dim: int | None = None, v_dim: int | None = None, d_ff: int | None = None,
                 ffn_proj_factor: float = 2.667, ffn_round_up_to: int = 64, gate_soft_cap: float | None = 15.0,
                 logit_soft_cap: float | None = 30.0, norm_eps: float = 1e-6, eps: float = 1e-6,
                 chunk_size: int = 64, form: str = "chunkwise", tie_embeddings: bool = False,
                 **extra) -> ModelConfig:
    """The xLSTM-7B decoder: pre-RMSNorm mLSTM (layers.mlstm_large) + SwiGLU blocks, final
    RMSNorm, soft-capped logits. qk_dim / v_dim default to D / 2 and D; d_ff defaults to
    hidden * ffn_proj_factor rounded up to a multiple of ffn_round_up_to. `extra`: ModelConfig
    fields (dtype, param_dtype, remat, ...)."""
    extra.pop("impl", None)  # no mixer here has kernel choices
    norm = NormConfig(kind="rms", eps=norm_eps)
    mixer = MLSTMLargeConfig(d_model=d_model, n_heads=n_heads, qk_dim=qk_dim, v_dim=v_dim, form=form,
                             chunk_size=chunk_size, gate_soft_cap=gate_soft_cap, eps=eps, norm_eps=norm_eps)
    d_ff = d_ff or round_up(d_model * ffn_proj_factor, ffn_round_up_to)
    block = BlockConfig(mixer=mixer, ffn=MLPConfig(d_model=d_model, d_ff=d_ff, activation="silu", gated=True),
                        norm=norm)
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,), max_len=max_len,
                       tie_embeddings=tie_embeddings, final_norm=norm, final_logit_softcap=logit_soft_cap, **extra)


# ----------------------------------------------------------------------------- import


def config_from_hf(hf: dict) -> ModelConfig:
    D = hf.get("hidden_size") or hf.get("embedding_dim") or 4096
    if hf.get("use_bias", False):
        unsupported(_MT, "use_bias", hf["use_bias"], "the zoo's RMSNorm has no bias")
    if hf.get("embedding_dim") not in (None, D):
        unsupported(_MT, "embedding_dim", hf["embedding_dim"], f"must equal hidden_size={D}")
    n_layers = hf.get("num_hidden_layers") or hf.get("num_blocks") or 32
    if hf.get("num_blocks") not in (None, n_layers):
        unsupported(_MT, "num_blocks", hf["num_blocks"], f"must equal num_hidden_layers={n_layers}")
    if not hf.get("norm_reduction_force_float32", True):
        unsupported(_MT, "norm_reduction_force_float32", False, "the zoo's norms always reduce in float32")
    if hf.get("inference_state_dtype", "float32") != "float32":
        unsupported(_MT, "inference_state_dtype", hf["inference_state_dtype"], "the zoo keeps float32 states")
    if hf.get("weight_mode", "single") not in ("single", "fused"):
        unsupported(_MT, "weight_mode", hf["weight_mode"], "known: 'single', 'fused'")
    H = hf.get("num_heads", 8)
    qk_dim, v_dim = int(D * hf.get("qk_dim_factor", 0.5)), int(D * hf.get("v_dim_factor", 1.0))
    for option, dim in (("qk_dim_factor", qk_dim), ("v_dim_factor", v_dim)):
        if dim < 1 or dim % H:
            unsupported(_MT, option, hf.get(option), f"hidden_size * {option} = {dim} must be a multiple of "
                                                     f"num_heads={H}")
    d_ff = round_up(D * hf.get("ffn_proj_factor", 2.667), hf.get("ffn_round_up_to_multiple_of", 64))
    return model_config(vocab_size=hf.get("vocab_size", 50304), d_model=D, n_layers=n_layers, n_heads=H,
                        qk_dim=qk_dim, v_dim=v_dim, d_ff=d_ff, gate_soft_cap=hf.get("gate_soft_cap", 15.0),
                        logit_soft_cap=hf.get("output_logit_soft_cap", 30.0), norm_eps=float(hf.get("norm_eps", 1e-6)),
                        eps=float(hf.get("eps", 1e-6)), chunk_size=hf.get("chunk_size", 64),
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _mixer_from_hf(t: Tensors, pre: str, c: MLSTMLargeConfig) -> dict:
    D, H, K, V = c.d_model, c.n_heads, c.qk_head_dim, c.v_head_dim
    if t.has(pre + "qkv_opreact.weight"):  # weight_mode "fused"
        w = t.take(pre + "qkv_opreact.weight", (2 * c.qk_dim + 2 * c.v_dim, D))
        q, k, v, o = np.split(w, np.cumsum([c.qk_dim, c.qk_dim, c.v_dim]))
        w_if = t.take(pre + "ifgate_preact.weight", (2 * H, D))
        b_if = t.take(pre + "ifgate_preact.bias", (2 * H,))
        wi, wf, bi, bf = w_if[:H], w_if[H:], b_if[:H], b_if[H:]
    else:
        q, k = (t.take(f"{pre}{n}.weight", (c.qk_dim, D)) for n in ("q", "k"))
        v, o = (t.take(f"{pre}{n}.weight", (c.v_dim, D)) for n in ("v", "ogate_preact"))
        wi, wf = (t.take(f"{pre}{n}_preact.weight", (H, D)) for n in ("igate", "fgate"))
        bi, bf = (t.take(f"{pre}{n}_preact.bias", (H,)) for n in ("igate", "fgate"))
    return {"wq_DHK": from_linear(q, H, K), "wk_DHK": from_linear(k, H, K), "wv_DHV": from_linear(v, H, V),
            "wog_DHV": from_linear(o, H, V), "wi_DH": from_linear(wi), "wf_DH": from_linear(wf),
            "bi_H": bi, "bf_H": bf,
            "norm_HV": t.take(pre + "multihead_norm.weight", (c.v_dim,)).reshape(H, V),
            "wo_HVD": np.ascontiguousarray(t.take(pre + "out_proj.weight", (D, c.v_dim)).T).reshape(H, V, D)}


def _ffn_from_hf(t: Tensors, pre: str, c: MLPConfig) -> dict:
    if t.has(pre + "proj_up_gate_z.weight"):  # weight_mode "fused": [gate | up]
        gate, up = np.split(t.take(pre + "proj_up_gate_z.weight", (2 * c.d_ff, c.d_model)), 2)
        return {"gate": {"w": from_linear(gate)}, "up": {"w": from_linear(up)},
                "down": {"w": from_linear(t.take(pre + "proj_down.weight", (c.d_model, c.d_ff)))}}
    return parts.mlp_from_hf(t, pre, c, _FFN_NAMES)


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    block, D = cfg.pattern[0], cfg.d_model
    layers = []
    for i in range(cfg.n_layers):
        pre = f"backbone.blocks.{i}."
        layers.append({"mixer_norm": parts.norm_from_hf(t, pre + "norm_mlstm", D),
                       "mixer": _mixer_from_hf(t, pre + "mlstm_layer.", block.mixer),
                       "ffn_norm": parts.norm_from_hf(t, pre + "norm_ffn", D),
                       "ffn": _ffn_from_hf(t, pre + "ffn.", block.ffn)})
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, D, cfg.tie_embeddings, "backbone.embeddings.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "backbone.out_norm", D)}


# ----------------------------------------------------------------------------- export


def _factor(dim: int, d_model: int) -> float:
    """A factor f with int(d_model * f) == dim (transformers' layer truncates the product)."""
    f = dim / d_model
    while int(d_model * f) < dim:
        f = float(np.nextafter(f, np.inf))
    return f


def check_exportable(cfg: Any, model_type: str) -> None:
    def refuse(why: str):
        raise UnsupportedError(f"to_hf({model_type}): {why}")

    if not isinstance(cfg, ModelConfig):
        refuse(f"needs a decoder ModelConfig, got {type(cfg).__name__}")
    kinds = sorted({type(b.mixer).__name__ for b in cfg.prefix + cfg.pattern})
    if kinds != ["MLSTMLargeConfig"]:
        refuse(f"every mixer must be layers.mlstm_large.MLSTMLargeConfig, got {kinds}")
    if len(cfg.pattern) != 1 or cfg.prefix:
        refuse("needs one repeated block and no prefix blocks")
    b = cfg.pattern[0]
    f = b.ffn
    if not (isinstance(f, MLPConfig) and f.gated and f.activation == "silu" and not f.use_bias):
        refuse(f"the ffn must be a bias-free SwiGLU MLPConfig, got {f}")
    norm = cfg.final_norm
    if (norm.kind != "rms" or norm.scale_offset or b.norm != norm or b.norm_position != "pre" or b.parallel
            or b.mixer.norm_eps != norm.eps):
        refuse("needs pre-RMSNorm blocks whose norms, final norm and per-head norm share one eps "
               f"(block norm {b.norm}, final {norm}, mixer norm_eps {b.mixer.norm_eps})")
    if cfg.position != "none" or cfg.embed_scale is not None:
        refuse(f"xLSTM has no position table or embedding scale (position={cfg.position!r}, "
               f"embed_scale={cfg.embed_scale})")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    c, D, F = cfg.pattern[0].mixer, cfg.d_model, cfg.pattern[0].ffn.d_ff
    ffn_factor = _factor(F, D)
    multiple = 64 if round_up(D * ffn_factor, 64) == F else F  # F itself always rounds back to F
    return dict(hidden_size=D, embedding_dim=D, num_hidden_layers=cfg.n_layers, num_blocks=cfg.n_layers,
                num_heads=c.n_heads, qk_dim_factor=_factor(c.qk_dim, D), v_dim_factor=_factor(c.v_dim, D),
                ffn_proj_factor=ffn_factor, ffn_round_up_to_multiple_of=multiple, gate_soft_cap=c.gate_soft_cap,
                output_logit_soft_cap=cfg.final_logit_softcap, norm_eps=cfg.final_norm.eps, eps=c.eps,
                chunk_size=c.chunk_size, use_bias=False, weight_mode="single", add_out_norm=True,
                norm_reduction_force_float32=True, inference_state_dtype="float32", mode="inference")


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    block = cfg.pattern[0]
    out = parts.embedding_to_hf(params["embed"], "backbone.embeddings.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "backbone.out_norm"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        pre, m = f"backbone.blocks.{i}.", p["mixer"]
        lay = pre + "mlstm_layer."
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "norm_mlstm"))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "norm_ffn"))
        out.update(parts.mlp_to_hf(p["ffn"], pre + "ffn.", block.ffn, _FFN_NAMES))
        out.update({lay + "q.weight": to_linear(m["wq_DHK"]), lay + "k.weight": to_linear(m["wk_DHK"]),
                    lay + "v.weight": to_linear(m["wv_DHV"]), lay + "ogate_preact.weight": to_linear(m["wog_DHV"]),
                    lay + "igate_preact.weight": to_linear(m["wi_DH"]), lay + "igate_preact.bias": m["bi_H"],
                    lay + "fgate_preact.weight": to_linear(m["wf_DH"]), lay + "fgate_preact.bias": m["bf_H"],
                    lay + "multihead_norm.weight": m["norm_HV"].reshape(-1),
                    lay + "out_proj.weight": to_linear_in(m["wo_HVD"], 2)})
    return out
