"""Token sampling: penalties, temperature and the truncation filters, composable, all in fp32.

Order (as Hugging Face's logits processors): penalties on raw logits -> temperature -> top-k ->
top-p -> min-p -> sample. `temperature == 0` is greedy decoding. Every function takes [B, V]
logits and is jit-safe; the config is static.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Attributes:
    temperature: 0 for greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
    min_p: drop tokens whose probability is below min_p times the most likely one's (0 = off).
    repetition_penalty: seen tokens' logits are divided by it when positive, multiplied when
      negative (CTRL; 1 = off).
    frequency_penalty: subtract this times the token's count so far (OpenAI style; 0 = off).
    presence_penalty: subtract this once from every token seen so far (0 = off).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        name = "SamplingConfig"
        if not self.temperature >= 0:
            checks.fail(name, "temperature", "a float >= 0", self.temperature)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            checks.fail(name, "top_k", "an integer >= 0", self.top_k)
        if not 0 < self.top_p <= 1:
            checks.fail(name, "top_p", "a float in (0, 1]", self.top_p)
        if not 0 <= self.min_p < 1:
            checks.fail(name, "min_p", "a float in [0, 1)", self.min_p)
        if not self.repetition_penalty > 0:
            checks.fail(name, "repetition_penalty", "a float > 0", self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits_BV: "Float[Array, 'B V']", counts_BV: "Int[Array, 'B V']",
                    cfg: SamplingConfig) -> "Float[Array, 'B V']":
    """counts_BV: how often each token occurred so far (prompt and generated)."""
    logits_BV = logits_BV.astype(jnp.float32)
    seen_BV = counts_BV > 0
    if cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        penalised = jnp.where(logits_BV > 0, logits_BV / p, logits_BV * p)
        logits_BV = jnp.where(seen_BV, penalised, logits_BV)
    if cfg.frequency_penalty:
        logits_BV = logits_BV - cfg.frequency_penalty * counts_BV.astype(jnp.float32)
    if cfg.presence_penalty:
        logits_BV = logits_BV - cfg.presence_penalty * seen_BV.astype(jnp.float32)
    return logits_BV


def top_k_filter(logits_BV, k: int):
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, NEG_INF)


def top_p_filter(logits_BV, p: float):
    """Keep the smallest prefix of the sorted distribution whose mass reaches p (ties kept)."""
    if p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # The last kept token is the one whose preceding mass is still below p.
    n_keep_B1 = jnp.sum(mass_before_BV < p, axis=-1, keepdims=True)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, NEG_INF)


def min_p_filter(logits_BV, min_p: float):
    if min_p <= 0:
        return logits_BV
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    floor_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logits_BV >= floor_B1, logits_BV, NEG_INF)


def processed_logits(logits_BV, counts_BV, cfg: SamplingConfig):
    """The logits a sample is drawn from (-inf where filtered), after every processor."""
    logits_BV = apply_penalties(logits_BV, counts_BV, cfg)
    if cfg.greedy:
        return logits_BV
    logits_BV = logits_BV / cfg.temperature
    logits_BV = top_k_filter(logits_BV, cfg.top_k)
    logits_BV = top_p_filter(logits_BV, cfg.top_p)
    return min_p_filter(logits_BV, cfg.min_p)


def sample(key: jax.Array, logits_BV: "Float[Array, 'B V']", counts_BV: "Int[Array, 'B V']",
           cfg: SamplingConfig) -> "Int[Array, 'B']":
    logits_BV = processed_logits(logits_BV, counts_BV, cfg)
    if cfg.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
