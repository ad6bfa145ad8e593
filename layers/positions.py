"""Position information: rotary embeddings (with context-extension scalings), ALiBi, sinusoidal
and learned absolute embeddings.

Positions are always passed per token (`pos_BL`), never implied by the index along L, so packed
sequences, left padding and KV caches with arbitrary offsets all use the same code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from layers import checks
from layers.params import ParamSpec, normal

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

_LAYOUTS = ("half", "interleaved")
_SCALINGS = (None, "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Attributes:
    theta: base of the geometric frequency sequence, inv_freq[i] = theta ** (-2i / rot_dim).
    layout: which dims form a rotated pair. "half": (i, i + R/2), as Llama / HF `rotate_half`;
      "interleaved": (2i, 2i+1), as GPT-J and the rope part of DeepSeek's MLA.
    fraction: partial rotary; the first round(fraction * K) dims are rotated (must be even),
      the rest pass through unchanged.
    scaling: context-extension method, or None for plain RoPE.
    factor: context-extension factor (>= 1 when a scaling is set).
    original_max_len: context length the model was trained with.
    low_freq_factor, high_freq_factor: llama3 wavelength thresholds (original_max_len / factor).
    beta_fast, beta_slow: yarn rotation counts bounding the interpolation ramp.
    attention_factor: yarn multiplier on cos and sin; None means 0.1 * ln(factor) + 1. Models that
      derive it from mscale / mscale_all_dim (DeepSeek) pass the resulting value here. For
      longrope, None means sqrt(1 + ln(factor) / ln(original_max_len)) (1 when factor is 1).
    short_factor, long_factor: longrope (Phi-3) per-pair divisors of the plain frequencies, one per
      rotated pair (rot_dim / 2 each). A call whose largest position + 1 exceeds original_max_len
      uses long_factor, otherwise short_factor, for every token of the call (as transformers does):
      decoding past the boundary keeps the short-factor rotation of keys already in the cache.
    """

    theta: float = 10000.0
    layout: Literal["half", "interleaved"] = "half"
    fraction: float = 1.0
    scaling: Literal[None, "linear", "dynamic", "yarn", "llama3", "longrope"] = None
    factor: float = 1.0
    original_max_len: int = 2048
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        owner = "RopeConfig"
        if not self.theta > 0:
            checks.fail(owner, "theta", "a positive float", self.theta)
        checks.one_of(owner, "layout", self.layout, _LAYOUTS)
        checks.one_of(owner, "scaling", self.scaling, _SCALINGS)
        if not 0.0 < self.fraction <= 1.0:
            checks.fail(owner, "fraction", "a float in (0, 1]", self.fraction)
        checks.positive(owner, "original_max_len", self.original_max_len)
        if self.scaling is not None and not self.factor >= 1.0:
            checks.fail(owner, "factor", f"a float >= 1 with scaling={self.scaling!r}", self.factor)
        if self.scaling == "llama3":
            if not self.low_freq_factor > 0:
                checks.fail(owner, "low_freq_factor", "a positive float", self.low_freq_factor)
            if not self.high_freq_factor > self.low_freq_factor:
                checks.fail(owner, "high_freq_factor",
                            f"a float > low_freq_factor={self.low_freq_factor}", self.high_freq_factor)
        if self.scaling == "yarn":
            if not self.beta_fast > 0:
                checks.fail(owner, "beta_fast", "a positive float", self.beta_fast)
            if not self.beta_slow > 0:
                checks.fail(owner, "beta_slow", "a positive float", self.beta_slow)
            if self.attention_factor is not None and not self.attention_factor > 0:
                checks.fail(owner, "attention_factor", "a positive float or None", self.attention_factor)
        if self.scaling == "longrope":
            for name in ("short_factor", "long_factor"):
                value = getattr(self, name)
                # A tuple keeps the config hashable (it is a static jit argument).
                if not (isinstance(value, tuple) and value and all(
                        isinstance(v, (int, float)) and v > 0 for v in value)):
                    checks.fail(owner, name, "a non-empty tuple of positive floats with scaling='longrope'", value)
            if len(self.short_factor) != len(self.long_factor):
                checks.fail(owner, "long_factor", f"{len(self.short_factor)} entries, as short_factor has",
                            len(self.long_factor))
            if self.attention_factor is not None and not self.attention_factor > 0:
                checks.fail(owner, "attention_factor", "a positive float or None", self.attention_factor)
        elif self.short_factor is not None or self.long_factor is not None:
            checks.fail(owner, "short_factor", "None unless scaling='longrope'", self.short_factor)


def rotary_dim(cfg: RopeConfig, head_dim: int) -> int:
    """Number of leading dims of a head that are rotated."""
    rot_dim = round(cfg.fraction * head_dim)
    if rot_dim < 2 or rot_dim % 2:
        raise ValueError(
            f"RopeConfig.fraction={cfg.fraction} with head dim {head_dim} gives rotary dim {rot_dim}; "
            "expected an even number >= 2"
        )
    return rot_dim


def _yarn_inv_freq(cfg: RopeConfig, inv_R2: np.ndarray, rot_dim: int) -> np.ndarray:
    # Pair index at which a frequency completes `n_rot` turns over the original context.
    def correction_dim(n_rot: float) -> float:
        return rot_dim * math.log(cfg.original_max_len / (n_rot * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # 0 below `low` (keep: high frequencies extrapolate), 1 above `high` (interpolate by factor).
    ramp_R2 = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return inv_R2 * (1.0 - ramp_R2) + (inv_R2 / cfg.factor) * ramp_R2


def _llama3_inv_freq(cfg: RopeConfig, inv_R2: np.ndarray) -> np.ndarray:
    wavelen_R2 = 2 * math.pi / inv_R2
    # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between blended.
    smooth_R2 = (cfg.original_max_len / wavelen_R2 - cfg.low_freq_factor) / (
        cfg.high_freq_factor - cfg.low_freq_factor)
    blended_R2 = (1.0 - smooth_R2) * inv_R2 / cfg.factor + smooth_R2 * inv_R2
    return np.where(
        wavelen_R2 < cfg.original_max_len / cfg.high_freq_factor,
        inv_R2,
        np.where(wavelen_R2 > cfg.original_max_len / cfg.low_freq_factor, inv_R2 / cfg.factor, blended_R2),
    )


def _longrope_inv_freq(cfg: RopeConfig, inv_R2: np.ndarray, seq_len: Any) -> tuple[Any, float]:
    half = inv_R2.shape[0]
    for name in ("short_factor", "long_factor"):
        if len(getattr(cfg, name)) != half:
            raise ValueError(f"RopeConfig.{name}: expected {half} entries (rot_dim / 2), "
                             f"got {len(getattr(cfg, name))}")
    short_R2 = jnp.asarray((inv_R2 / np.asarray(cfg.short_factor, np.float64)).astype(np.float32))
    long_R2 = jnp.asarray((inv_R2 / np.asarray(cfg.long_factor, np.float64)).astype(np.float32))
    if cfg.attention_factor is not None:
        multiplier = float(cfg.attention_factor)
    elif cfg.factor > 1:
        multiplier = math.sqrt(1.0 + math.log(cfg.factor) / math.log(cfg.original_max_len))
    else:
        multiplier = 1.0
    if seq_len is None:
        return short_R2, multiplier
    # seq_len may be traced (decoding), so the choice is a select, not a Python branch.
    return jnp.where(jnp.asarray(seq_len) > cfg.original_max_len, long_R2, short_R2), multiplier


def inv_frequencies(cfg: RopeConfig, rot_dim: int, seq_len: Any = None) -> tuple["Float[Array, 'R2']", float]:
    """Inverse frequencies [rot_dim // 2] (float32) and the multiplier applied to cos and sin.

    `seq_len` (a Python int or a traced int scalar) is read by "dynamic" and "longrope" only.
    dynamic: beyond original_max_len the base grows to theta * (factor * seq_len / original_max_len
    - (factor - 1)) ** (rot_dim / (rot_dim - 2)); up to it the plain frequencies are returned.
    longrope: plain frequencies divided by long_factor when seq_len > original_max_len, else (and
    when seq_len is None) by short_factor.
    """
    if not isinstance(rot_dim, (int, np.integer)) or rot_dim < 2 or rot_dim % 2:
        raise ValueError(f"inv_frequencies: rot_dim must be an even integer >= 2, got {rot_dim!r}")
    # Static frequencies in float64, rounded once to float32.
    exponent_R2 = np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim
    inv_R2 = cfg.theta ** -exponent_R2
    multiplier = 1.0
    if cfg.scaling == "linear":
        inv_R2 = inv_R2 / cfg.factor
    elif cfg.scaling == "yarn":
        inv_R2 = _yarn_inv_freq(cfg, inv_R2, rot_dim)
        if cfg.attention_factor is not None:
            multiplier = float(cfg.attention_factor)
        elif cfg.factor > 1:
            multiplier = 0.1 * math.log(cfg.factor) + 1.0
    elif cfg.scaling == "llama3":
        inv_R2 = _llama3_inv_freq(cfg, inv_R2)
    elif cfg.scaling == "longrope":
        return _longrope_inv_freq(cfg, inv_R2, seq_len)
    inv_R2 = jnp.asarray(inv_R2.astype(np.float32))

    if cfg.scaling == "dynamic" and seq_len is not None:
        if rot_dim <= 2:
            raise ValueError(f"inv_frequencies: dynamic scaling needs rot_dim > 2, got {rot_dim}")
        # seq_len may be traced (it grows during decoding), so this part is jnp, not NumPy.
        n = jnp.asarray(seq_len).astype(jnp.float32)
        # Clamped so the unused branch of the where below never takes a fractional power of a negative.
        n_long = jnp.maximum(n, jnp.float32(cfg.original_max_len))
        grown = (cfg.factor * n_long / cfg.original_max_len - (cfg.factor - 1.0)) ** (rot_dim / (rot_dim - 2))
        # Exactly 1 within the original context, so the plain frequencies come back bit for bit.
        base_scale = jnp.where(n > cfg.original_max_len, grown, jnp.float32(1.0))
        # (theta * s) ** -e == theta ** -e * s ** -e
        inv_R2 = inv_R2 * base_scale ** jnp.asarray(-exponent_R2.astype(np.float32))
    return inv_R2, multiplier


def apply_rope(x_BLHK: "Float[Array, 'B L H K']", pos_BL: "Int[Array, 'B L']", *,
               cfg: RopeConfig) -> "Float[Array, 'B L H K']":
    """Rotate the first rot_dim dims of each head by angle pos * inv_freq.

    The rotation is computed in float32 and the result returned in x's dtype; pass-through dims
    (partial rotary) are returned untouched. For "dynamic" and "longrope" scaling the frequencies
    follow seq_len = max(pos_BL) + 1, so they change once decoding passes original_max_len.
    """
    # Floating check by jnp: NumPy does not count bfloat16 as np.floating.
    checks.array("x_BLHK", x_BLHK, rank=4)
    if not jnp.issubdtype(x_BLHK.dtype, jnp.floating):
        raise TypeError(f"x_BLHK: expected a floating dtype, got {x_BLHK.dtype}")
    B, L, H, K = x_BLHK.shape
    checks.array("pos_BL", pos_BL, rank=2, kind="i", shape=(B, L))
    R = rotary_dim(cfg, K)
    half = R // 2

    seq_len = jnp.max(pos_BL) + 1 if cfg.scaling in ("dynamic", "longrope") else None
    inv_R2, multiplier = inv_frequencies(cfg, R, seq_len)
    angle_BLR2 = pos_BL.astype(jnp.float32).reshape(B, L, 1) * inv_R2.reshape(1, 1, half)
    # One angle per (token, pair), shared by all heads.
    cos_BL1R2 = jnp.cos(angle_BLR2).reshape(B, L, 1, half)
    sin_BL1R2 = jnp.sin(angle_BLR2).reshape(B, L, 1, half)
    if multiplier != 1.0:
        cos_BL1R2 = cos_BL1R2 * multiplier
        sin_BL1R2 = sin_BL1R2 * multiplier

    rot_BLHR = x_BLHK[..., :R].astype(jnp.float32)
    if cfg.layout == "half":
        a_BLHR2, b_BLHR2 = rot_BLHR[..., :half], rot_BLHR[..., half:]
    else:
        a_BLHR2, b_BLHR2 = rot_BLHR[..., 0::2], rot_BLHR[..., 1::2]
    # (a, b) -> (a cos - b sin, b cos + a sin): a 2-D rotation of each pair.
    new_a_BLHR2 = a_BLHR2 * cos_BL1R2 - b_BLHR2 * sin_BL1R2
    new_b_BLHR2 = b_BLHR2 * cos_BL1R2 + a_BLHR2 * sin_BL1R2
    if cfg.layout == "half":
        out_BLHR = jnp.concatenate([new_a_BLHR2, new_b_BLHR2], axis=-1)
    else:
        out_BLHR = jnp.stack([new_a_BLHR2, new_b_BLHR2], axis=-1).reshape(B, L, H, R)
    out_BLHR = out_BLHR.astype(x_BLHK.dtype)
    if R == K:
        return out_BLHR
    return jnp.concatenate([out_BLHR, x_BLHK[..., R:]], axis=-1)


def alibi_slopes(n_heads: int) -> "np.ndarray":
    """ALiBi head slopes [H] (float32), as in Press et al. and HF's `build_alibi_tensor`.

    For a power of two n: 2 ** (-8 i / n), i = 1..n. Otherwise the n' = largest power of two below
    n gets those slopes, and the remaining n - n' heads take every other slope of the 2n' sequence
    (its 1st, 3rd, ...), which interleaves between the existing ones.
    """
    checks.positive("alibi_slopes", "n_heads", n_heads)

    def geometric(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, n + 1, dtype=np.float64) / n)

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes_H = np.concatenate([geometric(p), geometric(2 * p)[0::2][: n_heads - p]])
    return slopes_H.astype(np.float32)


def alibi_bias(slopes_H: "Float[Array, 'H']", q_pos_BL: "Int[Array, 'B L']", k_pos_BS: "Int[Array, 'B S']",
               *, causal: bool) -> "Float[Array, 'B H L S']":
    """Additive attention bias, float32 [B, H, L, S].

    causal: -slope * (q_pos - k_pos), meaningful only where k_pos <= q_pos (the rest is masked
    anyway); bidirectional: -slope * |q_pos - k_pos|.
    """
    checks.array("slopes_H", slopes_H, rank=1)
    checks.array("q_pos_BL", q_pos_BL, rank=2, kind="i")
    B, L = q_pos_BL.shape
    checks.array("k_pos_BS", k_pos_BS, rank=2, kind="i", shape=(B, None))
    S = k_pos_BS.shape[1]
    H = slopes_H.shape[0]

    rel_BLS = q_pos_BL.astype(jnp.int32).reshape(B, L, 1) - k_pos_BS.astype(jnp.int32).reshape(B, 1, S)
    dist_BLS = rel_BLS if causal else jnp.abs(rel_BLS)
    slopes_1H11 = jnp.asarray(slopes_H).astype(jnp.float32).reshape(1, H, 1, 1)
    return -slopes_1H11 * dist_BLS.astype(jnp.float32).reshape(B, 1, L, S)


def sinusoidal(pos_BL: "Int[Array, 'B L']", d_model: int, *, max_timescale: float = 10000.0,
               dtype: Any = jnp.float32) -> "Float[Array, 'B L D']":
    """Fixed sinusoidal table of "Attention is all you need", laid out [sin | cos] (not interleaved):
    out[..., i] = sin(pos * w_i), out[..., D/2 + i] = cos(pos * w_i), w_i = max_timescale ** (-2i / D).
    """
    if not isinstance(d_model, (int, np.integer)) or d_model < 2 or d_model % 2:
        raise ValueError(f"sinusoidal: d_model must be an even integer >= 2, got {d_model!r}")
    checks.array("pos_BL", pos_BL, rank=2)
    B, L = pos_BL.shape
    half = d_model // 2
    inv_D2 = jnp.asarray((max_timescale ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model))
                         .astype(np.float32))
    angle_BLD2 = pos_BL.astype(jnp.float32).reshape(B, L, 1) * inv_D2.reshape(1, 1, half)
    return jnp.concatenate([jnp.sin(angle_BLD2), jnp.cos(angle_BLD2)], axis=-1).astype(dtype)


def learned_param_specs(max_len: int, d_model: int, init_std: float = 0.02) -> dict[str, ParamSpec]:
    checks.positive("learned_param_specs", "max_len", max_len)
    checks.positive("learned_param_specs", "d_model", d_model)
    return {"pos_PD": ParamSpec((max_len, d_model), ("positions", "embed"), normal(init_std), decay=False)}


def learned(params: dict, pos_BL: "Int[Array, 'B L']", dtype: Any = jnp.float32) -> "Float[Array, 'B L D']":
    """Learned absolute position embeddings: row pos of the table.

    Concrete positions outside [0, max_len) raise; under tracing the check is skipped and
    out-of-range rows come back as NaN (jnp.take's fill mode), never as a silently clamped row.
    """
    table_PD = params["pos_PD"]
    max_len = table_PD.shape[0]
    checks.array("pos_BL", pos_BL, rank=2, kind="i")
    if not isinstance(pos_BL, jax.core.Tracer):
        values = np.asarray(pos_BL)
        if values.size:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= max_len:
                raise ValueError(
                    f"pos_BL: positions must lie in [0, max_len={max_len}), got values in [{lo}, {hi}]"
                )
    return jnp.take(table_PD, pos_BL, axis=0, mode="fill", fill_value=jnp.nan).astype(dtype)
