"""`zoo train`: train a preset on the built-in corpus, your text, or a synthetic task; report
validation bits per byte (or task accuracy) and sample greedily.

    zoo train --preset llama-tiny --steps 300 --prompt "def "
    zoo train --data notes/ --optimizer muon --schedule wsd --metrics-jsonl run/metrics.jsonl
    zoo train --task mqar --seq-len 64 --steps 500
"""

from __future__ import annotations

import argparse
import os
import re
import time

from zoo.cli import (add_model_overrides, flag as _flag, model_config, non_negative_float,
                     non_negative_int, positive_float, positive_int)


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def add_parser(sub) -> None:
    import zoo
    from zoo import optimizers, tasks

    t = sub.add_parser("train", help="train a preset on text or a synthetic task and sample from it",
                       description="Train a preset (byte level) on the Python standard library's sources "
                                   "(default), on your text files / folders / JSONL (packed documents), or "
                                   "on a synthetic task; report validation bits per byte or task accuracy "
                                   "and print a greedy sample.")
    t.add_argument("--preset", default="llama-tiny",
                   help=f"model preset (default llama-tiny); one of: {', '.join(zoo.presets.names())}")
    t.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    t.add_argument("--batch-size", type=positive_int, default=16, help="rows per step (default 16)")
    t.add_argument("--seq-len", type=positive_int, default=128, help="tokens per row (default 128)")
    t.add_argument("--grad-accum", type=positive_int, default=1,
                   help="split each batch into N micro-batches inside one step (default 1)")
    t.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    t.add_argument("--schedule", choices=optimizers.SCHEDULES, default="cosine",
                   help="after warmup: cosine or linear decay, or wsd (warmup-stable-decay) (default cosine)")
    t.add_argument("--decay-fraction", type=positive_float, default=0.2,
                   help="wsd: share of the post-warmup steps spent decaying, in (0, 1] (default 0.2)")
    t.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warmup steps (default: min(20, steps // 10))")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="decoupled decay (default 0.1)")
    t.add_argument("--optimizer", choices=optimizers.OPTIMIZERS, default="adamw",
                   help="optimizer (default adamw); muon: Muon on the matrices, AdamW on the rest")
    t.add_argument("--clip-norm", type=positive_float, default=1.0, help="global gradient norm clip (default 1)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 compute with fp32 params (default: fp32 on CPU, bf16 elsewhere)")
    t.add_argument("--z-loss", type=non_negative_float, default=0.0,
                   help="weight of the logit z-loss mean(logsumexp^2) (default 0; PaLM 1e-4)")
    t.add_argument("--label-smoothing", type=_fraction, default=0.0, help="in [0, 1) (default 0)")
    t.add_argument("--on-nonfinite", choices=("raise", "stop", "skip"), default="stop",
                   help="on a NaN/inf loss: stop with an error (raise), stop cleanly, or skip the batch "
                        "(default stop); the update is never applied")
    t.add_argument("--seed", type=non_negative_int, default=0, help="init, shuffling and data seed (default 0)")
    t.add_argument("--log-every", type=positive_int, default=None,
                   help="print a progress line every N steps (default: about 10 lines per run)")
    t.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate on the held-out split every N steps (default 0: only at the end)")
    data = t.add_argument_group("data (default: the built-in stdlib corpus)")
    data.add_argument("--data", default="stdlib",
                      help="'stdlib', or a text file, a folder of text files, or a .jsonl file: documents "
                           "packed into rows with segment ids (no attention across documents)")
    data.add_argument("--jsonl-field", default="text", help="the text field of .jsonl records (default text)")
    data.add_argument("--task", choices=tuple(tasks.TASKS), default=None,
                      help="train on a synthetic task instead (loss only at the answer positions)")
    data.add_argument("--max-bytes", type=positive_int, default=None,
                      help="use only the first N bytes of the built-in corpus (default: all of it)")
    t.add_argument("--prompt", default="def ", help="sample prompt (default 'def ')")
    t.add_argument("--sample-tokens", type=non_negative_int, default=120,
                   help="greedy tokens to sample after training; 0 skips sampling (default 120)")
    out = t.add_argument_group("checkpoints and metrics")
    out.add_argument("--checkpoint-dir", default=None, help="save checkpoints here (orbax, atomic)")
    out.add_argument("--save-every", type=non_negative_int, default=0,
                     help="checkpoint every N steps and at the end (default: only at the end)")
    out.add_argument("--keep-last", type=positive_int, default=3, help="checkpoints kept (default 3)")
    out.add_argument("--keep-best", type=non_negative_int, default=0,
                     help="also keep the N checkpoints with the lowest validation bits, measured at "
                          "their step (set --eval-every to divide --save-every; default 0)")
    out.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in --checkpoint-dir (bit-for-bit)")
    out.add_argument("--metrics-jsonl", default=None,
                     help="write one JSON line of metrics per logged step here (default: "
                          "CHECKPOINT_DIR/metrics.jsonl when --checkpoint-dir is given)")
    out.add_argument("--tensorboard", default=None, metavar="DIR",
                     help="also write TensorBoard scalars here (needs tensorboardX: pip install 'zoo[tb]')")
    out.add_argument("--peak-flops", type=positive_float, default=None,
                     help="FLOP/s that MFU is computed against (default: a matmul measured at start)")
    from sharding import cli as sharding_cli
    sharding_cli.add_flags(t.add_argument_group("sharding and multi-process runs"))
    t.set_defaults(run=cmd_train, subparser=t)
    add_model_overrides(t)


def _train_config(args: argparse.Namespace, parser: argparse.ArgumentParser, precision: str):
    from layers.checks import ConfigError
    from zoo.train import TrainConfig

    warmup = min(20, args.steps // 10) if args.warmup_steps is None else args.warmup_steps
    log_every = max(1, args.steps // 10) if args.log_every is None else args.log_every
    try:
        return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           warmup_steps=warmup, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                           seed=args.seed, log_every=log_every, optimizer=args.optimizer,
                           schedule=args.schedule, decay_fraction=args.decay_fraction,
                           grad_accum=args.grad_accum, precision=precision, z_loss=args.z_loss,
                           label_smoothing=args.label_smoothing, on_nonfinite=args.on_nonfinite,
                           eval_every=args.eval_every)
    except ConfigError as e:
        m = re.match(r"TrainConfig\.(\w+)", str(e))
        parser.error(f"{_flag(m.group(1)) if m else '--steps'}: {e}")


def _task_data(args, parser, cfg):
    """(train sampler, validation sampler, task config) for --task."""
    from layers.checks import ConfigError
    from zoo import tasks

    cls = tasks.TASKS[args.task]
    kwargs = {"seq_len": args.seq_len}
    if args.task == "mqar":
        kwargs["vocab_size"] = cfg.vocab_size
    try:
        task = cls(**kwargs)
    except ConfigError as e:
        parser.error(f"--task: {args.task} with --seq-len {args.seq_len} and the model's vocab_size="
                     f"{cfg.vocab_size}: {e}")
    if task.vocab_size > cfg.vocab_size:
        parser.error(f"--task: {args.task} needs vocab_size >= {task.vocab_size}, the preset has {cfg.vocab_size}")
    # A different seed stream for validation: fresh examples, never the training ones.
    return (tasks.Sampler(task, args.batch_size, args.seed),
            tasks.Sampler(task, args.batch_size, args.seed + 1_000_003), task)


def _document_data(args, parser, val_fraction: float):
    """(train sampler, validation sampler or None, description) for --data PATH."""
    from zoo import packing

    try:
        docs = packing.read_documents(args.data, jsonl_field=args.jsonl_field)
        train_docs, val_docs = packing.split_documents(docs, val_fraction)
        sampler = packing.PackedSampler(train_docs, args.batch_size, args.seq_len, args.seed)
    except (OSError, ValueError) as e:
        parser.error(f"--data: {e}")
    val = None
    if sum(len(d) for d in val_docs) > args.seq_len:
        val = packing.PackedSampler(val_docs, args.batch_size, args.seq_len, args.seed)
    n_bytes = sum(len(d) for d in docs)
    return sampler, val, f"{len(docs):,} documents ({n_bytes:,} bytes) from {args.data}"


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import jax
    import numpy as np

    from sharding import cli as sharding_cli
    from zoo import data, generate, tasks, train

    mesh, rules = sharding_cli.setup(args, parser)  # first: jax.distributed precedes any device use
    cfg = model_config(args, parser)
    platform = jax.devices()[0].platform
    precision = args.precision or ("fp32" if platform == "cpu" else "bf16")
    tcfg = _train_config(args, parser, precision)
    tokenizer = data.ByteTokenizer()
    if args.task is None and cfg.vocab_size < tokenizer.vocab_size:
        parser.error(f"--preset: {args.preset!r} has vocab_size={cfg.vocab_size}; byte-level text "
                     f"needs {tokenizer.vocab_size}")
    if args.seq_len > cfg.max_len:
        parser.error(f"--seq-len: {args.seq_len} exceeds the model's max_len={cfg.max_len}")
    if args.task is not None and args.data != "stdlib":
        parser.error("--task: give either --task or --data, not both")
    sample = args.sample_tokens if args.task is None else 0
    prompt_ids = tokenizer.encode(args.prompt)
    if sample:
        if prompt_ids.size == 0:
            parser.error("--prompt: expected a non-empty prompt to sample from")
        if prompt_ids.size + sample > cfg.max_len:
            parser.error(f"--sample-tokens: prompt ({prompt_ids.size} bytes) + {sample} tokens "
                         f"exceeds the model's max_len={cfg.max_len}")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume: needs --checkpoint-dir")
    if args.save_every and args.checkpoint_dir is None:
        parser.error("--save-every: needs --checkpoint-dir")

    task = None
    if args.task is not None:
        train_data, val_data, task = _task_data(args, parser, cfg)
        desc = f"task {args.task}: {task}"
    elif args.data != "stdlib":
        train_data, val_data, desc = _document_data(args, parser, tcfg.val_fraction)
    else:
        train_data, val_data = data.builtin_corpus(args.max_bytes), None
        min_bytes = int((args.seq_len + 1) / 0.95) + 2
        if len(train_data) < min_bytes:
            parser.error(f"--max-bytes: {len(train_data)} bytes is too little for --seq-len {args.seq_len}")
        desc = f"corpus {len(train_data):,} bytes of Python stdlib source"
    metrics_jsonl = args.metrics_jsonl
    if metrics_jsonl is None and args.checkpoint_dir is not None:
        # orbax lists only its numbered step directories, so a file beside them is safe
        metrics_jsonl = os.path.join(args.checkpoint_dir, "metrics.jsonl")
    print(f"preset {args.preset}: d_model={cfg.d_model} n_layers={cfg.n_layers} max_len={cfg.max_len} "
          f"on {platform} ({precision}); {desc}")
    t0 = time.perf_counter()
    try:
        params, _history = train.train(cfg, tcfg, data=train_data, val_data=val_data,
                                       checkpoint_dir=args.checkpoint_dir, save_every=args.save_every,
                                       keep_last=args.keep_last, keep_best=args.keep_best, resume=args.resume, metrics_jsonl=metrics_jsonl,
                                       tensorboard_dir=args.tensorboard, peak_flops=args.peak_flops,
                                       mesh=mesh, rules=rules)
    except train.NonFiniteLossError as e:
        print(f"error: {e}")
        return 1
    except (ValueError, FileNotFoundError) as e:
        if args.checkpoint_dir is None:
            raise
        parser.error(f"--checkpoint-dir: {str(e).splitlines()[0]}")
    print(f"trained in {time.perf_counter() - t0:.1f}s" + (f"; metrics in {metrics_jsonl}" if metrics_jsonl else ""))
    if task is not None:
        run_cfg = train.with_precision(cfg, precision)
        inputs, targets = val_data.batch(0)
        logits = train.zoo.forward(params, inputs, cfg=run_cfg)
        print(f"{args.task} accuracy on {args.batch_size} held-out rows: {tasks.accuracy(logits, targets):.3f}")
    if sample:
        run_cfg = train.with_precision(cfg, precision)
        out_BN = generate.greedy(params, prompt_ids[None, :], run_cfg, sample)
        text = tokenizer.decode(np.asarray(out_BN[0]))
        print(f"--- greedy sample ({sample} tokens after {args.prompt!r}) ---")
        print(args.prompt + text)
    return 0
