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

Clock (`--clock`): `cpu` (default) times each run by the process's CPU seconds
(`time.process_time()`, all threads), which on a shared machine counts the work and not the
wait for a core; pin the process to one core and keep XLA to one thread so the CPU seconds are
one core's seconds:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 nice -n 5 python benchmarks/seq_len.py --presets mamba-tiny --json mamba.json

`wall` uses `time.perf_counter()`. Rows also carry the wall seconds of the timed run
(`train_wall_s`: one step; `decode_wall_s`: the --decode-steps steps) and the peak resident
set. Each row also carries its ratio to the `--baseline` preset (llama-tiny, softmax
attention) at the same length, measured in the same process (once per length, before the first
other preset), so ratios stay comparable between processes run at different loads.

Skips name their reason in the row: a program whose memory, extrapolated from the same preset's
two shorter programs, clearly exceeds --max-gib is not even compiled (an attention gradient at
16k compiles for minutes), and a cell whose step, extrapolated linearly from the previous length,
would take more than --max-step-s seconds of wall time is not run.
"""

from __future__ import annotations

import argparse
import json
import resource
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


_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _best(compiled, args, repeats: int, budget_s: float, clock: str) -> tuple[float, float]:
    """(best `clock` seconds, wall seconds of that run) of `repeats` timed runs after one warm-up,
    stopping early once `budget_s` wall seconds are spent (a warm-up over the budget is itself
    the one sample: the program is already compiled)."""
    tick = _CLOCKS[clock]

    def run():
        t0, c0 = time.perf_counter(), tick()
        jax.block_until_ready(compiled(*args))
        return tick() - c0, time.perf_counter() - t0

    best = run()
    spent = best[1]
    if spent > budget_s:
        return best
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        took = run()
        best, spent = min(best, took), spent + took[1]
        if spent > budget_s:
            break
    return best


def _peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux: the process's high-water mark so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _too_slow(prev: dict | None, key: str, length: int, max_step_s: float) -> str | None:
    """Why the `key` ("train" or "decode") cell at `length` would take too long, from the
    previous (shorter) row of the same preset."""
    if prev is not None and "s wall >" in (prev.get(key + "_skipped") or ""):
        return f"slower than at L {prev['seq_len']}, already over {max_step_s:.0f} s"
    if prev is None or prev.get(key + "_wall_s") is None:
        return None
    est = prev[key + "_wall_s"] * length / prev["seq_len"]
    if est > max_step_s:
        return (f"one step est. {est:.0f} s wall > {max_step_s:.0f} s "
                f"(x{length // prev['seq_len']} the L {prev['seq_len']} step)")
    return None


def _too_big(prevs: list[dict], key: str, length: int, max_bytes: float) -> str | None:
    """Why the `key` program at `length` would need too much memory, judged from the same
    preset's shorter rows without compiling it: compiling an 8k or 16k attention gradient only
    to read its memory_analysis() takes minutes (XLA warns of a very slow compile). Extrapolates
    from the two previous programs with the growth exponent they show (2 for materialised
    attention scores, about 1 for a recurrence) and skips only a clear excess (twice the limit);
    anything closer is compiled and checked."""
    if prevs and "GiB" in (prevs[-1].get(key + "_skipped") or ""):
        return f"needs more than at L {prevs[-1]['seq_len']}, already over --max-gib (not compiled)"
    if len(prevs) < 2 or any(r.get(key + "_bytes") is None for r in prevs[-2:]):
        return None
    (l0, b0), (l1, b1) = ((r["seq_len"], r[key + "_bytes"]) for r in prevs[-2:])
    exponent = float(np.log(b1 / b0) / np.log(l1 / l0))
    est = b1 * (length / l1) ** exponent
    if est > 2 * max_bytes:
        return (f"needs ~{est / 2**30:.0f} GiB > --max-gib (memory ~ L^{exponent:.1f} from L {l0} to {l1}; "
                f"not compiled)")
    return None


def _cell(row: dict, key: str, fn, args, n_tokens: int, prevs: list[dict], *, max_bytes: float,
          max_step_s: float, repeats: int, budget_s: float, clock: str) -> None:
    """Fill row[key + "_s_per_token" | "_wall_s" | "_bytes" | "_skipped"] for program `fn`."""
    row[key + "_s_per_token"] = row[key + "_wall_s"] = row[key + "_bytes"] = None
    why = _too_big(prevs, key, row["seq_len"], max_bytes)
    if why is None:
        compiled, need = _compiled(fn, *args)
        row[key + "_bytes"] = int(need)
        if need > max_bytes:
            why = f"needs {need / 2**30:.1f} GiB > --max-gib"
        else:
            why = _too_slow(prevs[-1] if prevs else None, key, row["seq_len"], max_step_s)
    if why is not None:
        row[key + "_skipped"] = why
        return
    t, wall = _best(compiled, args, repeats, budget_s, clock)
    row[key + "_s_per_token"], row[key + "_wall_s"] = t / n_tokens, wall


def measure(name: str, length: int, *, max_bytes: float, repeats: int, decode_steps: int,
            budget_s: float = 30.0, clock: str = "cpu", prevs: list[dict] = (),
            max_step_s: float = float("inf")) -> dict:
    """One row: training and decoding seconds per token of preset `name` at `length` tokens
    (`prevs`: the same preset's rows at shorter lengths, for the memory and time estimates)."""
    cfg = zoo.presets.get(name, max_len=max(length, 256))
    params = zoo.init(jax.random.key(0), cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, length + 1), dtype=np.int32))
    row = {"preset": name, "seq_len": length, "clock": clock}
    kw = dict(max_bytes=max_bytes, max_step_s=max_step_s, repeats=repeats, budget_s=budget_s, clock=clock)

    def loss(p, t):
        return train.loss_fn(p, t[:, :-1], t[:, 1:], cfg)

    _cell(row, "train", jax.value_and_grad(loss), (params, tokens), length, list(prevs), **kw)

    state = zoo.init_state(cfg, 1, length)

    def steps(p, tok_B, s):
        def body(carry, _):
            tok, s = carry
            logits, s = zoo.step(p, tok, s, cfg=cfg)
            return (jnp.argmax(logits, -1).astype(jnp.int32), s), None
        return jax.lax.scan(body, (tok_B, s), None, length=decode_steps)[0]

    _cell(row, "decode", steps, (params, tokens[:, 0], state), decode_steps, list(prevs), **kw)
    row["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
    row["peak_rss_gib"] = round(_peak_rss_gib(), 2)
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(FAMILIES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--max-gib", type=float, default=3.0, help="skip programs needing more memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per timing (one scan)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a cell after this long")
    parser.add_argument("--max-step-s", type=float, default=180.0,
                        help="skip a cell whose step, extrapolated from the previous length, takes longer")
    parser.add_argument("--clock", choices=tuple(_CLOCKS), default="cpu", help="what a timing counts")
    parser.add_argument("--baseline", default="llama-tiny",
                        help="preset each row is divided by, same length, same process ('none': no ratios)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows here (as they come)")
    args = parser.parse_args(argv)
    kw = dict(max_bytes=args.max_gib * 2**30, repeats=args.repeats, decode_steps=args.decode_steps,
              budget_s=args.budget_s, clock=args.clock, max_step_s=args.max_step_s)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch 1; presets at their tiny sizes "
          f"(d_model 64); us per token by the {args.clock} clock; ratio = over {args.baseline} at the same L")
    print(f"{'preset':<22}{'L':>7}{'train us/tok':>14}{'ratio':>7}{'decode us/tok':>15}{'ratio':>7}{'state':>11}"
          f"{'rss':>8}")
    rows, base, prev_base = [], {}, []
    rows_out = {"rows": rows, "baseline": base}

    def show(r):
        t = "skipped" if r["train_s_per_token"] is None else f"{r['train_s_per_token'] * 1e6:.1f}"
        d = "skipped" if r["decode_s_per_token"] is None else f"{r['decode_s_per_token'] * 1e6:.0f}"
        tr = r.get("train_ratio")
        dr = r.get("decode_ratio")
        print(f"{r['preset']:<22}{r['seq_len']:>7}{t:>14}{'' if tr is None else f'{tr:.2f}':>7}{d:>15}"
              f"{'' if dr is None else f'{dr:.2f}':>7}{r['state_bytes'] / 2**10:>9.0f}KiB"
              f"{r['peak_rss_gib']:>6.1f}G", flush=True)

    for name in args.presets:
        prevs = []
        for length in args.lengths:
            if args.baseline != "none" and length not in base:
                # Measured here, right before the rows that are divided by it.
                base[length] = measure(args.baseline, length, prevs=prev_base, **kw)
                prev_base.append(base[length])
                if name != args.baseline:
                    show(base[length])
            r = base[length] if name == args.baseline else measure(name, length, prevs=prevs, **kw)
            prevs.append(r)
            if args.baseline != "none":
                r = dict(r, baseline=args.baseline,
                         train_ratio=_ratio(r["train_s_per_token"], base[length]["train_s_per_token"]),
                         decode_ratio=_ratio(r["decode_s_per_token"], base[length]["decode_s_per_token"]))
            rows.append(r)
            if args.json_path:
                with open(args.json_path, "w") as f:
                    json.dump(rows_out, f, indent=1)
            show(r)
    print(json.dumps(rows_out))
    return rows


if __name__ == "__main__":
    main()
