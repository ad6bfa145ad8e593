"""Train a preset sharded over every device of every process: the same script on one CPU, on 8
simulated CPU devices, on several processes, on a TPU pod or a GPU cluster; only flags change.

    # 8 simulated CPU devices, FSDP x TP
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_on_pod.py --mesh fsdp=4,tensor=2
    # context parallelism: attention runs as ring attention, GLA/RetNet/Mamba scans pass states
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_on_pod.py --mesh fsdp=2,sequence=4
    # two processes on one machine (run both; 4 devices each)
    python examples/train_on_pod.py --mesh data=2,fsdp=4 --coordinator localhost:12355 --num-processes 2 --process-id 0
    # a TPU pod slice / SLURM job: jax finds the processes itself
    python examples/train_on_pod.py --mesh fsdp=-1,tensor=4 --preset llama3-8b --batch-size 256 --seq-len 2048

Parameters and optimizer state are created directly in their sharded layout (no host ever holds
the whole model); each process feeds only the rows of the global batch that its devices hold.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax

import sharding
import zoo
from sharding import cli as sharding_cli
from zoo import data
from zoo.train import loss_fn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (rows over all processes)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the loss history as one JSON line at the end")
    sharding_cli.add_flags(p)
    return p, p.parse_args(argv)


def global_batch(sampler, placement):
    """The step's global batch as sharded arrays; each process builds only its own shards (every
    process draws the same global rows from the seeded sampler and keeps its slice)."""
    inputs, targets = next(sampler)
    make = lambda a: jax.make_array_from_callback(a.shape, placement, lambda idx: a[idx].astype(np.int32))  # noqa: E731
    return make(inputs), make(targets)


def main(argv=None) -> list[float]:
    parser, args = parse_args(argv)
    mesh, rules = sharding_cli.setup(args, parser)  # before any other use of jax's devices
    if mesh is None:
        mesh, rules = sharding.make_mesh({"data": -1}), "dp"
    overrides = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers)) if v is not None}
    cfg = zoo.presets.get(args.preset, **overrides)
    specs = zoo.param_specs(cfg)
    p_shard = sharding.param_shardings(specs, mesh, rules)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.1))

    params = sharding.init_sharded(jax.random.key(args.seed), specs, mesh, rules)
    opt_state = sharding.init_optimizer_sharded(optimizer, params, p_shard, mesh)
    o_shard = jax.tree.map(lambda a: a.sharding, opt_state)

    def step(params, opt_state, inputs_BL, targets_BL):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BL, targets_BL, cfg)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with sharding.use_rules(mesh, rules):
        step = jax.jit(step, out_shardings=(p_shard, o_shard, None), donate_argnums=(0, 1))
    placement = sharding.batch_sharding(mesh, rules, (args.batch_size, args.seq_len))
    sampler = data.WindowSampler(data.builtin_corpus(2_000_000), args.batch_size, args.seq_len, args.seed)
    lead = jax.process_index() == 0
    if lead:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        print(f"{args.preset}: {n:,} params on mesh {sharding.describe(mesh)} ({rules}), "
              f"{jax.process_count()} process(es), {jax.device_count()} devices; "
              f"{sharding.per_device_bytes(params):,} param bytes per device")
    history = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        with sharding.use_rules(mesh, rules):
            params, opt_state, loss = step(params, opt_state, *global_batch(sampler, placement))
        history.append(float(loss))
        if lead:
            print(f"step {i + 1}/{args.steps} loss {history[-1]:.4f} ({time.perf_counter() - t0:.2f}s)")
    if args.json and lead:
        print(json.dumps({"history": history}))
    return history


if __name__ == "__main__":
    main()
