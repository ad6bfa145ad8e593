"""Per-device memory of a ~1B-parameter Llama train step on 8 simulated devices under each sharding
strategy, from XLA's `memory_analysis()` of the compiled step. Nothing is allocated: the step
is lowered from abstract, sharded shapes and compiled, never run.

    python benchmarks/sharding_memory.py [--batch-size 8] [--seq-len 1024] [--strategies dp,fsdp,tp,fsdp_tp]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sharding  # noqa: E402
import zoo  # noqa: E402
from layers import params as P  # noqa: E402
from zoo import presets  # noqa: E402
from zoo.train import loss_fn  # noqa: E402

MESHES = {"dp": "data=8", "fsdp": "fsdp=8", "tp": "tensor=8", "fsdp_tp": "fsdp=4,tensor=2"}


def llama_1b(max_len: int):
    """Llama shapes at ~1.0B parameters (TinyLlama-like width, 18 layers, GQA 16 / 8 heads)."""
    return presets.llama(vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, n_kv_heads=8, d_ff=5632,
                         max_len=max_len, remat="full")


def measure(cfg, strategy: str, batch: int, seq: int) -> dict:
    mesh = sharding.make_mesh(MESHES[strategy])
    specs = zoo.param_specs(cfg)
    p_shard = sharding.param_shardings(specs, mesh, strategy)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), P.abstract(specs), p_shard)
    optimizer = optax.adamw(1e-4)
    with jax.numpy_dtype_promotion("standard"):
        opt_abs = jax.eval_shape(optimizer.init, params)
    o_shard = sharding.like_params_shardings(opt_abs, p_shard, mesh)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, o_shard)
    batch_at = sharding.batch_sharding(mesh, strategy, (batch, seq))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_at)

    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    with sharding.use_rules(mesh, strategy):
        compiled = jax.jit(step, out_shardings=(p_shard, o_shard, None), donate_argnums=(0, 1)).lower(
            params, opt_state, tokens, tokens).compile()
    m = compiled.memory_analysis()
    per_device_params = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                            for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_shard)))
    return {"strategy": strategy, "mesh": MESHES[strategy], "params": P.count(specs),
            "param_bytes": per_device_params, "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes, "compile_s": time.perf_counter() - t0}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--strategies", default=",".join(MESHES))
    args = p.parse_args(argv)
    cfg = llama_1b(args.seq_len)
    gib = 2 ** 30
    rows = []
    print(f"llama ~1B ({P.count(zoo.param_specs(cfg)) / 1e9:.2f}B params, fp32, AdamW, remat=full), "
          f"batch {args.batch_size} x {args.seq_len}, 8 devices; GiB per device")
    print(f"| strategy | mesh | params | arguments (params+opt+batch) | temp | peak est. (args+temp) | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.strategies.split(","):
        r = measure(cfg, name, args.batch_size, args.seq_len)
        rows.append(r)
        print(f"| {name} | {r['mesh']} | {r['param_bytes'] / gib:.2f} | {r['arguments'] / gib:.2f} | "
              f"{r['temp'] / gib:.2f} | {(r['arguments'] + r['temp']) / gib:.2f} | {r['compile_s']:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
