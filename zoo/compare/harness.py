"""Train and measure every family on every task under one budget; return results.json's dict.

One budget for all: the same parameter target (non-embedding, solved per family), the same
seed (initialisation and batches), the same steps, batch and learning-rate sweep. For each
(family, task) the sweep trains all learning rates at once (`sweep.train_sweep`) and reports
the best member on held-out data, as Zoology does.

Per family the speed and memory numbers come from the reference task (language modelling when
it is selected, else the first task): `compile_s` and `step_s` are those of the whole sweep step
(R members), `tokens_per_s` counts the tokens of all members, `mfu` is analytic training FLOP/s
over the fp32 matmul peak measured at the start of the run, and `peak_bytes` is XLA's plan for
that compiled sweep step (params, gradients and AdamW moments of all R members, activations).

Compilation dominates a CPU-sized comparison, so a run compiles as little as it can: every task
trains on rows of the run's longest length, shorter tasks packed several sequences to a row
(`tasks.pack`), with the run's largest vocabulary (`tasks.model_vocab`), hence one sweep step and
one scorer per family; the step takes the schedule as an input, so tasks with other step counts
share it too; and all of them are compiled up front (`precompile`, optionally by a thread pool),
before any timed step. `compile_s` is the wall time of that compilation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import numpy as np

import zoo
from zoo import hugepages
from zoo.compare import families as F
from zoo.compare import measure, sweep
from zoo.compare import tasks as T


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """Attributes:
    target_params: non-embedding parameters every family is sized to.
    steps, batch_size: optimizer steps, and rows per step (per sweep member). A row holds the
      run's longest task length in tokens (`tasks.row_length`): a task half as long puts two of
      its sequences in each row, so every task trains on the same tokens per step.
    lrs: the learning-rate sweep (peak of warmup + cosine; AdamW, weight decay 0.1).
    warmup_fraction: warmup steps as a fraction of steps.
    eval_batches, eval_batch_size: held-out batches scored per task, and rows per batch (packed
      like the training rows).
    decode_contexts: cache lengths at which decoding is timed and its state measured.
    mqar_steps, mqar_batch_size, mqar_lrs: MQAR's own steps, batch and sweep where they differ
      (None: the general ones). Attention leaves MQAR's ln(4) plateau only after a few hundred
      steps, far more than a language-modelling smoke run needs (docs/compare.md, "MQAR on a CPU").
    xla_optimization_level: XLA's backend optimisation level for the sweep steps, scorers and
      decoding steps (None: XLA's default). Lower levels compile faster and run slower (0: about
      half the compile time, 2.5-12x slower steps; 1: 10-30% less compile time, steps up to 1.4x
      slower): the reported compile, step and decoding times are then not comparable with a run
      at the default (`meta.xla_optimization_level` records it).
    """

    target_params: int
    steps: int
    batch_size: int
    lrs: tuple[float, ...]
    warmup_fraction: float = 0.1
    eval_batches: int = 2
    eval_batch_size: int = 128
    decode_contexts: tuple[int, ...] = (1024, 4096, 16384)
    mqar_steps: int | None = None
    mqar_batch_size: int | None = None
    mqar_lrs: tuple[float, ...] | None = None
    xla_optimization_level: int | None = None

    def __post_init__(self):
        for name in ("target_params", "steps", "batch_size", "eval_batches", "eval_batch_size",
                     "mqar_steps", "mqar_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Budget.{name}: expected a positive int, got {v!r}")
        for name in ("lrs", "mqar_lrs"):
            v = getattr(self, name)
            if v is not None and (not v or not all(x > 0 for x in v)):
                raise ValueError(f"Budget.{name}: expected a non-empty tuple of positive rates, got {v!r}")
        level = self.xla_optimization_level
        if level is not None and (not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 3):
            raise ValueError(f"Budget.xla_optimization_level: expected None or an int in 0..3, got {level!r}")

    def for_task(self, task: T.Task) -> "Budget":
        """This budget with MQAR's own steps, batch and rates in place for an MQAR task."""
        if not task.name.startswith("mqar_"):
            return self
        return dataclasses.replace(self, steps=self.mqar_steps or self.steps,
                                   batch_size=self.mqar_batch_size or self.batch_size,
                                   lrs=self.mqar_lrs or self.lrs)


#: The MQAR sanity budget (tests/zoo/test_compare.py, docs/compare.md "MQAR on a CPU"): a 2-layer
#: d 56 Llama at 80k parameters crosses 0.9 on (64, 4) with vocabulary 72 after ~500-600 of these
#: 800 steps x 32 at lr 3e-3. Far more than a smoke run can afford for 13 families on a CPU.
MQAR_SANITY = dict(target_params=80_000, steps=800, batch_size=32, lrs=(3e-3,), eval_batches=2)

BUDGETS = {
    # A smoke run: every family compiles one sweep step (MQAR and LM share length 64 and the LM
    # vocabulary), one scorer and its decode steps, and trains 20 steps per task, all at XLA
    # level 1: it compiles 10-30% faster than the default level and steps nearly as fast (level 0
    # compiles faster still but its steps are 2.5-12x slower; docs/compare.md, "Compilation").
    # It checks that every family trains, scores, decodes and reports; MQAR stays at chance (see
    # MQAR_SANITY), and its times are not comparable with a run at XLA's default level.
    # At 20 steps 1e-2 was the better rate for every family and left Mamba-2 at 8.2 bits per byte
    # on LM; 3e-2 brings it to 4.3 (docs/compare.md), hence this sweep.
    "quick": Budget(target_params=20_000, steps=20, batch_size=8, lrs=(1e-2, 3e-2), eval_batches=1,
                    eval_batch_size=64, decode_contexts=(256, 1024), xla_optimization_level=1),
    # Ten minutes on a 2-core CPU: rows of 256 tokens (MQAR's longest), 6 per step, so every task
    # trains on 1536 tokens a step and each family compiles one sweep step and one scorer at XLA's
    # default level; 60 steps per task (docs/compare.md).
    "default": Budget(target_params=30_000, steps=60, batch_size=6, lrs=(3e-3, 1e-2), eval_batches=2,
                      eval_batch_size=32),
    "full": Budget(target_params=1_000_000, steps=5000, batch_size=64,
                   lrs=tuple(float(x) for x in np.logspace(-4, -2, 4)), eval_batches=8,
                   decode_contexts=(1024, 4096, 16384, 65536)),
}


class Progress:
    """One status line on stderr (rewritten in place on a terminal, a line per update otherwise)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def show(self, what: str, final: bool = False, transient: bool = False) -> None:
        """Rewrite the status line; `transient` updates (steps within a task) only on a terminal."""
        if not self.enabled or (transient and not self.tty):
            return
        elapsed = time.perf_counter() - self.t0
        frac = self.done / max(self.total, 1)
        eta = f", ~{elapsed / frac * (1 - frac):.0f}s left" if 0 < frac < 1 else ""
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        line = f"[{bar}] {self.done}/{self.total} {what} ({elapsed:.0f}s{eta})"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _best(task: T.Task, values_R: np.ndarray) -> int:
    vals = np.where(np.isfinite(values_R), values_R, -np.inf if task.higher_is_better else np.inf)
    return int(np.argmax(vals) if task.higher_is_better else np.argmin(vals))


def _curve(losses_S: np.ndarray, points: int = 100) -> list[float]:
    """The loss curve averaged into at most `points` buckets (JSON-friendly floats; NaN -> None)."""
    buckets = np.array_split(losses_S, min(points, len(losses_S)))
    return [None if not np.isfinite(b).all() else float(np.mean(b)) for b in buckets]


def run_task(sized: F.Sized, task: T.Task, budget: Budget, seed: int,
             on_step: Callable[[int], Any] | None = None, *,
             vocab_size: int | None = None, row_len: int | None = None) -> tuple[dict, sweep.SweepResult, Any]:
    """Train the sweep on `task` and score it on held-out data; (results entry, sweep, config).

    vocab_size: the model's vocabulary (default the task's; `tasks.model_vocab` gives the one
      shared by the tasks of a run, so that they share a compiled step).
    row_len: pack the task's sequences into rows of this many tokens (`tasks.pack`; default: one
      sequence per row, unpacked).
    """
    budget = budget.for_task(task)
    fam = F.get(sized.family)
    vocab = task.vocab_size if vocab_size is None else vocab_size
    if vocab < task.vocab_size:
        raise ValueError(f"run_task: vocab_size: expected at least the task's {task.vocab_size}, got {vocab}")
    if row_len is not None and row_len < task.seq_len:
        raise ValueError(f"run_task: row_len: expected at least the task's length {task.seq_len}, got {row_len}")
    cfg = fam.config(vocab_size=vocab, max_len=row_len or task.seq_len, d_model=sized.d_model, d_ff=sized.d_ff)
    res = sweep.train_sweep(cfg, budget.lrs, T.train_batches(task, budget.batch_size, seed, row_len),
                            steps=budget.steps,
                            warmup_steps=min(budget.steps - 1, max(1, int(budget.warmup_fraction * budget.steps))),
                            seed=seed, on_step=on_step, xla_level=budget.xla_optimization_level)
    held_out = T.eval_batches(task, budget.eval_batch_size, budget.eval_batches, seed, row_len)
    score = sweep.accuracy_R if task.metric == "accuracy" else sweep.bits_per_token_R
    values_R = score(res.params, cfg, held_out, xla_level=budget.xla_optimization_level)
    best = _best(task, values_R)
    entry = {
        "metric": task.metric,
        "value": float(values_R[best]),
        "lr": res.lrs[best],
        "sweep": {f"{lr:.3g}": float(v) for lr, v in zip(res.lrs, values_R)},
        "steps": budget.steps,
        "tokens": budget.steps * budget.batch_size * ((row_len or task.seq_len) // task.seq_len) * task.seq_len,
        "model_vocab_size": vocab,
        "loss_curve": _curve(res.losses_RS[best]),
    }
    return entry, res, cfg


def _rows(tasks: list[T.Task]) -> int | None:
    """The row length a run of `tasks` packs into, or None when every task fills the rows."""
    return T.row_length(tasks) if T.packed(tasks) else None


def run_family(name: str, tasks: list[T.Task], budget: Budget, seed: int, peak_flops: float,
               progress: Progress | None = None) -> dict:
    ref = next((t for t in tasks if t.name == "lm"), tasks[0])
    sized = F.solve(name, budget.target_params, vocab_size=T.model_vocab(tasks), max_len=T.row_length(tasks))
    out: dict[str, Any] = {
        "params": sized.params, "non_embedding_params": sized.non_embedding_params,
        "target_params": sized.target, "d_model": sized.d_model, "d_ff": sized.d_ff,
        "description": F.get(name).description, "tasks": {},
    }
    ref_result = ref_cfg = ref_params = None
    for task in tasks:
        label = f"{name} {task.name}"

        def tick(s, label=label, steps=budget.for_task(task).steps):
            if progress is not None and (s + 1) % max(1, steps // 10) == 0:
                progress.show(f"{label} step {s + 1}/{steps}", transient=True)

        entry, res, cfg = run_task(sized, task, budget, seed, tick, vocab_size=T.model_vocab(tasks),
                                   row_len=_rows(tasks))
        out["tasks"][task.name] = entry
        if task is ref:
            ref_result, ref_cfg = res, cfg
            ref_params = _member(res.params, _best(task, np.asarray(
                [entry["sweep"][f"{lr:.3g}"] for lr in res.lrs])))
        if progress is not None:
            progress.done += 1
            progress.show(f"{label}: {task.metric} {entry['value']:.3f}")

    ref_budget = budget.for_task(ref)
    R, B, L = len(ref_budget.lrs), ref_budget.batch_size, T.row_length(tasks)
    # Attention's context is the reference task's own sequences, packed or not.
    flops = measure.analytic_flops_per_token(ref_cfg, ref.seq_len)
    out["flops_per_token"] = flops
    out["xla_flops_per_token"] = measure.xla_flops_per_token(ref_cfg, B, L)
    out["compile_s"] = ref_result.compile_s
    out["step_s"] = ref_result.step_s
    out["tokens_per_s"] = R * B * L / ref_result.step_s
    out["mfu"] = flops * out["tokens_per_s"] / peak_flops
    out["peak_bytes"] = ref_result.peak_bytes
    out["reference_task"] = ref.name
    out["decode"] = {}
    for ctx in budget.decode_contexts:
        s_per_token = measure.decode_seconds_per_token(ref_cfg, ref_params, ctx,
                                                       xla_level=budget.xla_optimization_level)
        out["decode"][str(ctx)] = {"s_per_token": s_per_token, "state_bytes": measure.state_bytes(ref_cfg, ctx)}
        if progress is not None:
            progress.show(f"{name} decode at context {ctx}", transient=True)
    return out


def shape_groups(tasks: list[T.Task], budget: Budget) -> list[tuple[int, int, int, int, bool]]:
    """The distinct (row length, model vocabulary, rows, members, packed) of `tasks`: one compiled
    sweep step and one scorer each, per family. One unless MQAR has a budget of its own."""
    groups = []
    for task in tasks:
        b = budget.for_task(task)
        g = (T.row_length(tasks), T.model_vocab(tasks), b.batch_size, len(b.lrs), T.packed(tasks))
        if g not in groups:
            groups.append(g)
    return groups


def precompile(family_names: list[str], tasks: list[T.Task], budget: Budget, threads: int,
               progress: Progress | None = None) -> float:
    """Compile every family's initialisers, sweep steps, scorers and decoding steps in a pool of
    `threads` before any training; returns the wall seconds. The phase ends before the first
    timed step, so no compile competes with a measurement; the caches in `sweep` and `measure`
    then serve `run_task` and `run_family`. With threads > 1 several compile at once (XLA's
    compiler releases the GIL)."""
    import concurrent.futures

    t0 = time.perf_counter()
    ref = next((t for t in tasks if t.name == "lm"), tasks[0])
    level = budget.xla_optimization_level
    jobs = []
    for name in family_names:
        fam = F.get(name)
        sized = F.solve(name, budget.target_params, vocab_size=T.model_vocab(tasks), max_len=T.row_length(tasks))
        for L, V, B, R, packed in shape_groups(tasks, budget):
            cfg = fam.config(vocab_size=V, max_len=L, d_model=sized.d_model, d_ff=sized.d_ff)
            jobs.append((sweep._compiled_start, (cfg, R, 0.1)))
            jobs.append((sweep.compile_step, (cfg, R, B, L, 0.1, level, packed)))
            jobs.append((sweep.compile_scorer, (cfg, R, budget.eval_batch_size, L, level, packed)))
        ref_cfg = fam.config(vocab_size=T.model_vocab(tasks), max_len=T.row_length(tasks), d_model=sized.d_model,
                             d_ff=sized.d_ff)
        jobs += [(measure.compile_decoder, (ref_cfg, ctx, level)) for ctx in budget.decode_contexts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        for i, fut in enumerate(concurrent.futures.as_completed(futures)):
            fut.result()
            if progress is not None:
                progress.show(f"compiled {i + 1}/{len(jobs)} executables on {threads} threads",
                              transient=True)
    return time.perf_counter() - t0


def _member(params_R: Any, r: int) -> Any:
    """Member r's parameters, sliced on the host: an eager `a[r]` would compile a slice per shape."""
    import jax
    return jax.device_put(jax.tree.map(lambda a: np.asarray(a)[r], params_R))


def meta(*, budget: Budget, mode: str, seed: int, command: str, peak_flops: float,
         family_names: list[str], task_list: list[T.Task]) -> dict:
    import platform

    import jax
    import optax

    dev = jax.devices()[0]
    return {
        "schema_version": 1,
        "command": command,
        "mode": mode,
        "seed": seed,
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
                   "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
                     "optax": optax.__version__},
        "matmul_peak_flops": peak_flops,
        "row_length": T.row_length(task_list),
        "packed": T.packed(task_list),
        "malloc_hugepages": hugepages.active(),
        "xla_optimization_level": budget.xla_optimization_level,
        "budget": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(budget).items()},
        "families": family_names,
        "tasks": {t.name: {"metric": t.metric, "vocab_size": t.vocab_size, "seq_len": t.seq_len,
                           "model_vocab_size": T.model_vocab(task_list),
                           "source": None if t.source is None else repr(t.source)} for t in task_list},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(family_names: list[str], task_list: list[T.Task], budget: Budget, *, seed: int = 0, mode: str = "default",
        command: str = "", show_progress: bool = True, compile_threads: int | None = None) -> dict:
    """Every family on every task; returns the results dict (see docs/compare.md for the schema).

    compile_threads: size of the pool that compiles every executable up front, before training
      (default: 2, or 1 on a 1-CPU machine; on the loaded 2-core CPU 2 threads took 10% less wall
      time than 1 for the same CPU time: tracing and lowering hold the GIL, docs/compare.md).
    """
    t0 = time.perf_counter()
    peak = measure.matmul_peak_flops()
    progress = Progress(len(family_names) * len(task_list), enabled=show_progress)
    results = {"meta": meta(budget=budget, mode=mode, seed=seed, command=command, peak_flops=peak,
                            family_names=family_names, task_list=task_list), "families": {}}
    threads = compile_threads or min(2, os.cpu_count() or 1)
    results["meta"]["compile_threads"] = threads
    results["meta"]["precompile_s"] = precompile(family_names, task_list, budget, threads, progress)
    for name in family_names:
        results["families"][name] = run_family(name, task_list, budget, seed, peak, progress)
    results["meta"]["wall_s"] = time.perf_counter() - t0
    progress.show("done", final=True)
    return results
