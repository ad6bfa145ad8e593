"""Speculative decoding: a small draft model proposes `gamma` tokens, the target scores them all
in one forward that continues its state, and a rejection rule keeps exactly the target's
distribution (Leviathan et al. 2023; Chen et al. 2023).

Per block and row, with q_j the draft's and p_j the target's distribution (both after the same
sampling processors: penalties, temperature, top-k/p, min-p) at the j-th proposed position:
draft token d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection
the row takes a token from norm(max(0, p_j - q_j)) and the block ends; when all gamma are
accepted it takes a bonus token from p_{gamma+1}. Greedy decoding is the case where p and q are
one-hot: a draft token is kept iff it is the target's argmax and the replacement is the
target's argmax, so the output equals target-only greedy decoding.

State rollback works for every family, attention or recurrent, through the mixer protocol alone:
the state from before the block is kept, and after acceptance each model is re-advanced from it
over the tokens it actually consumes (`[last, d_1..d_n]`, n + 1 tokens) with one `forward`.
When all tokens are accepted the verify forward's (target) or the proposal loop's (draft) state
is already right and is reused. With batch 1 a `lax.switch` runs only the needed re-advance;
with several rows (each accepting its own n) every prefix length is computed and each row
selects its own, which costs up to gamma extra forwards of growing length per block.

Everything runs in one jitted function with a `lax.while_loop` over blocks; `max_new_tokens` is a
traced bound, so one program serves every length that fits the cache bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zoo import model
from zoo.beam import state_batch_axes
from zoo.generate import GREEDY, left_pad, prefill, prompt_counts
from zoo.quantize import dequantize
from zoo.sampling import SamplingConfig, processed_logits

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """tokens: per row, the generated ids (a stop token, when hit, is the last one).
    acceptance_rate: accepted draft tokens / proposed draft tokens over the live rows.
    blocks: verify forwards of the target (each emits 1 to gamma + 1 tokens per row)."""

    tokens: list[list[int]]
    acceptance_rate: float
    blocks: int
    accepted: int
    proposed: int


def token_probs(logits_BV: "Float[Array, 'B V']", counts_BV: "Int[Array, 'B V']",
                sampling: SamplingConfig) -> "Float[Array, 'B V']":
    """The distribution a token is drawn from after every processor, fp32; one-hot at the
    argmax for greedy decoding (so the acceptance rule reduces to 'draft == target argmax')."""
    logits_BV = processed_logits(logits_BV, counts_BV, sampling)
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits_BV, axis=-1)


def _draw(key, probs_BV):
    return jax.random.categorical(key, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def accept(key: jax.Array, drafts_BG: "Int[Array, 'B G']", q_BGV: "Float[Array, 'B G V']",
           p_BJV: "Float[Array, 'B J V']") -> tuple["Int[Array, 'B']", "Int[Array, 'B']"]:
    """The rejection rule for one block, J = G + 1 target distributions.

    -> (n_B accepted draft tokens, the token that follows them: a residual or bonus sample)."""
    B, G = drafts_BG.shape
    k_u, k_x = jax.random.split(key)
    p_d_BG = jnp.take_along_axis(p_BJV[:, :G], drafts_BG[..., None], axis=-1)[..., 0]
    q_d_BG = jnp.take_along_axis(q_BGV, drafts_BG[..., None], axis=-1)[..., 0]
    u_BG = jax.random.uniform(k_u, (B, G), jnp.float32)
    # u < p / q without dividing (q(d) > 0: d was drawn from q).
    ok_BG = (u_BG * q_d_BG < p_d_BG).astype(jnp.int32)
    n_B = jnp.sum(jnp.cumprod(ok_BG, axis=1), axis=1)
    # A zero q after the last draft makes the residual at a full acceptance p itself (the bonus).
    q_BJV = jnp.concatenate([q_BGV, jnp.zeros_like(q_BGV[:, :1])], axis=1)
    pick = lambda a_BJV: jnp.take_along_axis(a_BJV, n_B[:, None, None], axis=1)[:, 0]
    p_BV = pick(p_BJV)
    res_BV = jnp.maximum(pick(p_BJV) - pick(q_BJV), 0.0)
    # p == q up to rounding leaves no residual mass; then p is the right distribution anyway.
    res_BV = jnp.where(jnp.sum(res_BV, axis=-1, keepdims=True) > 0, res_BV, p_BV)
    return n_B.astype(jnp.int32), _draw(k_x, res_BV)


def _pick_rows(state0, candidates, k_B):
    """Row b of the result is row b of candidates[k_B[b] - 1] (of state0 where k_B[b] == 0)."""
    B = k_B.shape[0]
    axes = state_batch_axes(state0)
    out = state0
    for k, s_k in enumerate(candidates, start=1):
        out = jax.tree.map(
            lambda new, old, ax: jnp.where((k_B == k).reshape((1,) * ax + (B,) + (1,) * (new.ndim - ax - 1)),
                                           new, old),
            s_k(), out, axes)
    return out


def _readvance(params, cfg, state0, block_BJ, full_state, k_B):
    """The target's state after each row's first k_B[b] tokens of `block_BJ`, re-advanced from
    `state0` with one forward (k = 0 keeps state0; k = J is `full_state`, already computed)."""
    B, J = block_BJ.shape

    def prefix(k):
        return lambda: model._forward(params, block_BJ[:, :k], cfg, state0)[1]

    branches = [prefix(k) for k in range(1, J)] + [lambda: full_state]
    if B == 1:
        return jax.lax.switch(k_B[0], [lambda: state0] + branches)
    return _pick_rows(state0, branches, k_B)


def _select(state0, states_J, k_B):
    """The draft's state after k_B[b] tokens, from its per-step snapshots (stacked on axis 0)."""
    J = jax.tree.leaves(states_J)[0].shape[0]
    snapshot = lambda k: lambda: jax.tree.map(lambda a: a[k - 1], states_J)
    if k_B.shape[0] == 1:
        return jax.lax.switch(k_B[0], [lambda: state0] + [snapshot(k) for k in range(1, J + 1)])
    return _pick_rows(state0, [snapshot(k) for k in range(1, J + 1)], k_B)


@functools.partial(jax.jit, static_argnames=("target_cfg", "draft_cfg", "gamma", "sampling", "cache_len"))
def speculative_jit(target_params, draft_params, prompt_BP, prompt_len_B, max_new, stop_S, key, *,
                    target_cfg, draft_cfg, gamma: int, sampling: SamplingConfig, cache_len: int):
    """-> (tokens [B, N] (-1 padded, may run past max_new), n_out_B, accepted, proposed, blocks)."""
    B, P = prompt_BP.shape
    G, J = gamma, gamma + 1
    target_params, draft_params = dequantize(target_params), dequantize(draft_params)
    # A verify forward writes J slots past what is consumed; room for it beyond the bucket.
    room = cache_len + J
    N = cache_len - P + J
    t_last_BV, t_state, seg_BP = prefill(target_params, prompt_BP, prompt_len_B, cfg=target_cfg, cache_len=room)
    _, d_state, _ = prefill(draft_params, prompt_BP, prompt_len_B, cfg=draft_cfg, cache_len=room)
    V = t_last_BV.shape[-1]
    counts_BV = prompt_counts(prompt_BP, seg_BP, V)
    key, sub = jax.random.split(key)
    first_B = _draw(sub, token_probs(t_last_BV, counts_BV, sampling))
    counts_BV = counts_BV + jax.nn.one_hot(first_B, V, dtype=jnp.int32)
    out_BN = jnp.full((B, N), -1, jnp.int32).at[:, 0].set(first_B)
    is_stop = lambda t: jnp.any(t[..., None] == stop_S.reshape((1,) * t.ndim + (-1,)), axis=-1)
    done_B = is_stop(first_B) | (max_new <= 1)
    j_1J = jnp.arange(J, dtype=jnp.int32)[None, :]

    def propose(carry, k):
        state, tok_B, counts_BV = carry
        logits_B1V, state, _ = model._forward(draft_params, tok_B[:, None], draft_cfg, state)
        q_BV = token_probs(logits_B1V[:, 0], counts_BV, sampling)
        d_B = _draw(k, q_BV)
        return (state, d_B, counts_BV + jax.nn.one_hot(d_B, V, dtype=jnp.int32)), (d_B, q_BV, state)

    def body(carry):
        last_B, t_state, d_state, counts_BV, out_BN, n_out_B, done_B, key, accepted, proposed, blocks = carry
        key, k_draft, k_acc = jax.random.split(key, 3)
        # J draft steps: the last one feeds d_G so a full acceptance finds the draft state ready.
        _, (d_JB, q_JBV, d_states_J) = jax.lax.scan(propose, (d_state, last_B, counts_BV),
                                                    jax.random.split(k_draft, J))
        drafts_BG, q_BGV = d_JB[:G].T, jnp.swapaxes(q_JBV[:G], 0, 1)
        block_BJ = jnp.concatenate([last_B[:, None], drafts_BG], axis=1)
        logits_BJV, t_full, _ = model._forward(target_params, block_BJ, target_cfg, t_state)
        # Position j has seen d_1..d_j-1 besides the history: penalties count them.
        seen_BJV = jnp.cumsum(jax.nn.one_hot(block_BJ, V, dtype=jnp.int32), axis=1) - \
            jax.nn.one_hot(last_B, V, dtype=jnp.int32)[:, None]
        p_BJV = token_probs(logits_BJV.reshape(B * J, V), (counts_BV[:, None] + seen_BJV).reshape(B * J, V),
                            sampling).reshape(B, J, V)
        n_B, x_B = accept(k_acc, drafts_BG, q_BGV, p_BJV)

        # Emitted: d_1..d_n then x; cut after a stop token and at max_new.
        emit_BJ = jnp.where(j_1J < n_B[:, None], jnp.concatenate([drafts_BG, x_B[:, None]], axis=1), x_B[:, None])
        stop_BJ = is_stop(emit_BJ) & (j_1J <= n_B[:, None])
        first_stop_B = jnp.where(jnp.any(stop_BJ, axis=1), jnp.argmax(stop_BJ, axis=1), J)
        n_emit_B = jnp.minimum(jnp.minimum(n_B + 1, first_stop_B + 1), max_new - n_out_B)
        n_emit_B = jnp.where(done_B, 0, n_emit_B)
        keep_BJ = j_1J < n_emit_B[:, None]
        out_BN = jax.vmap(lambda o, e, i: jax.lax.dynamic_update_slice(o, e, (i,)))(
            out_BN, jnp.where(keep_BJ, emit_BJ, -1), n_out_B)
        live_B = ~done_B
        counts_BV = counts_BV + jnp.sum(jax.nn.one_hot(emit_BJ, V, dtype=jnp.int32) * keep_BJ[..., None].astype(jnp.int32), axis=1)
        n_out_B = n_out_B + n_emit_B
        new_done_B = done_B | jnp.any(stop_BJ & keep_BJ, axis=1) | (n_out_B >= max_new)

        # Both models consume last, d_1..d_n; finished rows stay where they are.
        k_B = jnp.where(live_B, n_B + 1, 0)
        t_state = _readvance(target_params, target_cfg, t_state, block_BJ, t_full, k_B)
        d_state = _select(d_state, d_states_J, k_B)
        accepted = accepted + jnp.sum(jnp.where(live_B, n_B, 0))
        proposed = proposed + G * jnp.sum(live_B.astype(jnp.int32))
        return (jnp.where(live_B, x_B, last_B), t_state, d_state, counts_BV, out_BN, n_out_B, new_done_B, key,
                accepted, proposed, blocks + 1)

    zero = jnp.int32(0)
    init = (first_B, t_state, d_state, counts_BV, out_BN, jnp.ones((B,), jnp.int32), done_B, key, zero, zero, zero)
    carry = jax.lax.while_loop(lambda c: ~jnp.all(c[6]), body, init)
    _, _, _, _, out_BN, n_out_B, _, _, accepted, proposed, blocks = carry
    return out_BN, n_out_B, accepted, proposed, blocks


def speculative_generate(target_params: Any, draft_params: Any,
                         prompts: "Sequence[Sequence[int]] | Int[Array, 'B L']", *,
                         target_cfg: model.ModelConfig, draft_cfg: model.ModelConfig, max_new_tokens: int,
                         gamma: int = 4, sampling: SamplingConfig = GREEDY, stop_tokens: Sequence[int] = (),
                         seed: int = 0, cache_len: int | None = None) -> SpeculativeResult:
    """Sample from the target with the draft's help: same distribution as `zoo.generate.generate`
    with the target alone (identical tokens when greedy), fewer sequential target forwards when
    the draft agrees with it.

    gamma: draft tokens proposed per block.
    cache_len: the compile bucket (default target_cfg.max_len); both models get gamma + 1 extra
      slots internally for the verify forward.
    """
    if not isinstance(draft_cfg, model.ModelConfig):
        raise TypeError(f"draft_cfg: expected a zoo ModelConfig, got {type(draft_cfg).__name__}")
    if draft_cfg.vocab_size != getattr(target_cfg, "vocab_size", None):
        raise ValueError(f"draft_cfg.vocab_size: expected the target's vocab_size="
                         f"{getattr(target_cfg, 'vocab_size', None)}, got {draft_cfg.vocab_size}")
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ValueError(f"gamma: expected a positive integer, got {gamma!r}")
    prompt_BP, lens_B, cache_len = left_pad(prompts, target_cfg, max_new_tokens=max_new_tokens,
                                            stop_tokens=stop_tokens, cache_len=cache_len)
    out_BN, n_out_B, accepted, proposed, blocks = speculative_jit(
        target_params, draft_params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), jnp.int32(max_new_tokens),
        jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1), jax.random.key(seed),
        target_cfg=target_cfg, draft_cfg=draft_cfg, gamma=gamma, sampling=sampling, cache_len=cache_len)
    out_BN, n_out_B = np.asarray(out_BN), np.asarray(n_out_B)
    accepted, proposed = int(accepted), int(proposed)
    return SpeculativeResult(tokens=[row[:k].tolist() for row, k in zip(out_BN, n_out_B)],
                             acceptance_rate=accepted / max(proposed, 1), blocks=int(blocks),
                             accepted=accepted, proposed=proposed)
