"""Optimizers and learning-rate schedules, all through optax, driven by the parameter specs.

What the specs decide (never the arrays' ndim):
  - which parameters are decayed (`layers.params.decay_mask`);
  - which parameters Muon orthogonalises, and how each is seen as a (fan_in, fan_out) matrix
    (`muon_dimension_numbers`): a stacked weight's "layers" axis and an MoE weight's "expert"
    axis are batch axes (one matrix per layer / expert), a D -> H x K projection is a
    D x (H*K) matrix, and H x K -> D is (H*K) x D.

The `opt` argument of the functions below is any object with the optimizer fields of
`zoo.train.TrainConfig` (duck-typed, so this module does not import the training loop).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from layers import params as P

OPTIMIZERS = ("adamw", "lion", "adafactor", "muon")
SCHEDULES = ("cosine", "linear", "wsd")

#: Axes along which a weight holds independent matrices (Muon orthogonalises each separately).
BATCH_AXES = frozenset({"layers", "expert"})
#: Axes that make a parameter a lookup table or a depthwise filter rather than a linear map:
#: embeddings and the output head stay with AdamW (the Muon papers' practice), and a
#: convolution filter is per channel.
NOT_MATRIX_AXES = frozenset({"vocab", "positions", "conv_width"})


# ------------------------------------------------------------------------------------ schedules


def make_schedule(opt: Any) -> optax.Schedule:
    """Linear warmup from 0 to `opt.lr` over `opt.warmup_steps`, then, until `opt.steps`:
    "cosine" decay or "linear" decay to lr * min_lr_ratio, or "wsd" (warmup-stable-decay):
    constant lr, then a linear decay to lr * min_lr_ratio over the last `decay_fraction` of the
    steps (at least one step)."""
    peak, end, warmup, steps = opt.lr, opt.lr * opt.min_lr_ratio, opt.warmup_steps, opt.steps
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                                  decay_steps=steps, end_value=end)
    ramp = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if opt.schedule == "linear":
        decay = optax.linear_schedule(peak, end, max(steps - warmup, 1))
        return optax.join_schedules([ramp, decay], [warmup])
    n_decay = max(1, round(opt.decay_fraction * (steps - warmup)))
    stable_end = steps - n_decay
    return optax.join_schedules(
        [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, end, n_decay)],
        [warmup, stable_end])


# ------------------------------------------------------------------------------------ Muon


def matrix_dims(spec: P.ParamSpec) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees one parameter, from its logical axes; None keeps it with AdamW.

    A Muon matrix is decayed by the default rule (so not a norm scale, bias, fp32-pinned rate
    or embedding), has every axis named (an unnamed axis could be a stacked gate or a fused
    pair, whose role the name cannot tell), and has at least two axes besides the batch axes
    ("layers", "expert"). Weights are stored input axes first (`x W`); a projection into the
    model width ("embed" last) reduces over all its other axes, any other one over its first
    axis, e.g. embed -> heads x head_dim, heads x head_dim -> embed, kv_lora -> heads x head_dim.
    """
    axes = spec.logical_axes
    if not P.decays(spec) or any(a is None or a in NOT_MATRIX_AXES for a in axes):
        return None
    own = [i for i, a in enumerate(axes) if a not in BATCH_AXES]
    if len(own) < 2:
        return None
    if axes[own[-1]] == "embed" and axes[own[0]] != "embed":
        reduction, output = own[:-1], own[-1:]
    else:
        reduction, output = own[:1], own[1:]
    return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(reduction), output_axis=tuple(output))


def muon_dimension_numbers(specs: Any) -> Any:
    """`matrix_dims` for every spec: a tree like the params with MuonDimensionNumbers or None."""
    return jax.tree.map(matrix_dims, specs, is_leaf=P.is_spec)


def _muon_leaf(x: Any) -> bool:
    return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


# ------------------------------------------------------------------------------------ optimizer


def make_optimizer(opt: Any, mask: Any = None, specs: Any = None) -> optax.GradientTransformation:
    """Global-norm clipping, then `opt.optimizer` on `make_schedule(opt)`.

    mask: tree of bools like the params (e.g. `decay_mask(specs)`): which parameters decay (all
      if None).
    specs: the model's ParamSpecs; required by "muon", which orthogonalises the updates of the
      matrices named by `muon_dimension_numbers(specs)` and runs AdamW (b1, b2, same schedule
      and decay mask) on everything else. Muon's updates are scaled to AdamW's RMS (0.2 *
      sqrt(max(fan_in, fan_out)), Liu et al. 2025), so one lr and weight decay serve both.
    """
    schedule = make_schedule(opt)
    wd = opt.weight_decay
    if opt.optimizer == "lion":
        inner = optax.lion(schedule, b1=opt.b1, b2=opt.b2, weight_decay=wd, mask=mask)
    elif opt.optimizer == "adafactor":
        # Absolute steps (not scaled by each parameter's RMS) so that lr means what it means for
        # AdamW and Lion: tiny-init embeddings would otherwise barely move.
        inner = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                                weight_decay_rate=wd or None, weight_decay_mask=mask)
    elif opt.optimizer == "muon":
        if specs is None:
            raise ValueError("make_optimizer: specs: the muon optimizer needs the model's ParamSpecs "
                             "to tell matrices from other parameters, got None")
        dims = muon_dimension_numbers(specs)
        labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dims, is_leaf=_muon_leaf)
        if mask is None:
            mask = jax.tree.map(lambda _: True, labels)
        # optax's muon would run its own AdamW on the non-matrices without a decay mask; the
        # partition gives them ours. Inside the "muon" branch only Muon's leaves remain.
        inner = optax.partition({
            "muon": optax.contrib.muon(schedule, weight_decay=wd, weight_decay_mask=mask,
                                       muon_weight_dimension_numbers=dims, consistent_rms=0.2),
            "adam": optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=wd, mask=mask),
        }, labels)
    else:
        inner = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=wd, mask=mask)
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), inner)
