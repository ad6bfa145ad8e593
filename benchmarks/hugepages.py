"""What glibc's huge-page tunable does to `zoo compare`'s sweep step on this CPU.

    python benchmarks/hugepages.py                                  # transformer, mamba2, xlstm
    python benchmarks/hugepages.py --families mamba gla --steps 40 --rounds 3

The tunable (`glibc.malloc.hugetlb=1`, see zoo/hugepages.py) is read when a process starts, so
the two settings cannot share a process: each (family, setting) runs in a fresh child process
(`--child`), the settings alternate within a round, and each row reports the median over rounds.
A child compiles the default mode's sweep step (2 members, packed rows of 256 tokens, the run's
vocabulary), runs `--steps` steps on the MQAR (64, 4) task's packed batches, and reports the
median step time and the minor page faults per step (`getrusage`). The ratio column is
off / on: how many times faster the step runs with the tunable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(family: str, steps: int) -> dict:
    import numpy as np

    from zoo.compare import families as F
    from zoo.compare import harness as H
    from zoo.compare import sweep
    from zoo.compare import tasks as T

    budget, tasks = H.BUDGETS["default"], T.default_tasks("default")
    row_len, vocab = T.row_length(tasks), T.model_vocab(tasks)
    sized = F.solve(family, budget.target_params, vocab_size=vocab, max_len=row_len)
    cfg = F.get(family).config(vocab_size=vocab, max_len=row_len, d_model=sized.d_model, d_ff=sized.d_ff)
    R = len(budget.lrs)
    sweep.compile_step(cfg, R, budget.batch_size, row_len, packed=True)
    sweep.train_sweep(cfg, budget.lrs, T.train_batches(tasks[0], budget.batch_size, 0, row_len),
                      steps=2, warmup_steps=1)  # first-call allocations out of the way
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    res = sweep.train_sweep(cfg, budget.lrs, T.train_batches(tasks[0], budget.batch_size, 0, row_len),
                            steps=steps, warmup_steps=1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"step_ms": 1e3 * res.step_s, "faults_per_step": faults / steps, "finite": bool(np.isfinite(res.losses_RS).all())}


def run_child(family: str, steps: int, on: bool) -> dict:
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    env["GLIBC_TUNABLES"] = ":".join(tunables + ["glibc.malloc.hugetlb=" + ("1" if on else "0")])
    out = subprocess.run([sys.executable, __file__, "--child", family, "--steps", str(steps)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["transformer", "mamba2", "xlstm"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    print(f"# THP mode: {thp}; {args.steps} steps per child, {args.rounds} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| family | step ms, off | step ms, on | off / on | page faults per step, off | on |")
    print("|---|---|---|---|---|---|")
    for family in args.families:
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for on in (False, True):
                runs[on].append(run_child(family, args.steps, on))
        ms = {on: statistics.median(r["step_ms"] for r in runs[on]) for on in runs}
        pf = {on: statistics.median(r["faults_per_step"] for r in runs[on]) for on in runs}
        print(f"| {family} | {ms[False]:.1f} | {ms[True]:.1f} | {ms[False] / ms[True]:.2f}x | "
              f"{pf[False]:,.0f} | {pf[True]:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
