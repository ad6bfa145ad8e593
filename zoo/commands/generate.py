"""`zoo generate`: sample from a preset (random init) or a `zoo train` checkpoint, streaming.

    zoo generate --ckpt runs/llama --prompt "def " --max-new-tokens 80
    zoo generate --preset llama-tiny --prompt "x" --temperature 0.8 --top-p 0.9 --json

`--ckpt DIR` reads the model config the folder records: `config.json` (a `zoo train` run folder)
or `model_config.json` (`zoo convert --from-hf`), and its tokenizer: `tokenizer.json` (a BPE
run) or UTF-8 bytes. `--preset` (and overrides) instead names the model explicitly, e.g. for a
run folder written before config.json existed; a mismatch is reported from the stored shapes.

Streaming: the compiled decode loop calls back to the host with each sampled token
(jax.debug.callback, ordered); the command decodes the bytes incrementally and prints them as
they come. Beam search and speculative decoding print when they finish.
"""

from __future__ import annotations

import argparse
import codecs
import json
import re
import sys
import time

from zoo.cli import (MODEL_OVERRIDES, add_model_overrides, flag as _flag, model_config, non_negative_float,
                     non_negative_int, positive_float, positive_int)


def _unit_interval(text: str) -> float:
    """A float in (0, 1] (top-p)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_parser(sub) -> None:
    import zoo

    g = sub.add_parser("generate", help="sample text from a preset or a trained checkpoint",
                       description="Generate from a preset with random weights, or from the params of a "
                                   "`zoo train --checkpoint-dir` run or a `zoo convert` checkpoint (--ckpt: "
                                   "the folder's model config and tokenizer).")
    g.add_argument("--preset", default=None,
                   help=f"model preset (required without --ckpt; with --ckpt it replaces the folder's "
                        f"config); one of: {', '.join(zoo.presets.names())}")
    g.add_argument("--ckpt", default=None,
                   help="a `zoo train --checkpoint-dir` folder or `zoo convert` checkpoint (newest step)")
    g.add_argument("--prompt", required=True,
                   help="prompt text (tokenized by the folder's tokenizer: bytes, the zoo's BPE, or the Hugging "
                        "Face tokenizer a `zoo convert` checkpoint carries, special tokens such as BOS included)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--cache-len", type=positive_int, default=None,
                   help="decode cache length / compile bucket (default: the model's max_len)")
    g.add_argument("--temperature", type=_float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=_unit_interval, default=1.0, help="nucleus mass in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=non_negative_float, default=0.0, help="min-p in [0, 1) (0 = off)")
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="CTRL penalty (1 = off)")
    g.add_argument("--frequency-penalty", type=_float, default=0.0, help="per occurrence (0 = off)")
    g.add_argument("--presence-penalty", type=_float, default=0.0, help="once per seen token (0 = off)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="sampling (and random init) seed")
    g.add_argument("--stop", default=None,
                   help="stop after this token (text that is one token, e.g. one byte) instead of the tokenizer's "
                        "eos (a Hugging Face tokenizer's generation_config.json eos ids)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's eos ids")
    g.add_argument("--beams", type=positive_int, default=None, help="beam search with N beams (no sampling)")
    g.add_argument("--length-penalty", type=_float, default=1.0, help="beam length penalty (default 1)")
    g.add_argument("--draft-preset", default=None,
                   help="speculative decoding with this preset as draft (random init, same vocabulary)")
    g.add_argument("--gamma", type=positive_int, default=4, help="draft tokens per speculative block")
    g.add_argument("--int8-weights", action="store_true", help="weight-only int8 projections (zoo.quantize)")
    g.add_argument("--int8-kv-cache", action="store_true", help="int8 KV cache for attention mixers")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: tokens, text, timings (no streaming)")
    g.set_defaults(run=cmd_generate, subparser=g)
    add_model_overrides(g)


def _sampling(args, parser):
    from layers.checks import ConfigError
    from zoo.sampling import SamplingConfig

    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty,
                              frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
    except ConfigError as e:
        m = re.match(r"SamplingConfig\.(\w+)", str(e))
        parser.error(f"{_flag(m.group(1)) if m else '--temperature'}: {e}")


def _load_params(args, parser, cfg):
    import jax
    import orbax.checkpoint as ocp

    import zoo
    from layers import params as P

    if args.ckpt is None:
        return zoo.init(jax.random.key(args.seed), cfg)
    from zoo.checkpoint import Checkpointer, run_checkpoints

    steps = Checkpointer(run_checkpoints(args.ckpt)).all_steps()
    if not steps:
        parser.error(f"--ckpt: no checkpoint found in {args.ckpt!r}")
    target = P.abstract(zoo.param_specs(cfg))
    # Only the params item: the optimizer state's structure depends on settings we do not need.
    manager = ocp.CheckpointManager(Checkpointer(run_checkpoints(args.ckpt)).directory,
                                    item_handlers={"params": ocp.StandardCheckpointHandler()})
    try:
        return manager.restore(steps[-1], args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    except (ValueError, KeyError, TypeError) as e:
        source = f"--preset {args.preset!r}" if args.preset else "the folder's model config"
        parser.error(f"--ckpt: step {steps[-1]} of {args.ckpt!r} does not match {source} "
                     f"(give the preset and overrides it was trained with): {str(e).splitlines()[0][:300]}")
    finally:
        manager.close()


def _folder_config(args, parser):
    """The model config recorded in the --ckpt folder (a `zoo train` run's config.json or a
    `zoo convert` checkpoint's model_config.json)."""
    import json
    import os

    from zoo import model
    from zoo.commands.train import RUN_CONFIG_FILE
    from zoo.config import ModelConfig
    from zoo.convert import ckpt as zckpt

    given = [_flag(k) for k in MODEL_OVERRIDES if getattr(args, k) is not None]
    if given:
        parser.error(f"{given[0]}: model overrides need --preset (--ckpt {args.ckpt!r} fixes the model)")
    names = (RUN_CONFIG_FILE, zckpt.CONFIG_FILE)
    path = next((os.path.join(args.ckpt, n) for n in names if os.path.isfile(os.path.join(args.ckpt, n))), None)
    if path is None:
        parser.error(f"--ckpt: {args.ckpt!r} holds neither {names[0]} (zoo train) nor {names[1]} (zoo convert); "
                     f"give the --preset (and overrides) it was trained with")
    try:
        with open(path) as f:
            cfg = zckpt.config_from_json(json.load(f))
        model.family(cfg)
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        parser.error(f"--ckpt: {path} is not a zoo model config ({str(e).splitlines()[0][:200]}); "
                     f"a Hugging Face folder needs `zoo convert --from-hf` first")
    if not isinstance(cfg, ModelConfig):
        parser.error(f"--ckpt: {path} describes a {type(cfg).__name__}; this command needs a decoder (ModelConfig)")
    return cfg


def _tokenizer(args, parser, cfg):
    """The --ckpt folder's tokenizer (`zoo.tokenizer.load`: HF, zoo BPE or bytes), checked against
    the model."""
    from zoo import tokenizer as ztok

    try:
        tokenizer = ztok.load(args.ckpt) if args.ckpt is not None else ztok.ByteTokenizer()
    except (ztok.MissingDependencyError, ValueError, OSError) as e:
        parser.error(f"--ckpt: {e}")
    if cfg.vocab_size < tokenizer.vocab_size:
        model = f"--preset {args.preset!r}" if args.preset else f"the model of {args.ckpt!r}"
        parser.error(f"{'--preset' if args.preset else '--ckpt'}: {model} has vocab_size={cfg.vocab_size}; "
                     f"the tokenizer ({tokenizer!r}) needs {tokenizer.vocab_size}")
    return tokenizer


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np

    import zoo
    from zoo import beam, generate, quantize, speculative

    if args.preset is None and args.ckpt is None:
        parser.error("--preset: required without --ckpt")
    cfg = model_config(args, parser) if args.preset is not None else _folder_config(args, parser)
    sampling = _sampling(args, parser)
    tokenizer = _tokenizer(args, parser, cfg)
    prompt = tokenizer.encode(args.prompt)
    if prompt.size == 0:
        parser.error("--prompt: expected a non-empty prompt")
    cache_len = args.cache_len or cfg.max_len
    if prompt.size + args.max_new_tokens > cache_len:
        parser.error(f"--prompt: {prompt.size} tokens + --max-new-tokens {args.max_new_tokens} exceeds the cache "
                     f"length {cache_len} (--cache-len, default the model's max_len)")
    from zoo import tokenizer as ztok

    # A converted model's own eos ids end a reply, as in transformers' generate; the zoo's
    # tokenizers (bytes, BPE runs) keep running to --max-new-tokens unless --stop says otherwise.
    stops = [] if args.ignore_eos else [i for i in getattr(tokenizer, "eos_ids", ()) if i < cfg.vocab_size]
    if args.stop is not None:
        hf = isinstance(tokenizer, ztok.HFTokenizer)
        stop_ids = tokenizer.encode(args.stop, add_special_tokens=False) if hf else tokenizer.encode(args.stop)
        if stop_ids.size != 1:
            parser.error(f"--stop: expected text that is one token, got {args.stop!r} ({stop_ids.size} tokens)")
        stops = [int(stop_ids[0])]
    if args.beams and args.draft_preset:
        parser.error("--beams: cannot be combined with --draft-preset")
    if args.int8_kv_cache:
        cfg = quantize.with_int8_kv_cache(cfg)
    draft_cfg = None
    if args.draft_preset is not None:
        if args.draft_preset not in zoo.presets.names():
            parser.error(f"--draft-preset: unknown preset {args.draft_preset!r}")
        draft_cfg = zoo.presets.get(args.draft_preset, max_len=cfg.max_len)
        if draft_cfg.vocab_size != cfg.vocab_size:
            parser.error(f"--draft-preset: vocab_size {draft_cfg.vocab_size} differs from the target's "
                         f"{cfg.vocab_size}")

    import jax

    params = _load_params(args, parser, cfg)
    if args.int8_weights:
        params = quantize.quantize_params(params, cfg)
    report: dict = {"preset": args.preset, "ckpt": args.ckpt, "prompt": args.prompt, "prompt_tokens": int(prompt.size)}
    t0 = time.perf_counter()
    if args.beams:
        res = beam.beam_search(params, prompt, cfg, beam_size=args.beams, max_new_tokens=args.max_new_tokens,
                               length_penalty=args.length_penalty, stop_tokens=stops, cache_len=cache_len)
        tokens = res.sequences[0]
        report["beams"] = [{"text": tokenizer.decode(np.asarray(s, np.int32)), "score": sc}
                           for s, sc in zip(res.sequences, res.scores)]
    elif draft_cfg is not None:
        draft_params = zoo.init(jax.random.key(args.seed + 1), draft_cfg)
        res = speculative.speculative_generate(params, draft_params, [prompt], target_cfg=cfg, draft_cfg=draft_cfg,
                                               max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                                               sampling=sampling, stop_tokens=stops, seed=args.seed,
                                               cache_len=cache_len)
        tokens = res.tokens[0]
        report.update(acceptance_rate=res.acceptance_rate, target_forwards=res.blocks)
    else:
        tokens, timing = _stream(params, prompt, cfg, args, sampling, stops, cache_len, tokenizer)
        report.update(timing)
    report["total_ms"] = (time.perf_counter() - t0) * 1e3
    text = tokenizer.decode(np.asarray(tokens, np.int32))
    report.update(tokens=[int(t) for t in tokens], text=text)
    if args.json:
        print(json.dumps(report))
    elif args.beams or draft_cfg is not None:
        print(args.prompt + text)
        if draft_cfg is not None:
            print(f"[acceptance rate {report['acceptance_rate']:.2f}, {report['target_forwards']} target forwards]",
                  file=sys.stderr)
    return 0


def _stream(params, prompt, cfg, args, sampling, stops, cache_len, tokenizer):
    """Run the decode loop with a host callback that prints each token's bytes as it is sampled
    (unless --json); -> (tokens, timings). The program is compiled first so the timings are of the run."""
    import jax
    import jax.numpy as jnp

    from zoo import generate

    prompt_BP, lens_B, cache_len = generate.left_pad([prompt], cfg, max_new_tokens=args.max_new_tokens,
                                                     stop_tokens=stops, cache_len=cache_len)
    times: list[float] = []
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if not args.json:
        print(args.prompt, end="", flush=True)

    hidden = getattr(tokenizer, "special_ids", frozenset())  # decode() skips them too

    def on_token(step, tokens_B, done_B):
        times.append(time.perf_counter())
        token = int(tokens_B[0])
        if not args.json and not bool(done_B[0]) and token not in hidden:
            print(utf8.decode(tokenizer.piece(token)), end="", flush=True)

    dyn = (params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), jnp.int32(args.max_new_tokens),
           jnp.asarray(stops, jnp.int32).reshape(-1), jax.random.key(args.seed))
    t0 = time.perf_counter()
    compiled = generate.decode_jit.lower(*dyn, cfg=cfg, sampling=sampling, cache_len=cache_len,
                                         stream=on_token).compile()
    t1 = time.perf_counter()
    out_BN = jax.block_until_ready(compiled(*dyn))
    t2 = time.perf_counter()
    if not args.json:
        print(utf8.decode(b"", final=True), flush=True)
    row = [int(t) for t in out_BN[0, :args.max_new_tokens] if t >= 0]
    # The first callback comes once the prompt is prefilled and the first token sampled.
    prefill_ms = (times[0] - t1) * 1e3 if times else (t2 - t1) * 1e3
    n_decode = max(len(times) - 1, 1)
    decode_ms = (times[-1] - times[0]) * 1e3 / n_decode if len(times) > 1 else 0.0
    return row, {"compile_ms": (t1 - t0) * 1e3, "prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms,
                 "n_tokens": len(row)}
