"""`zoo eval`: held-out bits per byte of a run folder or converted checkpoint.

    zoo eval --ckpt runs/bpe                         # the split `zoo train` held out, same settings
    zoo eval --ckpt runs/llama --data notes/ --seq-len 256

The model config, tokenizer (tokenizer.json: BPE, else bytes) and newest params come from the
folder, as for `zoo generate --ckpt`. The data flags mirror `zoo train`'s, and with the same
values (--data, --max-bytes, --seq-len, --batch-size, --seed) the command evaluates exactly the
windows the run's final "val bits/byte" line did, so it reproduces that number. Bits per byte
divide the summed loss by the bytes of text the scored tokens cover, so byte and BPE runs compare.
"""

from __future__ import annotations

import argparse
import json

from zoo.cli import add_model_overrides, model_config, non_negative_int, positive_int


def add_parser(sub) -> None:
    import zoo

    e = sub.add_parser("eval", help="held-out bits per byte of a trained checkpoint",
                       description="Evaluate a `zoo train` run folder (or a `zoo convert` checkpoint) on the "
                                   "held-out split of its data: bits per byte, with the folder's tokenizer.")
    e.add_argument("--ckpt", required=True, help="the run folder (config.json, tokenizer.json, checkpoints)")
    e.add_argument("--preset", default=None,
                   help=f"replace the folder's model config (and take model overrides); one of: "
                        f"{', '.join(zoo.presets.names())}")
    e.add_argument("--data", default="stdlib", help="as for zoo train: 'stdlib', a text file, a folder or .jsonl")
    e.add_argument("--jsonl-field", default="text", help="the text field of .jsonl records (default text)")
    e.add_argument("--max-bytes", type=positive_int, default=None,
                   help="the first N bytes of the built-in corpus (use the run's value)")
    e.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (default 128)")
    e.add_argument("--batch-size", type=positive_int, default=16, help="windows per batch (default 16)")
    e.add_argument("--max-batches", type=positive_int, default=8,
                   help="evaluate at most N batches (default 8, as zoo train)")
    e.add_argument("--seed", type=non_negative_int, default=0, help="packed documents: the run's seed (default 0)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(run=cmd_eval, subparser=e)
    add_model_overrides(e)


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np

    from zoo import data, train
    from zoo import tokenizer as ztok
    from zoo.commands.generate import _folder_config, _load_params, _tokenizer
    from zoo.commands.train import _corpus_data, _document_data

    cfg = model_config(args, parser) if args.preset is not None else _folder_config(args, parser)
    tokenizer = _tokenizer(args, parser, cfg)
    if args.seq_len > cfg.max_len:
        parser.error(f"--seq-len: {args.seq_len} exceeds the model's max_len={cfg.max_len}")
    bpe = not isinstance(tokenizer, ztok.ByteTokenizer)  # the run's BPE or a converted model's HF tokenizer
    tokenizer_for = (lambda texts: tokenizer) if bpe else None  # the run's own, never retrained
    val_fraction = train.TrainConfig().val_fraction
    if args.data != "stdlib":
        _, val, desc, _ = _document_data(args, parser, val_fraction, tokenizer_for)
        if val is None:
            parser.error(f"--data: the held-out documents of {args.data!r} hold fewer than --seq-len + 1 tokens")
    else:
        train_ids, val, desc, _ = _corpus_data(args, parser, val_fraction, tokenizer_for)
        if val is None:  # bytes: zoo.train holds out the tail itself; take the same tail
            val = data.split(data.as_array(train_ids), val_fraction)[1]
        if len(val) < args.seq_len + 1:
            parser.error(f"--seq-len: the held-out split has {len(val)} tokens, fewer than one window "
                         f"of {args.seq_len + 1}")
    params = _load_params(args, parser, cfg)
    bits = train.evaluate(params, cfg, val, batch_size=args.batch_size, seq_len=args.seq_len,
                          max_batches=args.max_batches, token_bytes=tokenizer.token_bytes() if bpe else None)
    report = {"ckpt": args.ckpt, "tokenizer": repr(tokenizer), "val_bits_per_byte": float(bits), "data": desc}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{desc}\nval bits/byte {bits:.4f} ({tokenizer!r})")
    return 0 if np.isfinite(bits) else 1
