"""Train one model at several learning rates at once: the sweep is a `vmap` axis.

Zoology reports the best of a learning-rate sweep per family and task. Running the sweep as a
leading axis R of the params and optimizer state costs one compilation for all R members (a
Python loop would compile nothing more, but runs R small steps where one batched step keeps the
CPU's matmul units busier). Every member starts from the same initial parameters and sees the
same batches, so members differ only in their learning rate.

The optimizer is `zoo.train.make_optimizer` at a constant unit learning rate; each member's update
is multiplied by its own rate times the schedule's factor at that step (warmup + cosine, computed
on the host and passed in). AdamW's decoupled weight decay is applied as `lr * wd * w` inside
optax, so the scaling leaves the semantics of (lr, schedule, weight_decay) unchanged, and the
compiled step does not depend on the number of steps: tasks of one batch shape share it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo
from layers import params as P
from zoo import optimizers as zoptimizers
from zoo import train as ztrain

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepResult:
    """Attributes:
    lrs: the swept peak learning rates (R of them).
    losses_RS: training loss of member r at step s (NaN after a non-finite step).
    params: the trained parameters, stacked on a leading axis R.
    compile_s: seconds to lower and compile the sweep step.
    step_s: median wall seconds of one sweep step (all R members), compilation excluded.
    peak_bytes: arguments + outputs + temporaries - aliased buffers of the compiled sweep step
      (XLA's `memory_analysis()`): params, gradients and AdamW moments of all R members.
    """

    lrs: tuple[float, ...]
    losses_RS: np.ndarray
    params: Any
    compile_s: float
    step_s: float
    peak_bytes: int


def _packing_kwargs(packing: tuple) -> dict:
    """(segment_ids, positions) of packed rows, or () -> the forward's keyword arguments."""
    return dict(zip(("segment_ids", "positions"), packing))


def _sweep_step(cfg: Any, optimizer: optax.GradientTransformation, packed: bool) -> Callable:
    def one(params, opt_state, lr, inputs_BL, targets_BL, mask_BL, *packing):
        loss, grads = jax.value_and_grad(ztrain.loss_fn)(params, inputs_BL, targets_BL, cfg, mask_BL,
                                                         **_packing_kwargs(packing))
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)
        new_params = optax.apply_updates(params, updates)
        # A diverged member keeps its last finite parameters; its loss records the NaN.
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state),
                jnp.where(finite, loss, jnp.nan))

    batched = jax.vmap(one, in_axes=(0, 0, 0) + (None,) * (5 if packed else 3))
    return jax.jit(batched, donate_argnums=(0, 1))


def _optimizer(cfg: Any, weight_decay: float) -> optax.GradientTransformation:
    """AdamW (with clipping and the decay mask) at a constant unit rate: the sweep step scales
    each update by its member's rate times the schedule factor of the step."""
    # The seed and step count do not enter a constant-rate optimizer; TrainConfig needs some.
    tcfg = ztrain.TrainConfig(steps=1, lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=1.0,
                              weight_decay=weight_decay)
    return ztrain.make_optimizer(tcfg, ztrain.decay_mask(cfg))


@functools.lru_cache(maxsize=16)
def schedule_factors(steps: int, warmup_steps: int) -> np.ndarray:
    """The learning-rate multiplier of each step (peak 1): `zoo.train`'s schedule (linear warmup
    from 0, cosine decay to 10%) evaluated at steps 0 .. steps-1, as optax's count would."""
    tcfg = ztrain.TrainConfig(steps=steps, lr=1.0, warmup_steps=warmup_steps)
    # One executable at level 0, not a dozen eager ops each compiled at the default level.
    with jax.numpy_dtype_promotion("standard"):
        schedule = jax.jit(zoptimizers.make_schedule(tcfg)).lower(jax.ShapeDtypeStruct((steps,), jnp.int32)).compile(
            compiler_options=UNTIMED_COMPILE)
    factors = np.asarray(schedule(np.arange(steps, dtype=np.int32)), np.float32)
    factors.setflags(write=False)  # shared by the cache
    return factors


def compile_options(xla_level: int | None) -> dict:
    """XLA compile options for an optimisation level (None: XLA's default, the empty dict).

    Lower levels run fewer LLVM optimisations: a compare-sized sweep step compiles in about half
    the default's CPU time at level 0 but runs 2.5-12x slower, at level 1 in 70-90% of it and
    up to 1.4x slower (docs/compare.md, "Compilation"); that pays only where few steps run
    (`--quick`, level 1). The run records the level (`meta.xla_optimization_level`)."""
    return {} if xla_level is None else {"xla_backend_optimization_level": int(xla_level)}


#: Compiled sweep steps keyed by everything that shapes the executable (config, members, weight
#: decay, batch shape, packing, XLA optimisation level). The schedule and the step count are
#: inputs, so the tasks of one shape group (same rows, model vocabulary and batch) and a rerun with
#: another seed or step count reuse one compilation; compilation dominates a CPU-sized comparison.
_COMPILED: dict[tuple, tuple[Any, float, int]] = {}


def _compiled_step(cfg, R, weight_decay, params, opt_state, lrs_R, batch, xla_level=None):
    """(executable, seconds its compilation took, XLA's peak bytes), compiled on first use of the key.

    A cache hit reports the compile seconds of the original compilation: the cost that the
    family's step pays once per run."""
    packed = len(batch) == 5  # inputs, targets, mask [, segment_ids, positions]
    key = (cfg, R, float(weight_decay), tuple(batch[0].shape), packed, xla_level)
    if key not in _COMPILED:
        step_fn = _sweep_step(cfg, _optimizer(cfg, weight_decay), packed)
        t0 = time.perf_counter()
        compiled = step_fn.lower(params, opt_state, lrs_R, *batch).compile(compiler_options=compile_options(xla_level))
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
        _COMPILED[key] = (compiled, compile_s, peak)
    return _COMPILED[key]


def _start_fn(cfg: Any, R: int, weight_decay: float) -> Callable:
    """key -> (stacked parameters, optimizer state) of an R-member sweep: `zoo.init`'s
    initialisation (`layers.params.init` of the model's specs) copied R times, and AdamW's state."""
    optimizer = _optimizer(cfg, weight_decay)
    specs = zoo.param_specs(cfg)

    def start(key):
        params = P.init(key, specs)
        params_R = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (R,) + a.shape), params)
        with jax.numpy_dtype_promotion("standard"):
            return params_R, jax.vmap(optimizer.init)(params_R)

    return start


def _abstract_state(cfg: Any, R: int, weight_decay: float) -> tuple[Any, Any]:
    """Shapes of the stacked parameters and optimizer state of an R-member sweep (nothing allocated)."""
    return jax.eval_shape(_start_fn(cfg, R, weight_decay), jax.random.key(0))


#: Options for executables whose speed is never measured. Initialisation is a long chain of
#: threefry hashes: at XLA's default optimisation level it compiled in 2.5-7.5 s of CPU per
#: family, at level 0 in 1-1.5 s, and either runs in milliseconds (docs/compare.md).
UNTIMED_COMPILE = compile_options(0)

#: Compiled initialisers (key -> params and optimizer state), keyed by (config, members, weight decay).
_STARTS: dict[tuple, Any] = {}


def _compiled_start(cfg: Any, R: int, weight_decay: float) -> Any:
    """One executable for the whole initial state (not an eager op per leaf, each its own
    compile); the seed is an input, so other seeds reuse it."""
    key = (cfg, R, float(weight_decay))
    if key not in _STARTS:
        _STARTS[key] = jax.jit(_start_fn(cfg, R, weight_decay)).lower(jax.random.key(0)).compile(
            compiler_options=UNTIMED_COMPILE)
    return _STARTS[key]


def compile_step(cfg: Any, R: int, batch_size: int, seq_len: int, weight_decay: float = 0.1,
                 xla_level: int | None = None, packed: bool = False) -> float:
    """Compile (and cache) the sweep step that `train_sweep` will use for this shape (`packed`:
    batches carry segment ids and positions), from shapes alone; returns its compile seconds.
    Safe to call from worker threads: XLA compiles without the GIL, so a pool compiles several
    families at once (`harness.precompile`)."""
    params, opt_state = _abstract_state(cfg, R, weight_decay)
    int_BL = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    batch = (int_BL, int_BL, jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)) + (int_BL,) * (2 * packed)
    lrs_R = jax.ShapeDtypeStruct((R,), jnp.float32)
    return _compiled_step(cfg, R, weight_decay, params, opt_state, lrs_R, batch, xla_level)[1]


def clear_cache() -> None:
    """Drop the compiled initialisers, sweep steps, scorers and decoders (they hold executables; a
    long process may want them gone)."""
    _COMPILED.clear()
    _SCORERS.clear()
    _STARTS.clear()
    from zoo.compare import measure  # imports this module: not at the top
    measure._DECODERS.clear()


def init_sweep(cfg: Any, n: int, seed: int, weight_decay: float = 0.1) -> Any:
    """`n` copies of the same initial parameters (`zoo.init`'s), stacked on a leading axis."""
    return _compiled_start(cfg, n, weight_decay)(jax.random.key(seed))[0]


def train_sweep(cfg: Any, lrs: tuple[float, ...], batches: Iterator[tuple[np.ndarray, np.ndarray]], *,
                steps: int, warmup_steps: int, weight_decay: float = 0.1, seed: int = 0,
                on_step: Callable[[int], Any] | None = None, xla_level: int | None = None) -> SweepResult:
    """Train `cfg` for `steps` steps at every rate in `lrs` on the same `batches`.

    `batches` yields (inputs_BL, targets_BL) with IGNORE (< 0) at unscored targets, or packed rows
    (inputs, targets, segment_ids, positions; `tasks.pack`); the loss is the mean over scored
    positions. Schedule: linear warmup then cosine decay to 10% (the
    project's `TrainConfig` defaults), AdamW b2 0.95, clipping at 1. xla_level: XLA's
    optimisation level for the step (None: XLA's default; see `compile_options`).
    """
    factors_S = schedule_factors(steps, warmup_steps)
    R = len(lrs)
    params, opt_state = _compiled_start(cfg, R, weight_decay)(jax.random.key(seed))
    lrs_R = np.asarray(lrs, np.float32)

    def prepare(batch):
        inputs_BL, targets_BL, *packing = batch
        mask_BL = (targets_BL >= 0).astype(np.float32)
        return (np.asarray(inputs_BL, np.int32), np.maximum(targets_BL, 0).astype(np.int32), mask_BL,
                *(np.asarray(a, np.int32) for a in packing))

    first = prepare(next(batches))
    compiled, compile_s, peak_bytes = _compiled_step(cfg, R, weight_decay, params, opt_state, lrs_R, first,
                                                     xla_level)

    losses, times = [], []
    batch = first
    for s in range(steps):
        t = time.perf_counter()
        params, opt_state, loss_R = compiled(params, opt_state, lrs_R * factors_S[s], *batch)
        losses.append(np.asarray(loss_R))  # blocks: the step time includes the device work
        times.append(time.perf_counter() - t)
        if on_step is not None:
            on_step(s)
        if s + 1 < steps:
            batch = prepare(next(batches))
    return SweepResult(lrs=tuple(float(x) for x in lrs), losses_RS=np.stack(losses, axis=1), params=params,
                       compile_s=compile_s, step_s=float(np.median(times)),
                       peak_bytes=peak_bytes)


@functools.partial(jax.jit, static_argnames="cfg")
def _sweep_logits(params_R, inputs_BL, cfg):
    return jax.vmap(lambda p: zoo.model._forward(p, inputs_BL, cfg)[0])(params_R)


def sweep_logits(params_R: Any, inputs_BL: "Int[Array, 'B L']", cfg: Any) -> "Float[Array, 'R B L V']":
    """Logits of every sweep member on the same inputs."""
    return _sweep_logits(params_R, inputs_BL, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _sweep_scores(params_R, inputs_BL, targets_BL, cfg, segment_ids_BL=None, positions_BL=None):
    """(hits_R, nats_R): per member, the scored positions (target >= 0) whose argmax is the
    target, and the summed cross-entropy there. One executable per shape serves both metrics,
    and only 2R numbers leave the device."""
    mask_BL = targets_BL >= 0
    safe_BL = jnp.maximum(targets_BL, 0)

    def one(p):
        logits_BLV = zoo.model._forward(p, inputs_BL, cfg, positions_BL=positions_BL,
                                        segment_ids_BL=segment_ids_BL)[0].astype(jnp.float32)
        hit_BL = (jnp.argmax(logits_BLV, axis=-1) == safe_BL) & mask_BL
        ce_BL = jax.nn.logsumexp(logits_BLV, axis=-1) - jnp.take_along_axis(logits_BLV, safe_BL[..., None],
                                                                           axis=-1)[..., 0]
        return jnp.sum(hit_BL.astype(jnp.float32)), jnp.sum(jnp.where(mask_BL, ce_BL, 0.0))

    return jax.vmap(one)(params_R)


#: Compiled scorers keyed by (config, members, batch shape, XLA level), like `_COMPILED`.
_SCORERS: dict[tuple, Any] = {}


def compile_scorer(cfg: Any, R: int, batch_size: int, seq_len: int, xla_level: int | None = None,
                   packed: bool = False) -> Any:
    """The compiled `_sweep_scores` for this shape (cached; thread-safe like `compile_step`)."""
    key = (cfg, R, batch_size, seq_len, packed, xla_level)
    if key not in _SCORERS:
        params = _abstract_state(cfg, R, 0.1)[0]
        int_BL = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
        _SCORERS[key] = _sweep_scores.lower(params, int_BL, int_BL, cfg, *(int_BL,) * (2 * packed)).compile(
            compiler_options=compile_options(xla_level))
    return _SCORERS[key]


def _score_sums(params_R: Any, cfg: Any, batches: list[tuple[np.ndarray, ...]], xla_level: int | None
                ) -> tuple[np.ndarray, np.ndarray, int]:
    hits, nats, count = 0.0, 0.0, 0
    R = jax.tree.leaves(params_R)[0].shape[0]
    for inputs_BL, targets_BL, *packing in batches:
        scorer = compile_scorer(cfg, R, *inputs_BL.shape, xla_level=xla_level, packed=bool(packing))
        hits_R, nats_R = scorer(params_R, *(np.asarray(a, np.int32) for a in (inputs_BL, targets_BL, *packing)))
        hits = hits + np.asarray(hits_R, np.float64)
        nats = nats + np.asarray(nats_R, np.float64)
        count += int((targets_BL >= 0).sum())
    return np.asarray(hits), np.asarray(nats), count


def accuracy_R(params_R: Any, cfg: Any, batches: list[tuple[np.ndarray, ...]], *,
               xla_level: int | None = None) -> np.ndarray:
    """Per-member accuracy over the scored positions (target >= 0) of `batches` (argmax == target)."""
    hits, _nats, count = _score_sums(params_R, cfg, batches, xla_level)
    return hits / max(count, 1)


def bits_per_token_R(params_R: Any, cfg: Any, batches: list[tuple[np.ndarray, ...]], *,
                     xla_level: int | None = None) -> np.ndarray:
    """Per-member mean next-token loss in bits over the scored positions (bits per byte for
    byte-level data, where every position is scored)."""
    _hits, nats, count = _score_sums(params_R, cfg, batches, xla_level)
    return nats / max(count, 1) / math.log(2)
