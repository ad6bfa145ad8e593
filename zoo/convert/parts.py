"""Tensor layouts of the sub-layers most decoders share: attention projections, (gated) MLPs
and norms, in both directions. Names follow transformers' Llama modules (q_proj, gate_proj,
...); families with other names pass them in."""

from __future__ import annotations

from typing import Any

import numpy as np

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from zoo.convert.common import Tensors, from_linear, to_linear, to_linear_in

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_from_hf(t: Tensors, prefix: str, cfg: AttentionConfig, *, qk_norm_offset: float = 0.0) -> dict:
    """`qk_norm_offset`: Gemma 3 stores q/k-norm weights w applied as (offset + w); the zoo's
    attention applies its scale as is, so the offset is folded in here."""
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v, o = (prefix + n for n in QKVO)
    p: dict[str, Any] = {
        "wq_DHK": from_linear(t.take(q + ".weight", (H * K, D)), H, K),
        "wk_DGK": from_linear(t.take(k + ".weight", (G * K, D)), G, K),
        "wv_DGK": from_linear(t.take(v + ".weight", (G * K, D)), G, K),
        "wo_HKD": np.ascontiguousarray(t.take(o + ".weight", (D, H * K)).T).reshape(H, K, D),
    }
    if cfg.use_bias:
        p["bq_HK"] = t.take(q + ".bias", (H * K,)).reshape(H, K)
        p["bk_GK"] = t.take(k + ".bias", (G * K,)).reshape(G, K)
        p["bv_GK"] = t.take(v + ".bias", (G * K,)).reshape(G, K)
    if cfg.out_bias:
        p["bo_D"] = t.take(o + ".bias", (D,))
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            w = t.take(f"{prefix}{name}.weight", (K,))
            p[name] = {"scale": w.astype(np.float32) + qk_norm_offset if qk_norm_offset else w}
    return p


def attention_to_hf(p: dict, prefix: str, cfg: AttentionConfig, *, qk_norm_offset: float = 0.0) -> dict:
    q, k, v, o = (prefix + n for n in QKVO)
    out = {q + ".weight": to_linear(p["wq_DHK"]), k + ".weight": to_linear(p["wk_DGK"]),
           v + ".weight": to_linear(p["wv_DGK"]), o + ".weight": to_linear_in(p["wo_HKD"], 2)}
    if cfg.use_bias:
        out.update({q + ".bias": p["bq_HK"].reshape(-1), k + ".bias": p["bk_GK"].reshape(-1),
                    v + ".bias": p["bv_GK"].reshape(-1)})
    if cfg.out_bias:
        out[o + ".bias"] = p["bo_D"]
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            w = p[name]["scale"]
            out[f"{prefix}{name}.weight"] = (w.astype(np.float32) - qk_norm_offset).astype(w.dtype) if qk_norm_offset else w
    return out


MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def mlp_from_hf(t: Tensors, prefix: str, cfg: MLPConfig, names: dict = MLP_NAMES) -> dict:
    D, F = cfg.d_model, cfg.d_ff
    parts = ("gate", "up", "down") if cfg.gated else ("up", "down")
    out = {}
    for part in parts:
        shape = (D, F) if part == "down" else (F, D)
        out[part] = {"w": from_linear(t.take(f"{prefix}{names[part]}.weight", shape))}
        if cfg.use_bias:
            out[part]["b"] = t.take(f"{prefix}{names[part]}.bias", (shape[0],))
    return out


def mlp_to_hf(p: dict, prefix: str, cfg: MLPConfig, names: dict = MLP_NAMES) -> dict:
    out = {}
    for part, sub in p.items():
        out[f"{prefix}{names[part]}.weight"] = to_linear(sub["w"])
        if "b" in sub:
            out[f"{prefix}{names[part]}.bias"] = sub["b"]
    return out


def norm_from_hf(t: Tensors, name: str, dim: int, *, bias: bool = False) -> dict:
    p = {"scale": t.take(name + ".weight", (dim,))}
    if bias:
        p["bias"] = t.take(name + ".bias", (dim,))
    return p


def norm_to_hf(p: dict, name: str) -> dict:
    out = {name + ".weight": p["scale"]}
    if "bias" in p:
        out[name + ".bias"] = p["bias"]
    return out


def embedding_from_hf(t: Tensors, vocab_size: int, d_model: int, tied: bool, table: str,
                      head: str = "lm_head.weight") -> dict:
    p = {"table_VD": t.take(table, (vocab_size, d_model))}
    if tied:
        t.discard(head)  # some writers store the tied head too; it repeats the table
    else:
        p["unembed_DV"] = np.ascontiguousarray(t.take(head, (vocab_size, d_model)).T)
    return p


def embedding_to_hf(p: dict, table: str, head: str = "lm_head.weight") -> dict:
    out = {table: p["table_VD"]}
    if "unembed_DV" in p:
        out[head] = np.ascontiguousarray(p["unembed_DV"].T)
    return out
