"""Named model configurations. Tiny presets run on a laptop CPU (byte-level vocabulary);
full-size ones carry the published shapes for compile and memory reports.

`get(name, **overrides)` rebuilds the preset from its keyword arguments, so an override such as
`d_model=128` reaches every block that depends on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.moe import MoEConfig
from layers.norms import NormConfig
from layers.positions import RopeConfig
from zoo.config import BlockConfig, ModelConfig

_PRESETS: dict[str, tuple[Callable[..., ModelConfig], dict]] = {}

# Overrides accepted by every builder besides its architecture-specific ones.
_MODEL_FIELDS = ("max_len", "dtype", "param_dtype", "scan_layers", "remat", "init_std", "impl")


def register(name: str, builder: Callable[..., ModelConfig], **defaults) -> None:
    _PRESETS[name] = (builder, defaults)


KINDS = ("decoder", "encoder", "encoder-decoder")


def names(kind: str | None = None) -> list[str]:
    """Preset names; `kind` keeps those of one model kind (KINDS): most tools (generation,
    comparisons, the train command) work on decoders."""
    if kind is None:
        return sorted(_PRESETS)
    if kind not in KINDS:
        raise ValueError(f"names: kind must be one of {KINDS} or None, got {kind!r}")
    return [n for n in sorted(_PRESETS) if kind_of(n) == kind]


def kind_of(name: str) -> str:
    """"decoder", "encoder" or "encoder-decoder": the kind of model the preset builds."""
    cfg = get(name)
    return {"ModelConfig": "decoder", "EncoderConfig": "encoder", "EncDecConfig": "encoder-decoder"}[
        type(cfg).__name__]


def get(name: str, **overrides) -> ModelConfig:
    """The preset `name` with keyword overrides (vocab_size, d_model, n_layers, n_heads, ...)."""
    if name not in _PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; known presets: {', '.join(names())}")
    builder, defaults = _PRESETS[name]
    unknown = sorted(set(overrides) - set(defaults) - set(_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"preset {name!r}: unknown override(s) {unknown}; "
                         f"accepted: {sorted(set(defaults) | set(_MODEL_FIELDS))}")
    return builder(**{**defaults, **overrides})


def _finish(cfg_kwargs: dict, extra: dict, config_cls: type = ModelConfig) -> Any:
    """Apply the model-wide overrides (dtype, remat, ...) and the attention impl."""
    impl = extra.pop("impl", None)
    if impl is not None:
        # Only mixers with several implementations (attention, MLA) take the override.
        for field in ("pattern", "prefix"):
            cfg_kwargs[field] = tuple(
                dataclasses.replace(b, mixer=dataclasses.replace(b.mixer, impl=impl)) if hasattr(b.mixer, "impl")
                else b for b in cfg_kwargs.get(field, ()))
    return config_cls(**cfg_kwargs, **extra)


def _attn(d_model, n_heads, n_kv_heads, head_dim=None, **kw) -> AttentionConfig:
    return AttentionConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, **kw)


def gpt2(*, vocab_size, d_model, n_layers, n_heads, d_ff, max_len, **extra) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, GELU MLP, biases everywhere, tied embeddings."""
    norm = NormConfig(kind="layer", eps=1e-5)
    block = BlockConfig(
        mixer=_attn(d_model, n_heads, n_heads, rope=None, use_bias=True, out_bias=True),
        ffn=MLPConfig(d_model=d_model, d_ff=d_ff, activation="gelu_tanh", gated=False, use_bias=True),
        norm=norm)
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,),
                        max_len=max_len, position="learned", tie_embeddings=True, final_norm=norm), extra)


def llama(*, vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_len, rope_theta=10000.0,
          sliding_window=None, rope_scaling=None, rope_factor=1.0, tie_embeddings=False,
          norm_eps=1e-5, **extra) -> ModelConfig:
    """Llama / Mistral: RMSNorm, RoPE (half rotation), SwiGLU, GQA, optional sliding window."""
    rope = RopeConfig(theta=rope_theta, scaling=rope_scaling, factor=rope_factor,
                      original_max_len=max_len if rope_scaling is None else 8192)
    norm = NormConfig(kind="rms", eps=norm_eps)
    block = BlockConfig(
        # With a window, decoding keeps a ring of `sliding_window` slots (Mistral's rotating
        # buffer): the same logits as a full-length cache, in memory that does not grow.
        mixer=_attn(d_model, n_heads, n_kv_heads, rope=rope, sliding_window=sliding_window,
                    rolling_cache=sliding_window is not None),
        ffn=MLPConfig(d_model=d_model, d_ff=d_ff, activation="silu", gated=True),
        norm=norm)
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,),
                        max_len=max_len, tie_embeddings=tie_embeddings, final_norm=norm), extra)


def moe_llama(*, vocab_size, d_model, n_layers, n_heads, n_kv_heads, max_len, moe: dict, **extra) -> ModelConfig:
    """A Llama block whose channel mixer is a mixture of experts (Mixtral, Switch, Qwen-MoE)."""
    norm = NormConfig(kind="rms", eps=1e-5)
    block = BlockConfig(mixer=_attn(d_model, n_heads, n_kv_heads, rope=RopeConfig()),
                        ffn=MoEConfig(d_model=d_model, **moe), norm=norm)
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,),
                        max_len=max_len, final_norm=norm), extra)


def recurrent(*, vocab_size, d_model, n_layers, max_len, mixer: Callable[[int], Any],
              ffn: Callable[[int], Any] | None = None, norm_kind="rms", tie_embeddings=True,
              **extra) -> ModelConfig:
    """A stack of one linear-time mixer (with an optional channel mixer); `mixer` and `ffn` build
    the sub-layer configs from d_model, so width overrides reach them."""
    norm = NormConfig(kind=norm_kind, eps=1e-5)
    block = BlockConfig(mixer=mixer(d_model), ffn=None if ffn is None else ffn(d_model), norm=norm)
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,),
                        max_len=max_len, tie_embeddings=tie_embeddings, final_norm=norm), extra)


def _mlp(ratio: float, activation: str = "silu", gated: bool = True) -> Callable[[int], MLPConfig]:
    return lambda d: MLPConfig(d_model=d, d_ff=int(ratio * d), activation=activation, gated=gated)


def _lazy(module: str, cls: str, **kwargs) -> Callable[[int], Any]:
    """A sub-layer config factory importing its family only when the preset is built."""
    def make(d_model: int):
        import importlib
        return getattr(importlib.import_module(module), cls)(d_model=d_model, **kwargs)
    return make


def xlstm(*, vocab_size, d_model, n_layers, max_len, n_heads, slstm_at=(1,), group=8, **extra) -> ModelConfig:
    """xLSTM: mLSTM blocks (up-projection inside the mixer, no ffn) with an sLSTM block (gated
    GELU ffn) at the `slstm_at` positions of each group of `group` blocks (7:1 by default)."""
    from layers.mlstm import MLSTMConfig
    from layers.slstm import SLSTMConfig
    norm = NormConfig(kind="layer", use_bias=False, eps=1e-5)
    m = BlockConfig(mixer=MLSTMConfig(d_model=d_model, n_heads=n_heads, proj_factor=2.0, conv_width=4,
                                      form="chunkwise", chunk_size=64), ffn=None, norm=norm)
    # d_ff: 4/3 * d_model rounded up to a multiple of 64, as the reference's sLSTM blocks.
    d_ff = -(-4 * d_model // 3 // 64) * 64
    s = BlockConfig(mixer=SLSTMConfig(d_model=d_model, n_heads=n_heads, conv_width=4),
                    ffn=MLPConfig(d_model=d_model, d_ff=d_ff, activation="gelu", gated=True), norm=norm)
    pattern = tuple(s if i in slstm_at else m for i in range(group))
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=pattern,
                        max_len=max_len, final_norm=norm), extra)


def xlstm7b(**kwargs) -> ModelConfig:
    """xLSTM-7B (transformers' xLSTM): pre-RMSNorm mLSTM (layers.mlstm_large) + SwiGLU blocks,
    soft-capped gates and logits; built where its converter lives (zoo.convert.xlstm)."""
    from zoo.convert.xlstm import model_config
    return model_config(**kwargs)


def hybrid(*, vocab_size, d_model, n_layers, max_len, n_heads, n_kv_heads, d_ff, attn_every=4,
           moe: dict | None = None, **extra) -> ModelConfig:
    """Jamba-like: one attention block per `attn_every` blocks, the rest Mamba; every block has a
    SwiGLU channel mixer, or MoE on every other block when `moe` is given. A pattern, not code:
    the group of `attn_every` heterogeneous blocks is what the layer scan repeats."""
    from layers.mamba import MambaConfig
    norm = NormConfig(kind="rms", eps=1e-5)
    attn = _attn(d_model, n_heads, n_kv_heads, rope=None)  # Jamba uses no positional encoding
    mamba = MambaConfig(d_model=d_model, d_state=16, expand=2)
    mlp = MLPConfig(d_model=d_model, d_ff=d_ff)

    def ffn(i):
        return MoEConfig(d_model=d_model, **moe) if moe is not None and i % 2 == 1 else mlp

    pattern = tuple(BlockConfig(mixer=attn if i == attn_every // 2 else mamba, ffn=ffn(i), norm=norm)
                    for i in range(attn_every))
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=pattern,
                        max_len=max_len, final_norm=norm), extra)


def deepseek(*, vocab_size, d_model, n_layers, max_len, n_heads, kv_lora_rank, q_lora_rank, nope_dim,
             rope_dim, v_dim, moe: dict | None, d_ff=None, first_k_dense=0, **extra) -> ModelConfig:
    """DeepSeek-V2/V3: multi-head latent attention (the cache holds only the latent and a shared
    rope key) with a mixture of experts (sigmoid routing with bias, shared experts) or an MLP.
    The first `first_k_dense` blocks use a dense SwiGLU of width d_ff instead of the MoE
    (DeepSeek's first_k_dense_replace); they run unscanned before the scanned MoE blocks."""
    from layers.mla import MLAConfig
    norm = NormConfig(kind="rms", eps=1e-6)
    mla = MLAConfig(d_model=d_model, n_heads=n_heads, kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank,
                    qk_nope_head_dim=nope_dim, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
                    rope=RopeConfig(layout="interleaved"))
    dense = None if d_ff is None else MLPConfig(d_model=d_model, d_ff=d_ff)
    ffn = MoEConfig(d_model=d_model, **moe) if moe is not None else dense
    block = BlockConfig(mixer=mla, ffn=ffn, norm=norm)
    prefix = (BlockConfig(mixer=mla, ffn=dense, norm=norm),) * first_k_dense
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,),
                        prefix=prefix, max_len=max_len, final_norm=norm), extra)


def bert(*, vocab_size, d_model, n_layers, n_heads, d_ff, max_len, type_vocab_size=2, norm_eps=1e-12,
         output="mlm", activation="gelu", **extra):
    """BERT: bidirectional post-norm blocks (LayerNorm, biases everywhere, GELU MLP), learned
    positions and token types, embedding LayerNorm, pooler and tied masked-LM head."""
    from zoo.encoder import EncoderConfig
    norm = NormConfig(kind="layer", eps=norm_eps)
    block = BlockConfig(
        mixer=_attn(d_model, n_heads, n_heads, rope=None, causal=False, use_bias=True, out_bias=True),
        ffn=MLPConfig(d_model=d_model, d_ff=d_ff, activation=activation, gated=False, use_bias=True),
        norm=norm, norm_position="post")
    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, pattern=(block,),
                        max_len=max_len, type_vocab_size=type_vocab_size, embed_norm=norm, mlm_norm=norm,
                        output=output, mlm_activation=activation), extra, EncoderConfig)


def t5(*, vocab_size, d_model, n_layers, n_heads, d_ff, max_len, head_dim=None, n_decoder_layers=None,
       version="1.1", n_buckets=32, max_distance=128, **extra):
    """T5: pre-norm RMSNorm (no mean, no bias), no score scaling, relative position buckets shared
    across each stack. version "1.0": ReLU MLP, tied embeddings with logits rescaled by
    d_model ** -0.5; "1.1": gated GELU (tanh) MLP, separate LM head. n_layers: encoder blocks
    (the decoder has as many unless n_decoder_layers is given)."""
    from zoo.encdec import EncDecConfig
    if version not in ("1.0", "1.1"):
        raise ValueError(f"t5: version must be '1.0' or '1.1', got {version!r}")
    v10 = version == "1.0"
    extra.setdefault("init_std", 1.0)  # T5 initialises its embeddings with std 1
    return _finish_encdec(dict(
        vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, head_dim=head_dim, d_ff=d_ff,
        n_encoder_layers=n_layers, n_decoder_layers=n_decoder_layers or n_layers,
        activation="relu" if v10 else "gelu_tanh", gated=not v10, norm=NormConfig(kind="rms", eps=1e-6),
        position="relative", n_buckets=n_buckets, max_distance=max_distance, max_len=max_len, query_scale=1.0,
        tie_embeddings=v10, scale_tied_logits=True, decoder_start_id=0), extra)


def bart(*, vocab_size, d_model, n_layers, n_heads, d_ff, max_len, n_decoder_layers=None, **extra):
    """BART: post-norm LayerNorm blocks with biases, learned positions per stack, an embedding
    LayerNorm, GELU MLP, 1/sqrt(head_dim) scaling, tied embeddings without rescale; decoding starts
    from </s> (id 2). n_layers: encoder blocks (the decoder has as many unless given)."""
    return _finish_encdec(dict(
        vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, d_ff=d_ff,
        n_encoder_layers=n_layers, n_decoder_layers=n_decoder_layers or n_layers,
        activation="gelu", gated=False, norm=NormConfig(kind="layer", eps=1e-5), norm_position="post",
        final_norm=False, embed_norm=True, position="learned", max_len=max_len, query_scale=None,
        use_bias=True, tie_embeddings=True, scale_tied_logits=False, decoder_start_id=2), extra)


def _finish_encdec(cfg_kwargs: dict, extra: dict):
    from zoo.encdec import EncDecConfig
    impl = extra.pop("impl", None)
    if impl is not None:
        cfg_kwargs["impl"] = impl
    return EncDecConfig(**cfg_kwargs, **extra)


def gemma2(*, vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, max_len,
           sliding_window, attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=None,
           **extra) -> ModelConfig:
    """Gemma 2: alternating local (sliding window) and global attention, sandwich RMSNorms with
    weights around zero, GeGLU, attention and final logit softcaps, embeddings scaled by sqrt(D)."""
    norm = NormConfig(kind="rms", eps=1e-6, scale_offset=1.0)
    scale = (query_pre_attn_scalar or head_dim) ** -0.5
    ffn = MLPConfig(d_model=d_model, d_ff=d_ff, activation="gelu_tanh", gated=True)

    def block(window):
        mixer = _attn(d_model, n_heads, n_kv_heads, head_dim, rope=RopeConfig(theta=10000.0),
                      sliding_window=window, rolling_cache=window is not None, logit_softcap=attn_softcap,
                      query_scale=scale)
        return BlockConfig(mixer=mixer, ffn=ffn, norm=norm, norm_position="sandwich")

    return _finish(dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                        pattern=(block(sliding_window), block(None)), max_len=max_len,
                        tie_embeddings=True, final_norm=norm, final_logit_softcap=final_softcap,
                        embed_scale=math.sqrt(d_model)), extra)


_TINY = dict(vocab_size=256, d_model=64, n_layers=2, max_len=256)
register("gpt2-tiny", gpt2, **_TINY, n_heads=4, d_ff=256)
register("llama-tiny", llama, **_TINY, n_heads=4, n_kv_heads=2, d_ff=172)
register("mistral-tiny", llama, **_TINY, n_heads=4, n_kv_heads=2, d_ff=172, sliding_window=16)
register("gemma2-tiny", gemma2, **_TINY, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, sliding_window=16)
register("mixtral-tiny", moe_llama, **_TINY, n_heads=4, n_kv_heads=2,
         moe=dict(d_ff=128, n_experts=8, top_k=2, router="softmax", renormalize=True, load_balance_weight=0.02))
register("switch-tiny", moe_llama, **_TINY, n_heads=4, n_kv_heads=4,
         moe=dict(d_ff=128, n_experts=8, top_k=1, router="switch", dispatch="capacity", capacity_factor=1.25,
                  load_balance_weight=0.01, router_z_weight=1e-3))
register("qwen-moe-tiny", moe_llama, **_TINY, n_heads=4, n_kv_heads=2,
         moe=dict(d_ff=64, n_experts=8, top_k=2, router="softmax", renormalize=False, n_shared_experts=2,
                  load_balance_weight=0.01))

register("hybrid-tiny", hybrid, **{**_TINY, "n_layers": 8}, n_heads=4, n_kv_heads=2, d_ff=128)
register("xlstm-tiny", xlstm, **{**_TINY, "n_layers": 8}, n_heads=4)
register("xlstm7b-tiny", xlstm7b, **_TINY, n_heads=4, chunk_size=16)
register("mingru-tiny", recurrent, **{**_TINY, "n_layers": 3}, mixer=_lazy("layers.mingru", "MinGRUConfig", expand=1.5),
         ffn=_mlp(4, "gelu", gated=False))
register("minlstm-tiny", recurrent, **{**_TINY, "n_layers": 3}, mixer=_lazy("layers.mingru", "MinLSTMConfig", expand=1.5),
         ffn=_mlp(4, "gelu", gated=False))
register("retnet-tiny", recurrent, **_TINY, mixer=_lazy("layers.retnet", "RetNetConfig", n_heads=4),
         ffn=_mlp(2, "gelu"), norm_kind="layer", tie_embeddings=False)
register("gla-tiny", recurrent, **_TINY, mixer=_lazy("layers.gla", "GLAConfig", n_heads=4), ffn=_mlp(2.75))
register("linear-attention-tiny", recurrent, **_TINY,
         mixer=_lazy("layers.gla", "LinearAttentionConfig", n_heads=4, feature_map="elu1"), ffn=_mlp(2.75))
register("rwkv4-tiny", recurrent, **_TINY, norm_kind="layer", tie_embeddings=False,
         mixer=_lazy("layers.rwkv4", "RWKV4TimeMixConfig", form="chunked", chunk_size=32),
         ffn=_lazy("layers.rwkv4", "RWKV4ChannelMixConfig", d_ff=256))
register("rwkv7-tiny", recurrent, **_TINY, norm_kind="layer", tie_embeddings=False,
         mixer=_lazy("layers.rwkv7", "RWKV7TimeMixConfig", head_dim=16, decay_lora=16, a_lora=16, gate_lora=16,
                     form="chunked", chunk_size=16),
         ffn=_lazy("layers.rwkv7", "RWKV7ChannelMixConfig", d_ff=256))
register("mamba-tiny", recurrent, **{**_TINY, "n_layers": 4},
         mixer=_lazy("layers.mamba", "MambaConfig", d_state=16, expand=2, chunk_size=64))
register("mamba2-tiny", recurrent, **{**_TINY, "n_layers": 4},
         mixer=_lazy("layers.mamba2", "Mamba2Config", d_state=16, head_dim=16, expand=2, chunk_size=64))
register("deepseek-tiny", deepseek, **{**_TINY, "n_layers": 3}, n_heads=4, kv_lora_rank=32, q_lora_rank=48,
         nope_dim=16, rope_dim=8, v_dim=16, first_k_dense=1, d_ff=128,
         moe=dict(d_ff=64, n_experts=16, top_k=4, router="sigmoid", renormalize=True, routed_scaling=2.5,
                  n_groups=4, topk_groups=2, n_shared_experts=1, load_balance_weight=0.0))
register("mla-tiny", deepseek, **_TINY, n_heads=4, kv_lora_rank=32, q_lora_rank=None, nope_dim=16, rope_dim=8,
         v_dim=16, moe=None, d_ff=172)
register("deltanet-tiny", recurrent, **_TINY, ffn=_mlp(3),
         mixer=_lazy("layers.deltanet", "DeltaNetConfig", n_heads=2, head_dim=32, gated=False))
register("gated-deltanet-tiny", recurrent, **_TINY, ffn=_mlp(3),
         mixer=_lazy("layers.deltanet", "DeltaNetConfig", n_heads=2, head_dim=32, gated=True))
register("bert-tiny", bert, **{**_TINY, "max_len": 128}, n_heads=4, d_ff=256, output="mlm")

register("t5-tiny", t5, **_TINY, n_heads=4, d_ff=128, version="1.0", n_buckets=8, max_distance=20)
register("t5v1.1-tiny", t5, **_TINY, n_heads=4, d_ff=96, version="1.1", n_buckets=8, max_distance=20)
register("bart-tiny", bart, **{**_TINY, "max_len": 128}, n_heads=4, d_ff=128)

# Published shapes (for AOT compile and memory reports; too large to train on a CPU).
register("gpt2-small", gpt2, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024)
register("llama3-8b", llama, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
         d_ff=14336, max_len=8192, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0)
register("mistral-7b", llama, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
         d_ff=14336, max_len=32768, sliding_window=4096)
register("bert-base", bert, vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=512)
register("t5-base", t5, vocab_size=32128, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=512,
         version="1.0")
register("bart-base", bart, vocab_size=50265, d_model=768, n_layers=6, n_heads=12, d_ff=3072, max_len=1024)
register("gemma2-2b", gemma2, vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
         head_dim=256, d_ff=9216, max_len=8192, sliding_window=4096, query_pre_attn_scalar=256)
register("xlstm-7b", xlstm7b, vocab_size=50304, d_model=4096, n_layers=32, n_heads=8, max_len=8192)
