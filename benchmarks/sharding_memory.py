"""Per-device memory of a ~1B-parameter train step on 8 simulated devices under each sharding
strategy, from XLA's `memory_analysis()` of the compiled step. Nothing is allocated: the step
is lowered from abstract, sharded shapes and compiled, never run. Every strategy but `ep` runs
a ~1B Llama; `ep` needs experts, so it runs a ~1B Mixtral-style MoE (and `ep_fsdp`, the same
MoE under plain FSDP, is its yardstick).

    python benchmarks/sharding_memory.py [--batch-size 8] [--seq-len 1024] [--strategies dp,fsdp,tp,fsdp_tp,cp,ep,ep_fsdp]
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

# strategy -> mesh; the rule preset is the strategy's name unless RULES says otherwise
MESHES = {"dp": "data=8", "fsdp": "fsdp=8", "tp": "tensor=8", "fsdp_tp": "fsdp=4,tensor=2",
          "cp": "fsdp=2,sequence=4", "ep": "expert=8", "ep_fsdp": "fsdp=8"}
RULES = {"ep_fsdp": "fsdp"}
MOE_STRATEGIES = ("ep", "ep_fsdp")


def llama_1b(max_len: int):
    """Llama shapes at ~1.0B parameters (TinyLlama-like width, 18 layers, GQA 16 / 8 heads)."""
    return presets.llama(vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, n_kv_heads=8, d_ff=5632,
                         max_len=max_len, remat="full")


def moe_1b(max_len: int):
    """A Mixtral-style MoE at ~1.1B parameters (8 experts, top 2, 16 layers, GQA 16 / 8 heads)."""
    return presets.moe_llama(vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=8,
                             max_len=max_len, remat="full",
                             moe=dict(d_ff=2432, n_experts=8, top_k=2, router="softmax", renormalize=True,
                                      load_balance_weight=0.02))


def measure(cfg, strategy: str, batch: int, seq: int) -> dict:
    mesh = sharding.make_mesh(MESHES[strategy])
    rules = RULES.get(strategy, strategy)
    specs = zoo.param_specs(cfg)
    p_shard = sharding.param_shardings(specs, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), P.abstract(specs), p_shard)
    optimizer = optax.adamw(1e-4)
    with jax.numpy_dtype_promotion("standard"):
        opt_abs = jax.eval_shape(optimizer.init, params)
    o_shard = sharding.like_params_shardings(opt_abs, p_shard, mesh)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, o_shard)
    batch_at = sharding.batch_sharding(mesh, rules, (batch, seq))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_at)

    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    with sharding.use_rules(mesh, rules):
        compiled = jax.jit(step, out_shardings=(p_shard, o_shard, None), donate_argnums=(0, 1)).lower(
            params, opt_state, tokens, tokens).compile()
    m = compiled.memory_analysis()
    per_device_params = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                            for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_shard)))
    return {"strategy": strategy, "mesh": MESHES[strategy], "rules": rules, "params": P.count(specs),
            "param_bytes": per_device_params, "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes, "compile_s": time.perf_counter() - t0}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--strategies", default=",".join(MESHES))
    args = p.parse_args(argv)
    models = {"llama": llama_1b(args.seq_len), "moe": moe_1b(args.seq_len)}
    gib = 2 ** 30
    rows = []
    for model, cfg in models.items():
        print(f"{model}: {P.count(zoo.param_specs(cfg)) / 1e9:.2f}B params")
    print(f"fp32, AdamW, remat=full, batch {args.batch_size} x {args.seq_len}, 8 devices; GiB per device")
    print("| strategy | model | mesh | rules | params | arguments (params+opt+batch) | temp | peak est. (args+temp) "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.strategies.split(","):
        if name not in MESHES:
            p.error(f"--strategies: unknown strategy {name!r}; expected some of {', '.join(MESHES)}")
        model = "moe" if name in MOE_STRATEGIES else "llama"
        r = measure(models[model], name, args.batch_size, args.seq_len)
        rows.append(r)
        print(f"| {name} | {model} | {r['mesh']} | {r['rules']} | {r['param_bytes'] / gib:.2f} | "
              f"{r['arguments'] / gib:.2f} | {r['temp'] / gib:.2f} | {(r['arguments'] + r['temp']) / gib:.2f} | "
              f"{r['compile_s']:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
