"""Llama, Mistral, Qwen2, Qwen3 and Phi-3: pre-norm RMSNorm blocks, GQA attention with
half-rotation RoPE (every rope type the zoo has, longrope included), SwiGLU MLP. They differ in
options only: Mistral's sliding window on every layer, Qwen2's q/k/v biases (and per-layer
windows), Qwen3's RMSNorm on queries and keys, Phi-3's fused tensors (`qkv_proj` = q, k, v rows;
`gate_up_proj` = gate, up rows), split on import and fused again on export, and its window on
every layer."""

from __future__ import annotations

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig, ModelConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, block_at, fuse, minimal_pattern,
                                rope_from_hf, rope_parameters, rope_to_hf, stack_layers, unstack_layers,
                                unsupported)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
# The zoo's q/k-norm epsilon (layers.attention); Qwen3 uses rms_norm_eps there.
QK_NORM_EPS = 1e-6


def layer_windows(hf: dict) -> list[int | None]:
    """Per-layer sliding window as transformers applies it for this model_type."""
    n, mt = hf["num_hidden_layers"], hf["model_type"]
    window = hf.get("sliding_window")
    if mt == "llama":
        return [None] * n
    if mt in ("mistral", "mixtral", "phi3"):
        return [window] * n
    # Qwen families: windows only where layer_types (or, in older files, max_window_layers) says.
    if hf.get("layer_types") is not None:
        types = hf["layer_types"]
    else:  # older Qwen config.json: windows from max_window_layers up
        use = hf.get("use_sliding_window", False) and window is not None
        types = ["sliding_attention" if use and i >= hf.get("max_window_layers", 0) else "full_attention"
                 for i in range(n)]
    if not hf.get("use_sliding_window", False):
        window = None  # the config classes drop the window unless use_sliding_window
    for ty in set(types) - {"sliding_attention", "full_attention"}:
        unsupported(mt, "layer_types", ty)
    return [window if ty == "sliding_attention" else None for ty in types]


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf["model_type"]
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    G = hf.get("num_key_value_heads") or H
    K = hf.get("head_dim") or D // H
    eps = float(hf.get("rms_norm_eps", 1e-6))
    qk_norm = mt == "qwen3"
    if qk_norm and eps != QK_NORM_EPS:
        unsupported(mt, "rms_norm_eps", eps, f"the zoo's q/k RMSNorm uses eps={QK_NORM_EPS}")
    qkv_bias = True if mt == "qwen2" else bool(hf.get("attention_bias", False))
    out_bias = False if mt == "qwen2" else bool(hf.get("attention_bias", False))
    max_pos = hf.get("max_position_embeddings", 2048)
    rope = rope_from_hf(mt, rope_parameters(hf), max_pos)
    norm = NormConfig(kind="rms", eps=eps)
    ffn = MLPConfig(d_model=D, d_ff=hf["intermediate_size"], activation=activation(mt, "hidden_act", hf.get("hidden_act", "silu")),
                    gated=True, use_bias=bool(hf.get("mlp_bias", False)))

    def block(window):
        # A windowed layer decodes from a ring of `window` slots, as the zoo's own presets do.
        mixer = AttentionConfig(d_model=D, n_heads=H, n_kv_heads=G, head_dim=K, rope=rope, sliding_window=window,
                                rolling_cache=window is not None, qk_norm=qk_norm, use_bias=qkv_bias,
                                out_bias=out_bias)
        return BlockConfig(mixer=mixer, ffn=ffn, norm=norm)

    layers = [block(w) for w in layer_windows(hf)]
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"],
                       pattern=minimal_pattern(layers), max_len=max_pos,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), final_norm=norm)


def _fused(b: BlockConfig, pre: str) -> dict[str, dict[str, int]]:
    """Phi-3's fused tensors -> the Llama tensors they hold, in row order."""
    m, F = b.mixer, b.ffn.d_ff
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    a = pre + "self_attn."
    return {a + "qkv_proj.weight": {a + "q_proj.weight": q, a + "k_proj.weight": kv, a + "v_proj.weight": kv},
            pre + "mlp.gate_up_proj.weight": {pre + "mlp.gate_proj.weight": F, pre + "mlp.up_proj.weight": F}}


def params_from_hf(cfg: ModelConfig, hf: dict, t: Tensors) -> dict:
    layers = []
    for i in range(cfg.n_layers):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        if hf["model_type"] == "phi3":
            for fused, sizes in _fused(b, pre).items():
                t.split(fused, sizes)
        layers.append({
            "mixer_norm": parts.norm_from_hf(t, pre + "input_layernorm", cfg.d_model),
            "mixer": parts.attention_from_hf(t, pre + "self_attn.", b.mixer),
            "ffn_norm": parts.norm_from_hf(t, pre + "post_attention_layernorm", cfg.d_model),
            "ffn": parts.mlp_from_hf(t, pre + "mlp.", b.ffn),
        })
    return {"embed": parts.embedding_from_hf(t, cfg.vocab_size, cfg.d_model, cfg.tie_embeddings,
                                             "model.embed_tokens.weight"),
            "blocks": stack_layers(cfg, layers),
            "final_norm": parts.norm_from_hf(t, "model.norm", cfg.d_model)}


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    def no(option, value, why=""):
        raise UnsupportedError(f"to_hf({model_type}): {option}={value!r} cannot be written" + (f" ({why})" if why else ""))

    if cfg.position != "none" or cfg.embed_scale is not None or cfg.final_logit_softcap is not None:
        no("ModelConfig.position/embed_scale/final_logit_softcap", (cfg.position, cfg.embed_scale, cfg.final_logit_softcap))
    if cfg.final_norm.kind != "rms" or cfg.final_norm.scale_offset:
        no("final_norm", cfg.final_norm)
    first = cfg.pattern[0]
    for b in cfg.pattern:
        m, f = b.mixer, b.ffn
        if not isinstance(m, AttentionConfig) or not isinstance(f, MLPConfig):
            no("pattern mixer/ffn", (type(m).__name__, type(f).__name__), "needs attention + MLP")
        if b.norm != cfg.final_norm or b.norm_position != "pre" or b.parallel:
            no("BlockConfig norm", (b.norm, b.norm_position, b.parallel))
        if not m.causal or m.alibi or m.logit_softcap is not None or m.rope is None or m.rope.layout != "half":
            no("AttentionConfig causal/alibi/logit_softcap/rope", (m.causal, m.alibi, m.logit_softcap, m.rope))
        if m.query_scale is not None and m.query_scale != m.head_dim ** -0.5:
            no("AttentionConfig.query_scale", m.query_scale)
        if getattr(m, "attention_sinks", 0):
            no("AttentionConfig.attention_sinks", m.attention_sinks, "transformers' masks have no sinks")
        if (m.n_heads, m.n_kv_heads, m.head_dim, m.rope, m.qk_norm, m.use_bias, m.out_bias) != (
                first.mixer.n_heads, first.mixer.n_kv_heads, first.mixer.head_dim, first.mixer.rope,
                first.mixer.qk_norm, first.mixer.use_bias, first.mixer.out_bias) or f != first.ffn:
            no("pattern", "blocks differing in more than the sliding window")
        if not f.gated:
            no("MLPConfig.gated", f.gated)
    m, f = first.mixer, first.ffn
    windows = {b.mixer.sliding_window for b in cfg.pattern}
    if model_type == "qwen3":
        if not m.qk_norm or m.use_bias != m.out_bias or f.use_bias:
            no("qk_norm/use_bias/out_bias/mlp use_bias", (m.qk_norm, m.use_bias, m.out_bias, f.use_bias))
        if cfg.final_norm.eps != QK_NORM_EPS:
            no("norm eps", cfg.final_norm.eps, f"Qwen3's q/k norms share it; the zoo's use {QK_NORM_EPS}")
    elif m.qk_norm:
        no("AttentionConfig.qk_norm", True, "only qwen3 has it")
    if model_type == "qwen2" and (not m.use_bias or m.out_bias or f.use_bias):
        no("use_bias/out_bias/mlp use_bias", (m.use_bias, m.out_bias, f.use_bias), "qwen2 has q/k/v biases only")
    if model_type in ("llama", "mistral") and m.use_bias != m.out_bias:
        no("use_bias/out_bias", (m.use_bias, m.out_bias), "attention_bias covers q, k, v and o together")
    if model_type in ("mistral", "phi3") and (len(windows) > 1 or f.use_bias):
        no("sliding_window/mlp use_bias", (windows, f.use_bias), f"{model_type} has one window on every layer")
    if model_type == "phi3" and (m.use_bias or m.out_bias):
        no("use_bias/out_bias", (m.use_bias, m.out_bias), "phi3 has no attention biases")
    if model_type == "phi3" and m.rope.scaling not in (None, "longrope"):
        no("RopeConfig.scaling", m.rope.scaling, "Phi3Config accepts default and longrope only")
    if model_type == "phi3" and m.head_dim * m.n_heads != cfg.d_model:
        no("AttentionConfig.head_dim", m.head_dim, "Phi3Config sizes its rope factors by hidden_size / heads")
    if model_type == "llama" and windows != {None}:
        no("sliding_window", windows, "llama has none")
    if len(windows - {None}) > 1:
        no("sliding_window", windows, "one window size at most")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    m, f = cfg.pattern[0].mixer, cfg.pattern[0].ffn
    hf = dict(hidden_size=cfg.d_model, intermediate_size=f.d_ff, num_hidden_layers=cfg.n_layers,
              num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
              hidden_act=activation_to_hf(f.activation), max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.final_norm.eps, rope_parameters=rope_to_hf(m.rope, cfg.max_len))
    if model_type not in ("qwen2", "phi3"):
        hf["attention_bias"] = m.use_bias
    if model_type == "llama":
        hf["mlp_bias"] = f.use_bias
    windows = [block_at(cfg, i).mixer.sliding_window for i in range(cfg.n_layers)]
    window = next((w for w in windows if w is not None), None)
    if model_type in ("mistral", "phi3"):
        hf["sliding_window"] = window
    if model_type == "phi3":
        hf["pad_token_id"] = None  # Phi3Config's default (32000) would exceed a smaller vocabulary
        if m.rope.scaling in ("longrope", "yarn", "llama3"):
            # Phi3Config's own original_max_position_embeddings (default 4096) overrides the rope's.
            hf["original_max_position_embeddings"] = m.rope.original_max_len
    if model_type in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=cfg.n_layers,
                  layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    return hf


def params_to_hf(cfg: ModelConfig, params: dict, model_type: str) -> dict:
    out = parts.embedding_to_hf(params["embed"], "model.embed_tokens.weight")
    out.update(parts.norm_to_hf(params["final_norm"], "model.norm"))
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        b, pre = block_at(cfg, i), f"model.layers.{i}."
        out.update(parts.norm_to_hf(p["mixer_norm"], pre + "input_layernorm"))
        out.update(parts.attention_to_hf(p["mixer"], pre + "self_attn.", b.mixer))
        out.update(parts.norm_to_hf(p["ffn_norm"], pre + "post_attention_layernorm"))
        out.update(parts.mlp_to_hf(p["ffn"], pre + "mlp.", b.ffn))
        if model_type == "phi3":
            for fused, sizes in _fused(b, pre).items():
                fuse(out, list(sizes), fused)
    return out
