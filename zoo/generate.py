"""Greedy decoding: prefill the cache with the prompt, then one `zoo.step` per new token.

Prefill and the whole decode loop (a `jax.lax.scan` over the new tokens) are one jitted
function, compiled once per (config, prompt shape, number of new tokens).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

import zoo
from layers import checks

if TYPE_CHECKING:
    from jaxtyping import Array, Int


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_jit(params: Any, prompt_BL: "Int[Array, 'B L']", *, cfg: Any,
               max_new_tokens: int) -> "Int[Array, 'B N']":
    """The compiled body of `greedy` (no input checks; use `greedy`)."""
    batch, prompt_len = prompt_BL.shape
    state = zoo.init_state(cfg, batch, prompt_len + max_new_tokens)
    logits_BLV, state = zoo.forward(params, prompt_BL, cfg=cfg, state=state)
    first_B = jnp.argmax(logits_BLV[:, -1], axis=-1).astype(jnp.int32)

    def body(carry, _):
        token_B, state = carry
        logits_BV, state = zoo.step(params, token_B, state, cfg=cfg)
        next_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        return (next_B, state), next_B

    # the first new token comes from the prefill; each step then feeds the previous one
    _, rest_NB = jax.lax.scan(body, (first_B, state), None, length=max_new_tokens - 1)
    tokens_NB = jnp.concatenate([first_B[None, :], rest_NB], axis=0)
    return tokens_NB.T


def greedy(params: Any, prompt_BL: "Int[Array, 'B L']", cfg: Any, max_new_tokens: int
           ) -> "Int[Array, 'B N']":
    """The `max_new_tokens` most likely continuations of each prompt row, int32 [B, N].

    The prompt length plus max_new_tokens must fit the model's `max_len`.
    """
    checks.array("greedy: prompt_BL", prompt_BL, rank=2, kind="i")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"greedy: max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    batch, prompt_len = prompt_BL.shape
    if batch < 1 or prompt_len < 1:
        raise ValueError(f"greedy: prompt_BL: expected at least one row and one token, got shape "
                         f"{tuple(prompt_BL.shape)}")
    if prompt_len + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"greedy: prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the model's max_len={cfg.max_len}")
    checks.token_range("greedy: prompt_BL", prompt_BL, cfg.vocab_size)
    return greedy_jit(params, jnp.asarray(prompt_BL, jnp.int32), cfg=cfg, max_new_tokens=max_new_tokens)
