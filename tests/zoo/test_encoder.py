"""The BERT-style encoder: padding independence, heads against hand composition, validation,
MLM training through zoo.train's step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers import dense, embed, norms
from layers.attention import AttentionConfig
from layers.checks import ConfigError
from layers.mlp import MLPConfig
from zoo import encoder
from zoo.config import BlockConfig

CFG = zoo.presets.get("bert-tiny", d_model=32, n_heads=2, d_ff=64, max_len=16)
B, L = 2, 10


def _params(cfg, seed=0, scale=3.0):
    """Init 0.02 barely mixes tokens in a tiny model: scale matrices up."""
    params = zoo.init(jax.random.key(seed), cfg)
    return jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, params)


def _tokens(seed, shape=(B, L)):
    return jax.random.randint(jax.random.key(seed), shape, 1, CFG.vocab_size, jnp.int32)


_hidden = jax.jit(lambda p, t, tt, m: encoder.encode(p, t, CFG, tt, m)[0])


def test_preset_is_an_encoder_with_bidirectional_post_norm_blocks():
    cfg = zoo.presets.get("bert-tiny")
    assert isinstance(cfg, zoo.EncoderConfig) and cfg.output == "mlm"
    assert zoo.presets.kind_of("bert-tiny") == "encoder" and "bert-tiny" in zoo.presets.names("encoder")
    assert "bert-tiny" not in zoo.presets.names("decoder")
    block = cfg.pattern[0]
    assert block.mixer.causal is False and block.norm_position == "post"


def test_real_tokens_do_not_see_padding():
    params = _params(CFG)
    tokens = _tokens(1)
    types = jnp.zeros((B, L), jnp.int32).at[:, 4:].set(1)
    n_real = 6
    mask = jnp.ones((B, L), jnp.int32).at[1, n_real:].set(0)
    h = np.asarray(_hidden(params, tokens, types, mask))
    # Other padding values (tokens and types): real positions unchanged, bit for bit.
    other = tokens.at[1, n_real:].set((tokens[1, n_real:] * 7 + 3) % CFG.vocab_size)
    h_other = np.asarray(_hidden(params, other, types.at[1, n_real:].set(0), mask))
    np.testing.assert_array_equal(h_other[1, :n_real], h[1, :n_real])
    np.testing.assert_array_equal(h_other[0], h[0])
    # Without the mask the padding does leak in (bidirectional attention sees every token).
    leaky = np.asarray(_hidden(params, other, types, jnp.ones((B, L), jnp.int32)))
    assert not np.allclose(leaky[1, :n_real], h[1, :n_real], atol=1e-3)
    # A later token changes an earlier output: the encoder is not causal.
    later = tokens.at[0, L - 1].set((tokens[0, L - 1] + 1) % CFG.vocab_size)
    assert not np.allclose(np.asarray(_hidden(params, later, types, mask))[0, 0], h[0, 0], atol=1e-4)


def test_heads_match_hand_composition_and_forward_outputs():
    params = _params(CFG, seed=2)
    tokens = _tokens(3)
    types = jax.random.randint(jax.random.key(4), (B, L), 0, 2, jnp.int32)
    hidden = _hidden(params, tokens, types, jnp.ones((B, L), jnp.int32))  # same compile as above
    # MLM: dense -> gelu -> LayerNorm -> tied decoder + bias.
    head = params["mlm"]
    h = jax.nn.gelu(dense.forward(head["dense"], hidden), approximate=False)
    h = norms.forward(head["norm"], h, cfg=CFG.mlm_norm)
    want_mlm = h @ params["embed"]["table_VD"].T + head["bias_V"][None, None, :]
    logits = zoo.forward(params, tokens, cfg=CFG, token_types=types)
    assert logits.shape == (B, L, CFG.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_mlm), rtol=1e-5, atol=1e-5)
    # Pooler: tanh(dense(first token)); hidden output = the encoder stack.
    pooled = encoder.pool(params, hidden)
    want_pool = jnp.tanh(hidden[:, 0] @ params["pooler"]["w"] + params["pooler"]["b"][None, :])
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(want_pool), rtol=1e-5, atol=1e-6)
    assert pooled.shape == (B, CFG.d_model)
    # Token types enter the embedding.
    assert not np.allclose(np.asarray(_hidden(params, tokens, 1 - types, jnp.ones((B, L), jnp.int32))),
                           np.asarray(hidden), atol=1e-4)


@pytest.mark.slow  # two more compiles; the default suite covers the encoder through the heads test
def test_embedding_sums_token_position_and_type_then_norm():
    params = _params(CFG, seed=5)
    one_layer = dataclasses.replace(CFG, n_layers=1)
    tokens = _tokens(6, (1, 5))
    types = jnp.asarray([[0, 0, 1, 1, 1]], jnp.int32)
    x = (embed.embed(params["embed"], tokens) + params["pos"]["pos_PD"][None, :5]
         + params["types"]["table_TD"][types])
    x = norms.forward(params["embed_norm"], x, cfg=CFG.embed_norm)
    from zoo import blocks
    block_params = jax.tree.map(lambda a: a[0], params["blocks"][0])
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    want = jax.jit(lambda p, v: blocks.forward(p, v, cfg=CFG.pattern[0], positions=pos)[0])(block_params, x)
    one_params = {**params, "blocks": jax.tree.map(lambda a: a[:1], params["blocks"])}
    got = jax.jit(lambda p: encoder.encode(p, tokens, one_layer, types)[0])(one_params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_configs_and_inputs_are_refused():
    causal = BlockConfig(mixer=AttentionConfig(d_model=32, n_heads=2, rope=None),
                         ffn=MLPConfig(d_model=32, d_ff=64))
    with pytest.raises(ConfigError, match=r"pattern\[0\].mixer.causal.*False"):
        encoder.EncoderConfig(vocab_size=10, d_model=32, n_layers=1, pattern=(causal,))
    with pytest.raises(ConfigError, match="output"):
        dataclasses.replace(CFG, pooler=False, output="pooled")
    with pytest.raises(ConfigError, match="output"):
        dataclasses.replace(CFG, output="logits")
    params = zoo.init(jax.random.key(0), CFG)
    with pytest.raises(ValueError, match="token_types"):
        zoo.forward(params, _tokens(0), cfg=CFG, token_types=jnp.full((B, L), 2, jnp.int32))
    with pytest.raises(ValueError, match="max_len=16"):
        zoo.forward(params, _tokens(0, (1, 17)), cfg=CFG)
    with pytest.raises(TypeError, match="no init_state"):
        zoo.init_state(CFG, 1, 8)


def _mlm_batches(cfg, seq_len=32, batch_size=8):
    from zoo import data
    corpus = np.frombuffer(data.builtin_corpus(20_000), np.uint8).astype(np.int32)
    rng = np.random.default_rng(0)

    def batch(i):
        starts = rng.integers(0, corpus.size - seq_len, batch_size)
        tokens = jnp.asarray(np.stack([corpus[s:s + seq_len] for s in starts]))
        inputs, chosen = encoder.mlm_inputs(jax.random.key(i), tokens, mask_id=0, vocab_size=cfg.vocab_size)
        return inputs, tokens, chosen  # zoo.train's (inputs, targets, mask)

    return batch


@pytest.mark.slow  # compiles the gradient of the MLM loss
def test_mlm_inputs_and_gradients_reach_every_used_parameter():
    from zoo import train
    inputs, tokens, chosen = _mlm_batches(CFG, seq_len=16)(0)
    assert 0 < int(chosen.sum()) < chosen.size
    np.testing.assert_array_equal(np.asarray(inputs)[np.asarray(chosen) == 0], np.asarray(tokens)[np.asarray(chosen) == 0])
    assert np.mean(np.asarray(inputs)[np.asarray(chosen) == 1] == 0) > 0.5  # mostly the mask id
    params = _params(CFG, seed=7, scale=1.0)
    grads = jax.jit(jax.grad(train.loss_fn), static_argnums=3)(params, inputs, tokens, CFG, chosen)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        if "pooler" not in name:  # the MLM loss does not use the pooler
            assert float(jnp.max(jnp.abs(g))) > 0, name


@pytest.mark.slow  # ~25 optimizer steps: compiles the train step of a 2-layer encoder
def test_mlm_training_lowers_the_loss():
    """bert-tiny's MLM objective through zoo.train's jitted step (masked positions only)."""
    from zoo import train
    cfg = zoo.presets.get("bert-tiny", d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=32)
    batch = _mlm_batches(cfg)
    params = zoo.init(jax.random.key(0), cfg)
    held = batch(1000)
    tcfg = train.TrainConfig(steps=25, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, log_every=100)
    optimizer = train.make_optimizer(tcfg, train.decay_mask(cfg))
    step = train.make_train_step(cfg, optimizer)
    loss = jax.jit(lambda p, i, t, m: train.loss_fn(p, i, t, cfg, m))
    before = float(loss(params, *held))
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    for i in range(tcfg.steps):
        params, opt_state, metrics = step(params, opt_state, *batch(i))
        assert bool(metrics["finite"])
    after = float(loss(params, *held))
    assert after < before - 0.5, (before, after)
