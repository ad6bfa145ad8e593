"""A bidirectional encoder (BERT-style): token + learned position + token-type embeddings, an
embedding norm, the same residual blocks as the decoder (bidirectional attention, post-norm for
BERT) and the heads: a pooler (dense + tanh on the first token) and a masked-LM head (dense +
activation + norm, then the tied embedding table and a bias).

Padding: `attention_mask` (1 real, 0 padding) becomes the blocks' segment ids, so real tokens
attend only to real tokens; their outputs do not depend on the padding at all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

from layers import checks, dense, embed, norms, positions as pos_lib
from layers import params as P
from layers.mlp import ACTIVATIONS
from layers.norms import NormConfig
from layers.params import ParamSpec, normal, zeros
from zoo import blocks, model
from zoo.config import DTYPES, REMAT_POLICIES, BlockConfig, check_blocks

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

OUTPUTS = ("hidden", "pooled", "mlm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Attributes:
      vocab_size: V.
      d_model: D.
      n_layers: total blocks; a multiple of len(pattern).
      pattern: the blocks of one repeat; every mixer must have `causal=False`.
      max_len: size of the learned position table.
      type_vocab_size: number of token types (BERT's segment A/B); 0 for no type embedding.
      embed_norm: norm applied to the summed embeddings (BERT: LayerNorm), or None.
      final_norm: norm after the last block (pre-norm encoders), or None (BERT is post-norm).
      pooler: learn the pooler (dense + tanh on the first token).
      mlm_head: learn the masked-LM head (dense + mlm_activation + mlm_norm, tied decoder + bias).
      output: what `forward` returns: "hidden" [B, L, D], "pooled" [B, D] or "mlm" logits [B, L, V].
      mlm_activation: activation of the MLM transform (one of layers.mlp.ACTIVATIONS).
      mlm_norm: the MLM transform's norm.
      dtype, param_dtype, scan_layers, remat, init_std: as in ModelConfig.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    pattern: tuple[BlockConfig, ...]
    max_len: int = 512
    type_vocab_size: int = 2
    embed_norm: NormConfig | None = NormConfig(kind="layer", eps=1e-12)
    final_norm: NormConfig | None = None
    pooler: bool = True
    mlm_head: bool = True
    output: Literal["hidden", "pooled", "mlm"] = "hidden"
    mlm_activation: str = "gelu"
    mlm_norm: NormConfig = NormConfig(kind="layer", eps=1e-12)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02

    def __post_init__(self):
        name = "EncoderConfig"
        for f in ("vocab_size", "d_model", "n_layers", "max_len"):
            checks.positive(name, f, getattr(self, f))
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            checks.fail(name, "type_vocab_size", "a non-negative integer", self.type_vocab_size)
        if not isinstance(self.pattern, tuple) or not self.pattern:
            checks.fail(name, "pattern", "a non-empty tuple of BlockConfig", self.pattern)
        if self.n_layers % len(self.pattern):
            raise checks.ConfigError(
                f"{name}.n_layers={self.n_layers} must be a multiple of len(pattern)={len(self.pattern)}")
        check_blocks(name, "pattern", self.pattern, self.d_model)
        for i, block in enumerate(self.pattern):
            if getattr(block.mixer, "causal", True):
                checks.fail(name, f"pattern[{i}].mixer.causal",
                            "False (an encoder attends in both directions; a mixer with a causal=False "
                            "option, e.g. AttentionConfig)", getattr(block.mixer, "causal", "no such field"))
        checks.one_of(name, "output", self.output, OUTPUTS)
        if self.output == "pooled" and not self.pooler:
            checks.fail(name, "output", "'hidden' or 'mlm' when pooler=False", self.output)
        if self.output == "mlm" and not self.mlm_head:
            checks.fail(name, "output", "'hidden' or 'pooled' when mlm_head=False", self.output)
        checks.one_of(name, "mlm_activation", self.mlm_activation, tuple(ACTIVATIONS))
        checks.one_of(name, "dtype", self.dtype, tuple(DTYPES))
        checks.one_of(name, "param_dtype", self.param_dtype, tuple(DTYPES))
        checks.one_of(name, "remat", self.remat, REMAT_POLICIES)

    @property
    def n_repeats(self) -> int:
        return self.n_layers // len(self.pattern)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def param_specs(cfg: EncoderConfig) -> dict:
    D, std = cfg.d_model, cfg.init_std
    specs: dict[str, Any] = {
        "embed": embed.param_specs(cfg.vocab_size, D, tied=True, init_std=std),
        "pos": pos_lib.learned_param_specs(cfg.max_len, D, std),
        "blocks": tuple(P.stack(blocks.param_specs(b, D), cfg.n_repeats) for b in cfg.pattern),
    }
    if cfg.type_vocab_size:
        specs["types"] = {"table_TD": ParamSpec((cfg.type_vocab_size, D), ("token_types", "embed"),
                                                normal(std), decay=False)}
    if cfg.embed_norm is not None:
        specs["embed_norm"] = norms.param_specs(cfg.embed_norm, D)
    if cfg.final_norm is not None:
        specs["final_norm"] = norms.param_specs(cfg.final_norm, D)
    if cfg.pooler:
        specs["pooler"] = dense.param_specs(D, D, ("embed", "embed_out"), use_bias=True)
    if cfg.mlm_head:
        specs["mlm"] = {
            "dense": dense.param_specs(D, D, ("embed", "embed_out"), use_bias=True),
            "norm": norms.param_specs(cfg.mlm_norm, D),
            "bias_V": ParamSpec((cfg.vocab_size,), ("vocab",), zeros),
        }
    return model._cast_specs(specs, cfg.param_dtype)


def encode(params: dict, tokens_BL, cfg: EncoderConfig, token_types_BL=None, attention_mask_BL=None,
           positions_BL=None):
    """-> (hidden states [B, L, D] in the compute dtype, aux of the blocks). Traceable."""
    B, L = tokens_BL.shape
    dtype = cfg.compute_dtype
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
    x_BLD = embed.embed(params["embed"], tokens_BL, dtype) + pos_lib.learned(params["pos"], positions_BL, dtype)
    if cfg.type_vocab_size:
        types_BL = jnp.zeros((B, L), jnp.int32) if token_types_BL is None else token_types_BL
        x_BLD = x_BLD + jnp.take(params["types"]["table_TD"], types_BL, axis=0).astype(dtype)
    if cfg.embed_norm is not None:
        x_BLD = norms.forward(params["embed_norm"], x_BLD, cfg=cfg.embed_norm)
    # Segment ids: 1 for real tokens, 0 for padding; attention only within equal ids.
    segment_ids_BL = None if attention_mask_BL is None else (attention_mask_BL != 0).astype(jnp.int32)
    x_BLD, _, aux = model.run_blocks(params["blocks"], x_BLD, cfg, None, positions_BL, segment_ids_BL)
    if cfg.final_norm is not None:
        x_BLD = norms.forward(params["final_norm"], x_BLD, cfg=cfg.final_norm)
    return x_BLD, {"blocks": aux}


def pool(params: dict, hidden_BLD: "Float[Array, 'B L D']") -> "Float[Array, 'B D']":
    """BERT's pooler: tanh(dense(hidden state of the first token))."""
    return jnp.tanh(dense.forward(params["pooler"], hidden_BLD[:, 0]).astype(jnp.float32)).astype(hidden_BLD.dtype)


def mlm_logits(params: dict, hidden_BLD: "Float[Array, 'B L D']", cfg: EncoderConfig) -> "Float[Array, 'B L V']":
    """Masked-LM logits (fp32): dense + activation + norm, then the tied embedding and a bias."""
    head = params["mlm"]
    h_BLD = dense.forward(head["dense"], hidden_BLD)
    h_BLD = ACTIVATIONS[cfg.mlm_activation](h_BLD.astype(jnp.float32)).astype(hidden_BLD.dtype)
    h_BLD = norms.forward(head["norm"], h_BLD, cfg=cfg.mlm_norm)
    logits_BLV = embed.unembed(params["embed"], h_BLD)
    return logits_BLV + norms.trailing(head["bias_V"].astype(jnp.float32), logits_BLV.ndim)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward_jit(params, tokens_BL, token_types_BL, attention_mask_BL, positions_BL, cfg):
    hidden_BLD, aux = encode(params, tokens_BL, cfg, token_types_BL, attention_mask_BL, positions_BL)
    if cfg.output == "pooled":
        return pool(params, hidden_BLD), aux
    if cfg.output == "mlm":
        return mlm_logits(params, hidden_BLD, cfg), aux
    return hidden_BLD, aux


def forward(params: dict, tokens: "Int[Array, 'B L']", *, cfg: EncoderConfig,
            token_types: "Int[Array, 'B L'] | None" = None,
            attention_mask: "Int[Array, 'B L'] | None" = None,
            positions: "Int[Array, 'B L'] | None" = None, return_aux: bool = False):
    """By cfg.output: hidden states [B, L, D], pooled [B, D] or MLM logits (fp32) [B, L, V].

    token_types: segment A/B ids in [0, type_vocab_size) (default 0).
    attention_mask: 1 at real tokens, 0 at padding (default all real); outputs at real tokens do
      not depend on the padding.
    positions: position ids (default 0..L-1 in every row).
    return_aux: also return the blocks' auxiliary outputs ({"blocks": ...}, as the decoder's).
    """
    checks.array("tokens", tokens, rank=2, kind="i")
    checks.token_range("tokens", tokens, cfg.vocab_size)
    for name, arr in (("token_types", token_types), ("attention_mask", attention_mask), ("positions", positions)):
        if arr is not None:
            checks.array(name, arr, shape=tuple(tokens.shape))
    if token_types is not None:
        checks.token_range("token_types", token_types, max(cfg.type_vocab_size, 1))
    if positions is not None:
        checks.token_range("positions", positions, cfg.max_len)
    elif tokens.shape[1] > cfg.max_len:
        raise ValueError(f"tokens: length {tokens.shape[1]} exceeds max_len={cfg.max_len}")
    out, aux = _forward_jit(params, tokens, token_types, attention_mask, positions, cfg)
    return (out, aux) if return_aux else out


def mlm_inputs(key: jax.Array, tokens_BL: "Int[Array, 'B L']", *, mask_id: int, vocab_size: int,
               rate: float = 0.15) -> tuple["Int[Array, 'B L']", "Int[Array, 'B L']"]:
    """BERT's masking: choose `rate` of the tokens; of those 80% become mask_id, 10% a random
    token, 10% stay. -> (inputs, chosen as int32 0/1: where the MLM loss is taken)."""
    k_choose, k_kind, k_rand = jax.random.split(key, 3)
    chosen_BL = jax.random.uniform(k_choose, tokens_BL.shape) < rate
    u_BL = jax.random.uniform(k_kind, tokens_BL.shape)
    random_BL = jax.random.randint(k_rand, tokens_BL.shape, 0, vocab_size, tokens_BL.dtype)
    replaced = jnp.where(u_BL < 0.8, jnp.asarray(mask_id, tokens_BL.dtype),
                         jnp.where(u_BL < 0.9, random_BL, tokens_BL))
    return jnp.where(chosen_BL, replaced, tokens_BL), chosen_BL.astype(jnp.int32)


model.register_family(EncoderConfig, model.Family(param_specs=param_specs, forward=forward,
                                                  aux_loss=model.stack_aux_loss))
