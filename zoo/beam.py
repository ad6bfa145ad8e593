"""Beam search for every family: the decoding state is reordered by parent beam each step, so
attention caches and recurrent states are handled alike.

One jitted function per (cfg, beam size, prompt bucket, cache length, number of stop tokens,
early_stopping): the prompt is left-padded to a bucket (as `zoo.generate`) and prefilled once with
batch 1, the state is tiled to `beam_size` rows, then a `lax.while_loop` with a traced bound
(`max_new_tokens`) runs the steps. Each step scores all beam_size * V continuations with an fp32
log-softmax, keeps the best candidates, moves those ending with a stop token (ranked among the
first beam_size, as Hugging Face) into a finished pool and continues with the best beam_size
others. A finished hypothesis scores sum(logprob) / length ** length_penalty, where length counts
the generated tokens (the stop token included). Hypotheses still live when the loop runs out of
tokens join the pool with the same normalisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layers import checks
from zoo import model
from zoo.generate import bucket

if TYPE_CHECKING:
    from jaxtyping import Array, Int

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class BeamResult:
    """sequences: generated ids per hypothesis, best first (a stop token, when hit, is the last
    one); scores: their length-normalised sum of log-probabilities, in the same order."""

    sequences: list[list[int]]
    scores: list[float]


def state_batch_axes(state: dict) -> Any:
    """The batch axis of every leaf of a model state (same tree structure, ints): leaves under
    state["blocks"] are stacked over layers first, so their batch axis is 1; others (pos_B) 0."""
    def axis(path, leaf):
        first = path[0] if path else None
        return 1 if isinstance(first, jax.tree_util.DictKey) and first.key == "blocks" else 0

    return jax.tree_util.tree_map_with_path(axis, state)


def reorder_state(state: dict, parent_K: "Int[Array, 'K']") -> dict:
    """Row k of the result is row parent_K[k] of `state`, for every leaf along its batch axis.
    With parent_K = zeros(K) this tiles a batch-1 state to K rows."""
    axes = state_batch_axes(state)
    return jax.tree.map(lambda leaf, ax: jnp.take(leaf, parent_K, axis=ax), state, axes)


def _merge(score_A, seq_AN, score_C, seq_CN, k: int):
    """The k best of two scored pools (earlier entries win ties)."""
    score_M = jnp.concatenate([score_A, score_C])
    seq_MN = jnp.concatenate([seq_AN, seq_CN], axis=0)
    best_k, idx_k = jax.lax.top_k(score_M, k)
    return best_k, seq_MN[idx_k]


@functools.partial(jax.jit, static_argnames=("cfg", "beam_size", "cache_len", "early_stopping"))
def beam_jit(params, prompt_1P, prompt_len, max_new, stop_S, length_penalty, *, cfg, beam_size: int,
             cache_len: int, early_stopping: bool):
    """-> (finished scores [K] float32 best first, -inf where empty; sequences [K, N], -1 padded)."""
    K = beam_size
    _, P = prompt_1P.shape
    N = cache_len - P
    f32 = jnp.float32
    t_1P = jnp.arange(P, dtype=jnp.int32)[None, :]
    pad = P - prompt_len
    seg_1P = (t_1P >= pad).astype(jnp.int32)
    pos_1P = jnp.maximum(t_1P - pad, 0)
    state = model.init_state(cfg, 1, cache_len)
    logits_1PV, state, _ = model._forward(params, prompt_1P, cfg, state, pos_1P, seg_1P)
    V = logits_1PV.shape[-1]
    state = reorder_state(state, jnp.zeros((K,), jnp.int32))
    logits_KV = jnp.repeat(logits_1PV[:, -1], K, axis=0)
    # Enough candidates that K non-stop ones remain even if every beam proposes every stop token.
    C = min(max(2, 1 + stop_S.shape[0]) * K, K * V)
    is_stop_V = jnp.zeros((V,), bool).at[stop_S].set(True)
    lp = jnp.asarray(length_penalty, f32)
    rank_C = jnp.arange(C, dtype=jnp.int32)

    def cond(carry):
        i, *_, done = carry
        return (i < max_new) & ~done

    def body(carry):
        i, logits_KV, state, score_K, out_KN, fin_K, fin_KN, _ = carry
        logp_KV = jax.nn.log_softmax(logits_KV.astype(f32), axis=-1)
        cand_KV = score_K[:, None] + logp_KV
        cand_C, flat_C = jax.lax.top_k(cand_KV.reshape(-1), C)
        parent_C, token_C = flat_C // V, flat_C % V
        stop_C = is_stop_V[token_C]
        seq_CN = out_KN[parent_C].at[:, i].set(token_C)
        length = (i + 1).astype(f32)
        finished_C = jnp.where(stop_C & (rank_C < K), cand_C / length ** lp, NEG_INF)
        fin_K, fin_KN = _merge(fin_K, fin_KN, finished_C, seq_CN, K)
        score_K, idx_K = jax.lax.top_k(jnp.where(stop_C, NEG_INF, cand_C), K)
        token_K, out_KN = token_C[idx_K], seq_CN[idx_K]
        state = reorder_state(state, parent_C[idx_K])
        logits_K1V, state, _ = model._forward(params, token_K[:, None], cfg, state)
        full = jnp.sum((fin_K > NEG_INF).astype(jnp.int32)) >= K
        if early_stopping:
            done = full
        else:
            # The best any live beam can still reach: logprobs only lower its sum, so the bound
            # is its sum at the most favourable length (longest when length_penalty > 0).
            best_len = jnp.where(lp > 0, max_new, jnp.minimum(i + 2, max_new)).astype(f32)
            bound = score_K[0] / best_len ** lp
            done = (full & (jnp.min(fin_K) >= bound)) | (score_K[0] == NEG_INF)
        return i + 1, logits_K1V[:, 0], state, score_K, out_KN, fin_K, fin_KN, done

    init = (jnp.int32(0), logits_KV, state,
            jnp.where(jnp.arange(K) == 0, f32(0.0), f32(NEG_INF)),
            jnp.full((K, N), -1, jnp.int32), jnp.full((K,), NEG_INF, f32), jnp.full((K, N), -1, jnp.int32),
            jnp.asarray(False))
    i, _, _, score_K, out_KN, fin_K, fin_KN, done = jax.lax.while_loop(cond, body, init)
    # Live beams join the pool when the loop ran out of tokens (not when it stopped early).
    live_K = jnp.where(done, NEG_INF, score_K / i.astype(f32) ** lp)
    return _merge(fin_K, fin_KN, live_K, out_KN, K)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def beam_search(params: Any, prompt: Sequence[int], cfg: model.ModelConfig, *, beam_size: int,
                max_new_tokens: int, length_penalty: float = 1.0, early_stopping: bool = True,
                stop_tokens: Sequence[int] = (), cache_len: int | None = None) -> BeamResult:
    """The `beam_size` best continuations of one prompt, best first.

    length_penalty: finished scores are sum(logprob) / length ** length_penalty (0: raw sums;
      > 0 favours longer hypotheses).
    early_stopping: True stops as soon as beam_size hypotheses have finished; False continues
      until no live beam can beat the worst of beam_size finished ones (or tokens run out).
    cache_len: the decoding cache length (compile bucket); defaults to cfg.max_len. Any
      max_new_tokens that fits reuses the same compiled program.
    """
    if not isinstance(cfg, model.ModelConfig):
        raise TypeError(f"cfg: expected a zoo ModelConfig, got {type(cfg).__name__}")
    if hasattr(prompt, "ndim"):
        checks.array("prompt", prompt, rank=1, kind="i")
    row = np.asarray(prompt, np.int64).reshape(-1)
    if row.size == 0:
        raise ValueError("prompt: expected at least one token")
    checks.token_range("prompt", row, cfg.vocab_size)
    _positive_int("beam_size", beam_size)
    _positive_int("max_new_tokens", max_new_tokens)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty: expected a finite float, got {length_penalty!r}")
    stops = [int(t) for t in stop_tokens]
    if stops:
        checks.token_range("stop_tokens", np.asarray(stops), cfg.vocab_size)
    cache_len = cfg.max_len if cache_len is None else cache_len
    _positive_int("cache_len", cache_len)
    if row.size + max_new_tokens > cache_len:
        raise ValueError(f"prompt: length {row.size} + max_new_tokens {max_new_tokens} exceeds the cache length "
                         f"{cache_len} (cache_len argument, default cfg.max_len)")
    P = max(row.size, min(bucket(row.size), cache_len - max_new_tokens))
    prompt_1P = np.zeros((1, P), np.int32)
    prompt_1P[0, P - row.size:] = row
    score_K, seq_KN = beam_jit(params, jnp.asarray(prompt_1P), jnp.int32(row.size), jnp.int32(max_new_tokens),
                               jnp.asarray(stops, jnp.int32).reshape(-1), jnp.float32(length_penalty),
                               cfg=cfg, beam_size=beam_size, cache_len=cache_len,
                               early_stopping=bool(early_stopping))
    score_K, seq_KN = np.asarray(score_K), np.asarray(seq_KN)[:, :max_new_tokens]
    keep = np.isfinite(score_K)
    return BeamResult(sequences=[[int(t) for t in r if t >= 0] for r in seq_KN[keep]],
                      scores=[float(s) for s in score_K[keep]])
