"""Train-step throughput (tokens/s) and MFU of `zoo.train`'s compiled step, per preset.

    python benchmarks/train_throughput.py --presets llama-tiny mamba-tiny --batch-size 16 --seq-len 128

Each preset: the jitted, donated train step of `zoo.train.train_step_for` (AdamW unless
--optimizer) on random windows of the built-in corpus; 3 warm-up steps (compilation), then the
median of --repeats timings of --steps steps each. MFU = analytic train FLOPs per token
(`zoo.metrics.flops_per_token`) x tokens/s / peak, the peak being an fp32 matmul measured in the
same process (`zoo.metrics.measure_peak_flops`) unless --peak-flops is given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import zoo
from zoo import data, metrics, train


def measure(preset: str, tcfg: train.TrainConfig, steps: int, repeats: int, corpus: np.ndarray) -> dict:
    cfg = train.with_precision(zoo.presets.get(preset), tcfg.precision)
    optimizer, step = train.train_step_for(cfg, tcfg)
    params = zoo.init(jax.random.key(0), cfg)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    batches = [data.random_windows(corpus, tcfg.batch_size, tcfg.seq_len, rng) for _ in range(steps)]
    for x, y in batches[:3]:
        params, opt_state, m = step(params, opt_state, x, y)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, y in batches:
            params, opt_state, m = step(params, opt_state, x, y)
        jax.block_until_ready((params, m))
        times.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(times)
    tokens_per_s = tcfg.batch_size * tcfg.seq_len / step_s
    return {"preset": preset, "step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_s,
            "flops_per_token": metrics.flops_per_token(cfg, tcfg.seq_len), "loss": float(m["loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["llama-tiny", "mamba-tiny"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--optimizer", default="adamw", choices=train.OPTIMIZERS)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=10, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=None)
    args = p.parse_args()

    tcfg = train.TrainConfig(steps=1000, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=10,
                             optimizer=args.optimizer, precision=args.precision)
    corpus = data.as_array(data.builtin_corpus(2_000_000))
    peak = args.peak_flops or metrics.measure_peak_flops()
    rows = [measure(name, tcfg, args.steps, args.repeats, corpus) for name in args.presets]
    peak = args.peak_flops or max(peak, metrics.measure_peak_flops.__wrapped__())  # best of before / after
    print(f"peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul); batch {args.batch_size} x {args.seq_len}, "
          f"{args.optimizer}, {args.precision}, on {jax.devices()[0].device_kind}")
    print("| preset | ms/step | tokens/s | train GFLOP/step | MFU |")
    print("|---|---|---|---|---|")
    for r in rows:
        mfu = r["flops_per_token"] * r["tokens_per_s"] / peak
        print(f"| {r['preset']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['flops_per_token'] * args.batch_size * args.seq_len / 1e9:.2f} | {mfu:.1%} |")


if __name__ == "__main__":
    main()
