"""Training: config, loss, a compiled-once train step, evaluation and the training loop.

The step is one `jax.jit` with the model config closed over (static) and the params and
optimizer state donated, so a run compiles once per batch shape and updates in place. With
`grad_accum = k` the batch is split into k micro-batches inside that one step (`lax.scan`), and
the loss is weighted by token count over the whole batch, so k micro-batches give the gradient
of the big batch. A step whose loss or gradient norm is not finite leaves params and optimizer
state unchanged, so the loop can stop (or skip the batch) without a corrupted model.

Optimizers and schedules live in `zoo.optimizers`; metrics writers and FLOP counts in
`zoo.metrics`; packed-document and synthetic-task batches come from `zoo.packing` and
`zoo.tasks` (any `zoo.data.SeededSampler` is a data source).
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
from layers import moe as moe_lib
from layers import params as P
from zoo import checkpoint
from zoo import data as zdata
from zoo import metrics as zmetrics
from zoo import optimizers
from zoo import tokenizer as ztok

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int

OPTIMIZERS = optimizers.OPTIMIZERS
SCHEDULES = optimizers.SCHEDULES
PRECISIONS = ("model", "fp32", "bf16")


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


def _non_negative_int(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        checks.fail(owner, field, "a non-negative integer", value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Attributes:
    steps: optimizer steps.
    batch_size, seq_len: each step sees batch_size rows of seq_len tokens.
    grad_accum: the batch is processed as this many micro-batches of batch_size / grad_accum
      rows inside one compiled step (same gradient, less activation memory); must divide
      batch_size.
    lr: peak learning rate, reached after warmup_steps (linear from 0).
    schedule: after warmup, "cosine" or "linear" decay to lr * min_lr_ratio at the last step,
      or "wsd" (warmup-stable-decay: constant, then linear decay over the last decay_fraction
      of the steps).
    decay_fraction: WSD's decay share of the post-warmup steps, in (0, 1].
    warmup_steps: in [0, steps).
    weight_decay: decoupled decay of matrices; norm scales, biases and embedding tables are
      not decayed (see `decay_mask`).
    b1, b2: Adam moment decay rates (Lion: interpolation and momentum rates; Muon: the AdamW
      rates of its non-matrix parameters).
    clip_norm: gradients are rescaled to at most this global norm.
    seed: seeds parameter init and the batch sampler.
    log_every: print a progress line (and write a metrics record) every this many steps, and
      at the first and last step.
    eval_every: evaluate on the held-out split every this many steps (0: only at the end).
    min_lr_ratio: final learning rate as a fraction of lr.
    val_fraction: tail fraction of the data held out for evaluation.
    eval_batches: at most this many batches are evaluated.
    on_nonfinite: "raise" (NonFiniteLossError), "stop" (return the last finite params) or
      "skip" (drop that update and continue); the step never applies a non-finite update.
    optimizer: "adamw"; "lion" (use a lr 3-10x smaller than AdamW's); "adafactor" (factored
      second moments; b1, b2 unused); "muon" (orthogonalised momentum for the matrices named
      by the param specs, AdamW for the rest; see zoo.optimizers). All share the schedule,
      clipping and decay mask.
    precision: "model" keeps the model config's dtypes; "fp32" computes and stores in float32;
      "bf16" computes in bfloat16 with float32 params (and optimizer state). The loss is
      always computed from float32 logits.
    z_loss: weight of mean(logsumexp(logits)^2) over scored positions (PaLM uses 1e-4).
    label_smoothing: in [0, 1): the target distribution puts this mass uniformly over the
      vocabulary.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: Literal["cosine", "linear", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    warmup_steps: int = 20
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 25
    eval_every: int = 0
    min_lr_ratio: float = 0.1
    val_fraction: float = 0.05
    eval_batches: int = 8
    on_nonfinite: Literal["raise", "stop", "skip"] = "raise"
    optimizer: Literal["adamw", "lion", "adafactor", "muon"] = "adamw"
    precision: Literal["model", "fp32", "bf16"] = "model"
    z_loss: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        name = "TrainConfig"
        for f in ("steps", "batch_size", "seq_len", "log_every", "eval_batches", "grad_accum"):
            checks.positive(name, f, getattr(self, f))
        if self.batch_size % self.grad_accum:
            checks.fail(name, "grad_accum", f"a divisor of batch_size={self.batch_size}", self.grad_accum)
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) \
                or not 0 <= self.warmup_steps < self.steps:
            checks.fail(name, "warmup_steps", f"an integer in [0, steps={self.steps})", self.warmup_steps)
        _non_negative_int(name, "seed", self.seed)
        _non_negative_int(name, "eval_every", self.eval_every)
        _positive_float(name, "lr", self.lr)
        _positive_float(name, "clip_norm", self.clip_norm)
        if not isinstance(self.weight_decay, (int, float)) or isinstance(self.weight_decay, bool) \
                or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            checks.fail(name, "weight_decay", "a non-negative finite float", self.weight_decay)
        _in_range(name, "b1", self.b1, 0.0, 1.0)
        _in_range(name, "b2", self.b2, 0.0, 1.0)
        _in_range(name, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, hi_open=False)
        _in_range(name, "val_fraction", self.val_fraction, 0.0, 1.0)
        _in_range(name, "label_smoothing", self.label_smoothing, 0.0, 1.0)
        _in_range(name, "z_loss", self.z_loss, 0.0, math.inf)
        if not (isinstance(self.decay_fraction, (int, float)) and 0 < self.decay_fraction <= 1):
            checks.fail(name, "decay_fraction", "a float in (0, 1]", self.decay_fraction)
        checks.one_of(name, "on_nonfinite", self.on_nonfinite, ("raise", "stop", "skip"))
        checks.one_of(name, "optimizer", self.optimizer, OPTIMIZERS)
        checks.one_of(name, "schedule", self.schedule, SCHEDULES)
        checks.one_of(name, "precision", self.precision, PRECISIONS)


def with_precision(cfg: Any, precision: str) -> Any:
    """The model config under a precision policy (see TrainConfig.precision)."""
    checks.one_of("with_precision", "precision", precision, PRECISIONS)
    if precision == "fp32":
        return dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    if precision == "bf16":
        return dataclasses.replace(cfg, dtype="bfloat16", param_dtype="float32")
    return cfg


def decay_mask(cfg: Any) -> Any:
    """True where AdamW decays, from the model's parameter specs (layers.params.decays: matrices
    yes; vectors, biases, norm scales, fp32-pinned rates and embedding tables no)."""
    return P.decay_mask(zoo.param_specs(cfg))


def _optax_promotion():
    """optax mixes Python floats with int32 step counts (Adam's bias correction, schedules),
    which `jax_numpy_dtype_promotion="strict"` rejects; its internals run under standard rules."""
    return jax.numpy_dtype_promotion("standard")


make_schedule = optimizers.make_schedule


def make_optimizer(tcfg: TrainConfig, mask: Any = None, specs: Any = None) -> optax.GradientTransformation:
    """See `zoo.optimizers.make_optimizer` (specs: needed by Muon)."""
    return optimizers.make_optimizer(tcfg, mask, specs)


# ------------------------------------------------------------------------------------------ loss


def token_losses(logits_BLV: "Float[Array, 'B L V']", targets_BL: "Int[Array, 'B L']", *,
                 z_loss: float = 0.0, label_smoothing: float = 0.0
                 ) -> tuple["Float[Array, 'B L']", "Float[Array, 'B L']"]:
    """(objective, cross-entropy) per position, in float32.

    cross-entropy: -log p(target). objective: the cross-entropy against the smoothed target
    (1 - s) * onehot + s / V, i.e. lse - (1 - s) * logit_target - s * mean(logits), plus
    z_loss * lse^2. Negative targets (ignored positions) must be masked by the caller.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    safe_BL = jnp.maximum(targets_BL, 0)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, safe_BL[..., None], axis=-1)[..., 0]
    ce_BL = lse_BL - target_logit_BL
    objective_BL = ce_BL
    if label_smoothing:
        objective_BL = lse_BL - (1.0 - label_smoothing) * target_logit_BL \
            - label_smoothing * jnp.mean(logits_BLV, axis=-1)
    if z_loss:
        objective_BL = objective_BL + z_loss * jnp.square(lse_BL)
    return objective_BL, ce_BL


def _score_mask(targets_BL, mask_BL):
    """float32 mask: the given mask (all ones if None) and zero where targets are negative."""
    scored_BL = (targets_BL >= 0).astype(jnp.float32)
    return scored_BL if mask_BL is None else scored_BL * jnp.asarray(mask_BL).astype(jnp.float32)


def _moe_bias_sites(cfg: Any) -> tuple[tuple[str, int], ...]:
    """(group, index) of the blocks whose channel mixer is an MoE with a sigmoid router
    (DeepSeek-V3's bias-balanced routing), where the train step moves router_bias_E from the
    step's load. group "blocks": the scanned pattern (params stacked over layers); "prefix":
    blocks that run once."""
    groups = (("prefix", getattr(cfg, "prefix", ())), ("blocks", cfg.pattern))
    return tuple((g, j) for g, blocks in groups for j, b in enumerate(blocks)
                 if isinstance(b.ffn, moe_lib.MoEConfig) and b.ffn.router == "sigmoid")


def _sums(params, batch, cfg, tcfg, n_tokens):
    """(objective to differentiate, (ce sum, load per MoE bias block)) for one (micro-)batch;
    token sums are divided by the whole batch's token count `n_tokens`."""
    fwd = {k: batch[k] for k in ("segment_ids", "positions") if batch.get(k) is not None}
    logits_BLV, aux = zoo.forward(params, batch["inputs"], cfg=cfg, return_aux=True, **fwd)
    objective_BL, ce_BL = token_losses(logits_BLV, batch["targets"], z_loss=tcfg.z_loss,
                                       label_smoothing=tcfg.label_smoothing)
    mask_BL = _score_mask(batch["targets"], batch.get("mask"))
    objective = jnp.sum(objective_BL * mask_BL) / n_tokens + zoo.model.aux_loss(cfg, aux) / tcfg.grad_accum
    loads = tuple(aux[g][j]["ffn"]["tokens_per_expert"] for g, j in _moe_bias_sites(cfg))
    return objective, (jnp.sum(ce_BL * mask_BL), loads)


def loss_fn(params: Any, inputs: "Int[Array, 'B L']", targets: "Int[Array, 'B L']", cfg: Any,
            mask: "Any | None" = None, *, z_loss: float = 0.0, label_smoothing: float = 0.0,
            **forward_kwargs) -> "Float[Array, '']":
    """Mean next-token objective (fp32) over positions where `mask` is non-zero and the target
    is non-negative (all if None), plus the model's weighted auxiliary losses.

    z_loss, label_smoothing: see `token_losses`. `forward_kwargs` (positions=, segment_ids= for
    packed rows) go to `zoo.forward`.
    """
    logits_BLV, aux = zoo.forward(params, inputs, cfg=cfg, return_aux=True, **forward_kwargs)
    objective_BL, _ = token_losses(logits_BLV, targets, z_loss=z_loss, label_smoothing=label_smoothing)
    mask_BL = _score_mask(targets, mask)
    return jnp.sum(objective_BL * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0) + zoo.model.aux_loss(cfg, aux)


# ------------------------------------------------------------------------------------------ step


def _grads(params, batch, cfg, tcfg):
    """(objective, ce sum, token count, loads, grads) over the batch, in tcfg.grad_accum
    micro-batches when > 1 (one scan: the gradient of the token-weighted whole-batch loss)."""
    n_tokens = jnp.sum(_score_mask(batch["targets"], batch.get("mask")))
    denom = jnp.maximum(n_tokens, 1.0)
    grad_fn = jax.value_and_grad(_sums, has_aux=True)
    k = tcfg.grad_accum
    if k == 1:
        (objective, (ce_sum, loads)), grads = grad_fn(params, batch, cfg, tcfg, denom)
        return objective, ce_sum, n_tokens, loads, grads
    micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)

    def body(carry, mb):
        (objective, (ce_sum, loads)), grads = grad_fn(params, mb, cfg, tcfg, denom)
        return jax.tree.map(jnp.add, carry, (objective, ce_sum, loads, grads)), None

    (obj0, (ce0, loads0)), grads0 = jax.eval_shape(lambda p, mb: grad_fn(p, mb, cfg, tcfg, denom), params,
                                                   jax.tree.map(lambda a: a[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (obj0, ce0, loads0, grads0))
    (objective, ce_sum, loads, grads), _ = jax.lax.scan(body, zeros, micro)
    return objective, ce_sum, n_tokens, loads, grads


def _update_router_biases(params, loads, cfg):
    """DeepSeek-V3 aux-loss-free balancing: move each sigmoid router's bias toward equal load,
    per layer (a scanned block's bias is stacked over the `layers` axis like its load)."""
    if not loads:
        return params
    groups = {g: list(params[g]) for g, _ in _moe_bias_sites(cfg)}
    for (g, j), load in zip(_moe_bias_sites(cfg), loads):
        block_cfg = (cfg.pattern if g == "blocks" else cfg.prefix)[j]
        update = functools.partial(moe_lib.update_router_bias, rate=block_cfg.ffn.router_bias_rate)
        if g == "blocks":
            update = jax.vmap(update)
        ffn = {**groups[g][j]["ffn"]}
        ffn["router_bias_E"] = update(ffn["router_bias_E"], load)
        groups[g][j] = {**groups[g][j], "ffn": ffn}
    return {**params, **{g: tuple(blocks) for g, blocks in groups.items()}}


def make_train_step(cfg: Any, optimizer: optax.GradientTransformation, tcfg: TrainConfig | None = None
                    ) -> Callable:
    """`step(params, opt_state, inputs, targets, mask=None, segment_ids=None, positions=None)
    -> (params, opt_state, metrics)`.

    Jitted once with `cfg` and `tcfg` (grad_accum, z_loss, label_smoothing; defaults if None)
    closed over; params and opt_state are donated (the caller must use the returned ones).
    Targets < 0 are not scored. metrics: loss (the objective: mean smoothed cross-entropy +
    z-loss + aux losses), ce (mean cross-entropy, nats), tokens (scored positions), grad_norm
    (before clipping), finite (bool). When the loss or gradient is not finite the returned
    params and opt_state equal the inputs. MoE layers with a sigmoid router get their
    router_bias_E moved by the step's load (outside the gradient).
    """
    tcfg = TrainConfig() if tcfg is None else tcfg

    def step(params, opt_state, inputs_BL, targets_BL, mask_BL=None, segment_ids_BL=None, positions_BL=None):
        batch = {"inputs": inputs_BL, "targets": targets_BL, "mask": mask_BL, "segment_ids": segment_ids_BL,
                 "positions": positions_BL}
        batch = {k: v for k, v in batch.items() if v is not None}
        objective, ce_sum, n_tokens, loads, grads = _grads(params, batch, cfg, tcfg)
        grad_norm = optax.tree.norm(grads)
        with _optax_promotion():
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = _update_router_biases(optax.apply_updates(params, updates), loads, cfg)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {"loss": objective, "ce": ce_sum / jnp.maximum(n_tokens, 1.0), "tokens": n_tokens,
                   "grad_norm": grad_norm, "finite": finite}
        return new_params, new_opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def train_step_for(cfg: Any, tcfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, jitted step) for this model and the optimizer and loss fields of `tcfg`,
    memoised so that repeated `train` calls in one process (notebooks, tests) reuse the
    compiled step. `cfg` is used as given (apply `with_precision` first)."""
    fields = {f: getattr(tcfg, f) for f in _STEP_FIELDS}
    return _train_step_for(cfg, tuple(sorted(fields.items())))


_STEP_FIELDS = ("steps", "lr", "warmup_steps", "weight_decay", "b1", "b2", "clip_norm", "min_lr_ratio",
                "optimizer", "schedule", "decay_fraction", "grad_accum", "z_loss", "label_smoothing",
                "batch_size")


@functools.lru_cache(maxsize=16)
def _train_step_for(cfg: Any, fields: tuple) -> tuple[optax.GradientTransformation, Callable]:
    tcfg = TrainConfig(**dict(fields))
    specs = zoo.param_specs(cfg)
    optimizer = make_optimizer(tcfg, P.decay_mask(specs), specs)
    return optimizer, make_train_step(cfg, optimizer, tcfg)


# ------------------------------------------------------------------------------------ evaluation


def _eval_sums(params, inputs_BL, targets_BL, mask_BL, segment_ids_BL, positions_BL, cfg):
    logits_BLV = zoo.forward(params, inputs_BL, cfg=cfg, segment_ids=segment_ids_BL, positions=positions_BL)
    _, ce_BL = token_losses(logits_BLV, targets_BL)
    mask_BL = _score_mask(targets_BL, mask_BL)
    return jnp.sum(ce_BL * mask_BL), jnp.sum(mask_BL)


_eval_sums_jit = jax.jit(_eval_sums, static_argnames="cfg")


def evaluate(params: Any, cfg: Any, data: Any, *, batch_size: int, seq_len: int,
             max_batches: int | None = None, token_bytes: Any = None) -> float:
    """Mean next-token loss in bits (nats / ln 2); for byte-level tokens this is bits per byte.

    token_bytes: int [vocab_size], the text bytes each id stands for
      (`zoo.tokenizer.Tokenizer.token_bytes()`); given, the summed loss is divided by the bytes
      the scored targets cover instead of their count: bits per byte for any tokenizer.

    data: a token sequence (bytes or a rank-1 array), evaluated over non-overlapping windows
      (NaN when too short for one window; the last partial batch is padded and masked, so
      every batch has one shape: one compile); or a `zoo.data.SeededSampler` (packed documents,
      a synthetic task), whose batches 0 .. max_batches - 1 are evaluated on their scored
      positions.
    """
    if isinstance(data, zdata.SeededSampler):
        batches = (as_batch(data.batch(i)) for i in range(max_batches or 1))
    else:
        max_windows = None if max_batches is None else max_batches * batch_size
        inputs_NL, targets_NL = zdata.sequential_windows(zdata.as_array(data), seq_len, max_windows)
        if inputs_NL.shape[0] == 0:
            return float("nan")
        batches = _padded_batches(inputs_NL, targets_NL, batch_size)
    total, count = 0.0, 0.0
    for b in batches:
        s, c = _eval_sums_jit(params, b["inputs"], b["targets"], b.get("mask"), b.get("segment_ids"),
                              b.get("positions"), cfg=cfg)
        total += float(s)
        count += float(c) if token_bytes is None else ztok.covered_bytes(b["targets"], token_bytes, b.get("mask"))
    return total / max(count, 1.0) / math.log(2) if count else float("nan")


def _padded_batches(inputs_NL, targets_NL, batch_size):
    for start in range(0, inputs_NL.shape[0], batch_size):
        x, y = inputs_NL[start:start + batch_size], targets_NL[start:start + batch_size]
        mask = np.ones(x.shape, np.float32)
        if x.shape[0] < batch_size:
            pad = ((0, batch_size - x.shape[0]), (0, 0))
            x, y, mask = np.pad(x, pad), np.pad(y, pad), np.pad(mask, pad)
        yield {"inputs": x, "targets": y, "mask": mask}


def as_batch(batch: Any) -> dict:
    """A sampler's batch as a dict: (inputs, targets) tuples become {"inputs", "targets"}; dicts
    (packed rows: + "mask", "segment_ids", "positions") pass through."""
    if isinstance(batch, dict):
        return batch
    inputs, targets = batch
    return {"inputs": inputs, "targets": targets}


# ------------------------------------------------------------------------------------ the loop


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


def _data_sources(data: Any, val_data: Any, tcfg: TrainConfig, cfg: Any):
    """(train sampler factory(step), validation data, description) for `train`."""
    if isinstance(data, zdata.SeededSampler):
        return (lambda step: data.seek(step)), val_data, repr(data)
    tokens = zdata.as_array(zdata.builtin_corpus() if data is None else data, "train: data")
    if tokens.size and int(tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"train: data: token ids must be < vocab_size={cfg.vocab_size}, "
                         f"got max {int(tokens.max())}")
    if val_data is None:
        tokens, val_data = zdata.split(tokens, tcfg.val_fraction)
    desc = f"{len(tokens):,} train / {len(val_data):,} val tokens"
    return (lambda step: zdata.WindowSampler(tokens, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step=step)), \
        val_data, desc


def _placement(mesh, rules, cfg):
    """(param shardings or None, function placing a batch array, context for the step)."""
    if mesh is None:
        return None, (lambda a: a), contextlib.nullcontext()
    import sharding

    rules = "dp" if rules is None else rules
    p_shard = sharding.param_shardings(zoo.param_specs(cfg), mesh, rules)
    place = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, rules, a.shape,  # noqa: E731
                                                                  ("batch",) + (None,) * (a.ndim - 1)))
    return p_shard, place, sharding.use_rules(mesh, rules)


def train(cfg: Any, tcfg: TrainConfig, *, data: Any = None, val_data: Any = None, params: Any = None,
          print_fn: Callable[[str], Any] = print, checkpoint_dir: str | None = None, save_every: int = 0,
          keep_last: int = 3, keep_best: int = 0, resume: bool = False, metrics_jsonl: str | None = None,
          tensorboard_dir: str | None = None, peak_flops: float | None = None,
          mesh: Any = None, rules: Any = None, token_bytes: Any = None) -> tuple[Any, list[float]]:
    """Train `cfg` (under `tcfg.precision`) for `tcfg.steps` steps.

    data: a token sequence (bytes / rank-1 array; default the built-in stdlib corpus), sampled
      as random windows with the tail `val_fraction` held out; or a `zoo.data.SeededSampler`
      (packed documents, a synthetic task) whose batches may carry masks and segment ids.
    val_data: the held-out split (tokens or a sampler; see `evaluate`); default as above, and
      none for a sampler (evaluation is then skipped).
    params: the starting point (copied, not donated).
    checkpoint_dir / save_every / keep_last: save params, optimizer state, the data position and
      the loss history every `save_every` steps and at the end (orbax, atomic).
    keep_best: also keep the N checkpoints whose step had the lowest validation bits.
    resume: continue from the newest checkpoint in `checkpoint_dir` (if any): the run then
      matches an uninterrupted one bit for bit.
    metrics_jsonl / tensorboard_dir: where per-step metrics go (step, loss, ce, bits, lr,
      grad_norm, tokens_per_s, step_time_s, mfu; val_bits at evaluations).
    peak_flops: the FLOP/s that MFU is measured against; None measures a matmul once.
    token_bytes: the text bytes per token id (`zoo.tokenizer`), so that validation reports bits
      per byte for a tokenizer other than bytes (see `evaluate`).
    mesh / rules: place params and optimizer state with `sharding.param_shardings(specs, mesh,
      rules)` (rules: a preset name or table, default "dp") and batches over the data axes.

    Prints a progress line every `tcfg.log_every` steps and the validation bits at the end.
    Returns (params, history) where history[i] is the training loss of step i.
    """
    if not isinstance(tcfg, TrainConfig):
        raise TypeError(f"train: tcfg: expected a TrainConfig, got {type(tcfg).__name__}")
    cfg = with_precision(cfg, tcfg.precision)
    if tcfg.seq_len > cfg.max_len:
        raise checks.ConfigError(
            f"TrainConfig.seq_len={tcfg.seq_len} exceeds the model's max_len={cfg.max_len}")
    make_sampler, val_data, data_desc = _data_sources(data, val_data, tcfg, cfg)
    if resume and checkpoint_dir is None:
        raise ValueError("train: resume=True needs checkpoint_dir")
    # keep_best ranks checkpoints by the validation bits measured at their step (eval_every
    # should divide save_every); checkpoints without one are never counted among the best.
    ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(
        checkpoint_dir, keep_last=keep_last, keep_best=keep_best, best_metric="val_bits", best_mode="min")
    p_shard, place, rules_ctx = _placement(mesh, rules, cfg)
    if p_shard is not None:
        import sharding

    optimizer, step_fn = train_step_for(cfg, tcfg)
    start, history = 0, []
    if ckpt is not None and resume and ckpt.latest_step() is not None:
        params_target = P.abstract(zoo.param_specs(cfg))
        if p_shard is not None:
            params_target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                                         params_target, p_shard)
        with _optax_promotion():
            opt_target = jax.eval_shape(optimizer.init, params_target)
        if p_shard is not None:
            opt_shard = sharding.like_params_shardings(opt_target, p_shard, mesh)
            opt_target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                                      opt_target, opt_shard)
        params, opt_state, extra = ckpt.restore(params_target=params_target, opt_state_target=opt_target)
        saved = extra.get("train_config", {})
        changed = {k: (saved[k], v) for k, v in dataclasses.asdict(tcfg).items() if k in saved and saved[k] != v}
        if changed:
            raise ValueError(f"train: resume: the checkpoint was written with other settings "
                             f"(field: (saved, now)): {changed}")
        start, _ = checkpoint.resume_from(extra)
        history = list(extra.get("history", []))
        print_fn(f"resumed from {checkpoint_dir} at step {start}")
    else:
        if params is None and p_shard is not None:
            # Each device computes only its own shards: no device ever holds the whole model.
            params = sharding.init_sharded(jax.random.key(tcfg.seed), zoo.param_specs(cfg), mesh, rules or "dp")
        elif params is None:
            params = zoo.init(jax.random.key(tcfg.seed), cfg)
        else:
            params = jax.tree.map(jnp.array, params)  # a private copy: the step donates its input
            if p_shard is not None:
                params = jax.device_put(params, p_shard)
        if p_shard is not None:
            # Moments placed like their params from the start, so step 2 does not recompile.
            opt_state = sharding.init_optimizer_sharded(optimizer, params, p_shard, mesh)
        else:
            with _optax_promotion():
                opt_state = jax.jit(optimizer.init)(params)
    sampler = make_sampler(start)

    val_at: dict[int, float] = {}  # step -> validation bits measured there (ranks keep_best)

    def save(step: int, loss: float) -> None:
        metrics = {"loss": loss}
        if step in val_at:
            metrics["val_bits"] = val_at[step]
        ckpt.save(step, params=params, opt_state=opt_state, extra={
            "resume": checkpoint.exact_resume_state(sampler.step), "train_config": dataclasses.asdict(tcfg),
            "metrics": metrics, "history": history})
    with _optax_promotion():
        lrs = np.asarray(jax.jit(jax.vmap(make_schedule(tcfg)))(jnp.arange(tcfg.steps)))

    def run_eval() -> float:
        if val_data is None:
            return float("nan")
        return evaluate(params, cfg, val_data, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
                        max_batches=tcfg.eval_batches, token_bytes=token_bytes)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    flops_tok = zmetrics.flops_per_token(cfg, tcfg.seq_len)
    peak = zmetrics.measure_peak_flops() if peak_flops is None else peak_flops
    print_fn(f"training {n_params:,} params for {tcfg.steps} steps ({tcfg.optimizer}, {tcfg.schedule}, "
             f"{cfg.dtype} compute): batch {tcfg.batch_size} x {tcfg.seq_len} tokens"
             f"{f' in {tcfg.grad_accum} micro-batches' if tcfg.grad_accum > 1 else ''}, {data_desc}")
    # Closing the checkpointer (also on an exception) waits for a pending async save; with a
    # checkpointer, SIGTERM / SIGINT end the run after the current step with a final save.
    stop_signal: list[int] = []
    if jax.process_index() != 0:  # in a multi-process run only process 0 writes metrics
        metrics_jsonl = tensorboard_dir = None
    writer = zmetrics.MetricsWriter(metrics_jsonl, tensorboard_dir, print_fn=print_fn)
    with writer, ckpt if ckpt is not None else contextlib.nullcontext(), rules_ctx, \
            _stop_on_signals(stop_signal, enabled=ckpt is not None):
        skipped = 0
        t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
        for i in range(start, tcfg.steps):
            b = as_batch(next(sampler))
            args = [b["inputs"], b["targets"], b.get("mask"), b.get("segment_ids"), b.get("positions")]
            while args[-1] is None:  # the call signature of plain (inputs, targets) batches stays one
                args.pop()
            args = [None if a is None else place(a) for a in args]
            params, opt_state, metrics = step_fn(params, opt_state, *args)
            loss = float(metrics["loss"])
            history.append(loss)
            tokens_since += b["inputs"].size
            steps_since += 1
            if not bool(metrics["finite"]):
                msg = (f"non-finite training loss at step {i + 1}/{tcfg.steps}: loss={loss}, "
                       f"grad_norm={float(metrics['grad_norm'])}; the update was not applied")
                writer.write(i + 1, {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "skipped": True})
                if tcfg.on_nonfinite == "raise":
                    raise NonFiniteLossError(msg)
                if tcfg.on_nonfinite == "stop":
                    print_fn(msg + "; stopping with the last finite params")
                    break
                skipped += 1
                print_fn(msg + "; skipping this batch")
                continue
            record = None
            evaluating = tcfg.eval_every and (i + 1) % tcfg.eval_every == 0 and i + 1 < tcfg.steps
            if i % tcfg.log_every == 0 or i == tcfg.steps - 1 or evaluating:
                now = time.perf_counter()
                dt = max(now - t_last, 1e-9)
                ce = float(metrics["ce"])
                record = {"loss": loss, "ce": ce, "bits": ce / math.log(2), "perplexity": math.exp(min(ce, 80.0)),
                          "lr": float(lrs[i]), "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": tokens_since / dt, "step_time_s": dt / steps_since,
                          "mfu": (flops_tok * tokens_since / dt / peak) if peak else None}
                if token_bytes is not None:  # "bits" is per token; this one compares across tokenizers
                    record["bits_per_byte"] = ztok.bits_per_byte(
                        ce * float(metrics["tokens"]), ztok.covered_bytes(b["targets"], token_bytes, b.get("mask")))
                if i == start:
                    record["includes_compilation"] = True
                speed = (f"{dt:.1f}s incl. compilation" if i == start
                         else f"{record['tokens_per_s']:,.0f} tok/s  {1e3 * record['step_time_s']:.0f} ms/step"
                         + (f"  mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""))
                print_fn(f"step {i + 1:>6}/{tcfg.steps}  loss {loss:.4f}  "
                         f"grad_norm {record['grad_norm']:.3f}  lr {lrs[i]:.2e}  {speed}")
            if evaluating:
                val_bits = run_eval()
                val_at[i + 1] = val_bits
                record["val_bits"] = val_bits
                print_fn(f"step {i + 1:>6}/{tcfg.steps}  val bits {val_bits:.4f}")
            if record is not None:
                writer.write(i + 1, record)
                t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
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
        if val_data is not None:
            bits = run_eval()
            if isinstance(val_data, zdata.SeededSampler) or len(val_data) >= tcfg.seq_len + 1:
                writer.write(sampler.step, {"val_bits": bits})
                print_fn(f"val bits/byte {bits:.4f}")
            else:
                print_fn(f"val bits/byte: n/a (validation split of {len(val_data)} tokens is shorter "
                         f"than one window of {tcfg.seq_len + 1})")
    return params, history
