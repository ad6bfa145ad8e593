"""`zoo convert`: Hugging Face folder <-> zoo checkpoint.

    zoo convert --from-hf ./Llama-3.2-1B --out ./ckpt/llama      # HF folder -> zoo checkpoint
    zoo convert --to-hf ./ckpt/llama --out ./exported            # zoo checkpoint -> HF folder

The tokenizer travels both ways: the HF files in `zoo.tokenizer.HF_FILES` that the folder holds
are stored in the checkpoint (so `zoo generate --ckpt` prompts in the model's vocabulary) and
written back out on export. Where the folder has no generation_config.json, one holding
config.json's bos/eos/pad ids is written (what transformers derives when it loads the model).
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert between a Hugging Face folder and a zoo checkpoint",
                       description="Import a local Hugging Face model folder (config.json + safetensors) into a "
                                   "zoo checkpoint, or export a zoo checkpoint written by this command to a folder "
                                   "that transformers loads.")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face folder to import")
    src.add_argument("--to-hf", metavar="CKPT", help="zoo checkpoint (from `zoo convert --from-hf`) to export")
    c.add_argument("--out", required=True, metavar="PATH", help="checkpoint directory (import) or HF folder (export)")
    c.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="import: parameter storage dtype (default: the checkpoint's)")
    c.add_argument("--model-type", default=None,
                   help="export: transformers model_type to write (default: the one imported, else inferred)")
    c.set_defaults(run=cmd_convert, subparser=c)


def cmd_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from layers import params as P
    from zoo import convert
    from zoo import tokenizer as ztok
    from zoo.convert import ckpt

    if args.from_hf is not None:
        if not os.path.isfile(os.path.join(args.from_hf, "config.json")):
            parser.error(f"--from-hf: expected a folder holding config.json, got {args.from_hf!r}")
        if os.path.exists(args.out) and os.listdir(args.out):
            parser.error(f"--out: {args.out!r} exists and is not empty")
        try:
            cfg, params = convert.from_hf(args.from_hf, param_dtype=args.param_dtype)
        except (convert.UnsupportedError, FileNotFoundError, KeyError, ValueError) as e:
            parser.error(f"--from-hf: {e}")
        hf_config = convert.hf_io.read_config(args.from_hf)
        model_type = hf_config["model_type"]
        assets = _tokenizer_assets(args.from_hf, hf_config)
        ckpt.save(args.out, cfg, params, extra={"hf_model_type": model_type,
                                                "hf_source": os.path.abspath(args.from_hf)}, assets=assets)
        carried = f", tokenizer files: {', '.join(sorted(assets))}" if assets else " (no tokenizer files found)"
        print(f"imported {model_type} ({P.count(params):,} parameters, {cfg.n_layers} layers, "
              f"{cfg.param_dtype}) into {os.path.abspath(args.out)}{carried}")
        return 0

    try:
        cfg, params, extra = ckpt.load(args.to_hf)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--to-hf: {e}")
    model_type = args.model_type or extra.get("hf_model_type")
    if model_type is not None and model_type not in convert.FAMILIES:
        parser.error(f"--model-type: unknown {model_type!r}; choose from {', '.join(convert.model_types())}")
    try:
        folder = convert.to_hf(cfg, params, args.out, model_type=model_type)
    except convert.UnsupportedError as e:
        parser.error(f"--model-type: {e}" if args.model_type else f"--to-hf: {e}")
    assets = ckpt.read_assets(args.to_hf, ztok.HF_FILES)
    for name, data in assets.items():
        ckpt.write_atomic(os.path.join(folder, name), data)
    carried = f" with {', '.join(sorted(assets))}" if assets else ""
    print(f"exported {model_type or 'the inferred architecture'} to {os.path.abspath(folder)}{carried}")
    return 0


def _tokenizer_assets(folder: str, hf_config: dict) -> dict[str, bytes]:
    """The HF tokenizer files `folder` holds, plus a generation_config.json from config.json's
    special token ids when the folder has none (the eos there is where generation stops)."""
    from zoo import tokenizer as ztok
    from zoo.convert import ckpt

    assets = ckpt.read_assets(folder, ztok.HF_FILES)
    if ztok.TOKENIZER_FILE in assets and ztok.HF_GENERATION_FILE not in assets:
        ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if hf_config.get(k) is not None}
        if ids:
            assets[ztok.HF_GENERATION_FILE] = json.dumps(ids, indent=2).encode()
    return assets
