"""A custom hybrid from the block pattern alone: three families in one
group (Mamba-2, GLA, sliding-window attention), scanned twice, trained for a few steps on the
built-in corpus.

    python examples/train_custom_hybrid.py [steps]
"""

import sys

import zoo
from layers.attention import AttentionConfig
from layers.gla import GLAConfig
from layers.mamba2 import Mamba2Config
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from zoo import data, train


def build(d_model: int = 64) -> zoo.ModelConfig:
    norm = NormConfig(kind="rms")
    swiglu = MLPConfig(d_model=d_model, d_ff=2 * d_model)
    pattern = (
        zoo.BlockConfig(mixer=Mamba2Config(d_model=d_model, d_state=16, head_dim=16, chunk_size=32), ffn=None, norm=norm),
        zoo.BlockConfig(mixer=GLAConfig(d_model=d_model, n_heads=4, chunk_size=32), ffn=swiglu, norm=norm),
        zoo.BlockConfig(mixer=AttentionConfig(d_model=d_model, n_heads=4, n_kv_heads=2, sliding_window=32),
                        ffn=swiglu, norm=norm),
    )
    # Six layers: the three-block group is what the layer scan repeats.
    return zoo.ModelConfig(vocab_size=256, d_model=d_model, n_layers=6, pattern=pattern, max_len=128,
                           final_norm=norm, tie_embeddings=True)


def main(steps: int = 30) -> list[float]:
    cfg = build()
    tcfg = train.TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=min(5, steps - 1),
                             log_every=max(1, steps // 5))
    _, history = train.train(cfg, tcfg, data=data.builtin_corpus(300_000))
    return history


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
