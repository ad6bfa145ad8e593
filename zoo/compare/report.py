"""Write a comparison: results.json (checked against the schema), report.md, PNG plots.

The schema (docs/compare.md) is the contract with whoever reads results.json:

    {"meta": {...},
     "families": {NAME: {"params": int, "flops_per_token": float, "compile_s": float,
                         "step_s": float, "tokens_per_s": float, "mfu": float, "peak_bytes": int,
                         "decode": {CTX: {"s_per_token": float, "state_bytes": int}},
                         "tasks": {TASK: {"metric": str, "value": float}}}}}

Families and tasks may carry more keys than these (lr chosen, sweep values, loss curves); the
listed ones are always present with these types. Plots need matplotlib (the `[plot]` extra);
without it the report says that they were skipped.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

FAMILY_FIELDS = {"params": int, "flops_per_token": float, "compile_s": float, "step_s": float,
                 "tokens_per_s": float, "mfu": float, "peak_bytes": int, "decode": dict, "tasks": dict}
DECODE_FIELDS = {"s_per_token": float, "state_bytes": int}
TASK_FIELDS = {"metric": str, "value": float}


class SchemaError(ValueError):
    """results.json does not have the documented shape; the message names the path."""


def _check(path: str, value: Any, kind: type) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise SchemaError(f"results{path}: expected {kind.__name__}, got {type(value).__name__} {value!r:.80}")


def validate(results: Any) -> None:
    """Raise SchemaError naming the first entry that breaks the schema."""
    _check("", results, dict)
    for key in ("meta", "families"):
        if key not in results:
            raise SchemaError(f"results: missing key {key!r}")
        _check(f"[{key!r}]", results[key], dict)
    for name, fam in results["families"].items():
        base = f"['families'][{name!r}]"
        _check(base, fam, dict)
        for field, kind in FAMILY_FIELDS.items():
            if field not in fam:
                raise SchemaError(f"results{base}: missing key {field!r}")
            _check(f"{base}[{field!r}]", fam[field], kind)
        for ctx, d in fam["decode"].items():
            if not str(ctx).isdigit():
                raise SchemaError(f"results{base}['decode']: expected context lengths as keys, got {ctx!r}")
            for field, kind in DECODE_FIELDS.items():
                if field not in d:
                    raise SchemaError(f"results{base}['decode'][{ctx!r}]: missing key {field!r}")
                _check(f"{base}['decode'][{ctx!r}][{field!r}]", d[field], kind)
        for task, t in fam["tasks"].items():
            for field, kind in TASK_FIELDS.items():
                if field not in t:
                    raise SchemaError(f"results{base}['tasks'][{task!r}]: missing key {field!r}")
                _check(f"{base}['tasks'][{task!r}][{field!r}]", t[field], kind)


def _json_safe(x: Any) -> Any:
    """NaN and infinities become None (JSON has no literal for them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _si(x: float, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(n: int) -> str:
    for factor, prefix in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= factor:
            return f"{n / factor:.3g} {prefix}"
    return f"{n} B"


def _level_note(level: int | None) -> str:
    if level is None:
        return "Compiled at XLA's default optimisation level."
    return (f"**Compiled at XLA optimisation level {level}** (to compile fast): the compile, step and decoding "
            "times below are of less optimised code and are not comparable with a run at XLA's default level; "
            "the scores do not depend on it.")


def _packing_note(meta: dict) -> str:
    if not meta.get("packed"):
        return ""
    return " (shorter tasks packed several sequences to a row, each in its own segment)"


def markdown(results: dict, plots: list[str], plot_note: str | None) -> str:
    meta, fams = results["meta"], results["families"]
    names = list(fams)
    task_names = list(meta.get("tasks", {})) or sorted({t for f in fams.values() for t in f["tasks"]})
    b = meta.get("budget", {})
    lines = [
        "# Sequence-model families compared", "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Device: {meta.get('device', {})}; matmul peak {_si(meta.get('matmul_peak_flops', float('nan')), 'FLOP/s')} "
        f"(fp32, measured in this run); seed {meta.get('seed')}; versions {meta.get('versions', {})}  ",
        f"Budget ({meta.get('mode')}): {b.get('target_params', '?'):,} non-embedding parameters per family "
        f"(widths solved per family), {b.get('steps')} steps x {b.get('batch_size')} rows of "
        f"{meta.get('row_length', '?')} tokens per task{_packing_note(meta)}, "
        f"learning rates {b.get('lrs')} swept at once, best reported; 2 layers, AdamW (wd 0.1), warmup + cosine.  ",
        f"Wall time: {meta.get('wall_s', float('nan')):.0f} s; glibc huge pages for XLA's buffers: "
        f"{'on' if meta.get('malloc_hugepages') else 'off'}.  ",
        _level_note(meta.get("xla_optimization_level")), "",
        "## Task scores (best of the learning-rate sweep)", "",
        "| family | " + " | ".join(task_names) + " |",
        "|---|" + "---|" * len(task_names),
    ]
    for n in names:
        cells = []
        for t in task_names:
            e = fams[n]["tasks"].get(t)
            cells.append("" if e is None else f"{e['value']:.3f} (lr {e.get('lr', float('nan')):.0e})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Metrics: " + ", ".join(f"{t}: {v['metric']}" for t, v in meta.get("tasks", {}).items())
              + " (accuracy: higher is better; bits per byte: lower is better).", "",
              "## Size and speed", "",
              "| family | d_model | d_ff | params (non-emb.) | FLOPs/token (analytic / XLA) | compile s | step s | "
              "tokens/s | MFU | peak memory |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        f = fams[n]
        lines.append(
            f"| {n} | {f.get('d_model')} | {f.get('d_ff') or '-'} | {f['params']:,} ({f.get('non_embedding_params', 0):,}) | "
            f"{_si(f['flops_per_token'])} / {_si(f.get('xla_flops_per_token', float('nan')))} | {f['compile_s']:.2f} | "
            f"{f['step_s'] * 1e3:.1f} ms | {_si(f['tokens_per_s'])} | {100 * f['mfu']:.1f}% | {_bytes(f['peak_bytes'])} |")
    ctxs = sorted({int(c) for f in fams.values() for c in f["decode"]})
    lines += ["", "## Decoding (batch 1)", "",
              "| family | " + " | ".join(f"{c} tokens: ms/token, state" for c in ctxs) + " |",
              "|---|" + "---|" * len(ctxs)]
    for n in names:
        d = fams[n]["decode"]
        cells = [f"{1e3 * d[str(c)]['s_per_token']:.2f}, {_bytes(d[str(c)]['state_bytes'])}" if str(c) in d else ""
                 for c in ctxs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Families", ""] + [f"- `{n}`: {fams[n].get('description', '')}" for n in names]
    lines += ["", "## Plots", ""]
    if plot_note:
        lines.append(plot_note)
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    if "scaling" in results:
        lines += ["", "## Scaling (loss vs training FLOPs)", "", "| family | fit: loss = a * C^b | points |",
                  "|---|---|---|"]
        for n, s in results["scaling"].items():
            lines.append(f"| {n} | a = {s['fit']['a']:.3g}, b = {s['fit']['b']:.3f} | {len(s['points'])} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: str) -> tuple[list[str], str | None]:
    """PNG files written into out_dir (names relative to it), and a note when skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (`pip install jax-zoo[plot]`)."
    fams = results["families"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)

    tasks = [t for t, v in results["meta"].get("tasks", {}).items() if v["metric"] == "accuracy"]
    if tasks:
        ctx = str(max(int(c) for f in fams.values() for c in f["decode"]))
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            for n, f in fams.items():
                if t in f["tasks"] and ctx in f["decode"]:
                    ax.scatter(f["decode"][ctx]["state_bytes"], f["tasks"][t]["value"], label=n)
                    ax.annotate(n, (f["decode"][ctx]["state_bytes"], f["tasks"][t]["value"]), fontsize=7)
            ax.set_xscale("log")
            ax.set(title=t, xlabel=f"decoding state bytes at {ctx} tokens", ylabel="accuracy", ylim=(-0.02, 1.02))
        save(fig, "accuracy_vs_state.png")

    all_tasks = list(results["meta"].get("tasks", {}))
    if all_tasks:
        fig, axes = plt.subplots(1, len(all_tasks), figsize=(4 * len(all_tasks), 3.4), squeeze=False)
        for ax, t in zip(axes[0], all_tasks):
            for n, f in fams.items():
                curve = f["tasks"].get(t, {}).get("loss_curve")
                if curve:
                    ax.plot([float("nan") if v is None else v for v in curve], label=n)
            ax.set(title=t, xlabel="training progress (%)", ylabel="loss (best lr)")
        axes[0][-1].legend(fontsize=6)
        save(fig, "loss_curves.png")

    for key, label, name in (("s_per_token", "seconds per token (batch 1)", "decode_time_vs_context.png"),
                             ("state_bytes", "decoding state bytes", "memory_vs_context.png")):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for n, f in fams.items():
            ctxs = sorted(int(c) for c in f["decode"])
            ax.plot(ctxs, [f["decode"][str(c)][key] for c in ctxs], marker="o", label=n)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=label)
        ax.legend(fontsize=6)
        save(fig, name)

    if "scaling" in results:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for n, s in results["scaling"].items():
            c = [p["flops"] for p in s["points"]]
            line = ax.plot(c, [p["loss"] for p in s["points"]], "o", label=n)[0]
            lo, hi = min(c), max(c)
            xs = [lo * (hi / lo) ** (i / 20) for i in range(21)]
            ax.plot(xs, [s["fit"]["a"] * x ** s["fit"]["b"] for x in xs], "-", color=line.get_color())
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="held-out loss (bits per byte)")
        ax.legend(fontsize=6)
        save(fig, "scaling.png")
    return written, None


def write(results: dict, out_dir: str) -> dict[str, str]:
    """Validate, then write results.json, the plots and report.md into out_dir; returns their paths."""
    results = _json_safe(results)
    validate(results)
    os.makedirs(out_dir, exist_ok=True)
    path_json = os.path.join(out_dir, "results.json")
    with open(path_json, "w") as f:
        json.dump(results, f, indent=1)
    written, note = plots(results, out_dir)
    path_md = os.path.join(out_dir, "report.md")
    with open(path_md, "w") as f:
        f.write(markdown(results, written, note))
    return {"results": path_json, "report": path_md, **{p: os.path.join(out_dir, p) for p in written}}
