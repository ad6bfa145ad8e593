"""Generation for every family through one loop: prefill with `forward`, then sample and `step`
inside one `lax.while_loop`, all in one jitted function.

The compiled program depends on (batch, prompt bucket, cache length), not on how many tokens are
asked for: `max_new_tokens` is a traced loop bound, so 16 and 512 new tokens share one compile.
Prompts of different lengths are left-padded to a power-of-two bucket; padding carries segment
id 0 (attention never reads it; recurrent states reset when the real prompt starts) and each
row's positions start at 0 with its first real token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layers import checks
from zoo import model
from zoo.quantize import dequantize
from zoo.sampling import SamplingConfig, sample

if TYPE_CHECKING:
    from jaxtyping import Array, Int

GREEDY = SamplingConfig(temperature=0.0)


def replace_attention(cfg: model.ModelConfig, **changes) -> model.ModelConfig:
    """`cfg` with `changes` applied to every softmax-attention mixer (pattern and prefix blocks)."""
    from layers.attention import AttentionConfig

    def block(b):
        if not isinstance(b.mixer, AttentionConfig):
            return b
        return dataclasses.replace(b, mixer=dataclasses.replace(b.mixer, **changes))

    return dataclasses.replace(cfg, pattern=tuple(block(b) for b in cfg.pattern),
                               prefix=tuple(block(b) for b in cfg.prefix))


def with_rolling_cache(cfg: model.ModelConfig, *, sinks: int, window: int) -> model.ModelConfig:
    """`cfg` whose attention keeps `sinks` first tokens and a recent `window` (StreamingLLM) in a
    rolling cache of sinks + window slots: generation runs past any cache length in constant
    memory. The same sink + window mask applies to the stateless forward, so a full-sequence
    forward is the reference. Keys keep their original positions (RoPE at the true position);
    StreamingLLM instead re-numbers positions within the cache."""
    return replace_attention(cfg, sliding_window=window, attention_sinks=sinks, rolling_cache=True)


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= n (and >= minimum): prompt lengths share compiled programs."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Generation:
    """tokens: per row, the generated ids (a stop token, when hit, is the last one)."""

    tokens: list[list[int]]
    tokens_BN: np.ndarray  # -1 after a row stopped
    n_generated: np.ndarray


def prefill(params, prompt_BP, prompt_len_B, *, cfg, cache_len: int):
    """Run left-padded prompts through a fresh state of `cache_len` slots (traceable).

    -> (last logits [B, V], state, segment ids [B, P]: 0 on padding)."""
    B, P = prompt_BP.shape
    pad_B1 = (P - prompt_len_B)[:, None]
    t_1P = jnp.arange(P, dtype=jnp.int32)[None, :]
    seg_BP = (t_1P >= pad_B1).astype(jnp.int32)
    pos_BP = jnp.maximum(t_1P - pad_B1, 0)
    state = model.init_state(cfg, B, cache_len)
    logits_BPV, state, _ = model._forward(params, prompt_BP, cfg, state, pos_BP, seg_BP)
    return logits_BPV[:, -1], state, seg_BP


def prompt_counts(prompt_BP, seg_BP, vocab_size: int):
    """How often each token occurs in each row's real prompt (the penalties' history)."""
    B = prompt_BP.shape[0]
    return jnp.zeros((B, vocab_size), jnp.int32).at[jnp.arange(B)[:, None], prompt_BP].add(seg_BP)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "cache_len", "stream"))
def decode_jit(params, prompt_BP, prompt_len_B, max_new, stop_S, key, *, cfg, sampling: SamplingConfig,
               cache_len: int, stream: Callable | None = None):
    """Prefill the left-padded prompts, then sample up to `max_new` tokens (traced).
    stream: called on the host as stream(step, tokens_B, done_B) as each token is sampled."""
    B, P = prompt_BP.shape
    N = cache_len - P
    params = dequantize(params)  # int8 weights (zoo.quantize) rest quantised between calls
    last_BV, state, seg_BP = prefill(params, prompt_BP, prompt_len_B, cfg=cfg, cache_len=cache_len)
    V = last_BV.shape[-1]
    counts_BV = prompt_counts(prompt_BP, seg_BP, V)

    def cond(carry):
        i, _, _, _, done_B, _, _ = carry
        return (i < max_new) & ~jnp.all(done_B)

    def body(carry):
        i, logits_BV, state, counts_BV, done_B, out_BN, key = carry
        key, sub = jax.random.split(key)
        token_B = sample(sub, logits_BV, counts_BV, sampling)
        token_B = jnp.where(done_B, 0, token_B)
        out_BN = out_BN.at[:, i].set(jnp.where(done_B, -1, token_B))
        if stream is not None:
            jax.debug.callback(stream, i, token_B, done_B, ordered=True)
        counts_BV = counts_BV + jax.nn.one_hot(token_B, V, dtype=jnp.int32) * (~done_B)[:, None].astype(jnp.int32)
        done_B = done_B | jnp.any(token_B[:, None] == stop_S[None, :], axis=-1)
        logits_B1V, state, _ = model._forward(params, token_B[:, None], cfg, state)
        return i + 1, logits_B1V[:, 0], state, counts_BV, done_B, out_BN, key

    init = (jnp.int32(0), last_BV, state, counts_BV, jnp.zeros((B,), bool),
            jnp.full((B, N), -1, jnp.int32), key)
    _, _, _, _, _, out_BN, _ = jax.lax.while_loop(cond, body, init)
    return out_BN


def left_pad(prompts: "Sequence[Sequence[int]] | Int[Array, 'B L']", cfg: model.ModelConfig, *,
             max_new_tokens: int, stop_tokens: Sequence[int] = (), cache_len: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate a generation request and left-pad its prompts to a compile bucket.

    -> (prompt_BP int32, prompt lengths [B] int32, cache_len)."""
    if not isinstance(cfg, model.ModelConfig):
        raise TypeError(f"cfg: expected a zoo ModelConfig, got {type(cfg).__name__}")
    if hasattr(prompts, "ndim"):
        checks.array("prompts", prompts, rank=2, kind="i")
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError("prompts: expected at least one prompt, each with at least one token")
    for i, r in enumerate(rows):
        checks.token_range(f"prompts[{i}]", r, cfg.vocab_size)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    for t in stop_tokens:
        checks.token_range("stop_tokens", np.asarray([t]), cfg.vocab_size)
    longest = max(r.size for r in rows)
    cache_len = cfg.max_len if cache_len is None else cache_len
    checks.positive("generate", "cache_len", cache_len)
    if longest >= cache_len:
        raise ValueError(f"prompts: the longest prompt has {longest} tokens, which leaves no room in the cache "
                         f"length {cache_len} (cache_len argument, default cfg.max_len)")
    if longest + max_new_tokens > cache_len:
        raise ValueError(f"longest prompt {longest} + max_new_tokens {max_new_tokens} exceeds the cache length "
                         f"{cache_len} (cache_len argument, default cfg.max_len)")
    # Round the prompt up to a bucket where the cache leaves room for it.
    P = max(longest, min(bucket(longest), cache_len - max_new_tokens))
    prompt_BP = np.zeros((len(rows), P), np.int32)
    for i, r in enumerate(rows):
        prompt_BP[i, P - r.size:] = r
    return prompt_BP, np.asarray([r.size for r in rows], np.int32), cache_len


def generate(params: Any, prompts: "Sequence[Sequence[int]] | Int[Array, 'B L']", cfg: model.ModelConfig, *,
             max_new_tokens: int, sampling: SamplingConfig = GREEDY, stop_tokens: Sequence[int] = (),
             seed: int = 0, cache_len: int | None = None, stream: Callable | None = None) -> Generation:
    """Generate up to `max_new_tokens` per prompt (rows may have different lengths).

    stream: a host function called as stream(step, tokens_B, done_B) while the loop runs, as
      each token is sampled (a jax.debug.callback inside the compiled loop; ordered); part of
      the compile key, so pass the same function to reuse a program.

    cache_len: the decoding cache length (the compile bucket); defaults to cfg.max_len. Any
      max_new_tokens that fits it reuses the same compiled program. Models whose state does not
      grow with length (recurrent mixers, rolling attention caches) may take a cache_len beyond
      cfg.max_len: it then only sizes the output buffer.
    """
    prompt_BP, lens_B, cache_len = left_pad(prompts, cfg, max_new_tokens=max_new_tokens,
                                            stop_tokens=stop_tokens, cache_len=cache_len)
    out_BN = decode_jit(params, jnp.asarray(prompt_BP), jnp.asarray(lens_B),
                        jnp.int32(max_new_tokens), jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1),
                        jax.random.key(seed), cfg=cfg, sampling=sampling, cache_len=cache_len, stream=stream)
    out_BN = np.asarray(out_BN)[:, :max_new_tokens]
    n = (out_BN >= 0).sum(axis=1)
    return Generation(tokens=[row[:k].tolist() for row, k in zip(out_BN, n)], tokens_BN=out_BN, n_generated=n)


def greedy(params: Any, prompt_BL: "Int[Array, 'B L']", cfg: model.ModelConfig, max_new_tokens: int
           ) -> "Int[Array, 'B N']":
    """The `max_new_tokens` most likely continuations of each prompt row, int32 [B, N]."""
    checks.array("greedy: prompt_BL", prompt_BL, rank=2, kind="i")
    out = generate(params, np.asarray(prompt_BL), cfg, max_new_tokens=max_new_tokens)
    return jnp.asarray(out.tokens_BN)
