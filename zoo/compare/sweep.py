"""Train one model at several learning rates at once: the sweep is a `vmap` axis.

Zoology reports the best of a learning-rate sweep per family and task. Running the sweep as a
leading axis R of the params and optimizer state costs one compilation for all R members (a
Python loop would compile nothing more, but runs R small steps where one batched step keeps the
CPU's matmul units busier). Every member starts from the same initial parameters and sees the
same batches, so members differ only in their learning rate.

The optimizer is `zoo.train.make_optimizer` with a unit peak learning rate; each member's update
is multiplied by its own rate. AdamW's decoupled weight decay is applied as `lr * wd * w` inside
optax, so the scaling leaves the semantics of (lr, weight_decay) unchanged.
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


def _sweep_step(cfg: Any, optimizer: optax.GradientTransformation) -> Callable:
    def one(params, opt_state, lr, inputs_BL, targets_BL, mask_BL):
        loss, grads = jax.value_and_grad(ztrain.loss_fn)(params, inputs_BL, targets_BL, cfg, mask_BL)
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)
        new_params = optax.apply_updates(params, updates)
        # A diverged member keeps its last finite parameters; its loss records the NaN.
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state),
                jnp.where(finite, loss, jnp.nan))

    batched = jax.vmap(one, in_axes=(0, 0, 0, None, None, None))
    return jax.jit(batched, donate_argnums=(0, 1))


def _optimizer(cfg: Any, steps: int, warmup_steps: int, weight_decay: float) -> optax.GradientTransformation:
    # The seed does not enter the optimizer, so it is left at TrainConfig's default.
    tcfg = ztrain.TrainConfig(steps=steps, lr=1.0, warmup_steps=warmup_steps, weight_decay=weight_decay)
    return ztrain.make_optimizer(tcfg, ztrain.decay_mask(cfg))


#: Compiled sweep steps keyed by everything that shapes the executable (config, members, schedule,
#: batch shape). A rerun with another seed, or a task with the same vocabulary, length and batch,
#: reuses one compilation; compilation dominates a CPU-sized comparison.
_COMPILED: dict[tuple, tuple[Any, float, int]] = {}


def _compiled_step(cfg, R, steps, warmup_steps, weight_decay, shape_BL, params, opt_state, lrs_R, batch):
    """(executable, seconds its compilation took, XLA's peak bytes), compiled on first use of the key.

    A cache hit reports the compile seconds of the original compilation: the cost that the
    family's step pays once per run."""
    key = (cfg, R, steps, warmup_steps, float(weight_decay), tuple(shape_BL))
    if key not in _COMPILED:
        step_fn = _sweep_step(cfg, _optimizer(cfg, steps, warmup_steps, weight_decay))
        t0 = time.perf_counter()
        compiled = step_fn.lower(params, opt_state, lrs_R, *batch).compile()
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
        _COMPILED[key] = (compiled, compile_s, peak)
    return _COMPILED[key]


def clear_cache() -> None:
    """Drop the compiled sweep steps (they hold executables; a long process may want them gone)."""
    _COMPILED.clear()


def init_sweep(cfg: Any, n: int, seed: int) -> Any:
    """`n` copies of the same initial parameters, stacked on a leading axis."""
    params = zoo.init(jax.random.key(seed), cfg)
    return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (n,) + a.shape), params)


def train_sweep(cfg: Any, lrs: tuple[float, ...], batches: Iterator[tuple[np.ndarray, np.ndarray]], *,
                steps: int, warmup_steps: int, weight_decay: float = 0.1, seed: int = 0,
                on_step: Callable[[int], Any] | None = None) -> SweepResult:
    """Train `cfg` for `steps` steps at every rate in `lrs` on the same `batches`.

    `batches` yields (inputs_BL, targets_BL) with IGNORE (< 0) at unscored targets; the loss is
    the mean over scored positions. Schedule: linear warmup then cosine decay to 10% (the
    project's `TrainConfig` defaults), AdamW b2 0.95, clipping at 1.
    """
    optimizer = _optimizer(cfg, steps, warmup_steps, weight_decay)
    R = len(lrs)
    params = init_sweep(cfg, R, seed)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.vmap(optimizer.init)(params)
    lrs_R = jnp.asarray(lrs, jnp.float32)

    def prepare(batch):
        inputs_BL, targets_BL = batch
        mask_BL = (targets_BL >= 0).astype(np.float32)
        return inputs_BL, np.maximum(targets_BL, 0), mask_BL

    first = prepare(next(batches))
    compiled, compile_s, peak_bytes = _compiled_step(cfg, R, steps, warmup_steps, weight_decay,
                                                     first[0].shape, params, opt_state, lrs_R, first)

    losses, times = [], []
    batch = first
    for s in range(steps):
        t = time.perf_counter()
        params, opt_state, loss_R = compiled(params, opt_state, lrs_R, *batch)
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


def accuracy_R(params_R: Any, cfg: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-member accuracy over the scored positions of `batches` (argmax == target)."""
    hits, total = 0.0, 0
    for inputs_BL, targets_BL in batches:
        pred_RBL = np.asarray(jnp.argmax(sweep_logits(params_R, inputs_BL, cfg), axis=-1))
        mask_BL = targets_BL >= 0
        hits = hits + ((pred_RBL == targets_BL[None]) & mask_BL[None]).sum(axis=(1, 2))
        total += int(mask_BL.sum())
    return np.asarray(hits, np.float64) / max(total, 1)


def bits_per_token_R(params_R: Any, cfg: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-member mean next-token loss in bits (bits per byte for byte-level data)."""
    nats, count = 0.0, 0
    for inputs_BL, targets_BL in batches:
        logits_RBLV = sweep_logits(params_R, inputs_BL, cfg)
        with jax.numpy_dtype_promotion("standard"):
            ce_RBL = optax.softmax_cross_entropy_with_integer_labels(
                logits_RBLV, jnp.broadcast_to(targets_BL, logits_RBLV.shape[:-1]))
        nats = nats + np.asarray(ce_RBL, np.float64).sum(axis=(1, 2))
        count += targets_BL.size
    return np.asarray(nats, np.float64) / count / math.log(2)
