"""Model configuration: frozen, hashable, validated at construction."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from layers import checks, mixers
from layers.norms import NormConfig

REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """One residual block: x + mixer(norm(x)), then x + ffn(norm(x)).

    Attributes:
      mixer: a registered mixer config (e.g. layers.attention.AttentionConfig).
      ffn: channel mixer config (MLPConfig or another registered channel mixer, e.g. RWKV's
        channel mix), or None for a mixer-only block (Mamba-style).
      norm: the normalisation used around both sub-layers.
      norm_position: "pre" (x + f(norm(x))), "post" (norm(x + f(x)), original Transformer/BERT),
        or "sandwich" (x + norm(f(norm(x))), Gemma 2).
      parallel: x + mixer(norm(x)) + ffn(norm(x)) with one shared norm (GPT-J, PaLM).
    """

    mixer: Any
    ffn: Any | None
    norm: NormConfig = NormConfig()
    norm_position: Literal["pre", "post", "sandwich"] = "pre"
    parallel: bool = False

    def __post_init__(self):
        mixers.module_for(self.mixer)  # raises for unknown mixer types
        if self.ffn is not None:
            mixers.module_for(self.ffn)
        checks.one_of("BlockConfig", "norm_position", self.norm_position, ("pre", "post", "sandwich"))
        if self.parallel and (self.ffn is None or self.norm_position != "pre"):
            raise checks.ConfigError("BlockConfig.parallel=True needs an ffn and norm_position='pre'")


def check_blocks(owner: str, field: str, blocks: tuple, d_model: int) -> None:
    """Every entry is a BlockConfig whose sub-layers have width d_model."""
    for i, block in enumerate(blocks):
        if not isinstance(block, BlockConfig):
            checks.fail(owner, f"{field}[{i}]", "a BlockConfig", block)
        for part in ("mixer", "ffn"):
            sub = getattr(block, part)
            if sub is not None and sub.d_model != d_model:
                raise checks.ConfigError(
                    f"{owner}.{field}[{i}].{part}.d_model={sub.d_model} differs from d_model={d_model}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder: embed -> prefix blocks -> the pattern repeated -> norm -> unembed.

    Attributes:
      vocab_size: V.
      d_model: D; every block's mixer and ffn must use it.
      n_layers: total blocks, prefix included: len(prefix) + a positive multiple of len(pattern).
      pattern: the blocks of one repeat, e.g. (local, global) for Gemma 2.
      prefix: blocks that run once each, in order, before the scanned repeats (DeepSeek's
        first_k_dense layers: a dense FFN where the rest use MoE). Their parameters are not
        stacked; empty by default.
      max_len: longest sequence (learned position table size, default cache length).
      position: absolute positions added to the embedding: "none" (RoPE/ALiBi live in the
        mixer), "learned" (GPT-2) or "sinusoidal".
      tie_embeddings: unembed with the embedding table.
      final_norm: norm before the unembedding.
      final_logit_softcap: logits become cap * tanh(logits / cap) (Gemma 2).
      embed_scale: multiply embeddings by this (Gemma: sqrt(d_model)); None for 1.
      embed_norm: a norm (with its own parameters) applied to the embeddings, after embed_scale
        and absolute positions, before the first block (RWKV-4's ln0); None for none.
      dtype: compute dtype name; params are stored in param_dtype.
      param_dtype: storage dtype name of the parameters.
      scan_layers: run the repeats with lax.scan (compile time independent of depth);
        False unrolls them, with identical numbers.
      remat: rematerialisation policy name for each repeat (REMAT_POLICIES).
      init_std: std of the embedding initialisation.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    pattern: tuple[BlockConfig, ...]
    prefix: tuple[BlockConfig, ...] = ()
    max_len: int = 2048
    position: Literal["none", "learned", "sinusoidal"] = "none"
    tie_embeddings: bool = False
    final_norm: NormConfig = NormConfig()
    final_logit_softcap: float | None = None
    embed_scale: float | None = None
    embed_norm: NormConfig | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02

    def __post_init__(self):
        name = "ModelConfig"
        for f in ("vocab_size", "d_model", "n_layers", "max_len"):
            checks.positive(name, f, getattr(self, f))
        if not isinstance(self.pattern, tuple) or not self.pattern:
            checks.fail(name, "pattern", "a non-empty tuple of BlockConfig", self.pattern)
        if not isinstance(self.prefix, tuple):
            checks.fail(name, "prefix", "a tuple of BlockConfig", self.prefix)
        scanned = self.n_layers - len(self.prefix)
        if scanned < 1 or scanned % len(self.pattern):
            if self.prefix:
                raise checks.ConfigError(
                    f"{name}.n_layers={self.n_layers} must be len(prefix)={len(self.prefix)} plus a positive "
                    f"multiple of len(pattern)={len(self.pattern)}")
            raise checks.ConfigError(
                f"{name}.n_layers={self.n_layers} must be a multiple of len(pattern)={len(self.pattern)}")
        check_blocks(name, "pattern", self.pattern, self.d_model)
        check_blocks(name, "prefix", self.prefix, self.d_model)
        checks.one_of(name, "position", self.position, ("none", "learned", "sinusoidal"))
        checks.one_of(name, "dtype", self.dtype, tuple(DTYPES))
        checks.one_of(name, "param_dtype", self.param_dtype, tuple(DTYPES))
        checks.one_of(name, "remat", self.remat, REMAT_POLICIES)
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            checks.fail(name, "final_logit_softcap", "a positive float or None", self.final_logit_softcap)
        if self.embed_norm is not None and not isinstance(self.embed_norm, NormConfig):
            checks.fail(name, "embed_norm", "a NormConfig or None", self.embed_norm)

    @property
    def n_repeats(self) -> int:
        return (self.n_layers - len(self.prefix)) // len(self.pattern)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]
