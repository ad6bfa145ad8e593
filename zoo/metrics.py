"""Training metrics: FLOPs per token, a measured matmul peak for MFU, and writers (JSONL always
available, TensorBoard through tensorboardX when it is installed).

FLOPs per token are analytic (`zoo.cost_report.model_flops_per_token`, times 3 for forward +
backward): 6 per active parameter (the embedding lookup free, MoE experts at top_k / n_experts)
plus the attention scores and values over the average causal context. Recurrent mixers'
state updates are not counted, so their MFU is a lower bound.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp



def flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token at sequence length `seq_len`,
    by the model-FLOPs convention of `zoo.cost_report.model_flops_per_token`."""
    from zoo import cost_report  # heavy (AOT machinery); only needed once per run

    return 3.0 * cost_report.model_flops_per_token(cfg, seq_len)


@functools.cache
def measure_peak_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a jitted fp32 n x n matmul on the default device: the fastest of the calls made
    in about `seconds` after a warm-up call (the best call, not the mean, so that other load on
    a shared machine lowers the estimate less). Measured once per process (cached)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


class MetricsWriter:
    """One JSON object per `write` to `jsonl_path` (appended, flushed each time, so a resumed
    run continues the file and a crash loses nothing), and scalars to TensorBoard under
    `tensorboard_dir`. TensorBoard needs tensorboardX (the `[tb]` extra); without it, a
    warning goes to `print_fn` and training continues with the JSONL alone."""

    def __init__(self, jsonl_path: str | None = None, tensorboard_dir: str | None = None, *,
                 print_fn=print):
        self._jsonl = None
        self._tb = None
        if jsonl_path is not None:
            parent = os.path.dirname(os.path.abspath(jsonl_path))
            os.makedirs(parent, exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print_fn("tensorboardX is not installed (pip install 'zoo[tb]'): TensorBoard logging is off")
            else:
                self._tb = SummaryWriter(tensorboard_dir)

    def write(self, step: int, values: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
