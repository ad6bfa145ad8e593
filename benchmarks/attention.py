"""Flash attention benchmark.

    python benchmarks/attention.py                      # on GPU/TPU: TFLOP/s table; on CPU: memory
    python benchmarks/attention.py --memory --lengths 1024 4096 --head-dims 64 128

On a GPU or TPU: TFLOP/s of the forward and of forward + backward of `pallas_kernels.flash_attention`
against `jax.nn.dot_product_attention(implementation="cudnn")` (GPU) and `"xla"`, causal, bf16,
at each length and head dim. FLOPs: forward 4 B H L^2 K, halved when causal; forward + backward
3.5x the forward (FlashAttention's convention: the backward does 2.5x the forward's matmuls).

With --memory (the default on CPU): peak temporary memory from the compiled program's
`memory_analysis()` of naive attention (the [B, H, L, S] score matrix, `attention_core`'s "xla"
path) against the blocked Pallas program (interpret mode: XLA walks the same blocks), forward and
forward + backward. Nothing is allocated: programs are compiled for abstract shapes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from layers import attention_core
from pallas_kernels.flash_attention import flash_attention


def _naive(q, k, v):
    B, L = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, causal=True, impl="xla")


def _flash(q, k, v):
    return flash_attention(q, k, v, causal=True)


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _xla_sdpa(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _fwd_bwd(f):
    def g(q, k, v):
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    return g


def temp_bytes(f, args) -> int:
    return jax.jit(f).trace(*args).lower().compile().memory_analysis().temp_size_in_bytes


def memory_table(lengths, head_dims, batch, heads):
    print("| L | K | naive fwd temp | blocked fwd temp | naive fwd+bwd temp | blocked fwd+bwd temp |")
    print("|---|---|---|---|---|---|")
    for L in lengths:
        for K in head_dims:
            args = [jax.ShapeDtypeStruct((batch, L, heads, K), jnp.float32)] * 3
            cells = [temp_bytes(f, args) / 2 ** 20
                     for f in (_naive, _flash, _fwd_bwd(_naive), _fwd_bwd(_flash))]
            print(f"| {L} | {K} | " + " | ".join(f"{c:,.1f} MiB" for c in cells) + " |", flush=True)


def seconds(f, args, repeats=10) -> float:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def speed_table(lengths, head_dims, batch_tokens, heads):
    impls = {"pallas": _flash, "xla": _xla_sdpa}
    if jax.default_backend() == "gpu":
        impls["cudnn"] = _cudnn
    print(f"device: {jax.devices()[0].device_kind}; causal, bf16, {heads} heads, batch*L = {batch_tokens}")
    print("| L | K | impl | fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|")
    for L in lengths:
        B = max(1, batch_tokens // L)
        for K in head_dims:
            keys = jax.random.split(jax.random.key(0), 3)
            args = [jax.random.normal(kk, (B, L, heads, K), jnp.bfloat16) for kk in keys]
            fwd_flops = 4 * B * heads * L * L * K / 2
            for name, f in impls.items():
                try:
                    tf = fwd_flops / seconds(f, args) / 1e12
                    tb = 3.5 * fwd_flops / seconds(_fwd_bwd(f), args) / 1e12
                    print(f"| {L} | {K} | {name} | {tf:.1f} | {tb:.1f} |", flush=True)
                except Exception as e:  # e.g. cuDNN unavailable for a shape
                    print(f"| {L} | {K} | {name} | failed: {type(e).__name__} | |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="batch for --memory")
    ap.add_argument("--batch-tokens", type=int, default=32768, help="B * L for the speed table")
    ap.add_argument("--memory", action="store_true", help="the CPU memory table (default on CPU)")
    a = ap.parse_args()
    if a.memory or jax.default_backend() == "cpu":
        memory_table(a.lengths, a.head_dims, a.batch, a.heads)
    else:
        speed_table(a.lengths, a.head_dims, a.batch_tokens, a.heads)


if __name__ == "__main__":
    main()
