"""Training throughput: the zoo's JAX train step against Hugging Face transformers' PyTorch
LlamaForCausalLM on the same config, run alternately in one process.

    python benchmarks/train_vs_torch.py                      # the ratio, default config
    python benchmarks/train_vs_torch.py --breakdown          # where the JAX step's time goes
    python benchmarks/train_vs_torch.py --variant impl=reference --variant remat=full

Config (issue 8): d_model 256, 4 layers, 4 heads, 2 KV heads, d_ff 688, vocab 256, batch 8 x 256,
fp32, AdamW with global-norm clipping 1.0 on both sides. Each round times `--steps` JAX steps then
`--steps` PyTorch steps; the best round of each is reported (the machine is shared: the best
round is the least disturbed one) with their ratio. XLA flags must be set before JAX starts:
pass them in the environment (XLA_FLAGS=...) and compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from layers import params as P
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

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            state[0], state[1], metrics = step(state[0], state[1], inputs, targets)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

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

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        return time.perf_counter() - t0

    run(2)
    return run


def _parse_variant(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
        if key not in ("attn_chunk", "impl", "scan_layers", "remat", "dtype"):
            raise SystemExit(f"--variant: unknown key {key!r} (attn_chunk, impl, scan_layers, remat, dtype)")
    return out


def compare(args) -> list[dict]:
    """The default config and each --variant (one JAX step each) and PyTorch, timed alternately
    in rounds in this one process; ratios are to PyTorch's best round."""
    import torch
    variants = [{}] + [_parse_variant(v) for v in args.variant]
    cfgs = [jax_config(args.seq_len, **{k: x for k, x in v.items() if k != "attn_chunk"}) for v in variants]
    runs = []
    for v, cfg in zip(variants, cfgs):
        with _block_causal_attention(int(v["attn_chunk"])) if "attn_chunk" in v else contextlib.nullcontext():
            runs.append(jax_step(cfg, args.batch, args.seq_len))  # traced and compiled here
    run_torch = None if args.jax_only else torch_step(args.batch, args.seq_len, args.torch_attn)
    times: list[list[float]] = [[] for _ in runs]
    torch_s: list[float] = []
    for _ in range(args.rounds):
        for run, t in zip(runs, times):
            t.append(run(args.steps) / args.steps)
        if run_torch is not None:
            torch_s.append(run_torch(args.steps) / args.steps)
    tokens = args.batch * args.seq_len
    from zoo.cost_report import model_flops_per_token
    best_torch = min(torch_s) if torch_s else float("nan")
    rows = []
    for v, cfg, t in zip(variants, cfgs, times):
        flops = 3 * tokens * model_flops_per_token(cfg, args.seq_len)
        rows.append({"variant": v or "default", "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "jax_step_s": min(t), "jax_tokens_per_s": tokens / min(t),
                     "jax_over_torch": best_torch / min(t), "jax_gflops": flops / min(t) / 1e9})
        print(f"JAX   {min(t) * 1e3:8.1f} ms/step  {tokens / min(t):9.0f} tok/s  {flops / min(t) / 1e9:5.1f} "
              f"model GFLOP/s  x{best_torch / min(t):.2f} PyTorch's tok/s   ({v or 'default'})")
    if torch_s:
        print(f"torch {best_torch * 1e3:8.1f} ms/step  {tokens / best_torch:9.0f} tok/s  (transformers "
              f"LlamaForCausalLM, attn {args.torch_attn}, {torch.get_num_threads()} threads)")
        for r in rows:
            r.update(torch_step_s=best_torch, torch_tokens_per_s=tokens / best_torch,
                     torch_threads=torch.get_num_threads())
    for r in rows:
        r.update(rounds=args.rounds, steps_per_round=args.steps)
    return rows


def _best(fn, *args, n: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _torch_breakdown(B: int, L: int, n_layers: int) -> dict:
    """The same sub-graphs in PyTorch: forward, forward + backward, one layer's MLP."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def best(fn, n=3):
        fn()
        out = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
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
    """Time sub-graphs of the JAX step: forward, forward+backward, the whole step, one layer's
    attention and MLP, and a matmul of the same FLOPs (the machine's rate)."""
    from layers import attention, mlp, norms
    from zoo.cost_report import jaxpr_flops

    cfg = jax_config(args.seq_len)
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
    rows["train step (+ clip, AdamW)"] = min(run(3) / 3 for _ in range(3))

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


@contextlib.contextmanager
def _block_causal_attention(chunk: int):
    """Experiment: while active, plain causal self-attention (no window, softcap, bias, segments
    or cache; positions 0..L-1, as in this benchmark) goes through `_attend_block_causal`."""
    from layers import attention_core
    original = attention_core.attend

    def attend(q, k, v, *, q_pos_BL, k_pos_BS, q_seg_BL=None, k_seg_BS=None, causal=True, window=None,
               softcap=None, scale=None, alibi_slopes_H=None, impl="xla"):
        if (causal and window is None and softcap is None and alibi_slopes_H is None and q_seg_BL is None
                and k_seg_BS is None and q.shape[1] == k.shape[1] > chunk):
            return _attend_block_causal(q, k, v, chunk=chunk, scale=scale)
        return original(q, k, v, q_pos_BL=q_pos_BL, k_pos_BS=k_pos_BS, q_seg_BL=q_seg_BL, k_seg_BS=k_seg_BS,
                        causal=causal, window=window, softcap=softcap, scale=scale,
                        alibi_slopes_H=alibi_slopes_H, impl=impl)

    attention_core.attend = attend
    try:
        yield
    finally:
        attention_core.attend = original


def _attend_block_causal(q_BLHK, k_BSGK, v_BSGK, *, chunk: int, scale: float | None = None):
    """Experiment: causal attention over query chunks of `chunk` tokens, each against only the
    keys up to its end (the fully masked blocks above the diagonal are never computed). Exact
    for causal rows 0..L-1 with no window, segments or padding."""
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    R = H // G
    outs = []
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        q = q_BLHK[:, start:stop].reshape(B, stop - start, G, R, K)
        k, v = k_BSGK[:, :stop], v_BSGK[:, :stop]
        logits = jnp.einsum("BLGRK,BSGK->BGRLS", q, k, preferred_element_type=jnp.float32) * (
            K ** -0.5 if scale is None else scale)
        mask = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        p = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
        o = jnp.einsum("BGRLS,BSGK->BLGRK", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        outs.append(o.reshape(B, stop - start, H, K).astype(q_BLHK.dtype))
    return jnp.concatenate(outs, axis=1)


def attention_experiment(args) -> dict:
    """fwd+bwd of the attention core alone at the benchmark's shape: the layer's XLA path, its
    reference path, block-causal chunking (an experiment), and PyTorch's SDPA."""
    import torch
    from layers import attention_core

    B, L, H, G, K = args.batch, args.seq_len, SHAPE["n_heads"], SHAPE["n_kv_heads"], SHAPE["d_model"] // SHAPE["n_heads"]
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, L, H, K), jnp.float32)
    k = jax.random.normal(keys[1], (B, L, G, K), jnp.float32)
    v = jax.random.normal(keys[2], (B, L, G, K), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

    def layer(impl):
        return lambda q, k, v: attention_core.attend(q, k, v, q_pos_BL=pos, k_pos_BS=pos, impl=impl)

    fns = {"attend(impl='xla') (the layer)": layer("xla"), "attend(impl='reference')": layer("reference")}
    for c in (64, 128):
        fns[f"block-causal, {c}-token query chunks (experiment)"] = (
            lambda c: lambda q, k, v: _attend_block_causal(q, k, v, chunk=c))(c)
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
        t0 = time.perf_counter()
        torch_once()
        best = min(best, time.perf_counter() - t0)
    rows["torch scaled_dot_product_attention (causal, GQA)"] = best
    width = max(len(k) for k in rows) + 2
    print(f"attention core fwd+bwd, B {B} L {L} H {H} G {G} K {K} (one layer), best of 5:")
    for name, t in rows.items():
        print(f"  {name:<{width}}{t * 1e3:9.1f} ms")
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
            t0 = time.perf_counter()
            for _ in range(args.steps):
                jax.block_until_ready(jf(ja, jb))
            jbest = min(jbest, (time.perf_counter() - t0) / args.steps)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tf(ta, tb)
            tbest = min(tbest, (time.perf_counter() - t0) / args.steps)
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
    parser.add_argument("--matmul", action="store_true",
                        help="time the step's matmul shapes in XLA and PyTorch (run under XLA_FLAGS variants)")
    parser.add_argument("--jax-only", action="store_true", help="leave PyTorch out (variants only)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); "
          f"batch {args.batch} x {args.seq_len}, {SHAPE}")
    out = (breakdown(args) if args.breakdown else attention_experiment(args) if args.attention
           else matmul_experiment(args) if args.matmul else compare(args))
    if args.json:
        print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
