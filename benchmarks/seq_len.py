"""Time per token against sequence length, training and decoding, per family.

    python benchmarks/seq_len.py --lengths 1024 2048 4096 8192 16384

Training: one forward + backward of the LM loss on one row of L tokens (no optimizer), seconds
per token. Decoding: one `zoo.step` with a decoding state of capacity L, seconds per token (an
attention step reads its whole cache, so an empty cache of capacity L costs what a full one
does; a recurrent state does not grow). Before running, each program is compiled and its
`memory_analysis()` checked: programs needing more than --max-gib are skipped and say so (the
XLA attention materialises the L x L scores). Best of --repeats; the machine is shared.
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

FAMILIES = ("llama-tiny", "mamba-tiny", "mamba2-tiny", "rwkv7-tiny", "retnet-tiny", "xlstm-tiny", "gla-tiny",
            "gated-deltanet-tiny")


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    need = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return compiled, need


def _best(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure(name: str, length: int, *, max_bytes: float, repeats: int, decode_steps: int) -> dict:
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
        row["train_s_per_token"] = _best(compiled, (params, tokens), repeats) / length
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
        row["decode_s_per_token"] = _best(compiled, (params, tokens[:, 0], state), repeats) / decode_steps
    row["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(FAMILIES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--max-gib", type=float, default=3.0, help="skip programs needing more memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per timing (one scan)")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch 1; presets at their tiny sizes "
          f"(d_model 64); us per token")
    print(f"{'preset':<22}{'L':>7}{'train us/tok':>14}{'decode us/tok':>15}{'state':>11}")
    rows = []
    for name in args.presets:
        for length in args.lengths:
            r = measure(name, length, max_bytes=args.max_gib * 2**30, repeats=args.repeats,
                        decode_steps=args.decode_steps)
            rows.append(r)
            t = "skipped" if r["train_s_per_token"] is None else f"{r['train_s_per_token'] * 1e6:.1f}"
            d = "skipped" if r["decode_s_per_token"] is None else f"{r['decode_s_per_token'] * 1e6:.0f}"
            print(f"{name:<22}{length:>7}{t:>14}{d:>15}{r['state_bytes'] / 2**10:>9.0f}KiB", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
