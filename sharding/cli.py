"""Command-line flags for meshes, rules and multi-process runs, shared by `zoo train` and examples.

    --mesh fsdp=4,tensor=2 [--dcn-mesh data=2] [--rules fsdp_tp]
    --coordinator HOST:PORT --num-processes N --process-id I   (or jax's environment / cluster)
"""

from __future__ import annotations

import argparse

from sharding import distributed, mesh as mesh_lib, rules as R


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help="device mesh, e.g. 'fsdp=4,tensor=2' or 'data=-1' (-1 takes the remaining "
                             "devices; axes: data, fsdp, tensor, expert, sequence); default: one device")
    parser.add_argument("--dcn-mesh", default=None, metavar="SPEC",
                        help="multi-slice / multi-node: the cross-slice (DCN) part of each axis, e.g. 'data=2'")
    parser.add_argument("--rules", choices=tuple(R.PRESETS), default=None,
                        help="logical-axis rule preset (default: from the mesh axes: fsdp_tp, tp, fsdp, ep or dp)")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process: address of process 0 (with --num-processes, --process-id); "
                             "without it, jax's environment variables or a detected cluster are used")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-process: this process's rank")


def setup(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Initialise jax.distributed (if asked or detected), then build the mesh and pick the rules:
    (mesh or None, rules name or None). Call before anything touches jax's devices."""
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(f"--coordinator / --num-processes / --process-id: {e}")
    if args.mesh is None:
        if args.dcn_mesh is not None:
            parser.error("--dcn-mesh: needs --mesh (the per-slice axes)")
        if args.rules is not None:
            parser.error("--rules: needs --mesh")
        return None, None
    try:
        mesh = mesh_lib.make_mesh(args.mesh, dcn=args.dcn_mesh)
    except (ValueError, TypeError) as e:
        parser.error(f"--mesh: {e}")
    return mesh, args.rules or R.default_rules(mesh)
