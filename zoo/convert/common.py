"""What every architecture's converter shares: a tensor reader that notices leftovers, the
[out, in] <-> [in, ...] weight layout change, layer stacking, RoPE and dtype mapping.

Conventions: HF `nn.Linear` stores W as [out, in] and computes x W^T; zoo projections store
[in, ...out axes] and compute an einsum over `in`. `from_linear(W, *out_shape)` and
`to_linear(w)` are the two directions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from layers import checks
from layers import params as P
from layers.positions import RopeConfig
from zoo.config import BlockConfig, ModelConfig


class UnsupportedError(checks.ConfigError):
    """A checkpoint option the zoo cannot reproduce exactly (never approximated)."""


def unsupported(model_type: str, option: str, value: Any, why: str = "") -> None:
    raise UnsupportedError(f"{model_type}: config option {option}={value!r} is not supported"
                           + (f" ({why})" if why else ""))


# Tensors whose names are not weights (buffers some versions saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "embeddings.position_ids")


class Tensors:
    """The checkpoint's tensors by name. `take` hands each out once; `check_consumed` then
    refuses a checkpoint with tensors nobody read (a bias or norm the config did not declare
    would otherwise be dropped silently)."""

    def __init__(self, arrays: dict[str, np.ndarray], model_type: str):
        self._arrays = dict(arrays)
        self._taken: set[str] = set()
        self.model_type = model_type

    def has(self, name: str) -> bool:
        return name in self._arrays

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self._arrays:
            near = sorted(k for k in self._arrays if k.rsplit(".", 1)[0] == name.rsplit(".", 1)[0])[:5]
            raise KeyError(f"{self.model_type}: tensor {name!r} is missing from the checkpoint"
                           + (f" (same module holds {near})" if near else ""))
        self._taken.add(name)
        x = self._arrays[name]
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"{self.model_type}: tensor {name!r}: expected shape {tuple(shape)} from "
                             f"config.json, got {tuple(x.shape)}")
        return x

    def split(self, name: str, sizes: dict[str, int]) -> None:
        """Take a fused tensor and offer its consecutive row blocks under new names (e.g. Phi-3's
        qkv_proj as q/k/v_proj), so the shared layouts read it; the blocks must all be taken."""
        x = self.take(name)
        if x.shape[0] != sum(sizes.values()):
            raise ValueError(f"{self.model_type}: tensor {name!r}: expected {sum(sizes.values())} rows from "
                             f"config.json, got shape {tuple(x.shape)}")
        start = 0
        for part, size in sizes.items():
            self._arrays[part] = x[start:start + size]
            start += size

    def discard(self, name: str) -> None:
        """Mark a tensor read without using it (e.g. a tied lm_head that repeats the embedding)."""
        if name in self._arrays:
            self._taken.add(name)

    def check_consumed(self) -> None:
        left = sorted(k for k in set(self._arrays) - self._taken if not k.endswith(_IGNORED_SUFFIXES))
        if left:
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise UnsupportedError(f"{self.model_type}: the checkpoint holds tensors this converter does "
                                   f"not map (a config option it does not know?): {left[:8]}{more}")


def from_linear(w_OI: np.ndarray, *out_shape: int) -> np.ndarray:
    """HF Linear weight [out, in] -> zoo [in, *out_shape]."""
    return np.ascontiguousarray(w_OI.T).reshape(w_OI.shape[1], *(out_shape or (w_OI.shape[0],)))


def to_linear(w_I_: Any) -> np.ndarray:
    """zoo [in, ...out axes] -> HF Linear weight [out, in]."""
    w = np.asarray(w_I_)
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def fuse(tensors: dict[str, np.ndarray], names: list[str], fused: str) -> None:
    """The inverse of `Tensors.split`: replace `names` in `tensors` by their row concatenation."""
    tensors[fused] = np.concatenate([tensors.pop(n) for n in names], axis=0)


def to_linear_in(w__O: Any, n_in_axes: int) -> np.ndarray:
    """zoo [...in axes, out] (e.g. wo_HKD) -> HF Linear weight [out, in]."""
    w = np.asarray(w__O)
    return np.ascontiguousarray(w.reshape(math.prod(w.shape[:n_in_axes]), -1).T)


# ----------------------------------------------------------------------------- layers


def minimal_pattern(layer_blocks: list[BlockConfig]) -> tuple[BlockConfig, ...]:
    """The shortest prefix whose repetition gives every layer (the layer scan's unit)."""
    n = len(layer_blocks)
    for p in range(1, n + 1):
        if n % p == 0 and all(layer_blocks[i] == layer_blocks[i % p] for i in range(n)):
            return tuple(layer_blocks[:p])
    return tuple(layer_blocks)


def stack_layers(cfg: ModelConfig, per_layer: list[dict]) -> tuple:
    """Layer i = repeat r, pattern position j (i = r * len(pattern) + j) -> blocks[j][..][r]."""
    p = len(cfg.pattern)
    return tuple(jax.tree.map(lambda *xs: np.stack(xs), *per_layer[j::p]) for j in range(p))


def unstack_layers(cfg: ModelConfig, blocks: tuple) -> list[dict]:
    p = len(cfg.pattern)
    out = []
    for i in range(cfg.n_layers):
        r, j = divmod(i, p)
        out.append(jax.tree.map(lambda a: np.asarray(a[r]), blocks[j]))
    return out


def block_at(cfg: ModelConfig, i: int) -> BlockConfig:
    return cfg.pattern[i % len(cfg.pattern)]


# ----------------------------------------------------------------------------- dtypes

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def stored_dtype(hf: dict) -> str:
    name = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    if name not in _DTYPE_NAMES:
        unsupported(hf.get("model_type", "?"), "dtype", name, "expected float32, bfloat16 or float16")
    return _DTYPE_NAMES[name]


def finish(cfg: ModelConfig, params: dict) -> dict:
    """Check the converted tree against `param_specs(cfg)` (structure and shapes) and return it
    as jax arrays in each parameter's declared dtype."""
    from zoo import model

    specs = model.param_specs(cfg)
    spec_paths = {jax.tree_util.keystr(k): s for k, s in
                  jax.tree_util.tree_leaves_with_path(specs, is_leaf=P.is_spec)}
    got_paths = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if set(spec_paths) != set(got_paths):
        raise ValueError(f"convert: parameter tree mismatch: missing {sorted(set(spec_paths) - set(got_paths))}, "
                         f"unexpected {sorted(set(got_paths) - set(spec_paths))}")
    for path, spec in spec_paths.items():
        if tuple(got_paths[path].shape) != tuple(spec.shape):
            raise ValueError(f"convert: parameter {path}: expected shape {spec.shape}, got {got_paths[path].shape}")
    return jax.tree.map(lambda s, x: jnp.asarray(np.asarray(x).astype(s.dtype)), specs, params,
                        is_leaf=P.is_spec)


def export_dtype(cfg: ModelConfig) -> Any:
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[cfg.param_dtype]


def numpy_tree(params: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)


# ----------------------------------------------------------------------------- activations

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACTIVATIONS_OUT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def activation(model_type: str, option: str, name: str) -> str:
    if name not in _ACTIVATIONS:
        unsupported(model_type, option, name, f"known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def activation_to_hf(name: str) -> str:
    return _ACTIVATIONS_OUT[name]


# ----------------------------------------------------------------------------- rope


def rope_parameters(hf: dict, layer_type: str | None = None) -> dict:
    """RoPE settings in transformers 5's `rope_parameters` form, also from the older
    `rope_theta` + `rope_scaling` keys (older config.json files)."""
    params = hf.get("rope_parameters")
    if params is not None and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if "partial_rotary_factor" not in params and "partial_rotary_factor" in hf:
        params["partial_rotary_factor"] = hf["partial_rotary_factor"]
    if params["rope_type"] in ("llama3", "yarn", "longrope") and hf.get("original_max_position_embeddings"):
        # transformers lets a top-level original_max_position_embeddings (Phi-3's files) win.
        params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return params


def rope_from_hf(model_type: str, rp: dict, max_pos: int, layout: str = "half") -> RopeConfig:
    """transformers' ROPE_INIT_FUNCTIONS semantics -> RopeConfig (raises for kinds the zoo lacks)."""
    kind = rp["rope_type"]
    base = dict(theta=float(rp.get("rope_theta", 10000.0)), layout=layout,
                fraction=float(rp.get("partial_rotary_factor", 1.0)))
    # original_max_len is unused by these two; max_pos matches what zoo.presets.llama writes.
    if kind == "default":
        return RopeConfig(**base, original_max_len=max_pos)
    if kind == "linear":
        return RopeConfig(**base, scaling="linear", factor=float(rp["factor"]), original_max_len=max_pos)
    if kind == "dynamic":
        # transformers grows the base past max_position_embeddings (not the original length).
        return RopeConfig(**base, scaling="dynamic", factor=float(rp["factor"]), original_max_len=max_pos)
    if kind == "llama3":
        return RopeConfig(**base, scaling="llama3", factor=float(rp["factor"]),
                          original_max_len=int(rp["original_max_position_embeddings"]),
                          low_freq_factor=float(rp["low_freq_factor"]),
                          high_freq_factor=float(rp["high_freq_factor"]))
    if kind == "yarn":
        if rp.get("truncate", True) is not True:
            unsupported(model_type, "rope_parameters.truncate", rp["truncate"],
                        "the zoo's yarn ramp always rounds its bounds")
        original = int(rp.get("original_max_position_embeddings") or max_pos)
        factor = rp.get("factor")
        factor = max_pos / original if factor is None else float(factor)
        attention = rp.get("attention_factor")
        if attention is None:
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        return RopeConfig(**base, scaling="yarn", factor=factor, original_max_len=original,
                          beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
                          attention_factor=float(attention))
    if kind == "longrope":
        original = int(rp.get("original_max_position_embeddings") or max_pos)
        factor = rp.get("factor")
        # Phi-3 files give no factor: transformers takes the context extension ratio.
        factor = max_pos / original if factor is None else float(factor)
        if factor < 1.0:
            unsupported(model_type, "rope_parameters.factor", factor, "longrope needs a factor >= 1")
        attention = rp.get("attention_factor")
        return RopeConfig(**base, scaling="longrope", factor=factor, original_max_len=original,
                          short_factor=tuple(float(v) for v in rp["short_factor"]),
                          long_factor=tuple(float(v) for v in rp["long_factor"]),
                          attention_factor=None if attention is None else float(attention))
    unsupported(model_type, "rope_parameters.rope_type", kind,
                "layers.positions.RopeConfig has default, linear, dynamic, yarn, llama3 and longrope")


def rope_to_hf(rope: RopeConfig, max_len: int) -> dict:
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling or "default"}
    if rope.fraction != 1.0:
        out["partial_rotary_factor"] = rope.fraction
    if rope.scaling is None:
        return out
    out["factor"] = rope.factor
    if rope.scaling == "dynamic" and rope.original_max_len != max_len:
        raise UnsupportedError(f"to_hf: dynamic RoPE with original_max_len={rope.original_max_len} != "
                               f"max_len={max_len}: transformers grows the base past max_position_embeddings")
    if rope.scaling == "llama3":
        out.update(original_max_position_embeddings=rope.original_max_len,
                   low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.scaling == "yarn":
        out.update(original_max_position_embeddings=rope.original_max_len, beta_fast=rope.beta_fast,
                   beta_slow=rope.beta_slow)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    if rope.scaling == "longrope":
        out.update(original_max_position_embeddings=rope.original_max_len, short_factor=list(rope.short_factor),
                   long_factor=list(rope.long_factor))
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    return out


def replace(cfg: Any, **changes) -> Any:
    return dataclasses.replace(cfg, **changes)
