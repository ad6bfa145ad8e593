"""Training throughput: the zoo's JAX train step against Hugging Face transformers' PyTorch
LlamaForCausalLM on the same config, run alternately in one process.

    python benchmarks/train_vs_torch.py                      # the ratio, default config (attention "auto":
                                                             # the blocked path on CPU)
    python benchmarks/train_vs_torch.py --breakdown          # where the JAX step's time goes
    python benchmarks/train_vs_torch.py --variant impl=xla_blocked --variant impl=xla_blocked,scan_layers=false
    taskset -c 0 python benchmarks/train_vs_torch.py --attention --clock cpu   # the attention core alone
    taskset -c 0 python benchmarks/train_vs_torch.py --mlp --clock cpu --rounds 7   # one MLP layer

Config (issue 8): d_model 256, 4 layers, 4 heads, 2 KV heads, d_ff 688, vocab 256, batch 8 x 256,
fp32, AdamW with global-norm clipping 1.0 on both sides. Each round times `--steps` JAX steps then
`--steps` PyTorch steps; medians over rounds are reported with their ratio (and the best rounds'
ratio), with each side's process CPU time per step (the figure to track on one pinned core under
load), the thread count of each runtime and the load average (the machine is shared). XLA flags
must be set before JAX starts:
pass them in the environment (XLA_FLAGS=...) and compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from layers import params as P
from zoo import hugepages
from zoo import train

SHAPE = dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688, vocab_size=256)


def jax_config(seq_len: int, **changes):
    cfg = zoo.presets.get("llama-tiny", **{k: v for k, v in SHAPE.items() if k != "vocab_size"}, max_len=seq_len)
    assert cfg.vocab_size == SHAPE["vocab_size"]
    impl = changes.pop("impl", None)
    if impl is not None:
        cfg = zoo.presets.get("llama-tiny", **{k: v for k, v in SHAPE.items() if k != "vocab_size"},
                              max_len=seq_len, impl=impl)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def jax_step(cfg, batch: int, seq_len: int):
    """(run(n) -> seconds for n steps, flops per step by the model convention)."""
    tcfg = train.TrainConfig(batch_size=batch, seq_len=seq_len, steps=10_000, warmup_steps=10)
    specs = zoo.param_specs(cfg)
    optimizer = train.make_optimizer(tcfg, P.decay_mask(specs), specs)
    step = train.make_train_step(cfg, optimizer, tcfg)
    params = zoo.init(jax.random.key(0), cfg)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    state = [params, opt_state]

    def run(n: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            state[0], state[1], metrics = step(state[0], state[1], inputs, targets)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0, time.process_time() - c0

    run(2)  # compile and warm up
    return run


def torch_step(batch: int, seq_len: int, attn: str = "sdpa"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["d_ff"],
                     num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
                     num_key_value_heads=SHAPE["n_kv_heads"], max_position_embeddings=seq_len,
                     tie_word_embeddings=False, rms_norm_eps=1e-5)
    hf._attn_implementation = attn
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq_len + 1), generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def one():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def run(n: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            one()
        return time.perf_counter() - t0, time.process_time() - c0

    run(2)
    return run


def _parse_variant(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
        if key not in ("impl", "scan_layers", "remat", "dtype"):
            raise SystemExit(f"--variant: unknown key {key!r} (impl, scan_layers, remat, dtype)")
    return out


def _xla_threads() -> int:
    """Threads of XLA's CPU intra-op pool in this process (named tf_XLAEigen on Linux)."""
    try:
        return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "tf_XLAEigen"
                   for t in os.listdir("/proc/self/task"))
    except OSError:
        return -1


def compare(args) -> list[dict]:
    """The default config and each --variant (one JAX step each) and PyTorch, timed alternately
    in rounds in this one process; ratios are of medians over rounds (and of best rounds)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    variants = [{}] + [_parse_variant(v) for v in args.variant]
    cfgs = [jax_config(args.seq_len, **v) for v in variants]
    runs = [jax_step(cfg, args.batch, args.seq_len) for cfg in cfgs]  # traced and compiled here
    run_torch = None if args.jax_only else torch_step(args.batch, args.seq_len, args.torch_attn)
    times: list[list[float]] = [[] for _ in runs]
    cpu: list[list[float]] = [[] for _ in runs]
    torch_s: list[float] = []
    torch_cpu: list[float] = []
    for _ in range(args.rounds):
        for run, t, c in zip(runs, times, cpu):
            wall, used = run(args.steps)
            t.append(wall / args.steps)
            c.append(used / args.steps)
        if run_torch is not None:
            wall, used = run_torch(args.steps)
            torch_s.append(wall / args.steps)
            torch_cpu.append(used / args.steps)
    load_after = os.getloadavg()
    tokens = args.batch * args.seq_len
    from zoo.cost_report import model_flops_per_token
    med_torch = float(np.median(torch_s)) if torch_s else float("nan")
    best_torch = min(torch_s) if torch_s else float("nan")
    threads = {"xla_pool_threads": _xla_threads(), "torch_threads": torch.get_num_threads(),
               "cpus_allowed": len(os.sched_getaffinity(0))}
    print(f"threads: XLA pool {threads['xla_pool_threads']}, torch {threads['torch_threads']}, CPUs allowed "
          f"{threads['cpus_allowed']}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"glibc huge pages {'on' if hugepages.active() else 'off'} (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
          "speeds up both sides' steps: BENCHMARKS.md)")
    # Process CPU seconds per step: on one pinned core under load this is the work done, free of
    # the time spent waiting for the core (both runtimes' spin-waits included).
    med_torch_cpu = float(np.median(torch_cpu)) if torch_cpu else float("nan")
    rows = []
    for v, cfg, t, c in zip(variants, cfgs, times, cpu):
        med, med_cpu = float(np.median(t)), float(np.median(c))
        flops = 3 * tokens * model_flops_per_token(cfg, args.seq_len)
        rows.append({"variant": v or "default", "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "jax_step_s_median": med, "jax_step_s_best": min(t), "jax_tokens_per_s": tokens / med,
                     "jax_over_torch_median": med_torch / med, "jax_over_torch_best": best_torch / min(t),
                     "jax_gflops": flops / med / 1e9, "jax_cpu_s_median": med_cpu,
                     "jax_over_torch_cpu": med_torch_cpu / med_cpu, **threads})
        print(f"JAX   {med * 1e3:8.1f} ms/step (median; best {min(t) * 1e3:.1f})  {tokens / med:8.0f} tok/s  "
              f"{flops / med / 1e9:5.1f} model GFLOP/s  x{med_torch / med:.2f} PyTorch's tok/s "
              f"(best/best x{best_torch / min(t):.2f}; CPU s {med_cpu * 1e3:.0f} ms, x{med_torch_cpu / med_cpu:.2f})"
              f"   ({v or 'default'})")
    if torch_s:
        print(f"torch {med_torch * 1e3:8.1f} ms/step (median; best {best_torch * 1e3:.1f})  {tokens / med_torch:8.0f} "
              f"tok/s  CPU s {med_torch_cpu * 1e3:.0f} ms  (transformers LlamaForCausalLM, attn {args.torch_attn})")
        for r in rows:
            r.update(torch_step_s_median=med_torch, torch_step_s_best=best_torch,
                     torch_tokens_per_s=tokens / med_torch, torch_cpu_s_median=med_torch_cpu)
    for r in rows:
        r.update(rounds=args.rounds, steps_per_round=args.steps, load_before=load_before[0],
                 load_after=load_after[0])
    return rows


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter  # --clock cpu: process CPU seconds (the work, on one pinned core under load)


def _best(fn, *args, n: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(n):
        t0 = _clock()
        jax.block_until_ready(fn(*args))
        best = min(best, _clock() - t0)
    return best


def _torch_breakdown(B: int, L: int, n_layers: int) -> dict:
    """The same sub-graphs in PyTorch: forward, forward + backward, one layer's MLP."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def best(fn, n=3):
        fn()
        out = float("inf")
        for _ in range(n):
            t0 = _clock()
            fn()
            out = min(out, _clock() - t0)
        return out

    hf = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["d_ff"],
                     num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
                     num_key_value_heads=SHAPE["n_kv_heads"], max_position_embeddings=L, tie_word_embeddings=False)
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf).float().train()
    ids = torch.randint(0, SHAPE["vocab_size"], (B, L + 1))

    def loss():
        logits = model(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def fwd():
        with torch.no_grad():
            loss()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss().backward()

    mlp = model.model.layers[0].mlp
    x = torch.randn(B, L, SHAPE["d_model"], requires_grad=True)

    def mlp_fwd_bwd():
        mlp.zero_grad(set_to_none=True)
        mlp(x).sum().backward()

    return {"torch forward (loss, no grad)": best(fwd), "torch forward + backward": best(fwd_bwd),
            f"torch one layer's mlp, fwd+bwd (x{n_layers} layers)": best(mlp_fwd_bwd) * n_layers}


def breakdown(args) -> dict:
    """Time sub-graphs of the JAX step (the first --variant's config, if given): forward,
    forward+backward, the whole step, one layer's attention and MLP, and a matmul of the same
    FLOPs (the machine's rate)."""
    from layers import attention, mlp, norms
    from zoo.cost_report import jaxpr_flops

    cfg = jax_config(args.seq_len, **(_parse_variant(args.variant[0]) if args.variant else {}))
    B, L, D = args.batch, args.seq_len, cfg.d_model
    params = zoo.init(jax.random.key(0), cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, L + 1), dtype=np.int32))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(p):
        return train.loss_fn(p, inputs, targets, cfg)

    rows = {}
    fwd = jax.jit(loss)
    grad = jax.jit(jax.value_and_grad(loss))
    rows["forward (loss)"] = _best(fwd, params)
    rows["forward + backward"] = _best(grad, params)
    run = jax_step(cfg, B, L)
    rows["train step (+ clip, AdamW)"] = min(run(3)[args.clock == "cpu"] / 3 for _ in range(3))

    block = cfg.pattern[0]
    p0 = jax.tree.map(lambda a: a[0], params["blocks"][0])
    x = jax.random.normal(jax.random.key(1), (B, L, D), jnp.float32)

    def attn_loss(p, x):
        return jnp.sum(attention.forward(p, x, cfg=block.mixer)[0])

    def mlp_loss(p, x):
        return jnp.sum(mlp.forward(p, x, cfg=block.ffn)[0])

    def norm_loss(p, x):
        return jnp.sum(norms.forward(p, x, cfg=block.norm))

    for name, f, p in (("attention", attn_loss, p0["mixer"]), ("mlp", mlp_loss, p0["ffn"]),
                       ("rmsnorm", norm_loss, p0["mixer_norm"])):
        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        fl, _ = jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(p, x).jaxpr)
        t = _best(g, p, x)
        rows[f"one layer's {name}, fwd+bwd (x{cfg.n_layers} layers)"] = t * cfg.n_layers
        rows[f"  {name} matmul GFLOP/s"] = fl / t / 1e9 if fl else 0.0

    rows.update(_torch_breakdown(B, L, cfg.n_layers))
    fl_step, _ = jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    a = jax.random.normal(jax.random.key(2), (B * L, D), jnp.float32)
    w = jax.random.normal(jax.random.key(3), (D, 4 * D), jnp.float32)
    mm = jax.jit(lambda a, w: a @ w)
    t = _best(mm, a, w)
    peak = 2 * B * L * D * 4 * D / t
    rows["matmul [2048x256]@[256x1024] GFLOP/s"] = peak / 1e9
    rows["fwd+bwd matmul FLOPs at that rate (s)"] = fl_step / peak
    width = max(len(k) for k in rows) + 2
    for k, v in rows.items():
        unit = "" if "GFLOP/s" in k else " s"
        print(f"{k:<{width}}{v:10.4f}{unit}")
    return rows


def attention_experiment(args) -> dict:
    """fwd+bwd of the attention core alone at the benchmark's shape: the layer's XLA path, its
    reference path, the blocked path at several tile sizes, and PyTorch's SDPA."""
    import torch
    from layers import attention_core, blocked_attention

    B, L, H, G, K = args.batch, args.seq_len, SHAPE["n_heads"], SHAPE["n_kv_heads"], SHAPE["d_model"] // SHAPE["n_heads"]
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, L, H, K), jnp.float32)
    k = jax.random.normal(keys[1], (B, L, G, K), jnp.float32)
    v = jax.random.normal(keys[2], (B, L, G, K), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

    def layer(impl):
        return lambda q, k, v: attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, impl=impl)

    # The layer's default ("auto") is the blocked path here: the model vouches for index order.
    fns = {"attend(impl='xla')": layer("xla"), "attend(impl='reference')": layer("reference"),
           f"attend(impl='xla_blocked') ({blocked_attention.DEFAULT_BLOCK}-query tiles)": layer("xla_blocked")}
    mask = attention_core.make_mask(pos, pos, causal=True, window=None)
    for c in (32, 128, L):
        fns[f"attend_blocked(block={c})" + (" (one tile: the softmax alone)" if c == L else "")] = (
            lambda c: lambda q, k, v: blocked_attention.attend_blocked(q, k, v, mask, scale=K ** -0.5, block=c))(c)
    ref = fns["attend(impl='reference')"](q, k, v)
    rows = {}
    for name, f in fns.items():
        np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(ref), rtol=2e-4, atol=2e-5)
        g = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
        rows[name] = _best(g, q, k, v)
    tq, tk, tv = (torch.tensor(np.asarray(a)).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))

    def torch_once():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        (o ** 2).sum().backward()

    torch_once()
    best = float("inf")
    for _ in range(5):
        t0 = _clock()
        torch_once()
        best = min(best, _clock() - t0)
    rows["torch scaled_dot_product_attention (causal, GQA)"] = best
    width = max(len(k) for k in rows) + 2
    print(f"attention core fwd+bwd, B {B} L {L} H {H} G {G} K {K} (one layer), best of 5 by {args.clock} clock:")
    for name, t in rows.items():
        print(f"  {name:<{width}}{t * 1e3:9.1f} ms")
    return rows


def mlp_experiment(args) -> dict:
    """One layer's SwiGLU MLP, forward + backward against a random cotangent (a `sum()` loss
    would hand XLA a constant), in JAX and as transformers' `LlamaMLP`, alternately."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from layers import mlp

    cfg = jax_config(args.seq_len)
    block = cfg.pattern[0]
    p = jax.tree.map(lambda a: a[0], zoo.init(jax.random.key(0), cfg)["blocks"][0])["ffn"]
    shape = (args.batch, args.seq_len, SHAPE["d_model"])
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    w = jax.random.normal(jax.random.key(2), shape, jnp.float32)
    g = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(mlp.forward(p, x, cfg=block.ffn)[0] * w), argnums=(0, 1)))
    tm = LlamaMLP(LlamaConfig(hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["d_ff"]))
    tx, tw = torch.randn(*shape, requires_grad=True), torch.randn(*shape)

    def torch_once():
        tm.zero_grad(set_to_none=True)
        tx.grad = None
        (tm(tx) * tw).sum().backward()

    torch_once()
    jax.block_until_ready(g(p, x))
    jt, tt = [], []
    for _ in range(args.rounds):
        t0 = _clock()
        jax.block_until_ready(g(p, x))
        jt.append(_clock() - t0)
        t0 = _clock()
        torch_once()
        tt.append(_clock() - t0)
    rows = {"jax_mlp_fwd_bwd_s": float(np.median(jt)), "torch_mlp_fwd_bwd_s": float(np.median(tt)),
            "torch_threads": torch.get_num_threads(), "xla_pool_threads": _xla_threads()}
    print(f"one SwiGLU MLP layer fwd+bwd, median of {args.rounds} by {args.clock} clock: JAX "
          f"{rows['jax_mlp_fwd_bwd_s'] * 1e3:.1f} ms, PyTorch LlamaMLP {rows['torch_mlp_fwd_bwd_s'] * 1e3:.1f} ms "
          f"(threads: XLA {rows['xla_pool_threads']}, torch {rows['torch_threads']})")
    return rows


def matmul_experiment(args) -> dict:
    """The train step's matmul shapes (an MLP's forward, input-gradient and weight-gradient
    products) through XLA and through PyTorch, alternately in this process: GFLOP/s each.
    Run it under different XLA_FLAGS to see which backend setting closes a gap."""
    import torch
    M, D, F = args.batch * args.seq_len, SHAPE["d_model"], SHAPE["d_ff"]
    shapes = {"x @ W  [M,D]x[D,F]": ((M, D), (D, F), False), "dy @ W^T  [M,F]x[F,D]^T": ((M, F), (D, F), True),
              "x^T @ dy  [M,D]^T x [M,F]": ((M, D), (M, F), None)}
    rows = {}
    rng = np.random.default_rng(0)
    for name, (a_shape, b_shape, mode) in shapes.items():
        a = rng.standard_normal(a_shape, dtype=np.float32)
        b = rng.standard_normal(b_shape, dtype=np.float32)
        if mode is None:
            jf, tf = jax.jit(lambda a, b: a.T @ b), (lambda a, b: a.T @ b)
            flops = 2 * a_shape[0] * a_shape[1] * b_shape[1]
        elif mode:
            jf, tf = jax.jit(lambda a, b: a @ b.T), (lambda a, b: a @ b.T)
            flops = 2 * a_shape[0] * a_shape[1] * b_shape[0]
        else:
            jf, tf = jax.jit(lambda a, b: a @ b), (lambda a, b: a @ b)
            flops = 2 * a_shape[0] * a_shape[1] * b_shape[1]
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        jbest = tbest = float("inf")
        jax.block_until_ready(jf(ja, jb))
        tf(ta, tb)
        for _ in range(args.rounds):
            t0 = _clock()
            for _ in range(args.steps):
                jax.block_until_ready(jf(ja, jb))
            jbest = min(jbest, (_clock() - t0) / args.steps)
            t0 = _clock()
            for _ in range(args.steps):
                tf(ta, tb)
            tbest = min(tbest, (_clock() - t0) / args.steps)
        rows[name] = {"xla_gflops": flops / jbest / 1e9, "torch_gflops": flops / tbest / 1e9}
        print(f"  {name:<28} XLA {flops / jbest / 1e9:7.1f} GFLOP/s   torch {flops / tbest / 1e9:7.1f} GFLOP/s"
              f"   XLA/torch {tbest / jbest:.2f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[],
                        help="also time the model with these config changes (one variant per flag, "
                             "e.g. scan_layers=false or remat=full,impl=reference)")
    parser.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--breakdown", action="store_true", help="time the JAX step's parts instead")
    parser.add_argument("--attention", action="store_true",
                        help="time the attention core alone: layer paths, an experiment, PyTorch SDPA")
    parser.add_argument("--mlp", action="store_true",
                        help="one SwiGLU MLP layer fwd+bwd in JAX and as transformers' LlamaMLP")
    parser.add_argument("--matmul", action="store_true",
                        help="time the step's matmul shapes in XLA and PyTorch (run under XLA_FLAGS variants)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads(N) (XLA's pool follows the CPUs allowed: use taskset)")
    parser.add_argument("--clock", choices=tuple(_CLOCKS), default="wall",
                        help="timer for --breakdown/--attention/--matmul (cpu: process CPU time; pin to one core)")
    parser.add_argument("--jax-only", action="store_true", help="leave PyTorch out (variants only)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = parser.parse_args(argv)
    global _clock
    _clock = _CLOCKS[args.clock]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); "
          f"batch {args.batch} x {args.seq_len}, {SHAPE}")
    out = (breakdown(args) if args.breakdown else attention_experiment(args) if args.attention
           else matmul_experiment(args) if args.matmul else mlp_experiment(args) if args.mlp else compare(args))
    if args.json:
        print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
