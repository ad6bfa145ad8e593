"""`zoo train`: train a preset on the built-in corpus, report bits per byte, sample greedily.

    zoo train --preset llama-tiny --steps 300 --prompt "def "
"""

from __future__ import annotations

import argparse
import re
import time

from zoo.cli import (add_model_overrides, flag as _flag, model_config, non_negative_float,
                     non_negative_int, positive_float, positive_int)


def add_parser(sub) -> None:
    import zoo

    t = sub.add_parser("train", help="train a preset on the built-in corpus and sample from it",
                       description="Train a preset on the Python standard library's sources (byte "
                                   "level), report validation bits per byte and print a greedy sample.")
    t.add_argument("--preset", default="llama-tiny",
                   help=f"model preset (default llama-tiny); one of: {', '.join(zoo.presets.names())}")
    t.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    t.add_argument("--batch-size", type=positive_int, default=16, help="windows per step (default 16)")
    t.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (default 128)")
    t.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    t.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warmup steps (default: min(20, steps // 10))")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW decay (default 0.1)")
    t.add_argument("--optimizer", choices=("adamw", "lion", "adafactor"), default="adamw",
                   help="optimizer (default adamw)")
    t.add_argument("--clip-norm", type=positive_float, default=1.0, help="global gradient norm clip (default 1)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="init and data seed (default 0)")
    t.add_argument("--log-every", type=positive_int, default=None,
                   help="print a loss line every N steps (default: about 10 lines per run)")
    t.add_argument("--max-bytes", type=positive_int, default=None,
                   help="use only the first N bytes of the corpus (default: all of it)")
    t.add_argument("--prompt", default="def ", help="sample prompt (default 'def ')")
    t.add_argument("--sample-tokens", type=non_negative_int, default=120,
                   help="greedy tokens to sample after training; 0 skips sampling (default 120)")
    t.add_argument("--checkpoint-dir", default=None, help="save checkpoints here (orbax, atomic)")
    t.add_argument("--save-every", type=non_negative_int, default=0,
                   help="checkpoint every N steps and at the end (default: only at the end)")
    t.add_argument("--keep-last", type=positive_int, default=3, help="checkpoints kept (default 3)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (bit-for-bit)")
    t.set_defaults(run=cmd_train, subparser=t)
    add_model_overrides(t)


def _train_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from layers.checks import ConfigError
    from zoo.train import TrainConfig

    warmup = min(20, args.steps // 10) if args.warmup_steps is None else args.warmup_steps
    log_every = max(1, args.steps // 10) if args.log_every is None else args.log_every
    try:
        return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           warmup_steps=warmup, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                           seed=args.seed, log_every=log_every, optimizer=args.optimizer)
    except ConfigError as e:
        m = re.match(r"TrainConfig\.(\w+)", str(e))
        parser.error(f"{_flag(m.group(1)) if m else '--steps'}: {e}")


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import jax
    import numpy as np

    from zoo import data, generate, train

    cfg = model_config(args, parser)
    tcfg = _train_config(args, parser)
    tokenizer = data.ByteTokenizer()
    if cfg.vocab_size < tokenizer.vocab_size:
        parser.error(f"--preset: {args.preset!r} has vocab_size={cfg.vocab_size}; the byte-level corpus "
                     f"needs {tokenizer.vocab_size}")
    if args.seq_len > cfg.max_len:
        parser.error(f"--seq-len: {args.seq_len} exceeds the model's max_len={cfg.max_len}")
    prompt_ids = tokenizer.encode(args.prompt)
    if args.sample_tokens:
        if prompt_ids.size == 0:
            parser.error("--prompt: expected a non-empty prompt to sample from")
        if prompt_ids.size + args.sample_tokens > cfg.max_len:
            parser.error(f"--sample-tokens: prompt ({prompt_ids.size} bytes) + {args.sample_tokens} tokens "
                         f"exceeds the model's max_len={cfg.max_len}")

    corpus = data.builtin_corpus(args.max_bytes)
    min_bytes = int((args.seq_len + 1) / 0.95) + 2
    if len(corpus) < min_bytes:
        parser.error(f"--max-bytes: {len(corpus)} bytes is too little for --seq-len {args.seq_len}")
    print(f"preset {args.preset}: d_model={cfg.d_model} n_layers={cfg.n_layers} max_len={cfg.max_len} "
          f"on {jax.devices()[0].platform}; corpus {len(corpus):,} bytes of Python stdlib source")
    t0 = time.perf_counter()
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume: needs --checkpoint-dir")
    try:
        params, _history = train.train(cfg, tcfg, data=corpus, checkpoint_dir=args.checkpoint_dir,
                                       save_every=args.save_every, keep_last=args.keep_last, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        if args.checkpoint_dir is None:
            raise
        parser.error(f"--checkpoint-dir: {str(e).splitlines()[0]}")
    print(f"trained in {time.perf_counter() - t0:.1f}s")
    if args.sample_tokens:
        out_BN = generate.greedy(params, prompt_ids[None, :], cfg, args.sample_tokens)
        text = tokenizer.decode(np.asarray(out_BN[0]))
        print(f"--- greedy sample ({args.sample_tokens} tokens after {args.prompt!r}) ---")
        print(args.prompt + text)
    return 0
