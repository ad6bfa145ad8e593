"""Block variants (pre, post, sandwich norms; parallel) against hand-composed layers, and custom
patterns through the whole model API."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers import attention, mlp, norms
from layers import params as P
from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from zoo import blocks
from zoo.config import BlockConfig, ModelConfig

D = 32
ATTN = AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2)
FFN = MLPConfig(d_model=D, d_ff=48, activation="gelu", gated=False, use_bias=True)
NORM = NormConfig(kind="layer", eps=1e-5)


def _random_params(specs, seed):
    """Random values everywhere (biases too); norm scales around 1."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=P.is_spec)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([
        0.3 * jax.random.normal(k, s.shape) + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
        for (path, s), k in zip(leaves, keys)])


def _hand_composed(params, x, position):
    n = lambda name, v: norms.forward(params[name], v, cfg=NORM)
    attn = lambda v: attention.forward(params["mixer"], v, cfg=ATTN)[0]
    ff = lambda v: mlp.apply(params["ffn"], v, cfg=FFN)
    if position == "pre":
        x = x + attn(n("mixer_norm", x))
        return x + ff(n("ffn_norm", x))
    if position == "post":
        x = n("mixer_norm", x + attn(x))
        return n("ffn_norm", x + ff(x))
    if position == "sandwich":
        x = x + n("mixer_post_norm", attn(n("mixer_norm", x)))
        return x + n("ffn_post_norm", ff(n("ffn_norm", x)))
    h = n("mixer_norm", x)  # parallel
    return x + attn(h) + ff(h)


@pytest.mark.parametrize("variant", ["pre", "post", "sandwich", "parallel"])
def test_block_variants_match_hand_composition(variant):
    cfg = BlockConfig(mixer=ATTN, ffn=FFN, norm=NORM, norm_position="pre" if variant == "parallel" else variant,
                      parallel=variant == "parallel")
    params = _random_params(blocks.param_specs(cfg, D), seed=0)
    x = jax.random.normal(jax.random.key(1), (2, 9, D))
    y, state, aux = blocks.forward(params, x, cfg=cfg)
    assert aux == {}
    assert state is None
    np.testing.assert_allclose(np.asarray(y), np.asarray(_hand_composed(params, x, variant)), rtol=1e-5, atol=1e-5)


def test_parallel_block_requires_ffn_and_pre_norm():
    with pytest.raises(ValueError, match="parallel"):
        BlockConfig(mixer=ATTN, ffn=None, parallel=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["post", "parallel"])
def test_custom_patterns_decode_like_forward(variant):
    """A post-norm sinusoidal model and a parallel-block ALiBi model, built from blocks by hand."""
    if variant == "post":
        block = BlockConfig(mixer=ATTN, ffn=FFN, norm=NORM, norm_position="post")
        cfg = ModelConfig(vocab_size=50, d_model=D, n_layers=2, pattern=(block,), max_len=32,
                          position="sinusoidal", tie_embeddings=True, final_norm=NORM)
    else:
        alibi = dataclasses.replace(ATTN, rope=None, alibi=True)
        block = BlockConfig(mixer=alibi, ffn=FFN, norm=NORM, parallel=True)
        cfg = ModelConfig(vocab_size=50, d_model=D, n_layers=2, pattern=(block,), max_len=32, final_norm=NORM)
    params = zoo.init(jax.random.key(2), cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 50, jnp.int32)
    logits = zoo.forward(params, tokens, cfg=cfg)
    state = zoo.init_state(cfg, 2, 12)
    stepped = []
    for t in range(12):
        lt, state = zoo.step(params, tokens[:, t], state, cfg=cfg)
        stepped.append(lt)
    np.testing.assert_allclose(np.stack(stepped, 1), np.asarray(logits), rtol=1e-4, atol=1e-4)


def test_model_config_rejects_mismatched_widths():
    block = BlockConfig(mixer=ATTN, ffn=FFN)
    with pytest.raises(ValueError, match=r"pattern\[0\].mixer.d_model=32 differs from d_model=64"):
        ModelConfig(vocab_size=10, d_model=64, n_layers=1, pattern=(block,))
    with pytest.raises(TypeError, match="no mixer registered"):
        BlockConfig(mixer=NORM, ffn=None)
