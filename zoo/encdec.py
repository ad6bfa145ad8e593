"""Encoder-decoder transformers (T5, BART): an encoder stack over the source, a decoder stack
whose blocks add cross-attention to the encoder's output, one shared token embedding.

T5 (v1.0 and v1.1): pre-norm RMSNorm without mean or bias, no score scaling (1/sqrt(d) lives in
the init), relative position buckets shared by every layer of a stack (the bias is computed once
per stack and reused), ReLU or gated-GELU MLP, logits rescaled by d_model ** -0.5 when tied.
BART: post-norm LayerNorm, learned positions, an embedding LayerNorm, GELU, biases everywhere.

Decoding: `init_state` runs the encoder once and projects every decoder layer's cross-attention
keys and values; `step` then appends one token's self-attention keys and values to a cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import optax

from layers import attention_core, checks, cross_attention, embed, mlp, norms
from layers import params as P
from layers import positions as pos_lib
from layers import relative_position as relpos
from layers.cross_attention import CrossAttentionConfig
from layers.mlp import ACTIVATIONS, MLPConfig
from layers.norms import NormConfig
from layers.relative_position import RelativePositionConfig
from zoo import model
from zoo.config import DTYPES, REMAT_POLICIES

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncDecConfig:
    """Attributes:
      vocab_size: V, shared by source and target.
      d_model: D.
      n_heads: H; head_dim: K (default d_model // n_heads; T5 sets H * K independently of D).
      d_ff: hidden width of the MLPs.
      n_encoder_layers, n_decoder_layers: blocks per stack.
      activation, gated: the MLP (T5 v1.0: relu, not gated; v1.1: gelu_tanh, gated; BART: gelu).
      norm: the norm of every sub-layer (T5: RMSNorm without mean, eps 1e-6).
      norm_position: "pre" (x + f(norm(x)), T5) or "post" (norm(x + f(x)), BART).
      final_norm: a norm after each stack (T5 yes, BART no).
      embed_norm: a norm on each stack's embeddings (BART's layernorm_embedding).
      position: "relative" (T5 buckets, one table per stack) or "learned" (BART: a table per stack).
      n_buckets, max_distance: relative position buckets (T5: 32, 128).
      max_len: learned position table size and the default decoding cache length.
      query_scale: score multiplier; 1.0 for T5, None for head_dim ** -0.5.
      use_bias: biases on attention and MLP projections (BART).
      tie_embeddings: unembed with the shared embedding table.
      scale_tied_logits: with tied embeddings, multiply the decoder output by d_model ** -0.5
        before the unembedding (T5).
      embed_scale: multiply embeddings by this (BART's scale_embedding: sqrt(d_model)); None for 1.
      decoder_start_id: the first decoder input (T5: the pad id 0; BART: </s> = 2).
      impl: attention implementation ("xla" | "reference" | "pallas").
      dtype, param_dtype, scan_layers, remat, init_std: as in ModelConfig.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    d_ff: int
    n_encoder_layers: int
    n_decoder_layers: int
    head_dim: int | None = None
    activation: str = "relu"
    gated: bool = False
    norm: NormConfig = NormConfig(kind="rms", eps=1e-6)
    norm_position: Literal["pre", "post"] = "pre"
    final_norm: bool = True
    embed_norm: bool = False
    position: Literal["relative", "learned"] = "relative"
    n_buckets: int = 32
    max_distance: int = 128
    max_len: int = 512
    query_scale: float | None = 1.0
    use_bias: bool = False
    tie_embeddings: bool = True
    scale_tied_logits: bool = True
    embed_scale: float | None = None
    decoder_start_id: int = 0
    impl: str = "xla"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02

    def __post_init__(self):
        name = "EncDecConfig"
        for f in ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers", "max_len",
                  "n_buckets", "max_distance"):
            checks.positive(name, f, getattr(self, f))
        checks.one_of(name, "norm_position", self.norm_position, ("pre", "post"))
        checks.one_of(name, "position", self.position, ("relative", "learned"))
        checks.one_of(name, "activation", self.activation, tuple(ACTIVATIONS))
        checks.one_of(name, "dtype", self.dtype, tuple(DTYPES))
        checks.one_of(name, "param_dtype", self.param_dtype, tuple(DTYPES))
        checks.one_of(name, "remat", self.remat, REMAT_POLICIES)
        if not 0 <= self.decoder_start_id < self.vocab_size:
            checks.fail(name, "decoder_start_id", f"a token id in [0, vocab_size={self.vocab_size})",
                        self.decoder_start_id)
        try:  # the sub-layer configs validate the rest; re-raise naming this config's fields
            self.attention, self.relative(True), self.relative(False)
        except checks.ConfigError as e:
            raise checks.ConfigError(f"{name}: {e}") from None

    @property
    def attention(self) -> CrossAttentionConfig:
        return CrossAttentionConfig(d_model=self.d_model, n_heads=self.n_heads, head_dim=self.head_dim,
                                    query_scale=self.query_scale, use_bias=self.use_bias, impl=self.impl)

    @property
    def mlp(self) -> MLPConfig:
        return MLPConfig(d_model=self.d_model, d_ff=self.d_ff, activation=self.activation, gated=self.gated,
                         use_bias=self.use_bias)

    def relative(self, bidirectional: bool) -> RelativePositionConfig:
        return RelativePositionConfig(n_heads=self.n_heads, n_buckets=self.n_buckets,
                                      max_distance=self.max_distance, bidirectional=bidirectional,
                                      init_std=self.d_model ** -0.5)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


# ------------------------------------------------------------------------------------ parameters


def _block_specs(cfg: EncDecConfig, cross: bool) -> dict:
    parts = ("self_attn", "cross_attn", "ffn") if cross else ("self_attn", "ffn")
    specs = {}
    for part in parts:
        specs[part] = mlp.param_specs(cfg.mlp) if part == "ffn" else cross_attention.param_specs(cfg.attention)
        specs[f"{part}_norm"] = norms.param_specs(cfg.norm, cfg.d_model)
    return specs


def _stack_specs(cfg: EncDecConfig, decoder: bool) -> dict:
    n = cfg.n_decoder_layers if decoder else cfg.n_encoder_layers
    specs: dict[str, Any] = {"blocks": P.stack(_block_specs(cfg, cross=decoder), n)}
    if cfg.position == "relative":
        specs["rel_bias"] = relpos.param_specs(cfg.relative(bidirectional=not decoder))
    else:
        specs["pos"] = pos_lib.learned_param_specs(cfg.max_len, cfg.d_model, cfg.init_std)
    if cfg.embed_norm:
        specs["embed_norm"] = norms.param_specs(cfg.norm, cfg.d_model)
    if cfg.final_norm:
        specs["final_norm"] = norms.param_specs(cfg.norm, cfg.d_model)
    return specs


def param_specs(cfg: EncDecConfig) -> dict:
    specs = {"embed": embed.param_specs(cfg.vocab_size, cfg.d_model, tied=cfg.tie_embeddings, init_std=cfg.init_std),
             "encoder": _stack_specs(cfg, decoder=False),
             "decoder": _stack_specs(cfg, decoder=True)}
    return model._cast_specs(specs, cfg.param_dtype)


# ---------------------------------------------------------------------------------------- stacks


def _sublayer(p: dict, x_BLD, f, name: str, cfg: EncDecConfig):
    """Residual around f (h -> (y, extra)) with the configured norm placement -> (x, extra)."""
    norm = lambda v: norms.forward(p[f"{name}_norm"], v, cfg=cfg.norm)  # noqa: E731
    if cfg.norm_position == "post":
        y_BLD, extra = f(x_BLD)
        return norm(x_BLD + y_BLD), extra
    y_BLD, extra = f(norm(x_BLD))
    return x_BLD + y_BLD, extra


def _scan(body, x, xs, cfg: EncDecConfig, n: int):
    """Run `body(x, xs_layer) -> (x, ys_layer)` over n stacked layers (lax.scan or unrolled)."""
    body = model._remat(body, cfg)
    if cfg.scan_layers:
        return jax.lax.scan(body, x, xs)
    ys = []
    for i in range(n):
        x, y = body(x, jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _embed(params: dict, stack: dict, tokens_BL, pos_BL, cfg: EncDecConfig):
    dtype = cfg.compute_dtype
    x_BLD = embed.embed(params["embed"], tokens_BL, dtype)
    if cfg.embed_scale is not None:
        x_BLD = x_BLD * jnp.asarray(cfg.embed_scale, dtype)
    if cfg.position == "learned":
        x_BLD = x_BLD + pos_lib.learned(stack["pos"], pos_BL, dtype)
    if cfg.embed_norm:
        x_BLD = norms.forward(stack["embed_norm"], x_BLD, cfg=cfg.norm)
    return x_BLD


def _bias(stack: dict, q_pos_BL, k_pos_BS, cfg: EncDecConfig, bidirectional: bool):
    """The stack's relative position bias, computed once and shared by all its layers."""
    if cfg.position != "relative":
        return None
    return relpos.bias(stack["rel_bias"], q_pos_BL, jnp.maximum(k_pos_BS, 0), cfg=cfg.relative(bidirectional))


def _finish_stack(stack: dict, x_BLD, cfg: EncDecConfig):
    return norms.forward(stack["final_norm"], x_BLD, cfg=cfg.norm) if cfg.final_norm else x_BLD


def _positions(B: int, L: int, start_B=None):
    start_B = jnp.zeros((B,), jnp.int32) if start_B is None else start_B
    return start_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]


def encode(params: dict, tokens_BS: "Int[Array, 'B S']", cfg: EncDecConfig,
           mask_BS: "Int[Array, 'B S'] | None" = None) -> "Float[Array, 'B S D']":
    """The encoder's output; keys at padding (mask 0) are never attended. Traceable."""
    B, S = tokens_BS.shape
    stack = params["encoder"]
    pos_BS = _positions(B, S)
    k_pos_BS = pos_BS if mask_BS is None else jnp.where(mask_BS != 0, pos_BS, -1)
    bias_BHSS = _bias(stack, pos_BS, pos_BS, cfg, bidirectional=True)
    attn = cfg.attention

    def layer(x_BSD, p):
        def self_attn(h):
            kv = cross_attention.project_kv(p["self_attn"], h, cfg=attn)
            return cross_attention.forward(p["self_attn"], h, kv, cfg=attn, q_pos_BL=pos_BS, k_pos_BS=k_pos_BS,
                                           bias_BHLS=bias_BHSS), None
        x_BSD, _ = _sublayer(p, x_BSD, self_attn, "self_attn", cfg)
        x_BSD, _ = _sublayer(p, x_BSD, lambda h: (mlp.apply(p["ffn"], h, cfg=cfg.mlp), None), "ffn", cfg)
        return x_BSD, None

    x_BSD, _ = _scan(layer, _embed(params, stack, tokens_BS, pos_BS, cfg), stack["blocks"], cfg,
                     cfg.n_encoder_layers)
    return _finish_stack(stack, x_BSD, cfg)


def cross_kv(params: dict, memory_BSD: "Float[Array, 'B S D']", cfg: EncDecConfig) -> dict:
    """Every decoder layer's cross-attention keys and values, stacked: {"k_BSHK", "v_BSHK"} with a
    leading layers axis."""
    project = lambda p: cross_attention.project_kv(p, memory_BSD, cfg=cfg.attention)  # noqa: E731
    return jax.vmap(project)(params["decoder"]["blocks"]["cross_attn"])


def _decode(params: dict, tokens_BL, kv_cross: dict, enc_pos_BS, cfg: EncDecConfig, state: dict | None):
    """Decoder over tokens (continuing `state`'s self-attention cache when given).
    -> (logits fp32 [B, L, V], the state after the last token, or None without a state)."""
    B, L = tokens_BL.shape
    stack = params["decoder"]
    attn = cfg.attention
    pos_BL = _positions(B, L, None if state is None else state["index_B"])
    if state is None:
        k_pos_BS = pos_BL
    else:  # every layer appends the same positions: one shared slot-position table
        k_pos_BS = attention_core.cache_append({"pos_BT": state["pos_BT"], "index_B": state["index_B"]}, {},
                                               pos_BL)["pos_BT"]
    bias_BHLS = _bias(stack, pos_BL, k_pos_BS, cfg, bidirectional=False)
    q0_BL = jnp.zeros((B, L), jnp.int32)

    def layer(x_BLD, xs):
        p, kv_c, cache = xs

        def self_attn(h):
            kv = cross_attention.project_kv(p["self_attn"], h, cfg=attn)
            new_cache = None
            if cache is not None:
                written = attention_core.cache_append(
                    {"k_BTHK": cache["k_BTHK"], "v_BTHK": cache["v_BTHK"], "pos_BT": state["pos_BT"],
                     "index_B": state["index_B"]}, {"k_BTHK": kv["k_BSHK"], "v_BTHK": kv["v_BSHK"]}, pos_BL)
                new_cache = {"k_BTHK": written["k_BTHK"], "v_BTHK": written["v_BTHK"]}
                kv = {"k_BSHK": new_cache["k_BTHK"], "v_BSHK": new_cache["v_BTHK"]}
            y_BLD = cross_attention.forward(p["self_attn"], h, kv, cfg=attn, q_pos_BL=pos_BL, k_pos_BS=k_pos_BS,
                                            causal=True, bias_BHLS=bias_BHLS)
            return y_BLD, new_cache

        def cross_attn(h):
            return cross_attention.forward(p["cross_attn"], h, kv_c, cfg=attn, q_pos_BL=q0_BL,
                                           k_pos_BS=enc_pos_BS), None

        x_BLD, new_cache = _sublayer(p, x_BLD, self_attn, "self_attn", cfg)
        x_BLD, _ = _sublayer(p, x_BLD, cross_attn, "cross_attn", cfg)
        x_BLD, _ = _sublayer(p, x_BLD, lambda h: (mlp.apply(p["ffn"], h, cfg=cfg.mlp), None), "ffn", cfg)
        return x_BLD, new_cache

    caches = None if state is None else state["self"]
    x_BLD, new_caches = _scan(layer, _embed(params, stack, tokens_BL, pos_BL, cfg),
                              (stack["blocks"], kv_cross, caches), cfg, cfg.n_decoder_layers)
    x_BLD = _finish_stack(stack, x_BLD, cfg)
    if cfg.tie_embeddings and cfg.scale_tied_logits:
        x_BLD = x_BLD * jnp.asarray(cfg.d_model ** -0.5, x_BLD.dtype)
    logits_BLV = embed.unembed(params["embed"], x_BLD)
    if state is None:
        return logits_BLV, None
    new_state = {**state, "self": new_caches, "pos_BT": k_pos_BS, "index_B": state["index_B"] + L}
    return logits_BLV, new_state


def _enc_key_positions(mask_BS, B: int, S: int):
    """Cross-attention keys: position 0 where real, -1 (never attended) at padding."""
    zeros_BS = jnp.zeros((B, S), jnp.int32)
    return zeros_BS if mask_BS is None else jnp.where(mask_BS != 0, zeros_BS, -1)


# ------------------------------------------------------------------------------------ public API


def shift_right(targets_BL: "Int[Array, 'B L']", start_id: int) -> "Int[Array, 'B L']":
    """Teacher forcing: the decoder sees the start token, then the targets up to L - 1."""
    start_B1 = jnp.full((targets_BL.shape[0], 1), start_id, targets_BL.dtype)
    return jnp.concatenate([start_B1, targets_BL[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward_jit(params, encoder_tokens_BS, decoder_tokens_BL, encoder_mask_BS, cfg):
    B, S = encoder_tokens_BS.shape
    memory_BSD = encode(params, encoder_tokens_BS, cfg, encoder_mask_BS)
    logits_BLV, _ = _decode(params, decoder_tokens_BL, cross_kv(params, memory_BSD, cfg),
                            _enc_key_positions(encoder_mask_BS, B, S), cfg, None)
    return logits_BLV


def _check_tokens(name: str, tokens, cfg: EncDecConfig, rank: int = 2, shape=None) -> None:
    checks.array(name, tokens, rank=rank, kind="i", shape=shape)
    checks.token_range(name, tokens, cfg.vocab_size)


def forward(params: dict, encoder_tokens: "Int[Array, 'B S']", decoder_tokens: "Int[Array, 'B L']", *,
            cfg: EncDecConfig, encoder_mask: "Int[Array, 'B S'] | None" = None, return_aux: bool = False):
    """Logits float32 [B, L, V] of the decoder over `decoder_tokens` (teacher forcing: pass
    `shift_right(targets, cfg.decoder_start_id)`), attending to the encoded `encoder_tokens`.

    encoder_mask: 1 at real source tokens, 0 at padding (never attended).
    return_aux: also return an (empty) aux dict, as the other model kinds do.
    """
    _check_tokens("encoder_tokens", encoder_tokens, cfg)
    _check_tokens("decoder_tokens", decoder_tokens, cfg, shape=(encoder_tokens.shape[0], None))
    if encoder_mask is not None:
        checks.array("encoder_mask", encoder_mask, shape=tuple(encoder_tokens.shape))
    _check_lengths(cfg, encoder_tokens.shape[1], decoder_tokens.shape[1])
    logits = _forward_jit(params, encoder_tokens, decoder_tokens, encoder_mask, cfg)
    return (logits, {}) if return_aux else logits


def _check_lengths(cfg: EncDecConfig, *lengths: int) -> None:
    if cfg.position == "learned" and max(lengths) > cfg.max_len:
        raise ValueError(f"sequence length {max(lengths)} exceeds max_len={cfg.max_len} (learned positions)")


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "dtype"))
def _init_state_jit(params, encoder_tokens_BS, encoder_mask_BS, cfg, max_len, dtype):
    B, S = encoder_tokens_BS.shape
    memory_BSD = encode(params, encoder_tokens_BS, cfg, encoder_mask_BS)
    shape = (cfg.n_decoder_layers, B, max_len, cfg.n_heads, cfg.attention.head_dim)
    return {
        "cross": jax.tree.map(lambda a: a.astype(dtype), cross_kv(params, memory_BSD, cfg)),
        "enc_pos_BS": _enc_key_positions(encoder_mask_BS, B, S),
        "self": {"k_BTHK": jnp.zeros(shape, dtype), "v_BTHK": jnp.zeros(shape, dtype)},
        "pos_BT": jnp.full((B, max_len), -1, jnp.int32),
        "index_B": jnp.zeros((B,), jnp.int32),
    }


def init_state(cfg: EncDecConfig, params: dict, encoder_tokens: "Int[Array, 'B S']", max_len: int | None = None,
               *, encoder_mask: "Int[Array, 'B S'] | None" = None, dtype=None) -> dict:
    """Decoding state: the encoder runs once here, and every decoder layer's cross-attention keys
    and values are projected once ("cross", stacked over layers); "self" is the self-attention
    cache of `max_len` slots (default cfg.max_len) for each layer, with the slot positions
    ("pos_BT", -1 empty) and the next slot ("index_B") shared by all layers.
    """
    _check_tokens("encoder_tokens", encoder_tokens, cfg)
    if encoder_mask is not None:
        checks.array("encoder_mask", encoder_mask, shape=tuple(encoder_tokens.shape))
    max_len = cfg.max_len if max_len is None else max_len
    checks.positive("init_state", "max_len", max_len)
    _check_lengths(cfg, encoder_tokens.shape[1], max_len)
    dtype = jnp.dtype(cfg.compute_dtype if dtype is None else dtype)
    return _init_state_jit(params, encoder_tokens, encoder_mask, cfg, max_len, dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_jit(params, tokens_BL, state, cfg):
    """Decoder tokens continuing `state` -> (logits fp32 [B, L, V], state). Traceable."""
    return _decode(params, tokens_BL, state["cross"], state["enc_pos_BS"], cfg, state)


def step(params: dict, tokens: "Int[Array, 'B']", state: dict, *, cfg: EncDecConfig):
    """One decoding step: tokens int32 [B] -> (logits float32 [B, V], next state)."""
    _check_tokens("tokens", tokens, cfg, rank=1, shape=(state["index_B"].shape[0],))
    model.check_room(state, 1)
    logits_B1V, state = decode_jit(params, tokens[:, None], state, cfg)
    return logits_B1V[:, 0], state


def loss(params: dict, encoder_tokens_BS, targets_BL, cfg: EncDecConfig, encoder_mask_BS=None,
         target_mask_BL=None) -> "Float[Array, '']":
    """Mean cross-entropy (fp32) of the targets under teacher forcing, over target_mask (all if None)."""
    decoder_tokens_BL = shift_right(targets_BL, cfg.decoder_start_id)
    logits_BLV = _forward_jit(params, encoder_tokens_BS, decoder_tokens_BL, encoder_mask_BS, cfg)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    if target_mask_BL is None:
        return jnp.mean(ce_BL)
    mask_BL = target_mask_BL.astype(jnp.float32)
    return jnp.sum(ce_BL * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id"))
def _greedy_jit(params, encoder_tokens_BS, encoder_mask_BS, cfg, max_new_tokens, eos_id):
    B = encoder_tokens_BS.shape[0]
    state = _init_state_jit(params, encoder_tokens_BS, encoder_mask_BS, cfg, max_new_tokens,
                            jnp.dtype(cfg.compute_dtype))

    def body(carry, _):
        token_B, done_B, state = carry
        logits_B1V, state = _decode(params, token_B[:, None], state["cross"], state["enc_pos_BS"], cfg, state)
        next_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
        out_B = jnp.where(done_B, -1, next_B)
        if eos_id is not None:
            done_B = done_B | (next_B == eos_id)
        return (next_B, done_B, state), out_B

    start_B = jnp.full((B,), cfg.decoder_start_id, jnp.int32)
    _, out_NB = jax.lax.scan(body, (start_B, jnp.zeros((B,), bool), state), None, length=max_new_tokens)
    return out_NB.T


def generate(params: dict, encoder_tokens: "Int[Array, 'B S']", cfg: EncDecConfig, *, max_new_tokens: int,
             encoder_mask: "Int[Array, 'B S'] | None" = None, eos_id: int | None = None) -> "Int[Array, 'B N']":
    """Greedy decoding from the start token: int32 [B, max_new_tokens], -1 after a row has
    produced `eos_id` (the eos itself is kept). One compile per (shapes, max_new_tokens)."""
    _check_tokens("encoder_tokens", encoder_tokens, cfg)
    checks.positive("generate", "max_new_tokens", max_new_tokens)
    if encoder_mask is not None:
        checks.array("encoder_mask", encoder_mask, shape=tuple(encoder_tokens.shape))
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id: expected a token id in [0, {cfg.vocab_size}), got {eos_id}")
    _check_lengths(cfg, encoder_tokens.shape[1], max_new_tokens)
    return _greedy_jit(params, encoder_tokens, encoder_mask, cfg, max_new_tokens, eos_id)


model.register_family(EncDecConfig, model.Family(param_specs=param_specs, forward=forward,
                                                 init_state=init_state, step=step))
