"""Model FLOP utilisation of the train step: model FLOP/s over the matmul peak measured in the
same run, for presets at d_model 256 and 512.

    python benchmarks/mfu.py --widths 256 512 --presets llama-tiny mamba-tiny gla-tiny rwkv7-tiny

Model FLOPs follow the usual convention (`zoo.cost_report.model_flops_per_token`: 2 per active
parameter per token, attention over the average causal context, train = 3x forward). The peak is
the best fp32 matmul rate seen (an [B*L, D] x [D, 4D] product, before and after the models), so
MFU is the fraction of that rate the whole train step (with AdamW) achieves. Also reported: the
matmul FLOPs the program executes (`jaxpr_flops`: masked attention scores counted in full), as
a hardware utilisation. Heads are d_model / 64; other shape fields are the preset's.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from layers import params as P
from zoo import train
from zoo.cost_report import jaxpr_flops, model_flops_per_token


def matmul_peak(rows: int, d: int, repeats: int = 10) -> float:
    a = jax.random.normal(jax.random.key(0), (rows, d), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (d, 4 * d), jnp.float32)
    mm = jax.jit(lambda a, w: a @ w)
    jax.block_until_ready(mm(a, w))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, w))
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * d * 4 * d / best


def config(name: str, d: int, seq_len: int, n_layers: int | None):
    """The preset at width d: heads of 64 (half as many KV heads) and a SwiGLU-sized d_ff where
    the preset takes those fields; other fields as the preset has them."""
    base = {"d_model": d, "max_len": seq_len, **({} if n_layers is None else {"n_layers": n_layers})}
    attn = {"n_heads": max(1, d // 64), "n_kv_heads": max(1, d // 128), "d_ff": int(8 * d / 3) // 8 * 8}
    for drop in ((), ("n_kv_heads",), ("n_kv_heads", "d_ff"), tuple(attn)):
        try:
            return zoo.presets.get(name, **base, **{k: v for k, v in attn.items() if k not in drop})
        except ValueError as e:
            if "unknown override" not in str(e):
                raise
    raise AssertionError("unreachable")


def measure(name: str, d: int, batch: int, seq_len: int, steps: int, n_layers: int | None) -> dict:
    cfg = config(name, d, seq_len, n_layers)
    tcfg = train.TrainConfig(batch_size=batch, seq_len=seq_len, steps=10_000, warmup_steps=10)
    specs = zoo.param_specs(cfg)
    optimizer = train.make_optimizer(tcfg, P.decay_mask(specs), specs)
    step = train.make_train_step(cfg, optimizer, tcfg)
    params = zoo.init(jax.random.key(0), cfg)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    params, opt_state, m = step(params, opt_state, x, y)  # compile
    jax.block_until_ready(m["loss"])
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, m = step(params, opt_state, x, y)
        jax.block_until_ready(m["loss"])
        best = min(best, time.perf_counter() - t0)
    model = 3 * batch * seq_len * model_flops_per_token(cfg, seq_len)

    def loss(p):
        return train.loss_fn(p, x, y, cfg)

    executed, _ = jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    return {"preset": name, "d_model": d, "n_layers": cfg.n_layers, "params": P.count(specs),
            "step_s": best, "model_flops": model, "matmul_flops": float(executed),
            "model_flops_per_s": model / best, "matmul_flops_per_s": executed / best}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["llama-tiny", "mamba-tiny", "gla-tiny", "rwkv7-tiny"])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (best taken)")
    args = parser.parse_args(argv)
    peaks = {d: matmul_peak(args.batch * args.seq_len, d) for d in args.widths}
    rows = []
    for d in args.widths:
        for n in args.presets:
            rows.append(measure(n, d, args.batch, args.seq_len, args.steps, args.n_layers))
            r = rows[-1]
            print(f"measured {n} d {d}: {r['step_s']:.3f} s/step, {r['model_flops_per_s'] / 1e9:.1f} model "
                  f"GFLOP/s (peak so far {peaks[d] / 1e9:.1f})", flush=True)
    for d in args.widths:  # the peak again, after the models: keep the best seen
        peaks[d] = max(peaks[d], matmul_peak(args.batch * args.seq_len, d))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch} x {args.seq_len}; fp32")
    print(f"{'preset':<20}{'d':>5}{'layers':>7}{'params':>11}{'step s':>9}{'model GF/s':>12}{'peak GF/s':>11}"
          f"{'MFU':>7}{'matmul util':>13}")
    for r in rows:
        peak = peaks[r["d_model"]]
        r["peak_flops_per_s"] = peak
        r["mfu"] = r["model_flops_per_s"] / peak
        r["matmul_utilisation"] = r["matmul_flops_per_s"] / peak
        print(f"{r['preset']:<20}{r['d_model']:>5}{r['n_layers']:>7}{r['params']:>11,}{r['step_s']:>9.3f}"
              f"{r['model_flops_per_s'] / 1e9:>12.1f}{peak / 1e9:>11.1f}{r['mfu']:>7.1%}"
              f"{r['matmul_utilisation']:>13.1%}")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
