"""Decode time per token and decoding-state bytes at long contexts, per family.

    python benchmarks/decode.py                                   # the table in BENCHMARKS.md
    python benchmarks/decode.py --presets llama-tiny mamba-tiny --contexts 1024 4096 --steps 32

For each preset and context C: prefill C random tokens in chunks (`forward` continuing the state,
so the state is what generation would hold at position C), then time `--steps` greedy decode
steps inside one jitted `lax.fori_loop` (compiled and run once untimed first; the best of
`--repeats` timed runs is reported). State bytes are those of `init_state(cfg, 1, C + steps)`:
attention caches grow with C, recurrent states do not. Variants: "+int8kv" caches K/V in int8,
"+rolling" keeps 4 sink tokens and a 1024-token window in a rolling cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

import zoo
from zoo import generate, model, quantize

DEFAULT_PRESETS = ("llama-tiny", "llama-tiny+int8kv", "llama-tiny+rolling", "mla-tiny", "mamba-tiny",
                   "rwkv7-tiny", "retnet-tiny", "xlstm-tiny")


def config(name: str, max_len: int):
    preset, _, variant = name.partition("+")
    cfg = zoo.presets.get(preset, max_len=max_len)
    if variant == "int8kv":
        cfg = quantize.with_int8_kv_cache(cfg)
    elif variant == "rolling":
        cfg = generate.with_rolling_cache(cfg, sinks=4, window=1024)
    elif variant:
        raise SystemExit(f"--presets: unknown variant {variant!r} in {name!r} (int8kv, rolling)")
    return cfg


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill_chunk(params, tokens_BL, state, cfg):
    return model._forward(params, tokens_BL, cfg, state)[1]


@functools.partial(jax.jit, static_argnames=("cfg", "steps"))
def _decode(params, token_B, state, cfg, steps: int):
    def body(_, carry):
        token_B, state = carry
        logits_B1V, state, _ = model._forward(params, token_B[:, None], cfg, state)
        return jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32), state

    return jax.lax.fori_loop(0, steps, body, (token_B, state))


def measure(name: str, context: int, steps: int, chunk: int, repeats: int) -> dict:
    cfg = config(name, context + steps)
    params = zoo.init(jax.random.key(0), cfg)
    state = zoo.init_state(cfg, 1, context + steps)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    tokens = jax.random.randint(jax.random.key(1), (1, context), 0, cfg.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    for start in range(0, context, chunk):
        state = _prefill_chunk(params, tokens[:, start:start + chunk], state, cfg)
    jax.block_until_ready(state)
    prefill_s = time.perf_counter() - t0
    token_B = tokens[:, -1]
    jax.block_until_ready(_decode(params, token_B, state, cfg, steps))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(_decode(params, token_B, state, cfg, steps))
        best = min(best, time.perf_counter() - t0)
    return {"preset": name, "context": context, "decode_ms_per_token": best * 1e3 / steps,
            "state_bytes": state_bytes, "prefill_s": prefill_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk length (divides the contexts)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
    args = ap.parse_args()
    print(f"# {jax.devices()[0].platform}, batch 1, {args.steps} greedy steps, best of {args.repeats}")
    if not args.json:
        head = " | ".join(f"{c // 1024}k ms/tok | {c // 1024}k state" for c in args.contexts)
        print(f"| preset | {head} |")
        print("|---" * (1 + 2 * len(args.contexts)) + "|")
    for name in args.presets:
        rows = [measure(name, c, args.steps, args.chunk, args.repeats) for c in args.contexts]
        if args.json:
            for r in rows:
                print(json.dumps(r), flush=True)
            continue
        cells = " | ".join(f"{r['decode_ms_per_token']:.2f} | {r['state_bytes'] / 2**20:.2f} MiB" for r in rows)
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
