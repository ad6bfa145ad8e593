"""Compile time against depth, scanned and unrolled, for every preset (or the ones named).

    python benchmarks/compile_depth.py                          # every preset, 2 and 8 repeats
    python benchmarks/compile_depth.py --presets llama-tiny --repeats 4 16 --part train

For each preset, lowers and compiles one program (default `grad`: value and gradient of the LM
loss, what a train step compiles besides the optimizer; `train`: the whole AdamW step;
`forward`) at depths of `--repeats` repeats of its block pattern (plus its prefix blocks), with
scan_layers True and False, on abstract shapes (nothing allocated), and prints seconds and the
ratio of the deepest to the shallowest depth. Every compilation is cold (a fresh function, the
persistent cache off). Ratios, not absolute times, are what carries between machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

import zoo
from layers import params as P
from zoo import cost_report, train


def _grad_seconds(cfg, batch: int, seq_len: int) -> float:
    params = P.abstract(zoo.param_specs(cfg))
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)

    def loss(p, t):
        return train.loss_fn(p, t[:, :-1], t[:, 1:], cfg)

    _, _, lower_s, compile_s = cost_report.lower_and_compile(jax.jit(jax.value_and_grad(loss)), (params, tokens))
    return lower_s + compile_s


def compile_seconds(cfg, part: str, batch: int, seq_len: int) -> float:
    if part == "grad":
        return _grad_seconds(cfg, batch, seq_len)
    rcfg = cost_report.ReportConfig(batch_size=batch, seq_len=seq_len, parts=(part,))
    return cost_report.compile_seconds(cfg, rcfg, part)


def depth(cfg, repeats: int) -> int:
    return len(getattr(cfg, "prefix", ())) + repeats * len(cfg.pattern)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help="default: every decoder preset")
    parser.add_argument("--repeats", type=int, nargs="+", default=[2, 8], help="pattern repeats per depth")
    parser.add_argument("--part", choices=("grad", "train", "forward"), default="grad")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    names = args.presets or zoo.presets.names()
    # The first compilation in a process pays one-off start-up costs: do it before timing.
    compile_seconds(zoo.presets.get("llama-tiny", n_layers=1), args.part, args.batch, args.seq_len)
    print(f"{args.part} compile seconds; batch {args.batch} x {args.seq_len}; jax {jax.__version__} "
          f"on {jax.default_backend()}")
    print(f"{'preset':<24}{'layers':>12}{'scanned s':>20}{'ratio':>7}{'unrolled s':>20}{'ratio':>7}", flush=True)
    rows = []
    for name in names:
        base = zoo.presets.get(name)
        if not isinstance(base, zoo.ModelConfig):
            print(f"{name:<24}skipped: {type(base).__name__} is not a decoder ModelConfig (no n_layers scan to sweep)")
            continue
        mine = []
        for scan in (True, False):
            for r in args.repeats:
                cfg = dataclasses.replace(base, n_layers=depth(base, r), scan_layers=scan,
                                          max_len=max(base.max_len, args.seq_len + 1))
                s = compile_seconds(cfg, args.part, args.batch, args.seq_len)
                mine.append({"preset": name, "part": args.part, "scan_layers": scan, "n_layers": cfg.n_layers,
                             "repeats": r, "compile_s": round(s, 3)})
        for scan in (True, False):
            sel = [m for m in mine if m["scan_layers"] == scan]
            for m in sel:
                m["ratio_to_shallowest"] = round(m["compile_s"] / sel[0]["compile_s"], 2)
        sc = [m for m in mine if m["scan_layers"]]
        un = [m for m in mine if not m["scan_layers"]]
        layers = f"{sc[0]['n_layers']}->{sc[-1]['n_layers']}"
        print(f"{name:<24}{layers:>12}{sc[0]['compile_s']:>9.2f} ->{sc[-1]['compile_s']:>7.2f}"
              f"{sc[-1]['ratio_to_shallowest']:>9.2f}{un[0]['compile_s']:>9.2f} ->{un[-1]['compile_s']:>7.2f}"
              f"{un[-1]['ratio_to_shallowest']:>9.2f}", flush=True)
        rows.extend(mine)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
