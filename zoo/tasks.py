"""Synthetic sequence tasks as data sources: MQAR, selective copying, induction heads, passkey.

Every task is a frozen, validated config plus a NumPy generator

    inputs_BL, targets_BL = batch(cfg, batch_size, rng)

that returns int32 arrays of shape [B, L]. The alignment is the usual next-token one (the
same as `zoo.data.random_windows`): `targets_BL[b, t]` is what the model should emit after
reading `inputs_BL[b, :t + 1]`. Unscored positions hold IGNORE (-100), so the loss/accuracy
mask is `targets_BL >= 0`. `Sampler(cfg, batch_size, seed)` draws batch `i` from `(seed, i)`
alone, like `WindowSampler`, so a resumed run sees the same batches.

Generation is vectorised over the batch (no Python loop over examples), so it stays cheap
next to a small model's train step.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from layers import checks
from zoo.data import SeededSampler

if TYPE_CHECKING:
    from jaxtyping import Int

#: Target value of positions that are not scored (PyTorch's ignore_index convention).
IGNORE = -100


def _positive(owner: str, cfg: Any, *fields: str) -> None:
    for field in fields:
        checks.positive(owner, field, getattr(cfg, field))


def _distinct_per_row(n_rows: int, n_choices: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n_rows, k] indices into range(n_choices), distinct within a row, in uniformly random order.

    Draw j picks a uniform rank r among the n_choices - j values not yet taken, then maps it to
    the value: with the taken values sorted as c_0 < c_1 < ..., it is r + #{i : c_i - i <= r}
    (c_i - i counts the free values below c_i, so it is non-decreasing). This costs O(k^2) per
    row instead of the O(n_choices) of ranking a random vector, which matters at V = 8192.
    """
    out_RK = np.empty((n_rows, k), np.int64)
    taken_RJ = np.empty((n_rows, 0), np.int64)  # sorted ascending per row
    for j in range(k):
        r_R = rng.integers(0, n_choices - j, size=n_rows)
        free_below_RJ = taken_RJ - np.arange(j)[None, :]
        v_R = r_R + (free_below_RJ <= r_R[:, None]).sum(axis=1)
        out_RK[:, j] = v_R
        taken_RJ = np.sort(np.concatenate([taken_RJ, v_R[:, None]], axis=1), axis=1)
    return out_RK


# --------------------------------------------------------------------------------------------
# Multi-query associative recall (Zoology, Arora et al. 2023)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MQARConfig:
    """Multi-query associative recall.

    Layout of one row (L = seq_len, kv = num_kv_pairs):
      positions [0, 2kv): the context `k1 v1 k2 v2 ...`, keys distinct from [1, V/2), values
        distinct from [V/2, V) (Zoology draws both without replacement);
      positions [2kv, L): filler, except key j at 2kv + 2*gap_j. The gaps are drawn without
        replacement from 0..(L - 2kv)//2 - 1 with probability proportional to a*i^(a-1)
        (i = gap + 1, a = power_a), so small gaps, i.e. queries soon after the context, dominate.
    The target at the position of each queried key is that key's value (the token that follows
    the key in the underlying L + 1 sequence, exactly Zoology's shifted labels); all else IGNORE.

    Attributes:
      vocab_size: V; must exceed seq_len (Zoology's condition).
      seq_len: L, even, at least 4 * num_kv_pairs.
      num_kv_pairs: kv, also the number of scored positions per row.
      power_a: the power-law exponent a > 0 (1.0 gives uniform gaps).
      random_filler: replace filler zeros in the query region with uniform tokens from [0, V)
        (Zoology's `random_non_queries`, on by default there); off here so token 0 is the filler.
    """

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_filler: bool = False

    def __post_init__(self):
        name = type(self).__name__
        _positive(name, self, "vocab_size", "seq_len", "num_kv_pairs")
        if self.seq_len % 2:
            checks.fail(name, "seq_len", "an even integer", self.seq_len)
        if self.vocab_size <= self.seq_len:
            checks.fail(name, "vocab_size", f"> seq_len={self.seq_len}", self.vocab_size)
        if 4 * self.num_kv_pairs > self.seq_len:
            checks.fail(name, "num_kv_pairs", f"<= seq_len/4 = {self.seq_len // 4}", self.num_kv_pairs)
        if not isinstance(self.power_a, (int, float, np.floating)) or isinstance(self.power_a, bool) \
                or not self.power_a > 0:
            checks.fail(name, "power_a", "a positive float", self.power_a)
        if not isinstance(self.random_filler, bool):
            checks.fail(name, "random_filler", "a bool", self.random_filler)

    @property
    def n_gaps(self) -> int:
        """Number of query slots: gaps are drawn from range(n_gaps)."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def gap_probs(self) -> np.ndarray:
        """p[g] proportional to a * (g + 1)^(a - 1): the first query's gap distribution."""
        a = float(self.power_a)
        w = a * np.arange(1, self.n_gaps + 1, dtype=np.float64) ** (a - 1)
        return w / w.sum()


def mqar_batch(cfg: MQARConfig, batch_size: int, rng: np.random.Generator
               ) -> tuple["Int[np.ndarray, 'B L']", "Int[np.ndarray, 'B L']"]:
    checks.positive("mqar_batch", "batch_size", batch_size)
    B, L, V, kv = batch_size, cfg.seq_len, cfg.vocab_size, cfg.num_kv_pairs
    half = V // 2
    keys_BK = 1 + _distinct_per_row(B, half - 1, kv, rng)
    values_BK = half + _distinct_per_row(B, V - half, kv, rng)

    # Sequential sampling without replacement proportional to p (what np.random.choice with
    # replace=False, p=... does) equals the descending order of log p + Gumbel noise
    # (Plackett-Luce / Gumbel-top-k), which vectorises over the batch.
    scores_BG = np.log(cfg.gap_probs())[None, :] + rng.gumbel(size=(B, cfg.n_gaps))
    top_BK = np.argpartition(-scores_BG, kv - 1, axis=1)[:, :kv]
    order_BK = np.argsort(-np.take_along_axis(scores_BG, top_BK, axis=1), axis=1)
    gaps_BK = np.take_along_axis(top_BK, order_BK, axis=1)  # gaps_BK[:, j] is the j-th draw

    inputs_BL = np.zeros((B, L), np.int32)
    inputs_BL[:, 0:2 * kv:2] = keys_BK
    inputs_BL[:, 1:2 * kv:2] = values_BK
    query_pos_BK = 2 * kv + 2 * gaps_BK
    if cfg.random_filler:
        noise_BL = rng.integers(0, V, size=(B, L), dtype=np.int32)
        inputs_BL[:, 2 * kv:] = noise_BL[:, 2 * kv:]
    np.put_along_axis(inputs_BL, query_pos_BK, keys_BK, axis=1)
    targets_BL = np.full((B, L), IGNORE, np.int32)
    np.put_along_axis(targets_BL, query_pos_BK, values_BK, axis=1)
    return inputs_BL, targets_BL


# --------------------------------------------------------------------------------------------
# Selective copying (Mamba, Gu & Dao 2023)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectiveCopyConfig:
    """Copy the data tokens scattered in a noisy prefix, in order, after a marker.

    Tokens: NOISE (0) fills the prefix, MARKER (1) asks for output, data tokens come from
    [2, vocab_size). Layout: positions [0, L - n) are the prefix with n data tokens at sorted
    random positions; positions [L - n, L) hold MARKER, and the target at L - n + i is the i-th
    data token. The answer region is markers, not teacher-forced data, so the model must
    count how many it has already emitted (as in the Mamba paper's task).

    Attributes:
      vocab_size: V >= 3 (noise, marker and at least one data token).
      seq_len: L >= 2 * n_tokens_to_copy.
      n_tokens_to_copy: n, the number of scored positions per row.
    """

    NOISE = 0
    MARKER = 1

    vocab_size: int = 16
    seq_len: int = 64
    n_tokens_to_copy: int = 8

    def __post_init__(self):
        name = type(self).__name__
        _positive(name, self, "vocab_size", "seq_len", "n_tokens_to_copy")
        if self.vocab_size < 3:
            checks.fail(name, "vocab_size", ">= 3 (noise, marker, data)", self.vocab_size)
        if self.seq_len < 2 * self.n_tokens_to_copy:
            checks.fail(name, "seq_len", f">= 2 * n_tokens_to_copy = {2 * self.n_tokens_to_copy}",
                        self.seq_len)


def selective_copy_batch(cfg: SelectiveCopyConfig, batch_size: int, rng: np.random.Generator
                         ) -> tuple["Int[np.ndarray, 'B L']", "Int[np.ndarray, 'B L']"]:
    checks.positive("selective_copy_batch", "batch_size", batch_size)
    B, L, n = batch_size, cfg.seq_len, cfg.n_tokens_to_copy
    prefix = L - n
    data_BN = rng.integers(2, cfg.vocab_size, size=(B, n), dtype=np.int32)
    # Sorted positions keep the data in reading order, which is the order to copy.
    pos_BN = np.sort(_distinct_per_row(B, prefix, n, rng), axis=1)
    inputs_BL = np.full((B, L), cfg.NOISE, np.int32)
    np.put_along_axis(inputs_BL, pos_BN, data_BN, axis=1)
    inputs_BL[:, prefix:] = cfg.MARKER
    targets_BL = np.full((B, L), IGNORE, np.int32)
    targets_BL[:, prefix:] = data_BN
    return inputs_BL, targets_BL


# --------------------------------------------------------------------------------------------
# Induction heads
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class InductionConfig:
    """Predict the token that followed the first occurrence of a trigger, at its second one.

    Tokens: TRIGGER is vocab_size - 1; the rest of the row is uniform over [0, vocab_size - 1).
    The trigger occurs exactly twice: at a uniform position p in [0, L - 2) and as the last
    input token (L - 1), whose target is inputs[p + 1]. One scored position per row.

    Attributes:
      vocab_size: V >= 3.
      seq_len: L >= 3.
    """

    vocab_size: int = 16
    seq_len: int = 64

    def __post_init__(self):
        name = type(self).__name__
        _positive(name, self, "vocab_size", "seq_len")
        if self.vocab_size < 3:
            checks.fail(name, "vocab_size", ">= 3", self.vocab_size)
        if self.seq_len < 3:
            checks.fail(name, "seq_len", ">= 3", self.seq_len)

    @property
    def trigger(self) -> int:
        return self.vocab_size - 1


def induction_batch(cfg: InductionConfig, batch_size: int, rng: np.random.Generator
                    ) -> tuple["Int[np.ndarray, 'B L']", "Int[np.ndarray, 'B L']"]:
    checks.positive("induction_batch", "batch_size", batch_size)
    B, L = batch_size, cfg.seq_len
    inputs_BL = rng.integers(0, cfg.trigger, size=(B, L), dtype=np.int32)
    first_B = rng.integers(0, L - 2, size=B)  # p + 1 <= L - 2, so the answer precedes the query
    rows_B = np.arange(B)
    inputs_BL[rows_B, first_B] = cfg.trigger
    inputs_BL[:, -1] = cfg.trigger
    targets_BL = np.full((B, L), IGNORE, np.int32)
    targets_BL[:, -1] = inputs_BL[rows_B, first_B + 1]
    return inputs_BL, targets_BL


# --------------------------------------------------------------------------------------------
# Passkey retrieval (byte vocabulary)
# --------------------------------------------------------------------------------------------

#: Filler bytes: lowercase letters and space, so no digit and no '.' appears outside the needle.
FILLER_BYTES = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", np.uint8).astype(np.int32)
PASSKEY_PREFIX = b" the pass key is "
PASSKEY_SUFFIX = b". "
PASSKEY_QUERY = b" what is the pass key? the pass key is "


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyConfig:
    """Find "the pass key is <digits>" hidden in random filler, and repeat the digits at the end.

    Bytes (vocab 256, ASCII). The underlying sequence of L + 1 bytes is
      filler with the needle `PASSKEY_PREFIX + digits + PASSKEY_SUFFIX` at a uniform depth,
      then PASSKEY_QUERY, then the digits;
    inputs are its first L bytes, targets its last L with only the n_digits answer bytes kept
    (the answer is teacher-forced: the last n_digits targets, the digits, are scored).

    Attributes:
      seq_len: L; must leave room for the needle, the query and the answer.
      n_digits: length of the pass key.
    """

    seq_len: int = 256
    n_digits: int = 5

    def __post_init__(self):
        name = type(self).__name__
        _positive(name, self, "seq_len", "n_digits")
        if self.seq_len < self.min_seq_len:
            checks.fail(name, "seq_len", f">= {self.min_seq_len} for n_digits={self.n_digits}", self.seq_len)

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def needle_len(self) -> int:
        return len(PASSKEY_PREFIX) + self.n_digits + len(PASSKEY_SUFFIX)

    @property
    def min_seq_len(self) -> int:
        # The full sequence (L + 1 bytes) must hold the needle, the query and the answer.
        return self.needle_len + len(PASSKEY_QUERY) + self.n_digits - 1


def passkey_batch(cfg: PasskeyConfig, batch_size: int, rng: np.random.Generator
                  ) -> tuple["Int[np.ndarray, 'B L']", "Int[np.ndarray, 'B L']"]:
    checks.positive("passkey_batch", "batch_size", batch_size)
    B, L, n = batch_size, cfg.seq_len, cfg.n_digits
    tail_T = np.frombuffer(PASSKEY_QUERY, np.uint8).astype(np.int32)
    hay = L + 1 - len(tail_T) - n  # filler + needle region of the L + 1 sequence
    digits_BN = rng.integers(ord("0"), ord("9") + 1, size=(B, n), dtype=np.int32)
    needle_BN = np.concatenate([
        np.broadcast_to(np.frombuffer(PASSKEY_PREFIX, np.uint8).astype(np.int32), (B, len(PASSKEY_PREFIX))),
        digits_BN,
        np.broadcast_to(np.frombuffer(PASSKEY_SUFFIX, np.uint8).astype(np.int32), (B, len(PASSKEY_SUFFIX))),
    ], axis=1)
    hay_BH = FILLER_BYTES[rng.integers(0, len(FILLER_BYTES), size=(B, hay))]
    start_B = rng.integers(0, hay - cfg.needle_len + 1, size=B)
    rel_BH = np.arange(hay)[None, :] - start_B[:, None]  # index into the needle, if inside it
    inside_BH = (rel_BH >= 0) & (rel_BH < cfg.needle_len)
    picked_BH = np.take_along_axis(needle_BN, np.clip(rel_BH, 0, cfg.needle_len - 1), axis=1)
    hay_BH = np.where(inside_BH, picked_BH, hay_BH)
    seq_BS = np.concatenate([hay_BH, np.broadcast_to(tail_T, (B, len(tail_T))), digits_BN], axis=1)
    targets_BL = np.full((B, L), IGNORE, np.int32)
    targets_BL[:, L - n:] = digits_BN
    return np.ascontiguousarray(seq_BS[:, :-1], dtype=np.int32), targets_BL


# --------------------------------------------------------------------------------------------
# Dispatch, sampling, scoring
# --------------------------------------------------------------------------------------------

_GENERATORS = {
    MQARConfig: mqar_batch,
    SelectiveCopyConfig: selective_copy_batch,
    InductionConfig: induction_batch,
    PasskeyConfig: passkey_batch,
}


#: Task names for the command line (`zoo train --task NAME`) -> config class.
TASKS = {"mqar": MQARConfig, "selective_copy": SelectiveCopyConfig, "induction": InductionConfig,
         "passkey": PasskeyConfig}


def batch(cfg: Any, batch_size: int, rng: np.random.Generator
          ) -> tuple["Int[np.ndarray, 'B L']", "Int[np.ndarray, 'B L']"]:
    """(inputs_BL, targets_BL) int32 for any task config; targets are IGNORE where unscored."""
    gen = _GENERATORS.get(type(cfg))
    if gen is None:
        names = ", ".join(c.__name__ for c in _GENERATORS)
        raise TypeError(f"batch: cfg: expected one of {names}, got {type(cfg).__name__}")
    return gen(cfg, batch_size, rng)


class Sampler(SeededSampler):
    """Deterministic iterator over task batches: batch `i` depends only on `(seed, i)`, the
    contract of `zoo.data.SeededSampler` (so a resumed run sees the same batches)."""

    def __init__(self, cfg: Any, batch_size: int, seed: int = 0, *, step: int = 0):
        self.cfg = cfg
        super().__init__(batch_size, seed, step=step)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return batch(self.cfg, self.batch_size, self.rng(index))

    def __repr__(self) -> str:
        return (f"Sampler({self.cfg!r}, batch_size={self.batch_size}, seed={self.seed}, "
                f"step={self._step})")


def accuracy(logits_or_predictions: Any, targets_BL: Any) -> float:
    """Fraction of scored positions (targets >= 0) predicted exactly.

    Takes logits [B, L, V] (argmax over the last axis) or integer predictions [B, L].
    """
    targets_BL = np.asarray(targets_BL)
    pred = np.asarray(logits_or_predictions)
    if pred.ndim == targets_BL.ndim + 1:
        pred = pred.argmax(axis=-1)
    elif pred.ndim != targets_BL.ndim:
        raise ValueError(
            f"accuracy: logits_or_predictions: expected shape {targets_BL.shape} or "
            f"{targets_BL.shape} + (V,), got {pred.shape}"
        )
    if pred.shape != targets_BL.shape:
        raise ValueError(f"accuracy: logits_or_predictions: expected leading shape {targets_BL.shape}, "
                         f"got {pred.shape}")
    mask = targets_BL >= 0
    if not mask.any():
        raise ValueError("accuracy: targets_BL: expected at least one scored position (>= 0), got none")
    return float((pred[mask] == targets_BL[mask]).mean())
