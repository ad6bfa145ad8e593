"""Costs of one model: analytic and XLA FLOPs, a matmul peak, train-step memory, decoding.

FLOPs per token are training FLOPs (forward + backward = 3 x forward). The analytic count is
2 FLOPs per multiply-add of every matrix parameter a token touches (MoE: only the top-k of the
experts; the tied unembedding included) plus, per attention layer, the score and value
products over the visible context: L_eff * H * (K_qk + K_v) forward, where causal masking
halves the average context (L_eff = L/2, or the window when it is shorter). Recurrent state
updates are not counted (they are O(state) per token, small next to the projections here).

XLA's count comes from `Lowered.cost_analysis()` of one member's loss-and-gradient with the
layer scan unrolled (`scan_layers=False`): XLA counts a while-loop body once, not once per
trip, so a scanned stack would be under-counted by the number of repeats. Loops inside a mixer
(chunked scans) are still counted once; for chunked families XLA's number is a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from layers import params as P
from layers.attention import AttentionConfig
from layers.mla import MLAConfig
from layers.moe import MoEConfig
from zoo import train as ztrain
from zoo.config import ModelConfig

if TYPE_CHECKING:
    from jaxtyping import Int


def _matmul_params(specs: Any, block_cfgs: tuple, n_repeats: int) -> float:
    """Multiply-adds per token of the parameter matrices (vectors and biases excluded)."""
    total = 0.0
    for block_cfg, block_specs in zip(block_cfgs, specs["blocks"]):
        for part in ("mixer", "ffn"):
            sub = block_specs.get(part)
            if sub is None:
                continue
            leaves = [s for s in jax.tree.leaves(sub, is_leaf=P.is_spec) if len(s.shape) >= 3]
            n = sum(math.prod(s.shape) for s in leaves)  # leading axis: layers
            sub_cfg = getattr(block_cfg, part)
            if isinstance(sub_cfg, MoEConfig):
                expert = sum(math.prod(s.shape) for s in leaves if "expert" in s.logical_axes[1:2])
                n = n - expert + expert * sub_cfg.top_k / sub_cfg.n_experts
            total += n
    return total


def _attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the attention score and value products (causal: half)."""
    total = 0.0
    for block_cfg in cfg.pattern:
        m = block_cfg.mixer
        if isinstance(m, AttentionConfig):
            k_qk = k_v = m.head_dim or m.d_model // m.n_heads
        elif isinstance(m, MLAConfig):
            k_qk, k_v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        else:
            continue
        ctx = seq_len / 2 if m.sliding_window is None else min(m.sliding_window, seq_len / 2)
        total += cfg.n_repeats * 2 * ctx * m.n_heads * (k_qk + k_v)
    return total


def analytic_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (3 x forward); see the module docstring for what is counted."""
    specs = zoo.param_specs(cfg)
    forward = 2 * (_matmul_params(specs, cfg.pattern, cfg.n_repeats) + cfg.vocab_size * cfg.d_model)
    forward += _attention_flops(cfg, seq_len)
    return 3.0 * forward


def _grad_fn(cfg: ModelConfig):
    def f(params, inputs_BL, targets_BL):
        return jax.value_and_grad(ztrain.loss_fn)(params, inputs_BL, targets_BL, cfg)
    return jax.jit(f)


def xla_flops_per_token(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
    """XLA's FLOPs per token of loss + gradient, with the layer scan unrolled (lowered, not compiled)."""
    flat = dataclasses.replace(cfg, scan_layers=False)
    params = P.abstract(zoo.param_specs(flat))
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    cost = _grad_fn(flat).lower(params, tokens, tokens).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per computation
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) / (batch_size * seq_len)


def matmul_peak_flops(n: int = 512, repeats: int = 8) -> float:
    """FLOP/s of an fp32 n x n matmul through XLA on the default device (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def state_bytes(cfg: ModelConfig, context: int, batch_size: int = 1) -> int:
    """Bytes of the decoding state (KV caches, recurrent states) for `context` tokens."""
    shapes = jax.eval_shape(lambda: zoo.init_state(cfg, batch_size, context))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


#: Compiled (zero state, decoding step) pairs keyed by (config, the state's leaf shapes, XLA level).
_DECODERS: dict[tuple, tuple[Any, Any]] = {}


def compile_decoder(cfg: ModelConfig, context: int, xla_level: int | None = None) -> tuple[Any, Any]:
    """(zero state, compiled step) for decoding at batch 1 with a cache of `context` positions,
    from shapes alone (cached; thread-safe, so `harness.precompile` can run it in its pool).

    The step is `zoo.model`'s jitted decoding step, the function `zoo.step` runs after its host-side
    argument checks; compiled here with explicit options so that a run's XLA level applies to it.
    The cache is keyed by the state's shapes: a full attention cache grows with the context, so
    it compiles once per context, while a recurrent state or a sliding window's ring does not, so
    every context shares one step (jit's own cache would not help an explicit compile).
    """
    from zoo.compare.sweep import UNTIMED_COMPILE, compile_options

    shapes = jax.eval_shape(lambda: zoo.init_state(cfg, 1, context))
    key = (cfg, tuple((x.shape, x.dtype) for x in jax.tree.leaves(shapes)), xla_level)
    if key not in _DECODERS:
        # One executable for the zero state (eagerly, every leaf would compile its own fill and
        # reshape); its speed is not measured, so XLA need not optimise it.
        state = jax.jit(lambda: zoo.init_state(cfg, 1, context)).lower().compile(compiler_options=UNTIMED_COMPILE)()
        params = P.abstract(zoo.param_specs(cfg))
        tokens_B = jax.ShapeDtypeStruct((1,), jnp.int32)
        step = zoo.model._step_jit.lower(params, tokens_B, state, cfg=cfg).compile(
            compiler_options=compile_options(xla_level))
        _DECODERS[key] = (state, step)
    return _DECODERS[key]


def decode_seconds_per_token(cfg: ModelConfig, params: Any, context: int, n_tokens: int = 8, *,
                             xla_level: int | None = None) -> float:
    """Median seconds of one decoding step (batch 1) with a cache of `context` positions.

    Attention's step reads every slot of its cache (masked by position), so a fresh state of
    capacity `context` costs what a full one does; recurrent states cost the same at any context.
    """
    state, step = compile_decoder(cfg, context, xla_level)
    tokens_B: "Int[np.ndarray, 'B']" = np.ones((1,), np.int32)
    logits, state = step(params, tokens_B, state)  # warm-up: first-call allocations
    jax.block_until_ready(logits)
    times = []
    for _ in range(n_tokens):
        t = time.perf_counter()
        logits, state = step(params, tokens_B, state)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    return float(np.median(times))
