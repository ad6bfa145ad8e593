"""Hugging Face checkpoint interop: `from_hf(folder) -> (cfg, params)` and
`to_hf(cfg, params, folder)`.

A folder is what `save_pretrained` writes: config.json plus safetensors shards (pickled
`.bin` files are refused). Each architecture family is one module of this package, found
through `FAMILIES` by config.json's `model_type`; it maps the config to a zoo model config
(`ModelConfig`; `EncoderConfig` for BERT) and the tensors to zoo parameters (layers stacked
for the scan), and back. Options a family cannot reproduce exactly raise `UnsupportedError`
naming the option.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from zoo.config import ModelConfig
from zoo.convert import hf_io
from zoo.convert.common import Tensors, UnsupportedError, export_dtype, finish, numpy_tree, replace, stored_dtype

# model_type -> family module (imported on first use).
FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
    "gpt2": "gpt2",
    "gemma2": "gemma", "gemma3_text": "gemma",
    "mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe",
    "deepseek_v2": "deepseek", "deepseek_v3": "deepseek",
    "mamba": "mamba", "falcon_mamba": "mamba", "mamba2": "mamba",
    "rwkv": "rwkv",
    "bert": "bert",
    "jamba": "jamba",
    "t5": "t5",
    "bart": "bart",
    "xlstm": "xlstm", "recurrent_gemma": "recurrent_gemma",
}

__all__ = ["FAMILIES", "UnsupportedError", "family", "from_hf", "to_hf", "model_types"]


def model_types() -> list[str]:
    return sorted(FAMILIES)


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise UnsupportedError(f"config.json model_type={model_type!r} has no converter; "
                               f"supported: {', '.join(model_types())}")
    return importlib.import_module(f"zoo.convert.{FAMILIES[model_type]}")


def from_hf(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None
            ) -> tuple[Any, dict]:
    """Read a local HF folder (config.json + *.safetensors) -> (config, params): a ModelConfig
    for decoders, a zoo.encoder.EncoderConfig for BERT.

    param_dtype: storage dtype of the parameters (default: the checkpoint's dtype); dtype: the
    compute dtype (default: the same). Parameters the zoo pins to float32 (routers, SSM decay
    rates) stay float32.
    """
    folder = os.fspath(path)
    hf = hf_io.read_config(folder)
    model_type = hf.get("model_type")
    module = family(model_type)
    stored = stored_dtype(hf)
    cfg = module.config_from_hf(hf)  # refuses unsupported options before any tensor is read
    arrays = hf_io.read_tensors(folder)
    if hasattr(module, "config_options"):
        # Families whose config depends on which heads the file holds (BERT) read the tensor names.
        cfg = module.config_from_hf(hf, **module.config_options(set(arrays)))
    cfg = replace(cfg, param_dtype=param_dtype or stored, dtype=dtype or param_dtype or stored)
    tensors = Tensors(arrays, model_type)
    params = module.params_from_hf(cfg, hf, tensors)
    tensors.check_consumed()
    return cfg, finish(cfg, params)


def infer_model_type(cfg: Any) -> str:
    """The model_type whose family writes this config (the first family that accepts it)."""
    for model_type in dict.fromkeys(FAMILIES):
        try:
            family(model_type).check_exportable(cfg, model_type)
        except (UnsupportedError, AttributeError):  # AttributeError: another kind of model config
            continue
        return model_type
    raise UnsupportedError("to_hf: no transformers architecture reproduces this ModelConfig; "
                           "pass model_type= to see which option stands in the way")


def to_hf(cfg: Any, params: Any, path: str | os.PathLike, *, model_type: str | None = None) -> str:
    """Write config.json + model.safetensors (in cfg.param_dtype) that transformers loads.

    model_type: the transformers architecture to write (default: inferred from cfg). Returns
    the folder.
    """
    from zoo import model

    model.family(cfg)  # a TypeError naming cfg for anything but a zoo model config
    model_type = model_type or infer_model_type(cfg)
    module = family(model_type)
    module.check_exportable(cfg, model_type)
    if isinstance(cfg, ModelConfig) and cfg.embed_norm is not None and not getattr(module, "WRITES_EMBED_NORM", False):
        # Decoder families written before ModelConfig.embed_norm existed would drop it silently
        # (encoder and encoder-decoder configs have their own embed_norm, handled by their families).
        raise UnsupportedError(f"to_hf({model_type}): ModelConfig.embed_norm={cfg.embed_norm!r} cannot be written")
    hf = module.config_to_hf(cfg, model_type)
    hf.setdefault("architectures", [module.ARCHITECTURES[model_type]])
    hf.update(model_type=model_type, dtype=cfg.param_dtype, vocab_size=cfg.vocab_size,
              tie_word_embeddings=getattr(cfg, "tie_embeddings", True))
    tensors = module.params_to_hf(cfg, numpy_tree(params, export_dtype(cfg)), model_type)
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    hf_io.write_config(folder, hf)
    hf_io.write_tensors(folder, tensors)
    return folder
