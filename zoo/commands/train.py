"""`zoo train`: train a preset on the built-in corpus, your text, or a synthetic task; report
validation bits per byte (or task accuracy) and sample greedily.

    zoo train --preset llama-tiny --steps 300 --prompt "def "
    zoo train --data notes/ --optimizer muon --schedule wsd --metrics-jsonl run/metrics.jsonl
    zoo train --task mqar --seq-len 64 --steps 500
    zoo train --tokenizer bpe --vocab-size 1024 --out runs/bpe     # BPE trained on the train split

A run folder (--checkpoint-dir, alias --out) holds checkpoints/ (orbax steps), metrics.jsonl, config.json
(the model config, so `zoo generate --ckpt DIR` needs no --preset) and, for --tokenizer bpe,
tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from zoo.cli import (add_model_overrides, flag as _flag, model_config, non_negative_float,
                     non_negative_int, positive_float, positive_int)


DEFAULT_BPE_VOCAB = 1024
#: The run folder's model config (zoo.convert.ckpt's JSON encoding), read by `zoo generate --ckpt`.
RUN_CONFIG_FILE = "config.json"


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
    data.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes",
                      help="bytes: UTF-8 bytes, vocabulary 256 (default); bpe: a byte-level BPE trained "
                           "on the training split with Hugging Face tokenizers (pip install 'jax-zoo[bpe]'), "
                           "saved as CHECKPOINT_DIR/tokenizer.json; the model's vocab_size follows it")
    data.add_argument("--vocab-size", type=positive_int, default=None,
                      help=f"--tokenizer bpe: vocabulary size, >= 258 (default {DEFAULT_BPE_VOCAB})")
    t.add_argument("--prompt", default="def ", help="sample prompt (default 'def ')")
    t.add_argument("--sample-tokens", type=non_negative_int, default=120,
                   help="greedy tokens to sample after training; 0 skips sampling (default 120)")
    out = t.add_argument_group("checkpoints and metrics")
    out.add_argument("--checkpoint-dir", "--out", dest="checkpoint_dir", default=None,
                     help="the run folder: checkpoints (orbax, atomic), config.json, tokenizer.json, metrics")
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


def _document_data(args, parser, val_fraction: float, tokenizer_for=None):
    """(train sampler, validation sampler or None, description, tokenizer) for --data PATH.
    tokenizer_for: None (bytes), or a function of the training documents' texts giving the
    tokenizer (`zoo train` trains a BPE on them: never on the validation documents)."""
    from zoo import data, packing

    try:
        docs = packing.read_documents(args.data, jsonl_field=args.jsonl_field)
        train_docs, val_docs = packing.split_documents(docs, val_fraction)
    except (OSError, ValueError) as e:
        parser.error(f"--data: {e}")
    n_bytes = sum(len(d) for d in docs)
    tokenizer, counts = data.ByteTokenizer(), f"{n_bytes:,} bytes"
    if tokenizer_for is not None:
        texts = lambda ds: [d.decode("utf-8", errors="replace") for d in ds]  # noqa: E731
        tokenizer = tokenizer_for(texts(train_docs))
        train_docs = [tokenizer.encode(t) for t in texts(train_docs)]
        val_docs = [tokenizer.encode(t) for t in texts(val_docs)]
        n_tokens = sum(len(d) for d in train_docs + val_docs)
        counts += f", {n_tokens:,} BPE tokens: {n_bytes / max(1, n_tokens):.2f} bytes per token"
    try:
        sampler = packing.PackedSampler(train_docs, args.batch_size, args.seq_len, args.seed)
    except (OSError, ValueError) as e:
        parser.error(f"--data: {e}")
    val = None
    if sum(len(d) for d in val_docs) > args.seq_len:
        val = packing.PackedSampler(val_docs, args.batch_size, args.seq_len, args.seed)
    return sampler, val, f"{len(docs):,} documents ({counts}) from {args.data}", tokenizer


def _corpus_data(args, parser, val_fraction: float, tokenizer_for=None):
    """(train tokens, validation tokens or None, description, tokenizer) for the built-in corpus.
    Bytes (tokenizer_for None): the whole corpus (zoo.train holds out its tail). Otherwise the
    corpus is split first and tokenizer_for(training text) gives the tokenizer, so a BPE never
    sees the validation text."""
    from zoo import data

    raw = data.builtin_corpus(args.max_bytes)
    min_bytes = int((args.seq_len + 1) / (1 - val_fraction)) + 2
    if len(raw) < min_bytes:
        parser.error(f"--max-bytes: {len(raw)} bytes is too little for --seq-len {args.seq_len}")
    desc = f"corpus {len(raw):,} bytes of Python stdlib source"
    if tokenizer_for is None:
        return raw, None, desc, data.ByteTokenizer()
    train_text, val_text = (b.decode("utf-8", errors="replace") for b in data.split(raw, val_fraction))
    tokenizer = tokenizer_for(train_text)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    if len(train_ids) < args.seq_len + 1:
        parser.error(f"--max-bytes: {len(raw)} bytes make {len(train_ids)} BPE training tokens, too few for "
                     f"--seq-len {args.seq_len}")
    n = len(train_ids) + len(val_ids)
    return train_ids, val_ids, f"{desc} as {n:,} BPE tokens ({len(raw) / n:.2f} bytes per token)", tokenizer


def _train_bpe(args, parser, texts):
    from zoo import tokenizer as ztok

    t0 = time.perf_counter()
    try:
        tokenizer = ztok.BPETokenizer.train(texts, args.vocab_size or DEFAULT_BPE_VOCAB)
    except ValueError as e:
        parser.error(f"--vocab-size: {e}")
    print(f"trained a byte-level BPE of {tokenizer.vocab_size:,} tokens on the training split "
          f"in {time.perf_counter() - t0:.1f}s")
    return tokenizer


def _write_run_files(args, parser, run_cfg, tokenizer) -> None:
    """config.json (and tokenizer.json for a BPE) into the run folder, refusing to overwrite
    those of another run (a resumed run finds its own, equal files)."""
    from zoo import tokenizer as ztok
    from zoo.convert import ckpt as zckpt

    folder = args.checkpoint_dir
    os.makedirs(folder, exist_ok=True)
    config = zckpt.config_to_json(run_cfg)
    files = {RUN_CONFIG_FILE: (config, lambda f: json.load(f))}
    if isinstance(tokenizer, ztok.BPETokenizer):
        files[ztok.TOKENIZER_FILE] = (tokenizer, lambda f: ztok.BPETokenizer.load(f.name))
    elif os.path.isfile(os.path.join(folder, ztok.TOKENIZER_FILE)):
        parser.error(f"--tokenizer: {folder!r} holds a BPE run ({ztok.TOKENIZER_FILE}); "
                     f"use --tokenizer bpe to resume it, or a new folder")
    for name, (value, read) in files.items():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                if read(f) != value:
                    parser.error(f"--checkpoint-dir: {folder!r} holds another run ({name} differs: other "
                                 f"preset, overrides, precision or tokenizer); use a new folder")
    with open(os.path.join(folder, RUN_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1)
    if isinstance(tokenizer, ztok.BPETokenizer):
        tokenizer.save(os.path.join(folder, ztok.TOKENIZER_FILE))


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses

    import jax
    import numpy as np

    from sharding import cli as sharding_cli
    from zoo import checkpoint, data, generate, tasks, train
    from zoo import tokenizer as ztok

    mesh, rules = sharding_cli.setup(args, parser)  # first: jax.distributed precedes any device use
    cfg = model_config(args, parser)
    platform = jax.devices()[0].platform
    precision = args.precision or ("fp32" if platform == "cpu" else "bf16")
    tcfg = _train_config(args, parser, precision)
    bpe = args.tokenizer == "bpe"
    if args.vocab_size is not None and not bpe:
        parser.error("--vocab-size: only with --tokenizer bpe (the byte vocabulary is 256)")
    if bpe:
        if args.task is not None:
            parser.error("--tokenizer: bpe tokenizes text; --task has its own vocabulary")
        try:
            ztok.check_bpe_available()
        except ztok.MissingDependencyError as e:
            parser.error(f"--tokenizer: {e}")
    elif args.task is None and cfg.vocab_size < data.ByteTokenizer.vocab_size:
        parser.error(f"--preset: {args.preset!r} has vocab_size={cfg.vocab_size}; byte-level text "
                     f"needs {data.ByteTokenizer.vocab_size}")
    if args.seq_len > cfg.max_len:
        parser.error(f"--seq-len: {args.seq_len} exceeds the model's max_len={cfg.max_len}")
    if args.task is not None and args.data != "stdlib":
        parser.error("--task: give either --task or --data, not both")
    sample = args.sample_tokens if args.task is None else 0
    if sample and not args.prompt:
        parser.error("--prompt: expected a non-empty prompt to sample from")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume: needs --checkpoint-dir")
    if args.save_every and args.checkpoint_dir is None:
        parser.error("--save-every: needs --checkpoint-dir")

    task, tokenizer = None, data.ByteTokenizer()
    tokenizer_for = (lambda texts: _train_bpe(args, parser, texts)) if bpe else None
    if args.task is not None:
        train_data, val_data, task = _task_data(args, parser, cfg)
        desc = f"task {args.task}: {task}"
    elif args.data != "stdlib":
        train_data, val_data, desc, tokenizer = _document_data(args, parser, tcfg.val_fraction, tokenizer_for)
    else:
        train_data, val_data, desc, tokenizer = _corpus_data(args, parser, tcfg.val_fraction, tokenizer_for)
    if bpe:
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    prompt_ids = tokenizer.encode(args.prompt)
    if sample and prompt_ids.size + sample > cfg.max_len:
        parser.error(f"--sample-tokens: prompt ({prompt_ids.size} tokens) + {sample} tokens "
                     f"exceeds the model's max_len={cfg.max_len}")
    if args.checkpoint_dir is not None and jax.process_index() == 0:
        _write_run_files(args, parser, train.with_precision(cfg, precision), tokenizer)
    metrics_jsonl = args.metrics_jsonl
    if metrics_jsonl is None and args.checkpoint_dir is not None:
        # orbax lists only its numbered step directories, so a file beside them is safe
        metrics_jsonl = os.path.join(args.checkpoint_dir, "metrics.jsonl")
    print(f"preset {args.preset}: d_model={cfg.d_model} n_layers={cfg.n_layers} max_len={cfg.max_len} "
          f"vocab_size={cfg.vocab_size} on {platform} ({precision}); {desc}")
    t0 = time.perf_counter()
    try:
        params, _history = train.train(cfg, tcfg, data=train_data, val_data=val_data,
                                       checkpoint_dir=None if args.checkpoint_dir is None else
                                       checkpoint.run_checkpoints(args.checkpoint_dir), save_every=args.save_every,
                                       keep_last=args.keep_last, keep_best=args.keep_best, resume=args.resume,
                                       metrics_jsonl=metrics_jsonl, tensorboard_dir=args.tensorboard,
                                       peak_flops=args.peak_flops, mesh=mesh, rules=rules,
                                       token_bytes=tokenizer.token_bytes() if bpe else None)
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
