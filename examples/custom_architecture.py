"""Build an architecture from blocks instead of a preset: a GPT-J-style parallel block with
ALiBi positions, alternating with a sliding-window block, then decode with the KV cache.

    python examples/custom_architecture.py
"""

import jax
import jax.numpy as jnp

import zoo
from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig


def build(d_model: int = 64) -> zoo.ModelConfig:
    ffn = MLPConfig(d_model=d_model, d_ff=4 * d_model, activation="gelu_tanh", gated=False)
    norm = NormConfig(kind="layer", eps=1e-5)
    global_attn = AttentionConfig(d_model=d_model, n_heads=4, n_kv_heads=1, rope=None, alibi=True)
    local_attn = AttentionConfig(d_model=d_model, n_heads=4, n_kv_heads=1, sliding_window=8)
    pattern = (
        zoo.BlockConfig(mixer=global_attn, ffn=ffn, norm=norm, parallel=True),
        zoo.BlockConfig(mixer=local_attn, ffn=ffn, norm=norm),
    )
    # 4 layers = the 2-block pattern scanned twice.
    return zoo.ModelConfig(vocab_size=256, d_model=d_model, n_layers=4, pattern=pattern,
                           max_len=128, final_norm=norm, tie_embeddings=True)


def main() -> jax.Array:
    cfg = build()
    params = zoo.init(jax.random.key(0), cfg)
    prompt = jnp.array([list(b"def main():")], jnp.int32)
    state = zoo.init_state(cfg, batch_size=1, max_len=32)
    logits, state = zoo.forward(params, prompt, cfg=cfg, state=state)  # prefill
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = [token]
    for _ in range(8):
        logits_t, state = zoo.step(params, token, state, cfg=cfg)
        token = jnp.argmax(logits_t, axis=-1).astype(jnp.int32)
        out.append(token)
    tokens = jnp.stack(out, axis=1)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{n_params:,} params; pattern of {len(cfg.pattern)} blocks x {cfg.n_repeats}; "
          f"greedy continuation ids: {tokens[0].tolist()}")
    return tokens


if __name__ == "__main__":
    main()
