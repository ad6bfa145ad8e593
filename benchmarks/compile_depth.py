"""Compile time against depth: scanned layers should compile in near-constant time.

    python benchmarks/compile_depth.py --preset llama-tiny --depths 4 16

For each depth, lowers and compiles the gradient of the LM loss (what a train step compiles)
with scan_layers=True and False, and prints seconds and the ratio to the shallowest depth.
Ratios, not absolute times, are what carries between machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

import zoo
from layers import params as P


def compile_seconds(cfg, batch: int, seq_len: int) -> float:
    abstract_params = P.abstract(zoo.param_specs(cfg))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def loss(params, tokens_BL):
        logits = zoo.model._forward(params, tokens_BL, cfg)[0]
        logz = jax.nn.logsumexp(logits[:, :-1], axis=-1)
        gold = jnp.take_along_axis(logits[:, :-1], tokens_BL[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(logz - gold)

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(abstract_params, tokens).compile()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)
    base = zoo.presets.get(args.preset)
    # The first compilation in a process pays one-off start-up costs: do it before timing.
    compile_seconds(zoo.presets.get(args.preset, n_layers=args.depths[0]), args.batch, args.seq_len)
    rows = []
    for scan in (True, False):
        for depth in args.depths:
            cfg = dataclasses.replace(zoo.presets.get(args.preset, n_layers=depth), scan_layers=scan)
            rows.append({"preset": args.preset, "scan_layers": scan, "n_layers": depth,
                         "compile_s": round(compile_seconds(cfg, args.batch, args.seq_len), 3)})
    for scan in (True, False):
        mine = [r for r in rows if r["scan_layers"] == scan]
        for r in mine:
            r["ratio_to_shallowest"] = round(r["compile_s"] / mine[0]["compile_s"], 2)
    print(f"{'scan':>5} {'layers':>6} {'compile s':>10} {'ratio':>6}   ({base.d_model=}, backend {jax.default_backend()})")
    for r in rows:
        print(f"{str(r['scan_layers']):>5} {r['n_layers']:>6} {r['compile_s']:>10.2f} {r['ratio_to_shallowest']:>6.2f}")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
