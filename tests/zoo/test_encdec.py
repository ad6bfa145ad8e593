"""Encoder-decoders (T5 v1.0 / v1.1, BART): cached decoding equals the full decoder, T5's encoder
equals a slow hand-written reference, padding and causality, generation, validation, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers import relative_position as relpos
from layers.checks import ConfigError
from zoo import encdec

B, S, L = 2, 7, 6
SMALL = dict(d_model=32, n_heads=2, n_layers=2)


def _cfg(name, **kw):
    return zoo.presets.get(name, **{**SMALL, **kw})


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 3, 256, jnp.int32)


def _inputs(seed=0):
    src = _tokens(seed, (B, S))
    mask = jnp.ones((B, S), jnp.int32).at[1, 5:].set(0)
    tgt = _tokens(seed + 1, (B, L))
    return src, mask, tgt


@pytest.mark.parametrize("name", ["t5-tiny", pytest.param("t5v1.1-tiny", marks=pytest.mark.slow),
                                  pytest.param("bart-tiny", marks=pytest.mark.slow)])
def test_cached_decoding_equals_the_full_decoder(name):
    cfg = _cfg(name)
    params = zoo.init(jax.random.key(0), cfg)
    src, mask, tgt = _inputs()
    dec = encdec.shift_right(tgt, cfg.decoder_start_id)
    full = zoo.forward(params, src, dec, cfg=cfg, encoder_mask=mask)
    assert full.shape == (B, L, cfg.vocab_size) and full.dtype == jnp.float32
    state = zoo.init_state(cfg, params, src, L + 2, encoder_mask=mask)
    stepped = []
    for t in range(L):
        logits_t, state = zoo.step(params, dec[:, t], state, cfg=cfg)
        stepped.append(logits_t)
    np.testing.assert_allclose(np.stack(stepped, 1), np.asarray(full), rtol=2e-4, atol=2e-4)
    if name != "t5-tiny":  # one more compile: checked on the (slow) other variants
        # Prefill several tokens at once, then step: the same logits.
        state = zoo.init_state(cfg, params, src, L + 2, encoder_mask=mask)
        first, state = encdec.decode_jit(params, dec[:, :L - 1], state, cfg)
        last, state = zoo.step(params, dec[:, L - 1], state, cfg=cfg)
        np.testing.assert_allclose(np.concatenate([first, last[:, None]], 1), np.asarray(full), rtol=2e-4, atol=2e-4)
    # The cache holds L + 2 tokens: two more steps fill it, the next one is refused.
    for _ in range(2):
        _, state = zoo.step(params, dec[:, 0], state, cfg=cfg)
    with pytest.raises(ValueError, match="max_len"):
        zoo.step(params, dec[:, 0], state, cfg=cfg)
    # Causal decoder: later decoder tokens leave earlier logits alone; padded source tokens
    # are never read.
    changed_dec = dec.at[:, 3:].set((dec[:, 3:] + 5) % 256)
    changed_src = src.at[1, 5:].set((src[1, 5:] + 9) % 256)
    other = zoo.forward(params, changed_src, changed_dec, cfg=cfg, encoder_mask=mask)
    np.testing.assert_array_equal(np.asarray(other)[:, :3], np.asarray(full)[:, :3])
    assert not np.allclose(np.asarray(other)[:, 3:], np.asarray(full)[:, 3:])


def _rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w


def _t5_encoder_reference(params, tokens, mask, cfg):
    """T5's encoder in numpy, written out: pre-RMSNorm, unscaled scores plus one bias table for
    every layer, ReLU MLP, final RMSNorm."""
    p = jax.tree.map(np.asarray, params)
    enc = p["encoder"]
    x = p["embed"]["table_VD"][np.asarray(tokens)]
    Sn = tokens.shape[1]
    rel = np.arange(Sn)[None, :] - np.arange(Sn)[:, None]  # key - query
    buckets = np.asarray(relpos.bucket(jnp.asarray(rel), bidirectional=True, n_buckets=cfg.n_buckets,
                                       max_distance=cfg.max_distance))
    bias_HSS = np.transpose(enc["rel_bias"]["table_NH"][buckets], (2, 0, 1))
    keep = np.asarray(mask, bool)[:, None, None, :]
    for i in range(cfg.n_encoder_layers):
        blk = jax.tree.map(lambda a: a[i], enc["blocks"])
        a = blk["self_attn"]
        h = _rms(x, blk["self_attn_norm"]["scale"])
        q = np.einsum("bsd,dhk->bhsk", h, a["wq_DHK"])
        k = np.einsum("bsd,dhk->bhsk", h, a["wk_DHK"])
        v = np.einsum("bsd,dhk->bhsk", h, a["wv_DHK"])
        scores = np.einsum("bhqk,bhsk->bhqs", q, k) + bias_HSS[None]
        scores = np.where(keep, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        x = x + np.einsum("bhqs,bhsk,hkd->bqd", w, v, a["wo_HKD"])
        h = _rms(x, blk["ffn_norm"]["scale"])
        x = x + np.maximum(h @ blk["ffn"]["up"]["w"], 0) @ blk["ffn"]["down"]["w"]
    return _rms(x, enc["final_norm"]["scale"])


def test_t5_encoder_matches_a_slow_reference():
    cfg = _cfg("t5-tiny")
    params = zoo.init(jax.random.key(1), cfg)
    src, mask, tgt = _inputs(seed=2)
    got = jax.jit(lambda p: encdec.encode(p, src, cfg, mask))(params)
    want = _t5_encoder_reference(params, src, mask, cfg)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one more compile of the whole model
def test_tied_t5_logits_are_rescaled():
    """Tied T5 logits: the decoder output times d_model ** -0.5 against the embedding table."""
    cfg = _cfg("t5-tiny")
    params = zoo.init(jax.random.key(1), cfg)
    src, mask, tgt = _inputs(seed=2)
    dec = encdec.shift_right(tgt, 0)
    scaled = zoo.forward(params, src, dec, cfg=cfg, encoder_mask=mask)
    unscaled = zoo.forward(params, src, dec, cfg=dataclasses.replace(cfg, scale_tied_logits=False),
                           encoder_mask=mask)
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(unscaled) * cfg.d_model ** -0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles generation twice (with and without a stop token)
def test_greedy_generation_is_the_argmax_of_the_full_decoder():
    cfg = _cfg("t5v1.1-tiny")
    params = zoo.init(jax.random.key(3), cfg)
    src, mask, _ = _inputs(seed=4)
    out = encdec.generate(params, src, cfg, max_new_tokens=L, encoder_mask=mask)
    assert out.shape == (B, L) and out.dtype == jnp.int32
    logits = zoo.forward(params, src, encdec.shift_right(out, cfg.decoder_start_id), cfg=cfg, encoder_mask=mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.argmax(logits, -1)))
    # A stop token ends a row: -1 afterwards, the stop token itself kept.
    stop = int(out[0, 1])
    stopped = np.asarray(encdec.generate(params, src, cfg, max_new_tokens=L, encoder_mask=mask, eos_id=stop))
    np.testing.assert_array_equal(stopped[0, :2], np.asarray(out)[0, :2])
    assert np.all(stopped[0, 2:] == -1)


@pytest.mark.slow  # compiles the gradient of the encoder-decoder loss
def test_gradients_reach_every_parameter():
    cfg = _cfg("t5-tiny")
    params = zoo.init(jax.random.key(5), cfg)
    src, mask, tgt = _inputs(seed=6)
    grads = jax.jit(jax.grad(encdec.loss), static_argnums=3)(params, src, tgt, cfg, mask)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
    # One relative bias table per stack, shared by its layers (not stacked per layer).
    assert params["encoder"]["rel_bias"]["table_NH"].shape == (cfg.n_buckets, cfg.n_heads)
    assert params["decoder"]["rel_bias"]["table_NH"].shape == (cfg.n_buckets, cfg.n_heads)
    specs = zoo.param_specs(cfg)
    assert specs["decoder"]["blocks"]["cross_attn"]["wk_DHK"].logical_axes[0] == "layers"


def test_presets_and_bad_configs():
    for name, kind in (("t5-tiny", "encoder-decoder"), ("bart-tiny", "encoder-decoder")):
        assert isinstance(zoo.presets.get(name), zoo.EncDecConfig)
        assert name in zoo.presets.names(kind)
    t5 = zoo.presets.get("t5-tiny")
    assert t5.tie_embeddings and t5.activation == "relu" and t5.query_scale == 1.0
    v11 = zoo.presets.get("t5v1.1-tiny")
    assert not v11.tie_embeddings and v11.gated
    with pytest.raises(ConfigError, match="n_buckets"):
        zoo.presets.get("t5-tiny", n_buckets=0)
    with pytest.raises(ConfigError, match="n_buckets"):
        dataclasses.replace(t5, n_buckets=2)
    with pytest.raises(ConfigError, match="max_distance"):
        dataclasses.replace(t5, n_buckets=32, max_distance=4)
    with pytest.raises(ConfigError, match="decoder_start_id"):
        dataclasses.replace(t5, decoder_start_id=256)
    with pytest.raises(ConfigError, match="norm_position"):
        dataclasses.replace(t5, norm_position="sandwich")
    params = zoo.init(jax.random.key(0), _cfg("t5-tiny"))
    with pytest.raises(ValueError, match="decoder_tokens.*vocab_size"):
        zoo.forward(params, _tokens(0, (B, S)), jnp.full((B, 2), 999, jnp.int32), cfg=_cfg("t5-tiny"))
    with pytest.raises(ValueError, match="encoder_mask"):
        zoo.forward(params, _tokens(0, (B, S)), _tokens(0, (B, 2)), cfg=_cfg("t5-tiny"),
                    encoder_mask=jnp.ones((B, S + 1), jnp.int32))


@pytest.mark.slow  # compiles a train step of the encoder-decoder
@pytest.mark.parametrize("name", ["t5-tiny", "bart-tiny"])
def test_training_learns_to_copy(name):
    import optax
    cfg = _cfg(name)
    params = zoo.init(jax.random.key(7), cfg)
    opt = optax.adamw(3e-3)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, src):
        loss, grads = jax.value_and_grad(encdec.loss)(params, src, src, cfg)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    from zoo import data
    corpus = np.frombuffer(data.builtin_corpus(20_000), np.uint8).astype(np.int32)
    rng = np.random.default_rng(0)
    windows = lambda: jnp.asarray(np.stack([corpus[s:s + 12] for s in rng.integers(0, corpus.size - 12, 8)]))  # noqa: E731
    held = windows()
    before = float(encdec.loss(params, held, held, cfg))
    for _ in range(30):
        params, opt_state, _ = train_step(params, opt_state, windows())
    after = float(encdec.loss(params, held, held, cfg))
    assert after < before - 0.5, (before, after)
