"""The families `zoo compare` trains, and the solver that sizes each to one parameter budget.

A family is a builder `(d_model, d_ff) -> ModelConfig` for a 2-layer model (Zoology's depth)
with tied embeddings. `d_ff` is the width of the family's channel mixer (MLP, MoE expert,
RWKV channel mix); families without one (Mamba, Mamba-2, xLSTM's fixed sLSTM MLP) ignore it.

Budgets count non-embedding parameters (Kaplan et al.'s convention): the embedding table is
V x D for every family and would otherwise dominate these small models. `solve` finds d_model
by bisection on multiples of the family's width step (8, or 4 without a channel mixer; the
nearest count wins), then, where the family has a channel mixer, d_ff by bisection on
integers. Channel-mixer families land within 2% of the target and the others within 10% (half
a width step); the report states each count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from layers import params as P
from zoo import model as zmodel
from zoo import presets
from zoo.config import ModelConfig

#: Depth of every compared model (Zoology compares 2-layer models).
N_LAYERS = 2
#: d_model moves in steps of this by default (every family's head sizes divide it).
WIDTH_STEP = 8
#: Window of the sliding-window family, in tokens (shorter than every task's sequence).
SWA_WINDOW = 32
#: Std of the (tied) embedding initialisation of every compared model. The project default 0.02
#: (GPT-2's, for wide models) leaves these d 24-64 models on MQAR's ln(4) plateau for well over
#: 1,500 steps; at 1.0 (unit-scale token vectors, as T5 and PyTorch's nn.Embedding) a 2-layer
#: d 64 Llama leaves it after ~400 steps (docs/compare.md, "MQAR on a CPU").
EMBED_INIT_STD = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """Attributes:
    name: the key used in results.json and on the command line.
    build: (vocab_size, max_len, d_model, d_ff) -> ModelConfig.
    ffn_ratio: default d_ff / d_model; None when the family has no resizable channel mixer.
    description: one line for the report.
    width_step: d_model is a multiple of this (finer for families without a d_ff knob).
    """

    name: str
    build: Callable[[int, int, int, int], ModelConfig]
    ffn_ratio: float | None
    description: str
    width_step: int = WIDTH_STEP

    def config(self, *, vocab_size: int, max_len: int, d_model: int, d_ff: int | None = None) -> ModelConfig:
        if d_ff is None:
            d_ff = max(1, round((self.ffn_ratio or 4.0) * d_model))
        return dataclasses.replace(self.build(vocab_size, max_len, d_model, d_ff), init_std=EMBED_INIT_STD)


def _llama(window: int | None):
    def build(V, L, d, ff):
        # With a window, `presets.llama` decodes from a ring of `window` slots: constant state and
        # time per token, which is what the comparison reports for `swa`.
        return presets.llama(vocab_size=V, d_model=d, n_layers=N_LAYERS, n_heads=2, n_kv_heads=2, d_ff=ff,
                             max_len=L, sliding_window=window, tie_embeddings=True)
    return build


def _moe(V, L, d, ff):
    return presets.moe_llama(vocab_size=V, d_model=d, n_layers=N_LAYERS, n_heads=2, n_kv_heads=2, max_len=L,
                             moe=dict(d_ff=ff, n_experts=4, top_k=2, router="softmax", renormalize=True,
                                      load_balance_weight=0.01),
                             tie_embeddings=True)


def _mla(V, L, d, ff):
    return presets.deepseek(vocab_size=V, d_model=d, n_layers=N_LAYERS, max_len=L, n_heads=2,
                            kv_lora_rank=d // 2, q_lora_rank=None, nope_dim=d // 4, rope_dim=8,
                            v_dim=d // 2, moe=None, d_ff=ff, tie_embeddings=True)


def _recurrent(mixer: Callable[[int], Any], ffn: Callable[[int, int], Any] | None, norm_kind: str = "rms"):
    def build(V, L, d, ff):
        return presets.recurrent(vocab_size=V, d_model=d, n_layers=N_LAYERS, max_len=L, mixer=mixer,
                                 ffn=None if ffn is None else (lambda dd: ffn(dd, ff)), norm_kind=norm_kind,
                                 tie_embeddings=True)
    return build


def _swiglu(d, ff):
    from layers.mlp import MLPConfig
    return MLPConfig(d_model=d, d_ff=ff, activation="silu", gated=True)


def _gelu_mlp(d, ff):
    from layers.mlp import MLPConfig
    return MLPConfig(d_model=d, d_ff=ff, activation="gelu", gated=False)


def _mamba(d):
    from layers.mamba import MambaConfig
    return MambaConfig(d_model=d, d_state=16, expand=2, chunk_size=64)


def _mamba2(d):
    from layers.mamba2 import Mamba2Config
    # Chunk 16: the same function (forms are tested equal), 1.6x faster training step on CPU at
    # compare sizes (docs/recurrent_performance.md).
    return Mamba2Config(d_model=d, d_state=16, head_dim=8, expand=2, chunk_size=16)


def _rwkv7(d):
    from layers.rwkv7 import RWKV7TimeMixConfig
    return RWKV7TimeMixConfig(d_model=d, head_dim=8, decay_lora=16, a_lora=16, gate_lora=16, form="chunked",
                              chunk_size=16)


def _rwkv7_ffn(d, ff):
    from layers.rwkv7 import RWKV7ChannelMixConfig
    return RWKV7ChannelMixConfig(d_model=d, d_ff=ff)


def _retnet(d):
    from layers.positions import RopeConfig
    from layers.retnet import RetNetConfig
    return RetNetConfig(d_model=d, n_heads=2, rope=RopeConfig())


def _gla(d):
    from layers.gla import GLAConfig
    return GLAConfig(d_model=d, n_heads=2)


def _gated_deltanet(d):
    from layers.deltanet import DeltaNetConfig
    return DeltaNetConfig(d_model=d, n_heads=2, gated=True, chunk_size=16)  # as mamba2: faster on CPU


def _mingru(d):
    from layers.mingru import MinGRUConfig
    return MinGRUConfig(d_model=d, expand=1.5)


def _xlstm(V, L, d, ff):
    # One mLSTM and one sLSTM block (the 1:1 ratio of the paper's smallest xLSTM[1:1]).
    return presets.xlstm(vocab_size=V, d_model=d, n_layers=N_LAYERS, max_len=L, n_heads=4, group=2,
                         slstm_at=(1,), tie_embeddings=True)


def _hybrid(V, L, d, ff):
    return presets.hybrid(vocab_size=V, d_model=d, n_layers=N_LAYERS, max_len=L, n_heads=2, n_kv_heads=2,
                          d_ff=ff, attn_every=2, tie_embeddings=True)


_SWIGLU = 8 / 3
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="transformer", build=_llama(None), ffn_ratio=_SWIGLU,
           description="Llama: RoPE attention (2 heads) + SwiGLU"),
    Family(name="swa", build=_llama(SWA_WINDOW), ffn_ratio=_SWIGLU,
           description=f"Llama with sliding-window attention (window {SWA_WINDOW}; decodes from a ring of "
                       f"{SWA_WINDOW} slots)"),
    Family(name="moe", build=_moe, ffn_ratio=1.0,
           description="Llama attention + mixture of 4 SwiGLU experts, top-2"),
    Family(name="mla", build=_mla, ffn_ratio=_SWIGLU,
           description="multi-head latent attention (DeepSeek-V2) + SwiGLU"),
    Family(name="mamba", build=_recurrent(_mamba, None), ffn_ratio=None,
           description="Mamba (selective SSM, d_state 16, expand 2), no MLP", width_step=4),
    Family(name="mamba2", build=_recurrent(_mamba2, None), ffn_ratio=None,
           description="Mamba-2 (SSD, d_state 16, head_dim 8), no MLP", width_step=4),
    Family(name="rwkv7", build=_recurrent(_rwkv7, _rwkv7_ffn, norm_kind="layer"), ffn_ratio=4.0,
           description="RWKV-7 time mix (generalised delta rule) + channel mix"),
    Family(name="retnet", build=_recurrent(_retnet, _swiglu, norm_kind="layer"), ffn_ratio=_SWIGLU,
           description="RetNet retention (2 heads) + SwiGLU"),
    Family(name="xlstm", build=_xlstm, ffn_ratio=None,
           description="xLSTM: one mLSTM and one sLSTM block", width_step=4),
    Family(name="mingru", build=_recurrent(_mingru, _gelu_mlp), ffn_ratio=4.0,
           description="minGRU (expand 1.5, short conv) + GELU MLP"),
    Family(name="gla", build=_recurrent(_gla, _swiglu), ffn_ratio=_SWIGLU,
           description="gated linear attention (2 heads) + SwiGLU"),
    Family(name="gated_deltanet", build=_recurrent(_gated_deltanet, _swiglu), ffn_ratio=_SWIGLU,
           description="Gated DeltaNet (2 heads, short convs) + SwiGLU"),
    Family(name="hybrid", build=_hybrid, ffn_ratio=_SWIGLU,
           description="Jamba-like: one Mamba and one attention block, SwiGLU in both"),
)}


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family: unknown name {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts from the specs (nothing is allocated)."""
    specs = zmodel.param_specs(cfg)
    total = P.count(specs)
    embedding = P.count(specs["embed"]) + P.count(specs.get("pos", {}))
    return total, total - embedding


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sized:
    """A family solved for a budget: its config, widths and non-embedding parameter count."""

    family: str
    cfg: ModelConfig
    d_model: int
    d_ff: int | None
    params: int
    non_embedding_params: int
    target: int


def _bisect(count: Callable[[int], int], lo: int, hi: int, target: int) -> int:
    """The integer x in [lo, hi] whose count(x) is nearest `target`, for a non-decreasing count."""
    while count(hi) < target and hi < 1 << 16:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda x: abs(count(x) - target))


def solve(name: str, target: int, *, vocab_size: int, max_len: int) -> Sized:
    """Size family `name` to `target` non-embedding parameters (see the module docstring)."""
    fam = get(name)
    if target < 1:
        raise ValueError(f"solve: target: expected a positive parameter count, got {target}")

    def by_width(k: int) -> int:
        return count_params(fam.config(vocab_size=vocab_size, max_len=max_len, d_model=k * fam.width_step))[1]

    k = _bisect(by_width, 2, 16, target)
    d = k * fam.width_step
    d_ff = None
    if fam.ffn_ratio is not None:
        def by_ff(ff: int) -> int:
            return count_params(fam.config(vocab_size=vocab_size, max_len=max_len, d_model=d, d_ff=ff))[1]
        d_ff = _bisect(by_ff, 1, 8 * d, target)
    cfg = fam.config(vocab_size=vocab_size, max_len=max_len, d_model=d, d_ff=d_ff)
    total, non_embedding = count_params(cfg)
    return Sized(family=name, cfg=cfg, d_model=d, d_ff=d_ff, params=total, non_embedding_params=non_embedding,
                 target=target)
