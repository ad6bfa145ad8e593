"""Training: config, optimizer, loss, a compiled-once train step, and a small training loop.

The step is one `jax.jit` with the model config closed over (static) and the params and
optimizer state donated, so a run compiles once per batch shape and updates in place. A step
whose loss or gradient norm is not finite leaves params and optimizer state unchanged, so
the loop can stop (or skip the batch) without a corrupted model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo
from layers import checks
from layers import params as P
from zoo import checkpoint
from zoo import data as zdata

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

class NonFiniteLossError(FloatingPointError):
    """The training loss (or gradient norm) became NaN or infinite."""


def _positive_float(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        checks.fail(owner, field, "a positive finite float", value)


def _in_range(owner: str, field: str, value: Any, lo: float, hi: float, *, hi_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and (
        value < hi if hi_open else value <= hi)
    if not ok:
        checks.fail(owner, field, f"a float in [{lo}, {hi}{')' if hi_open else ']'}", value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Attributes:
    steps: optimizer steps.
    batch_size, seq_len: each step sees batch_size windows of seq_len tokens.
    lr: peak learning rate, reached after warmup_steps (linear from 0), then cosine decay to
      lr * min_lr_ratio at the last step.
    warmup_steps: in [0, steps).
    weight_decay: decoupled (AdamW) decay of matrices; norm scales, biases and embedding
      tables are not decayed (see `decay_mask`).
    b1, b2: Adam moment decay rates.
    clip_norm: gradients are rescaled to at most this global norm.
    seed: seeds parameter init and the batch sampler.
    log_every: print a loss line every this many steps (and at the first and last step).
    min_lr_ratio: final learning rate as a fraction of lr.
    val_fraction: tail fraction of the data held out for the final evaluation.
    eval_batches: at most this many batches of validation windows are evaluated.
    on_nonfinite: "raise" (NonFiniteLossError), "stop" (return the last finite params) or
      "skip" (drop that update and continue).
    optimizer: "adamw", "lion" (b1, b2 are its interpolation and momentum rates; use a lr
      3-10x smaller than AdamW's) or "adafactor" (factored second moments; b1, b2 unused);
      all on the same schedule, clipping and decay mask.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 25
    min_lr_ratio: float = 0.1
    val_fraction: float = 0.05
    eval_batches: int = 8
    on_nonfinite: Literal["raise", "stop", "skip"] = "raise"
    optimizer: Literal["adamw", "lion", "adafactor"] = "adamw"

    def __post_init__(self):
        name = "TrainConfig"
        for f in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
            checks.positive(name, f, getattr(self, f))
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) \
                or not 0 <= self.warmup_steps < self.steps:
            checks.fail(name, "warmup_steps", f"an integer in [0, steps={self.steps})", self.warmup_steps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            checks.fail(name, "seed", "a non-negative integer", self.seed)
        _positive_float(name, "lr", self.lr)
        _positive_float(name, "clip_norm", self.clip_norm)
        if not isinstance(self.weight_decay, (int, float)) or isinstance(self.weight_decay, bool) \
                or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            checks.fail(name, "weight_decay", "a non-negative finite float", self.weight_decay)
        _in_range(name, "b1", self.b1, 0.0, 1.0)
        _in_range(name, "b2", self.b2, 0.0, 1.0)
        _in_range(name, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, hi_open=False)
        _in_range(name, "val_fraction", self.val_fraction, 0.0, 1.0)
        checks.one_of(name, "on_nonfinite", self.on_nonfinite, ("raise", "stop", "skip"))
        checks.one_of(name, "optimizer", self.optimizer, OPTIMIZERS)


def decay_mask(cfg: Any) -> Any:
    """True where AdamW decays, from the model's parameter specs (layers.params.decays: matrices
    yes; vectors, biases, norm scales, fp32-pinned rates and embedding tables no)."""
    return P.decay_mask(zoo.param_specs(cfg))


def _optax_promotion():
    """optax mixes Python floats with int32 step counts (Adam's bias correction, schedules),
    which `jax_numpy_dtype_promotion="strict"` rejects; its internals run under standard rules."""
    return jax.numpy_dtype_promotion("standard")


def make_schedule(tcfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tcfg.lr, warmup_steps=tcfg.warmup_steps,
        decay_steps=tcfg.steps, end_value=tcfg.lr * tcfg.min_lr_ratio)


OPTIMIZERS = ("adamw", "lion", "adafactor")


def make_optimizer(tcfg: TrainConfig, mask: Any = None) -> optax.GradientTransformation:
    """Global-norm clipping, then `tcfg.optimizer` on a warmup + cosine schedule; `mask` (a tree
    of bools like the params, e.g. `decay_mask(cfg)`) says which parameters are decayed (all
    if None)."""
    schedule = make_schedule(tcfg)
    if tcfg.optimizer == "lion":
        inner = optax.lion(schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=mask)
    elif tcfg.optimizer == "adafactor":
        # Absolute steps (not scaled by each parameter's RMS) so that lr means what it means for
        # AdamW and Lion: tiny-init embeddings would otherwise barely move.
        inner = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                                weight_decay_rate=tcfg.weight_decay or None, weight_decay_mask=mask)
    else:
        inner = optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), inner)


def loss_fn(params: Any, inputs: "Int[Array, 'B L']", targets: "Int[Array, 'B L']", cfg: Any,
            mask: "Any | None" = None, **forward_kwargs) -> "Float[Array, '']":
    """Mean next-token cross-entropy (fp32) over positions where `mask` is non-zero (all if None),
    plus the model's weighted auxiliary losses.

    `forward_kwargs` (e.g. positions=, segment_ids= for packed rows) go to `zoo.forward`.
    """
    logits_BLV, aux = zoo.forward(params, inputs, cfg=cfg, return_aux=True, **forward_kwargs)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), targets)
    # Layers' auxiliary losses (MoE load balance, router z-loss), weighted by their configs.
    extra = zoo.model.aux_loss(cfg, aux)
    if mask is None:
        return jnp.mean(ce_BL) + extra
    mask_BL = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(ce_BL * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0) + extra


def make_train_step(cfg: Any, optimizer: optax.GradientTransformation) -> Callable:
    """`step(params, opt_state, inputs, targets, mask=None) -> (params, opt_state, metrics)`.

    Jitted once with `cfg` closed over; params and opt_state are donated (the caller must use
    the returned ones). metrics: loss, grad_norm (before clipping), finite (bool). When the
    loss or gradient is not finite the returned params and opt_state equal the inputs.
    """

    def step(params, opt_state, inputs_BL, targets_BL, mask_BL=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BL, targets_BL, cfg, mask_BL)
        grad_norm = optax.tree.norm(grads)
        with _optax_promotion():
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return new_params, new_opt_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(step, donate_argnums=(0, 1))


def train_step_for(cfg: Any, tcfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, jitted step) for this model and the optimizer fields of `tcfg`, memoised so
    that repeated `train` calls in one process (notebooks, tests) reuse the compiled step."""
    opt_fields = {f: getattr(tcfg, f) for f in _OPTIMIZER_FIELDS}
    return _train_step_for(cfg, tuple(sorted(opt_fields.items())))


_OPTIMIZER_FIELDS = ("steps", "lr", "warmup_steps", "weight_decay", "b1", "b2", "clip_norm", "min_lr_ratio",
                     "optimizer")


@functools.lru_cache(maxsize=16)
def _train_step_for(cfg: Any, opt_fields: tuple) -> tuple[optax.GradientTransformation, Callable]:
    optimizer = make_optimizer(TrainConfig(**dict(opt_fields)), decay_mask(cfg))
    return optimizer, make_train_step(cfg, optimizer)


def _eval_sums(params, inputs_BL, targets_BL, mask_BL, cfg):
    logits_BLV = zoo.forward(params, inputs_BL, cfg=cfg).astype(jnp.float32)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    mask_BL = mask_BL.astype(jnp.float32)
    return jnp.sum(ce_BL * mask_BL), jnp.sum(mask_BL)


_eval_sums_jit = jax.jit(_eval_sums, static_argnames="cfg")


def evaluate(params: Any, cfg: Any, data: bytes | np.ndarray, *, batch_size: int, seq_len: int,
             max_batches: int | None = None) -> float:
    """Mean next-token loss in bits (nats / ln 2) over non-overlapping windows of `data`;
    for byte-level tokens this is bits per byte. NaN when `data` is too short for one window.

    The last partial batch is padded and masked, so every batch has one shape (one compile).
    """
    max_windows = None if max_batches is None else max_batches * batch_size
    inputs_NL, targets_NL = zdata.sequential_windows(zdata.as_array(data), seq_len, max_windows)
    n = inputs_NL.shape[0]
    if n == 0:
        return float("nan")
    total, count = 0.0, 0.0
    for start in range(0, n, batch_size):
        x, y = inputs_NL[start:start + batch_size], targets_NL[start:start + batch_size]
        mask = np.ones(x.shape, np.float32)
        if x.shape[0] < batch_size:
            pad = ((0, batch_size - x.shape[0]), (0, 0))
            x, y, mask = np.pad(x, pad), np.pad(y, pad), np.pad(mask, pad)
        s, c = _eval_sums_jit(params, x, y, mask, cfg=cfg)
        total += float(s)
        count += float(c)
    return total / count / math.log(2)


@contextlib.contextmanager
def _stop_on_signals(flag: list[int], *, enabled: bool):
    """While active, SIGTERM and SIGINT append their number to `flag` instead of killing the
    process, so the loop can finish its step and save. Only the main thread may set handlers."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda signum, frame: flag.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(cfg: Any, tcfg: TrainConfig, *, data: bytes | np.ndarray | None = None, params: Any = None,
          print_fn: Callable[[str], Any] = print, checkpoint_dir: str | None = None, save_every: int = 0,
          keep_last: int = 3, resume: bool = False) -> tuple[Any, list[float]]:
    """Train `cfg` on `data` (default: the built-in stdlib corpus) for `tcfg.steps` steps.

    Prints a loss line every `tcfg.log_every` steps and the validation bits per byte at the
    end. `params` (optional) are the starting point; they are copied, not donated. Returns
    (params, history) where history[i] is the training loss of step i.

    checkpoint_dir / save_every: save params, optimizer state, the data position and the loss
      history every `save_every` steps and at the end (orbax, atomic; `keep_last` kept).
    resume: continue from the newest checkpoint in `checkpoint_dir` (if any): the run then
      matches an uninterrupted one bit for bit.
    """
    if not isinstance(tcfg, TrainConfig):
        raise TypeError(f"train: tcfg: expected a TrainConfig, got {type(tcfg).__name__}")
    if tcfg.seq_len > cfg.max_len:
        raise checks.ConfigError(
            f"TrainConfig.seq_len={tcfg.seq_len} exceeds the model's max_len={cfg.max_len}")
    tokens = zdata.as_array(zdata.builtin_corpus() if data is None else data, "train: data")
    if tokens.size and int(tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"train: data: token ids must be < vocab_size={cfg.vocab_size}, "
                         f"got max {int(tokens.max())}")
    train_tokens, val_tokens = zdata.split(tokens, tcfg.val_fraction)
    if resume and checkpoint_dir is None:
        raise ValueError("train: resume=True needs checkpoint_dir")
    ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(checkpoint_dir, keep_last=keep_last)

    optimizer, step_fn = train_step_for(cfg, tcfg)
    start, history = 0, []
    if ckpt is not None and resume and ckpt.latest_step() is not None:
        params_target = P.abstract(zoo.param_specs(cfg))
        with _optax_promotion():
            opt_target = jax.eval_shape(optimizer.init, params_target)
        params, opt_state, extra = ckpt.restore(params_target=params_target, opt_state_target=opt_target)
        saved = extra.get("train_config", {})
        changed = {k: (saved[k], v) for k, v in dataclasses.asdict(tcfg).items() if k in saved and saved[k] != v}
        if changed:
            raise ValueError(f"train: resume: the checkpoint was written with other settings "
                             f"(field: (saved, now)): {changed}")
        start, _ = checkpoint.resume_from(extra)
        history = list(extra.get("history", []))
        print_fn(f"resumed from {checkpoint_dir} at step {start}")
    elif params is None:
        params = zoo.init(jax.random.key(tcfg.seed), cfg)
        opt_state = optimizer.init(params)
    else:
        params = jax.tree.map(jnp.array, params)  # a private copy: the step donates its input
        opt_state = optimizer.init(params)
    sampler = zdata.WindowSampler(train_tokens, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step=start)

    def save(step: int, loss: float) -> None:
        ckpt.save(step, params=params, opt_state=opt_state, extra={
            "resume": checkpoint.exact_resume_state(sampler.step), "train_config": dataclasses.asdict(tcfg),
            "metrics": {"loss": loss}, "history": history})
    with _optax_promotion():
        lrs = np.asarray(jax.jit(jax.vmap(make_schedule(tcfg)))(jnp.arange(tcfg.steps)))

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print_fn(f"training {n_params:,} params for {tcfg.steps} steps: batch {tcfg.batch_size} x "
             f"{tcfg.seq_len} tokens, {len(train_tokens):,} train / {len(val_tokens):,} val tokens")
    # Closing the checkpointer (also on an exception) waits for a pending async save; with a
    # checkpointer, SIGTERM / SIGINT end the run after the current step with a final save.
    stop_signal: list[int] = []
    with ckpt if ckpt is not None else contextlib.nullcontext(), \
            _stop_on_signals(stop_signal, enabled=ckpt is not None):
        skipped = 0
        t_last, tokens_since = time.perf_counter(), 0
        for i in range(start, tcfg.steps):
            inputs_BL, targets_BL = next(sampler)
            params, opt_state, metrics = step_fn(params, opt_state, inputs_BL, targets_BL)
            loss = float(metrics["loss"])
            history.append(loss)
            tokens_since += inputs_BL.size
            if not bool(metrics["finite"]):
                msg = (f"non-finite training loss at step {i + 1}/{tcfg.steps}: loss={loss}, "
                       f"grad_norm={float(metrics['grad_norm'])}; the update was not applied")
                if tcfg.on_nonfinite == "raise":
                    raise NonFiniteLossError(msg)
                if tcfg.on_nonfinite == "stop":
                    print_fn(msg + "; stopping with the last finite params")
                    break
                skipped += 1
                print_fn(msg + "; skipping this batch")
                continue
            if i % tcfg.log_every == 0 or i == tcfg.steps - 1:
                now = time.perf_counter()
                speed = (f"{now - t_last:.1f}s incl. compilation" if i == 0
                         else f"{tokens_since / max(now - t_last, 1e-9):,.0f} tok/s")
                print_fn(f"step {i + 1:>6}/{tcfg.steps}  loss {loss:.4f}  "
                         f"grad_norm {float(metrics['grad_norm']):.3f}  lr {lrs[i]:.2e}  {speed}")
                t_last, tokens_since = now, 0
            if ckpt is not None and save_every and (i + 1) % save_every == 0 and i + 1 < tcfg.steps:
                save(i + 1, loss)
            if stop_signal:
                print_fn(f"received signal {stop_signal[0]} at step {i + 1}: saving and stopping")
                break
        if ckpt is not None:
            if history and sampler.step > (ckpt.latest_step() or 0):
                save(sampler.step, history[-1])
    if skipped:
        print_fn(f"skipped {skipped} non-finite step(s)")

    bpb = evaluate(params, cfg, val_tokens, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
                   max_batches=tcfg.eval_batches)
    if len(val_tokens) < tcfg.seq_len + 1:
        print_fn(f"val bits/byte: n/a (validation split of {len(val_tokens)} tokens is shorter "
                 f"than one window of {tcfg.seq_len + 1})")
    else:
        print_fn(f"val bits/byte {bpb:.4f}")
    return params, history
