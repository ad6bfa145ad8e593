"""Train-step speed of every `zoo compare` family at compare shapes, on this machine.

    python benchmarks/family_step.py                          # every family, default forms
    python benchmarks/family_step.py --families mamba gla --forms
    python benchmarks/family_step.py --sweep --batch 16 --seq 64

Each family is sized by `zoo.compare.families.solve` to `--target` non-embedding parameters (the
compare budget), then one jitted loss + grad step (`zoo.train.loss_fn`) is timed: the median of
`--repeats` calls after one warm-up, in tokens per second, and as a ratio to the transformer
timed in the same process. All variants are compiled first, then timed in interleaved rounds, so
load from other processes on a shared CPU shifts every row alike. `--sweep` times the step `zoo compare` actually runs instead: the
vmapped 2-member learning-rate sweep with its AdamW update (`zoo.compare.sweep`).

`--delta-rule` times the delta rule alone (chunk sizes, recurrent form, the triangular inverse's
custom gradient against autodiff) beside GLA's chunked scan at the same shape (CPU time).

`--forms` also times every XLA form of the family's mixer (chunked, associative, sequential,
recurrent, ...) and a few chunk sizes, by replacing fields of the mixer config; families whose
mixer has a single form print one row.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo import train as ztrain
from zoo.compare import families as F

#: Alternative forms per mixer config class: (label, field overrides).
FORMS: dict[str, list[tuple[str, dict]]] = {
    "MambaConfig": [("chunked/32", dict(scan="chunked", chunk_size=32)),
                    ("chunked/64", dict(scan="chunked", chunk_size=64)),
                    ("chunked/16", dict(scan="chunked", chunk_size=16)),
                    ("associative", dict(scan="associative")), ("sequential", dict(scan="sequential"))],
    "Mamba2Config": [("chunked/32", dict(scan="chunked", chunk_size=32)),
                     ("chunked/64", dict(scan="chunked", chunk_size=64)),
                     ("chunked/16", dict(scan="chunked", chunk_size=16)), ("sequential", dict(scan="sequential"))],
    "DeltaNetConfig": [("chunked/32", dict(form="chunked", chunk_size=32)),
                       ("chunked/64", dict(form="chunked", chunk_size=64)),
                       ("chunked/16", dict(form="chunked", chunk_size=16)), ("recurrent", dict(form="recurrent"))],
    "RWKV7TimeMixConfig": [("chunked/16", dict(form="chunked", chunk_size=16)),
                           ("chunked/32", dict(form="chunked", chunk_size=32)),
                           ("chunked/64", dict(form="chunked", chunk_size=64)), ("recurrent", dict(form="recurrent"))],
    "GLAConfig": [("chunked/64", dict(form="chunked", chunk_size=64)),
                  ("chunked/16", dict(form="chunked", chunk_size=16)),
                  ("chunked/32", dict(form="chunked", chunk_size=32)),
                  ("parallel", dict(form="parallel")), ("recurrent", dict(form="recurrent"))],
    "RetNetConfig": [("chunkwise/64", dict(form="chunkwise", chunk_size=64)),
                     ("chunkwise/32", dict(form="chunkwise", chunk_size=32)),
                     ("parallel", dict(form="parallel")), ("recurrent", dict(form="recurrent"))],
    "MLSTMConfig": [("chunkwise/64", dict(form="chunkwise", chunk_size=64)),
                    ("chunkwise/32", dict(form="chunkwise", chunk_size=32)),
                    ("parallel", dict(form="parallel")), ("recurrent", dict(form="recurrent"))],
    "MinGRUConfig": [("log_scan/256", dict(form="log_scan", chunk_size=256)),
                     ("log_scan/64", dict(form="log_scan", chunk_size=64)),
                     ("log_scan/full", dict(form="log_scan", chunk_size=None)),
                     ("sequential", dict(form="sequential"))],
}


def with_mixer(cfg, cls_name: str, overrides: dict):
    """`cfg` with `overrides` applied to every block mixer whose config class is `cls_name`."""
    def block(b):
        if type(b.mixer).__name__ != cls_name:
            return b
        return dataclasses.replace(b, mixer=dataclasses.replace(b.mixer, **overrides))
    return dataclasses.replace(cfg, pattern=tuple(map(block, cfg.pattern)),
                               prefix=tuple(map(block, cfg.prefix)))


def mixer_classes(cfg) -> list[str]:
    seen = []
    for b in tuple(cfg.prefix) + tuple(cfg.pattern):
        name = type(b.mixer).__name__
        if name not in seen:
            seen.append(name)
    return seen


def _batch(cfg, B, L, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, L + 1)).astype(np.int32)
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])


def prepare_grad(cfg, B, L):
    """A no-argument callable running one jitted loss + grad at batch B, length L (compiled)."""
    import zoo
    params = zoo.init(jax.random.key(0), cfg)
    inputs, targets = _batch(cfg, B, L)
    fn = jax.jit(jax.value_and_grad(lambda p, x, y: ztrain.loss_fn(p, x, y, cfg)))
    jax.block_until_ready(fn(params, inputs, targets))  # compile + warm-up
    return lambda: fn(params, inputs, targets)


def prepare_sweep(cfg, B, L, lrs=(3e-3, 1e-2)):
    """A no-argument callable running the 2-member sweep step of `zoo compare` (vmapped loss +
    grad + AdamW, donated buffers), compiled."""
    from zoo.compare import sweep
    optimizer = sweep._optimizer(cfg, 0.1)  # AdamW at unit rate, weight decay 0.1, as `zoo compare`
    params = sweep.init_sweep(cfg, len(lrs), 0)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.vmap(optimizer.init)(params)
    inputs, targets = _batch(cfg, B, L)
    mask = jnp.ones(targets.shape, jnp.float32)
    lrs_R = jnp.asarray(lrs, jnp.float32)
    compiled = sweep._sweep_step(cfg, optimizer).lower(params, opt_state, lrs_R, inputs, targets, mask).compile()
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], lrs_R, inputs, targets, mask)
        return loss

    jax.block_until_ready(run())
    return run


def time_rounds(runs: list, repeats: int) -> list[float]:
    """Median seconds per callable, timed in interleaved rounds (one call of each per round), so a
    change in machine load (the CPU is shared) hits every variant alike."""
    times = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            t = time.perf_counter()
            jax.block_until_ready(run())
            times[i].append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def delta_rule_rows(B: int, L: int, H: int, K: int, repeats: int) -> None:
    """The delta rule's chunked form (each chunk size, with the triangular inverse's custom
    gradient and with autodiff through its doubling product) against its recurrent form and
    GLA's chunked scan on the same q, k, v and per-head decays: fwd + bwd, CPU ms (medians of
    interleaved rounds; the process's CPU time, so pin it with taskset on a shared machine)."""
    from layers import deltanet, linear_recurrence

    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, L, H, K))
    k = jax.random.normal(ks[1], (B, L, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, L, H, K))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, L, H)))
    g = -jax.nn.softplus(jax.random.normal(ks[4], (B, L, H)))
    dy = jax.random.normal(ks[5], (B, L, H, K))
    fast_inverse = deltanet._unit_lower_inverse

    def delta(C, form="chunked", inverse=fast_inverse):
        def loss(q, k, v, beta, g):
            o, h = deltanet.delta_rule(q, k, v, beta, g, form=form, chunk_size=C)
            return jnp.sum(o * dy) + jnp.sum(h)
        deltanet._unit_lower_inverse = inverse  # read while tracing, below
        try:
            f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
            jax.block_until_ready(f(q, k, v, beta, g))
        finally:
            deltanet._unit_lower_inverse = fast_inverse
        return lambda: f(q, k, v, beta, g)

    def gla(C):
        def loss(q, k, v, g):
            o, h = linear_recurrence.decayed_linear_attention(q, k, v, g, scale=1.0, form="chunked", chunk_size=C)
            return jnp.sum(o * dy) + jnp.sum(h)
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        jax.block_until_ready(f(q, k, v, g))
        return lambda: f(q, k, v, g)

    rows = []
    for C in (64, 32, 16):
        rows.append((f"delta chunked/{C}", delta(C)))
        rows.append((f"delta chunked/{C}, autodiff inverse", delta(C, inverse=deltanet._doubling_inverse)))
    rows += [("delta recurrent", delta(64, "recurrent")), ("gla chunked/64", gla(64))]
    times = [[] for _ in rows]
    for _ in range(repeats):
        for i, (_, run) in enumerate(rows):
            c0 = time.process_time()
            jax.block_until_ready(run())
            times[i].append(time.process_time() - c0)
    print(f"# delta rule fwd+bwd, B={B} L={L} H={H} K=V={K}, gated; CPU ms, median of {repeats}")
    for (label, _), ts in zip(rows, times):
        print(f"{label:40s} {np.median(ts) * 1e3:9.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=None, help="default: all compare families")
    ap.add_argument("--target", type=int, default=80_000, help="non-embedding parameters (compare --quick)")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="time the vmapped 2-lr sweep step instead")
    ap.add_argument("--forms", action="store_true", help="also time every mixer form / chunk size")
    ap.add_argument("--delta-rule", action="store_true",
                    help="time the delta rule's forms against GLA's chunked scan instead, at --batch x --seq "
                         "with 2 heads of 32 (gated-deltanet-tiny's), e.g. --batch 1 --seq 1024")
    args = ap.parse_args(argv)
    if args.delta_rule:
        delta_rule_rows(args.batch, args.seq, 2, 32, args.repeats)
        return

    names = args.families or F.names()
    if "transformer" not in names:
        names = ["transformer"] + list(names)
    B, L = args.batch, args.seq
    prepare = prepare_sweep if args.sweep else prepare_grad
    what = "sweep step (2 lrs, AdamW)" if args.sweep else "loss+grad"
    print(f"# {what}, B={B} L={L} target={args.target} vocab={args.vocab}, backend={jax.default_backend()}")
    print(f"{'family':16s} {'form':22s} {'d_model':>7s} {'ms/step':>9s} {'tok/s':>9s} {'vs transformer':>14s}")
    rows = []
    for name in names:
        sized = F.solve(name, args.target, vocab_size=args.vocab, max_len=L)
        variants = [("default", sized.cfg)]
        if args.forms:
            for cls in mixer_classes(sized.cfg):
                for label, over in FORMS.get(cls, []):
                    variants.append((f"{cls.replace('Config', '')}:{label}", with_mixer(sized.cfg, cls, over)))
        for label, cfg in variants:
            rows.append((name, label, sized.d_model, prepare(cfg, B, L)))
    seconds = time_rounds([r[3] for r in rows], args.repeats)
    base = B * L / seconds[0]  # the transformer comes first
    for (name, label, d_model, _), s in zip(rows, seconds):
        tok_s = B * L / s
        print(f"{name:16s} {label:22s} {d_model:7d} {s * 1e3:9.1f} {tok_s:9.0f} {tok_s / base:14.3f}")

if __name__ == "__main__":
    main()
