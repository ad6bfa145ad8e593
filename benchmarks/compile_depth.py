"""Compile time against depth, scanned and unrolled, for every preset: decoders, encoders and
encoder-decoders (or the ones named).

    python benchmarks/compile_depth.py                          # every preset, 2 and 8 repeats
    python benchmarks/compile_depth.py --presets llama-tiny t5-tiny --repeats 4 16 --part train

For each preset, lowers and compiles one program at depths of `--repeats` repeats of its block
pattern (a decoder's prefix blocks are kept; an encoder-decoder gets that many blocks in each
stack), with scan_layers True and False, on abstract shapes (nothing is allocated), and prints
seconds and the ratio of the deepest to the shallowest depth. Programs (`--part`):

- `grad` (default): value and gradient of the model's training loss, what a train step compiles
  besides the optimizer: next-token cross-entropy for a decoder, masked-LM cross-entropy on the
  MLM head for an encoder, teacher-forced cross-entropy for an encoder-decoder;
- `train`: the whole AdamW step (decoders only: `zoo.train.make_train_step`);
- `forward`: the forward alone.

Every compilation is cold (a fresh function, the persistent cache off). Ratios, not absolute
times, are what carries between machines. `--json PATH` also writes the rows.

Each row records both wall seconds and process CPU seconds (`time.process_time()`, all threads)
of trace + lower + compile; `--clock` picks which one the table and ratios use. On a shared
machine take `--clock cpu` and pin the process to one core, so waiting for the CPU is not
counted as compiling:

    taskset -c 1 python benchmarks/compile_depth.py --presets xlstm-tiny --clock cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import optax

import zoo
from layers import params as P
from zoo import cost_report, encdec, encoder, train


def _kind(cfg) -> str:
    if isinstance(cfg, encoder.EncoderConfig):
        return "encoder"
    if isinstance(cfg, encdec.EncDecConfig):
        return "encdec"
    return "decoder"


def _loss_fn(cfg):
    """The training loss of `cfg` as f(params, tokens_BL1) with L + 1 tokens per row."""
    kind = _kind(cfg)
    if kind == "decoder":
        return lambda p, t: train.loss_fn(p, t[:, :-1], t[:, 1:], cfg)
    if kind == "encoder":
        # Reconstructing every token is the masked-LM loss with everything masked: same program.
        def mlm(p, t):
            logits_BLV = encoder.forward(p, t[:, :-1], cfg=cfg)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BLV, t[:, 1:]))
        return mlm
    return lambda p, t: encdec.loss(p, t[:, :-1], t[:, 1:], cfg)


def with_depth(base, repeats: int, scan: bool):
    """`base` with `repeats` repeats of its pattern (or blocks per stack) and scan_layers=scan."""
    kind = _kind(base)
    if kind == "encdec":
        return dataclasses.replace(base, n_encoder_layers=repeats, n_decoder_layers=repeats, scan_layers=scan)
    if kind == "encoder":
        return dataclasses.replace(base, n_layers=repeats * len(base.pattern), scan_layers=scan, output="mlm")
    return dataclasses.replace(base, n_layers=len(base.prefix) + repeats * len(base.pattern), scan_layers=scan)


def depth(cfg) -> int:
    """Blocks in the model (both stacks of an encoder-decoder)."""
    if _kind(cfg) == "encdec":
        return cfg.n_encoder_layers + cfg.n_decoder_layers
    return cfg.n_layers


def compile_seconds(cfg, part: str, batch: int, seq_len: int) -> float:
    """Wall seconds of trace + lower + compile of `part` (see `timed_compile` for CPU seconds)."""
    if part == "grad":
        params = P.abstract(zoo.param_specs(cfg))
        tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
        _, _, lower_s, compile_s = cost_report.lower_and_compile(
            jax.jit(jax.value_and_grad(_loss_fn(cfg))), (params, tokens))
        return lower_s + compile_s
    if part == "train" and _kind(cfg) != "decoder":
        raise ValueError(f"part: 'train' compiles the decoder train step; {type(cfg).__name__} needs 'grad'")
    rcfg = cost_report.ReportConfig(batch_size=batch, seq_len=seq_len, parts=(part,))
    return cost_report.compile_seconds(cfg, rcfg, part)


def timed_compile(cfg, part: str, batch: int, seq_len: int) -> tuple[float, float]:
    """(wall seconds of trace + lower + compile, process CPU seconds of the whole call)."""
    c0 = time.process_time()
    wall = compile_seconds(cfg, part, batch, seq_len)
    return wall, time.process_time() - c0


def sweep(name: str, part: str, repeats, batch: int, seq_len: int, clock: str = "wall") -> list[dict]:
    """One row per (scan_layers, repeats) of preset `name`, with the ratio to the shallowest
    (of wall or CPU seconds, as `clock` says; `compile_s` is that clock's figure)."""
    base = zoo.presets.get(name)
    if hasattr(base, "max_len"):
        base = dataclasses.replace(base, max_len=max(base.max_len, seq_len + 1))
    rows = []
    for scan in (True, False):
        mine = []
        for r in repeats:
            cfg = with_depth(base, r, scan)
            wall, cpu = timed_compile(cfg, part, batch, seq_len)
            mine.append({"preset": name, "kind": _kind(cfg), "part": part, "scan_layers": scan,
                         "n_layers": depth(cfg), "repeats": r, "clock": clock,
                         "compile_s": round(cpu if clock == "cpu" else wall, 3),
                         "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
        for m in mine:
            m["ratio_to_shallowest"] = round(m["compile_s"] / mine[0]["compile_s"], 2)
        rows.extend(mine)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help="default: every preset")
    parser.add_argument("--repeats", type=int, nargs="+", default=[2, 8], help="pattern repeats per depth")
    parser.add_argument("--part", choices=("grad", "train", "forward"), default="grad")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="seconds the table and ratios use: wall, or process CPU time (shared machines)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    names = args.presets or zoo.presets.names()
    # The first compilation in a process pays one-off start-up costs: do it before timing.
    compile_seconds(zoo.presets.get("llama-tiny", n_layers=1), args.part, args.batch, args.seq_len)
    print(f"{args.part} compile seconds ({args.clock} clock); batch {args.batch} x {args.seq_len}; "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print(f"{'preset':<22}{'kind':>9}{'layers':>9}{'scanned s':>18}{'ratio':>7}{'unrolled s':>18}{'ratio':>7}",
          flush=True)
    rows = []
    for name in names:
        mine = sweep(name, args.part, args.repeats, args.batch, args.seq_len, args.clock)
        sc = [m for m in mine if m["scan_layers"]]
        un = [m for m in mine if not m["scan_layers"]]
        layers = f"{sc[0]['n_layers']}->{sc[-1]['n_layers']}"
        print(f"{name:<22}{sc[0]['kind']:>9}{layers:>9}{sc[0]['compile_s']:>8.2f} ->{sc[-1]['compile_s']:>7.2f}"
              f"{sc[-1]['ratio_to_shallowest']:>8.2f}{un[0]['compile_s']:>8.2f} ->{un[-1]['compile_s']:>7.2f}"
              f"{un[-1]['ratio_to_shallowest']:>8.2f}", flush=True)
        rows.extend(mine)
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(rows, f, indent=1)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
