"""Scan kernels against the XLA chunked paths.

    python benchmarks/scan.py                   # on GPU/TPU: tokens/s and speedups; on CPU: memory
    python benchmarks/scan.py --memory --lengths 1024 4096

Two workloads, each forward and forward + backward:
  linear   `pallas_kernels.linear_scan` vs `layers.linear_recurrence.decayed_linear_attention`
           (impl="xla", the chunked lax.scan), per-key decays (GLA form), H heads of K = V.
  mamba    `pallas_kernels.selective_scan` vs `layers.mamba.selective_scan(mode="chunked")`,
           E channels, N = 16 states.
On a GPU or TPU the table gives milliseconds per call and the kernel's speedup. With --memory
(the default on CPU) it gives the compiled programs' peak temporary memory instead
(`memory_analysis()`, abstract shapes, nothing allocated; the kernel in interpret mode).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from layers import linear_recurrence, mamba
from pallas_kernels.linear_scan import linear_scan
from pallas_kernels.selective_scan import selective_scan


def _linear_args(B, L, H, K, abstract):
    shapes = [((B, L, H, K), jnp.bfloat16)] * 2 + [((B, L, H, K), jnp.bfloat16), ((B, L, H, K), jnp.float32)]
    if abstract:
        return [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, s, d) for kk, (s, d) in zip(keys, shapes[:3]))
    return [q, k, v, -jax.nn.softplus(jax.random.normal(keys[3], shapes[3][0]))]


def _mamba_args(B, L, E, N, abstract):
    shapes = [((B, L, E), jnp.bfloat16), ((B, L, E), jnp.float32), ((E, N), jnp.float32),
              ((B, L, N), jnp.bfloat16), ((B, L, N), jnp.bfloat16)]
    if abstract:
        return [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    keys = jax.random.split(jax.random.key(0), 5)
    u, dt, A, Bm, Cm = (jax.random.normal(kk, s, d) for kk, (s, d) in zip(keys, shapes))
    return [u, jax.nn.softplus(dt) * 0.1, -jnp.exp(A), Bm, Cm]


WORKLOADS = {
    "linear": dict(
        args=lambda L, a: _linear_args(max(1, a.batch_tokens // L), L, a.heads, a.head_dim, a.abstract),
        kernel=lambda q, k, v, g: linear_scan(q, k, v, g, chunk_size=a_chunk())[0],
        xla=lambda q, k, v, g: linear_recurrence.decayed_linear_attention(
            q, k, v, g, scale=1.0, chunk_size=64, impl="xla")[0]),
    "mamba": dict(
        args=lambda L, a: _mamba_args(max(1, a.batch_tokens // L), L, a.channels, 16, a.abstract),
        kernel=lambda u, dt, A, B, C: selective_scan(u, dt, A, B, C, chunk_size=a_chunk())[0],
        xla=lambda u, dt, A, B, C: mamba.selective_scan(u, dt, A, B, C, mode="chunked", chunk_size=64)[0]),
}


def a_chunk() -> int:
    return {"tpu": 64, "gpu": 16}.get(jax.default_backend(), 16)


def _fwd_bwd(f, n):
    def g(*args):
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=tuple(range(n)))(*args)
    return g


def seconds(f, args, repeats=10) -> float:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def temp_mib(f, args) -> float:
    return jax.jit(f).trace(*args).lower().compile().memory_analysis().temp_size_in_bytes / 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--batch-tokens", type=int, default=16384, help="B * L")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1024, help="Mamba E")
    ap.add_argument("--memory", action="store_true", help="the CPU memory table (default on CPU)")
    a = ap.parse_args()
    a.abstract = a.memory or jax.default_backend() == "cpu"
    if a.abstract:
        print("| workload | L | xla fwd temp | kernel fwd temp | xla fwd+bwd temp | kernel fwd+bwd temp |")
    else:
        print(f"device: {jax.devices()[0].device_kind}; B * L = {a.batch_tokens}")
        print("| workload | L | xla fwd ms | kernel fwd ms | speedup | xla fwd+bwd ms | kernel fwd+bwd ms | speedup |")
    print("|---|---|---|---|---|---|" + ("" if a.abstract else "---|---|"))
    for name in a.workloads:
        w = WORKLOADS[name]
        for L in a.lengths:
            args = w["args"](L, a)
            n = len(args)
            fns = (w["xla"], w["kernel"], _fwd_bwd(w["xla"], n), _fwd_bwd(w["kernel"], n))
            if a.abstract:
                cells = [f"{temp_mib(f, args):,.1f} MiB" for f in fns]
            else:
                t = [seconds(f, args) * 1e3 for f in fns]
                cells = [f"{t[0]:.2f}", f"{t[1]:.2f}", f"{t[0] / t[1]:.2f}x",
                         f"{t[2]:.2f}", f"{t[3]:.2f}", f"{t[2] / t[3]:.2f}x"]
            print(f"| {name} | {L} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
