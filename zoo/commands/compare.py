"""`zoo compare`: train and measure sequence-model families under one budget, write a report.

    zoo compare --out compare_out                       # every family, default tasks (docs/compare.md: times)
    zoo compare --quick                                 # a smoke run of every family
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

from zoo.cli import non_negative_int, positive_int


def add_parser(sub) -> None:
    from zoo.compare import families, tasks

    c = sub.add_parser("compare", help="train and measure model families side by side",
                       description="Train every family on MQAR, selective copying, induction heads and "
                                   "byte-level language modelling under one budget (same parameters, data, "
                                   "seed, steps and learning-rate sweep); measure FLOPs, speed, memory and "
                                   "decoding; write report.md, results.json and plots.")
    c.add_argument("--families", default=None,
                   help=f"comma-separated families (default: all): {','.join(families.names())}")
    c.add_argument("--tasks", default=None,
                   help="comma-separated tasks or groups (default: the mode's tasks): "
                        f"{','.join(tasks.GROUPS)} or a task name such as mqar_64_4")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="a smoke-sized run (MQAR 64/4 and a short LM task), compiled at XLA level 1: "
                           "its times are not comparable with other modes")
    mode.add_argument("--full", action="store_true",
                      help="paper-scale budget (MQAR up to 512/64, 1M parameters, 5000 steps): for accelerators")
    c.add_argument("--scaling", action="store_true",
                   help="also sweep model sizes per family on language modelling and fit loss = a * FLOPs^b")
    c.add_argument("--out", default="compare_out", help="output directory (default compare_out)")
    c.add_argument("--seed", type=non_negative_int, default=0, help="init and data seed (default 0)")
    c.add_argument("--steps", type=positive_int, default=None, help="override the mode's steps per task")
    c.add_argument("--target-params", type=positive_int, default=None,
                   help="override the mode's non-embedding parameter target per family")
    c.add_argument("--compile-threads", type=positive_int, default=None,
                   help="threads that compile every family's sweep steps and scorers before training "
                        "(default 2, or 1 on a 1-CPU machine)")
    c.add_argument("--no-progress", action="store_true", help="do not print the progress line")
    c.set_defaults(run=cmd_compare, subparser=c)


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from zoo.compare import families as F
    from zoo.compare import harness as H
    from zoo.compare import report, scaling
    from zoo.compare import tasks as T

    names = F.names() if args.families is None else _split(args.families)
    unknown = [n for n in names if n not in F.FAMILIES]
    if unknown or not names:
        parser.error(f"--families: unknown family {', '.join(map(repr, unknown)) or '(none given)'}; "
                     f"choose from {', '.join(F.names())}")
    mode = "quick" if args.quick else "full" if args.full else "default"
    all_tasks = T.default_tasks(mode)
    task_list = all_tasks
    if args.tasks is not None:
        wanted = _split(args.tasks)
        known = set(T.GROUPS) | {t.name for t in all_tasks}
        bad = [w for w in wanted if w not in known]
        if bad or not wanted:
            parser.error(f"--tasks: unknown task {', '.join(map(repr, bad)) or '(none given)'}; choose from "
                         f"{', '.join(sorted(known))}")
        task_list = T.select(all_tasks, wanted)
        if not task_list:
            parser.error(f"--tasks: {args.tasks!r} selects no task of the {mode} mode; its tasks are "
                         f"{', '.join(t.name for t in all_tasks)}")
    budget = H.BUDGETS[mode]
    if args.steps is not None:
        budget = dataclasses.replace(budget, steps=args.steps,
                                     mqar_steps=None if budget.mqar_steps is None else args.steps)
    if args.target_params is not None:
        budget = dataclasses.replace(budget, target_params=args.target_params)

    command = "zoo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else \
        "zoo compare " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if k not in ("run", "subparser"))
    mqar = next((t for t in task_list if t.name.startswith("mqar_")), None)
    mqar_note = ""
    if mqar is not None and budget.for_task(mqar) != budget:
        b = budget.for_task(mqar)
        mqar_note = f" (MQAR: {b.steps} steps x {b.batch_size}, lr sweep {b.lrs})"
    print(f"zoo compare ({mode}): {len(names)} families x {len(task_list)} tasks, "
          f"{budget.target_params:,} non-embedding params each, {budget.steps} steps x {budget.batch_size} "
          f"sequences, lr sweep {budget.lrs}{mqar_note}; writing to {args.out}")
    t0 = time.perf_counter()
    results = H.run(names, task_list, budget, seed=args.seed, mode=mode, command=command,
                    show_progress=not args.no_progress, compile_threads=args.compile_threads)
    if args.scaling:
        progress = H.Progress(len(names) * len(scaling.SIZE_FACTORS), enabled=not args.no_progress)
        results["scaling"] = scaling.run(names, budget, seed=args.seed, progress=progress)
        progress.show("scaling done", final=True)
    results["meta"]["wall_s"] = time.perf_counter() - t0
    paths = report.write(results, args.out)
    for n, f in results["families"].items():
        scores = ", ".join(f"{t} {e['value']:.3f}" for t, e in f["tasks"].items())
        print(f"{n:>15}: {f['non_embedding_params']:,} params, {f['tokens_per_s']:,.0f} tok/s, {scores}")
    print(f"wrote {paths['report']} and {paths['results']} in {results['meta']['wall_s']:.0f}s")
    return 0
