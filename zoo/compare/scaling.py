"""`zoo compare --scaling`: loss against training compute over model sizes, with a power-law fit.

Each family is sized to several parameter targets and trained on byte-level language modelling
with the run's budget (same steps, batch, learning-rate sweep); a point is (training FLOPs =
analytic FLOPs per token x tokens seen, best held-out bits per byte). The fit is
loss = a * C^b by least squares on (log C, log loss), the straight line of a scaling-law plot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from zoo.compare import harness as H
from zoo.compare import measure
from zoo.compare import tasks as T


def fit_power_law(flops: Any, losses: Any) -> dict[str, float]:
    """{"a", "b", "r2"} of loss = a * flops^b, least squares in log-log space."""
    c, loss = np.asarray(flops, np.float64), np.asarray(losses, np.float64)
    if c.shape != loss.shape or c.ndim != 1 or c.size < 2:
        raise ValueError(f"fit_power_law: expected two equal-length sequences of >= 2 points, got "
                         f"shapes {c.shape} and {loss.shape}")
    if not (np.isfinite(c).all() and np.isfinite(loss).all() and (c > 0).all() and (loss > 0).all()):
        raise ValueError(f"fit_power_law: expected positive finite flops and losses, got {c} and {loss}")
    logc, logl = np.log(c), np.log(loss)
    A = np.stack([np.ones_like(logc), logc], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(A, logl, rcond=None)
    resid = logl - A @ np.array([log_a, b])
    total = ((logl - logl.mean()) ** 2).sum()
    r2 = 1.0 - float((resid ** 2).sum() / total) if total > 0 else 1.0
    return {"a": float(np.exp(log_a)), "b": float(b), "r2": r2}


#: Parameter targets of the sweep, as multiples of the budget's target.
SIZE_FACTORS = (0.25, 0.5, 1.0, 2.0)


def run(family_names: list[str], budget: H.Budget, *, seed: int = 0, progress: H.Progress | None = None,
        factors: tuple[float, ...] = SIZE_FACTORS) -> dict:
    """{family: {"points": [{"target", "params", "flops", "loss"}], "fit": {...}}}."""
    task = T.lm()
    out = {}
    for name in family_names:
        points = []
        for factor in factors:
            sized_budget = dataclasses.replace(budget, target_params=max(1000, int(factor * budget.target_params)))
            sized = H.F.solve(name, sized_budget.target_params, vocab_size=task.vocab_size, max_len=task.seq_len)
            entry, _res, cfg = H.run_task(sized, task, sized_budget, seed)
            flops = measure.analytic_flops_per_token(cfg, task.seq_len) * entry["tokens"]
            points.append({"target": sized_budget.target_params, "params": sized.params,
                           "non_embedding_params": sized.non_embedding_params, "flops": flops,
                           "loss": entry["value"]})
            if progress is not None:
                progress.done += 1
                progress.show(f"scaling {name} {sized.non_embedding_params:,} params: {entry['value']:.3f} bits/byte")
        fit = fit_power_law([p["flops"] for p in points], [p["loss"] for p in points])
        out[name] = {"points": points, "fit": fit}
    return out
