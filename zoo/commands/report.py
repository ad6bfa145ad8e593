"""`zoo report`: lower and compile a preset's forward, train step and decode step on abstract
shapes and print what XLA says (seconds, FLOPs, bytes, memory, HLO size, collectives).

    zoo report --preset llama3-8b --batch-size 1 --seq-len 2048
    zoo report --preset llama-tiny --mesh fsdp=4,tensor=2 --json report.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from zoo.cli import add_model_overrides, model_config, positive_int

PARTS = ("forward", "train", "decode")


def _mesh(text: str) -> tuple[tuple[str, int], ...]:
    axes = []
    for item in text.split(","):
        name, _, size = item.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"expected axis=size pairs like fsdp=4,tensor=2, got {text!r}")
        axes.append((name.strip(), int(size)))
    return tuple(axes)


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts or any(p not in PARTS for p in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return parts


def _depths(text: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(d) for d in text.split(","))
    except ValueError:
        depths = ()
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive layer counts, got {text!r}")
    return depths


def add_parser(sub) -> None:
    import zoo

    r = sub.add_parser("report", help="compile a preset ahead of time and report its costs",
                       description="Lower and compile the forward, the train step (AdamW) and the decode "
                                   "step of a preset on abstract shapes (nothing is allocated) and report "
                                   "compile seconds, XLA and analytic FLOPs, bytes accessed, memory per "
                                   "device, HLO instructions and collectives.")
    r.add_argument("--preset", default="llama-tiny",
                   help=f"model preset (default llama-tiny); one of: {', '.join(zoo.presets.names())}")
    r.add_argument("--batch-size", type=positive_int, default=1, help="rows per step (default 1)")
    r.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per row (default: min(max_len, 2048))")
    r.add_argument("--cache-len", type=positive_int, default=None,
                   help="decode state capacity (default: --seq-len)")
    r.add_argument("--mesh", type=_mesh, default=None,
                   help="mesh axes, e.g. fsdp=4,tensor=2; on CPU that many devices are simulated")
    r.add_argument("--rules", default=None,
                   help="sharding rule preset (sharding.rules.PRESETS; default picked from the mesh axes)")
    r.add_argument("--parts", type=_parts, default=PARTS, help="subset of forward,train,decode (default all)")
    r.add_argument("--depths", type=_depths, default=(),
                   help="also time the train step's compilation at these layer counts, scanned and unrolled")
    r.add_argument("--no-compile", dest="compile", action="store_false",
                   help="stop after lowering: FLOP counts and StableHLO size in seconds, no XLA analyses")
    r.add_argument("--unrolled", action="store_true", help="unroll the layers instead of scanning them")
    r.add_argument("--remat", default=None, help="remat policy (zoo.config.REMAT_POLICIES)")
    r.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16, float16)")
    r.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="write the report as JSON to PATH ('-' prints JSON instead of the table)")
    r.set_defaults(run=cmd_report, subparser=r)
    add_model_overrides(r)


def _simulate_devices(n: int) -> None:
    """Make n CPU devices visible if the backend has not started yet (it reads the flag once)."""
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses

    from layers.checks import ConfigError
    from zoo import cost_report

    if args.mesh is not None:
        _simulate_devices(math.prod(s for _, s in args.mesh))
    cfg = model_config(args, parser, kind=None)
    changes = {}
    if args.unrolled:
        changes["scan_layers"] = False
    if args.remat is not None:
        changes["remat"] = args.remat
    if args.dtype is not None:
        changes["dtype"] = args.dtype
    try:
        cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    except ConfigError as e:
        parser.error(f"--{str(e).split('.')[1].split(':')[0].replace('_', '-')}: {e}")
    seq_len = args.seq_len or min(getattr(cfg, "max_len", 2048), 2048)
    try:
        rcfg = cost_report.ReportConfig(batch_size=args.batch_size, seq_len=seq_len, cache_len=args.cache_len,
                                        mesh=args.mesh, rules=args.rules, parts=args.parts, depths=args.depths,
                                        compile=args.compile)
    except ConfigError as e:
        field = str(e).split(".")[1].split(":")[0].split("[")[0]
        parser.error(f"--{field.replace('_', '-')}: {e}")
    try:
        rep = cost_report.report(cfg, rcfg, name=args.preset)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        parser.error(f"--{msg.split(':')[0]}: {msg}" if msg.split(":")[0] in ("mesh", "depths") else msg)
    if args.json_path == "-":
        json.dump(rep, sys.stdout, indent=1)
        print()
        return 0
    print(cost_report.format_report(rep))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {args.json_path}")
    return 0
