"""Checkpoints: params, optimizer state and a JSON `extra` per step, on orbax's CheckpointManager.

Layout: `<directory>/<step>/{params, opt_state, extra}` written by orbax (tensorstore arrays +
JSON metadata; no pickles anywhere, so loading never executes code). Orbax writes each step to
a temporary directory and renames it when complete, so a crash mid-save leaves the previous
step as the latest loadable one.

Restoring is driven by abstract targets (`jax.ShapeDtypeStruct` trees, e.g.
`layers.params.abstract(zoo.param_specs(cfg))` and `jax.eval_shape(optimizer.init, that)`),
optionally carrying shardings so arrays load straight into their sharded layout. Before any
array is read the stored metadata is compared with the target; a difference in tree structure,
shape or dtype is a ValueError naming the paths, never a silent partial load.

Exact resume: `extra` holds what the arrays do not, e.g. `exact_resume_state(sampler.step,
key)` (data position and PRNG key data as ints) and the configs; `resume_from(extra)` gives
them back.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

_ITEMS = ("params", "opt_state", "extra")

#: A run folder (`zoo train --out DIR`) keeps its orbax steps here, beside config.json,
#: metrics.jsonl and tokenizer.json.
RUN_CHECKPOINTS = "checkpoints"


def run_checkpoints(folder: str | os.PathLike) -> str:
    """Where the steps of a run folder live: `folder/checkpoints`, or `folder` itself when it
    already holds numbered steps (the layout of runs written before run folders had a
    checkpoints/ subfolder, and of `zoo convert` checkpoints)."""
    folder = os.fspath(folder)
    nested = os.path.join(folder, RUN_CHECKPOINTS)
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(folder) and any(n.isdigit() and os.path.isdir(os.path.join(folder, n))
                                     for n in os.listdir(folder)):
        return folder
    return nested


class CorruptCheckpointError(ValueError):
    """A step directory exists but its contents cannot be read back."""


# ----------------------------------------------------------------------------- exact resume


def exact_resume_state(sampler_step: int, key: Any = None) -> dict:
    """A JSON-able dict holding the data position and (optionally) a PRNG key.

    `sampler_step` is `zoo.data.WindowSampler.step` (batches drawn so far). `key` is a typed
    key (`jax.random.key`) or a raw uint32 key (`jax.random.PRNGKey`); its bits are stored
    as ints with the implementation's name, so `resume_from` rebuilds the identical key.
    """
    if not isinstance(sampler_step, (int, np.integer)) or isinstance(sampler_step, bool) or sampler_step < 0:
        raise ValueError(f"exact_resume_state: sampler_step: expected a non-negative integer, got {sampler_step!r}")
    state: dict[str, Any] = {"data_step": int(sampler_step)}
    if key is not None:
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            state["rng"] = {"impl": str(jax.random.key_impl(key)),
                            "data": np.asarray(jax.random.key_data(key)).tolist(), "typed": True}
        elif np.asarray(key).dtype == np.uint32:
            state["rng"] = {"impl": None, "data": np.asarray(key).tolist(), "typed": False}
        else:
            raise TypeError(f"exact_resume_state: key: expected a jax PRNG key, got dtype {key.dtype}")
    return state


def resume_from(state: dict) -> tuple[int, Any]:
    """(sampler_step, key or None) from `exact_resume_state`'s dict, or from a restored `extra`
    that holds it under "resume"."""
    if "data_step" not in state and isinstance(state.get("resume"), dict):
        state = state["resume"]
    if "data_step" not in state:
        raise KeyError(f"resume_from: state: expected a 'data_step' entry (from exact_resume_state), "
                       f"got keys {sorted(state)}")
    rng = state.get("rng")
    key = None
    if rng is not None:
        data = np.asarray(rng["data"], dtype=np.uint32)
        key = jax.random.wrap_key_data(data, impl=rng["impl"]) if rng["typed"] else jax.numpy.asarray(data)
    return int(state["data_step"]), key


# ----------------------------------------------------------------------------- helpers


def _path_str(path: tuple) -> str:
    """'a/b/0/count' from a jax key path; dict keys, sequence indices and namedtuple fields all
    become plain tokens, because orbax's metadata stores tuples as lists and namedtuples as dicts."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _leaf_table(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
    table = {}
    for path, leaf in leaves:
        if not _is_array_like(leaf):
            raise TypeError(f"leaf at '{_path_str(path)}': expected an array or ShapeDtypeStruct, "
                            f"got {type(leaf).__name__}")
        table[_path_str(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return table


def _compare(item: str, stored: dict, target: dict, step: int, directory: str) -> None:
    """Raise ValueError listing every missing / extra path and every shape or dtype mismatch."""
    missing = sorted(set(target) - set(stored))
    extra = sorted(set(stored) - set(target))
    mismatched = [
        f"'{p}': target {target[p][0]} {target[p][1]}, stored {stored[p][0]} {stored[p][1]}"
        for p in sorted(set(stored) & set(target)) if stored[p] != target[p]
    ]
    if not (missing or extra or mismatched):
        return
    lines = [f"restore: {item}_target does not match {item} stored at step {step} in {directory}:"]
    if missing:
        lines.append(f"  in the target but not stored: {missing}")
    if extra:
        lines.append(f"  stored but not in the target: {extra}")
    if mismatched:
        lines.append("  shape/dtype differ: " + "; ".join(mismatched))
    raise ValueError("\n".join(lines))


def _json_default(x: Any) -> Any:
    # numpy / jax scalars and small arrays become Python numbers / lists; anything else is an error
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"save: extra: {type(x).__name__} value {x!r} is not JSON-serialisable")


def _with_default_sharding(target: Any) -> Any:
    """Targets without a sharding load onto the first local device; otherwise orbax would reuse
    the device string stored at save time, which need not exist on the restoring machine."""
    device = jax.local_devices()[0]

    def fill(x):
        if getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
        return x

    return jax.tree.map(fill, target, is_leaf=_is_array_like)


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and restores `(params, opt_state, extra)` per training step.

    keep_last: the newest `keep_last` steps are kept (>= 1).
    keep_best: additionally keep the `keep_best` steps with the best `extra["metrics"][best_metric]`
      (lower is better when best_mode="min"); steps saved without that metric are never kept
      for being best, only for being recent.
    async_save: `save` returns once arrays are on the host; files are written in the
      background (`wait` blocks until done; the next `save`, `restore` and `close` wait too).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, keep_best: int = 0,
                 best_metric: str = "val_loss", best_mode: str = "min", async_save: bool = True):
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last: expected a positive integer, got {keep_last!r}")
        if not isinstance(keep_best, int) or isinstance(keep_best, bool) or keep_best < 0:
            raise ValueError(f"Checkpointer: keep_best: expected a non-negative integer, got {keep_best!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: best_mode: expected 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last, self.keep_best = keep_last, keep_best
        self.best_metric, self.best_mode = best_metric, best_mode

        policies: list[Any] = [ocm.LatestN(n=keep_last)]
        if keep_best:
            # BestN ranks ascending and keeps the tail; reverse for "min" puts the lowest last.
            policies.append(ocm.BestN(get_metric_fn=self._metric_value, reverse=(best_mode == "min"),
                                      n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=False,  # a read-only restore of a missing directory must not create it
            enable_async_checkpointing=async_save,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # A step dir left behind by a crash mid-save is removed when the manager starts.
            cleanup_tmp_directories=True,
        )
        self._manager: ocp.CheckpointManager | None = None
        self._options = options
        if os.path.isdir(self.directory):
            self._open()

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            os.makedirs(self.directory, exist_ok=True)
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options,
                item_handlers={"params": ocp.StandardCheckpointHandler(),
                               "opt_state": ocp.StandardCheckpointHandler(),
                               "extra": ocp.JsonCheckpointHandler()})
        return self._manager

    def _metric_value(self, metrics: Any) -> float:
        value = metrics.get(self.best_metric) if isinstance(metrics, dict) else None
        if value is None or not math.isfinite(float(value)):
            # a NaN / inf metric must never be ranked best
            return math.inf if self.best_mode == "min" else -math.inf
        return float(value)

    # -------------------------------------------------------------------------- saving

    def save(self, step: int, *, params: Any, opt_state: Any, extra: dict | None = None) -> None:
        """Write `step`. `extra` must be JSON-serialisable (numpy/jax scalars are converted);
        `extra["metrics"]` (a dict of numbers) feeds keep_best. Async when enabled: returns
        once the arrays are copied off the device, so the caller may donate them afterwards."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Checkpointer.save: step: expected a non-negative integer, got {step!r}")
        step = int(step)
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise TypeError(f"Checkpointer.save: extra: expected a dict, got {type(extra).__name__}")
        extra = json.loads(json.dumps(extra, default=_json_default))
        metrics = extra.get("metrics")
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"Checkpointer.save: extra['metrics']: expected a dict, got {type(metrics).__name__}")
        manager = self._open()
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"Checkpointer.save: step: expected a step after the latest saved step "
                             f"{latest} in {self.directory}, got {step}")
        manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                    opt_state=ocp.args.StandardSave(opt_state),
                                    extra=ocp.args.JsonSave(extra)),
            metrics=metrics if metrics else None,
            force=True,  # the training loop decides when to save, not orbax's interval policy
        )

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    # -------------------------------------------------------------------------- reading

    def all_steps(self) -> list[int]:
        """Completed steps on disk, ascending (temporary dirs of unfinished saves excluded)."""
        if self._manager is None:
            if not os.path.isdir(self.directory):
                return []
            self._open()
        self._manager.reload()  # another process (or a crash) may have changed the directory
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, *, params_target: Any, opt_state_target: Any
                ) -> tuple[Any, Any, dict]:
        """(params, opt_state, extra) of `step` (default: the latest), loaded into the
        structure, shapes, dtypes and shardings of the abstract targets."""
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"Checkpointer.restore: directory {self.directory} does not exist")
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"Checkpointer.restore: step {step} not found in {self.directory} "
                                    f"(available: {steps})")
        manager = self._open()
        step_dir = os.path.join(self.directory, str(step))
        try:
            metadata = manager.item_metadata(step)
            stored = {name: _leaf_table(metadata[name].tree) for name in ("params", "opt_state")}
        except (KeyError, OSError, ValueError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"Checkpointer.restore: step {step} in {step_dir} is incomplete or corrupt "
                f"(reading its metadata failed: {type(e).__name__}: {e})") from e
        _compare("params", stored["params"], _leaf_table(params_target), step, self.directory)
        _compare("opt_state", stored["opt_state"], _leaf_table(opt_state_target), step, self.directory)
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_with_default_sharding(params_target)),
                opt_state=ocp.args.StandardRestore(_with_default_sharding(opt_state_target)),
                extra=ocp.args.JsonRestore()))
        except (KeyError, OSError, ValueError) as e:
            raise CorruptCheckpointError(
                f"Checkpointer.restore: step {step} in {step_dir} is incomplete or corrupt "
                f"(reading it failed: {type(e).__name__}: {e})") from e
        return out["params"], out["opt_state"], dict(out["extra"] or {})

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
