"""Time per token against sequence length, training and decoding, per family.

    python benchmarks/seq_len.py                    # one preset per decoder family, 1k..16k
    python benchmarks/seq_len.py --presets llama-tiny mamba2-tiny --lengths 1024 4096 --json rows.json

Training: one forward + backward of the LM loss on one row of L tokens (no optimizer), seconds
per token. Decoding: one `zoo.step` with a decoding state of capacity L, seconds per token (an
attention step reads its whole cache, so an empty cache of capacity L costs what a full one
does; a recurrent state does not grow). Before running, each program is compiled and its
`memory_analysis()` checked: programs needing more than --max-gib are skipped and say so (the
XLA attention materialises the L x L scores). Best of --repeats runs (fewer once the runs of
one cell have taken --budget-s seconds: a 16k-token step of a slow family takes a minute on a
loaded 2-core CPU); the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from zoo import train

# One preset per decoder family (softmax attention first, then the recurrent and hybrid ones).
FAMILIES = ("llama-tiny", "mistral-tiny", "mla-tiny", "mixtral-tiny", "mamba-tiny", "mamba2-tiny", "rwkv4-tiny",
            "rwkv7-tiny", "retnet-tiny", "gla-tiny", "deltanet-tiny", "gated-deltanet-tiny", "linear-attention-tiny",
            "xlstm-tiny", "mingru-tiny", "minlstm-tiny", "hybrid-tiny")


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    need = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return compiled, need


def _best(compiled, args, repeats: int, budget_s: float) -> float:
    """Best of `repeats` timed runs after one warm-up, stopping early once `budget_s` is spent
    (a warm-up over the budget is itself the one sample: the program is already compiled)."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    spent = best = time.perf_counter() - t0
    if spent > budget_s:
        return best
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def measure(name: str, length: int, *, max_bytes: float, repeats: int, decode_steps: int,
            budget_s: float = 30.0) -> dict:
    cfg = zoo.presets.get(name, max_len=max(length, 256))
    params = zoo.init(jax.random.key(0), cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, length + 1), dtype=np.int32))
    row = {"preset": name, "seq_len": length}

    def loss(p, t):
        return train.loss_fn(p, t[:, :-1], t[:, 1:], cfg)

    compiled, need = _compiled(jax.value_and_grad(loss), params, tokens)
    row["train_bytes"] = int(need)
    if need > max_bytes:
        row["train_s_per_token"] = None
        row["train_skipped"] = f"needs {need / 2**30:.1f} GiB > --max-gib"
    else:
        row["train_s_per_token"] = _best(compiled, (params, tokens), repeats, budget_s) / length
    del compiled

    state = zoo.init_state(cfg, 1, length)

    def steps(p, tok_B, s):
        def body(carry, _):
            tok, s = carry
            logits, s = zoo.step(p, tok, s, cfg=cfg)
            return (jnp.argmax(logits, -1).astype(jnp.int32), s), None
        return jax.lax.scan(body, (tok_B, s), None, length=decode_steps)[0]

    compiled, need = _compiled(steps, params, tokens[:, 0], state)
    row["decode_bytes"] = int(need)
    if need > max_bytes:
        row["decode_s_per_token"] = None
        row["decode_skipped"] = f"needs {need / 2**30:.1f} GiB > --max-gib"
    else:
        row["decode_s_per_token"] = _best(compiled, (params, tokens[:, 0], state), repeats, budget_s) / decode_steps
    row["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(FAMILIES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--max-gib", type=float, default=3.0, help="skip programs needing more memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per timing (one scan)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a cell after this long")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows here (as they come)")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch 1; presets at their tiny sizes "
          f"(d_model 64); us per token")
    print(f"{'preset':<22}{'L':>7}{'train us/tok':>14}{'decode us/tok':>15}{'state':>11}")
    rows = []
    for name in args.presets:
        for length in args.lengths:
            r = measure(name, length, max_bytes=args.max_gib * 2**30, repeats=args.repeats,
                        decode_steps=args.decode_steps, budget_s=args.budget_s)
            rows.append(r)
            if args.json_path:
                with open(args.json_path, "w") as f:
                    json.dump(rows, f, indent=1)
            t = "skipped" if r["train_s_per_token"] is None else f"{r['train_s_per_token'] * 1e6:.1f}"
            d = "skipped" if r["decode_s_per_token"] is None else f"{r['decode_s_per_token'] * 1e6:.0f}"
            print(f"{name:<22}{length:>7}{t:>14}{d:>15}{r['state_bytes'] / 2**10:>9.0f}KiB", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
