"""Train a small mixture-of-experts model on the built-in corpus, then show how the router spreads
the tokens: per layer, the tokens sent to each expert and the fraction of assignments dropped
by the capacity limit (Switch-style dispatch; dropless dispatch never drops).

    python examples/train_moe.py [preset] [steps]      # default: switch-tiny 30
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from zoo import data, train


def expert_load(params, cfg: zoo.ModelConfig, tokens) -> list[dict]:
    """One row per MoE layer, in depth order: {"layer", "tokens_per_expert", "drop_fraction"},
    read from the model's auxiliary outputs (zoo.forward(..., return_aux=True))."""
    _, aux = zoo.forward(params, tokens, cfg=cfg, return_aux=True)
    rows = []
    # Prefix blocks run first, once each; then the pattern, stacked over its repeats.
    for j, block_aux in enumerate(aux.get("prefix", ())):
        if "tokens_per_expert" in block_aux.get("ffn", {}):
            rows.append(_row(j, block_aux["ffn"]))
    for j, block_aux in enumerate(aux["blocks"]):
        ffn = block_aux.get("ffn", {})
        if "tokens_per_expert" not in ffn:
            continue
        for r in range(cfg.n_repeats):
            layer = len(cfg.prefix) + r * len(cfg.pattern) + j
            rows.append(_row(layer, jax.tree.map(lambda a: a[r], ffn)))
    return sorted(rows, key=lambda row: row["layer"])


def _row(layer: int, ffn_aux: dict) -> dict:
    return {"layer": layer, "tokens_per_expert": np.asarray(ffn_aux["tokens_per_expert"]),
            "drop_fraction": float(ffn_aux["drop_fraction"])}


def format_table(rows: list[dict]) -> str:
    n_experts = len(rows[0]["tokens_per_expert"])
    head = "layer " + " ".join(f"{'e' + str(e):>5}" for e in range(n_experts)) + "   max/mean  dropped"
    lines = [head]
    for row in rows:
        counts = row["tokens_per_expert"]
        imbalance = counts.max() / max(counts.mean(), 1e-9)
        lines.append(f"{row['layer']:>5} " + " ".join(f"{int(c):>5}" for c in counts)
                     + f"   {imbalance:>8.2f}  {row['drop_fraction']:>7.1%}")
    return "\n".join(lines)


def main(preset: str = "switch-tiny", steps: int = 30, **overrides):
    cfg = zoo.presets.get(preset, **overrides)
    tcfg = train.TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=min(5, steps - 1),
                             log_every=max(1, steps // 5))
    corpus = data.builtin_corpus(200_000)
    params, history = train.train(cfg, tcfg, data=corpus)
    # The load of one fresh batch of windows from the corpus.
    windows = np.frombuffer(corpus[: 8 * 64], np.uint8).astype(np.int32).reshape(8, 64)
    rows = expert_load(params, cfg, jnp.asarray(windows))
    print(f"\nexpert load of {preset} after {steps} steps ({windows.size} tokens):")
    print(format_table(rows))
    return history, rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "switch-tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 30)
