"""The model API: forward vs step for every preset, scan vs unrolled, remat, compile counts,
causality, dtypes and validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers.checks import ConfigError

# Every CPU-sized preset; switch-tiny's capacity dispatch may drop tokens in forward but never
# in a one-token step, so it has its own test below.
TINY = [n for n in zoo.presets.names("decoder") if n.endswith("-tiny") and n != "switch-tiny"]
B, L = 2, 24  # longer than the tiny presets' sliding window (16)


def _tokens(cfg, seed=0, shape=(B, L)):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


# The suite compiles at XLA's backend optimisation level 0 (tests/conftest.py: compiling is most
# of its time). These two tests hold every preset's forward to its decode path at 2e-4, a bound
# set for, and checked on, the code users run: XLA's default level 3 (the rounding of the two
# differs between levels by about that much for the deepest presets).
_USER_LEVEL = {"xla_backend_optimization_level": 3}


def _as_users_compile(fn, *args):
    """fn compiled for these arguments at XLA's default optimisation level."""
    return jax.jit(fn).lower(*args).compile(compiler_options=_USER_LEVEL)


def _scaled_params(cfg, seed=0, scale=4.0):
    """Tiny random models with init 0.02 barely exercise softcaps and windows: scale up."""
    params = zoo.init(jax.random.key(seed), cfg)
    return jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, params)


def test_presets_listed():
    names = zoo.presets.names()
    for n in ("gpt2-tiny", "llama-tiny", "mistral-tiny", "gemma2-tiny"):
        assert n in names


def test_windowed_layers_decode_from_a_ring_of_their_window():
    """Mistral's every layer and Gemma 2's local layers keep `sliding_window` slots whatever the
    context; Gemma 2's global layers keep the whole context."""
    mistral = zoo.init_state(zoo.presets.get("mistral-tiny"), 1, 64)
    assert mistral["blocks"][0]["mixer"]["k_BTGK"].shape[2] == 16
    local, global_ = zoo.init_state(zoo.presets.get("gemma2-tiny"), 1, 64)["blocks"]
    assert local["mixer"]["k_BTGK"].shape[2] == 16 and global_["mixer"]["k_BTGK"].shape[2] == 64


@pytest.mark.parametrize("name", TINY)
def test_forward_equals_step_by_step_and_is_causal(name):
    cfg = zoo.presets.get(name)
    params = _scaled_params(cfg)
    tokens = _tokens(cfg)
    forward = _as_users_compile(lambda p, x: zoo.forward(p, x, cfg=cfg), params, tokens)
    logits = forward(params, tokens)
    assert logits.shape == (B, L, cfg.vocab_size) and logits.dtype == jnp.float32
    state = zoo.init_state(cfg, B, L)
    step = _as_users_compile(lambda p, x, s: zoo.step(p, x, s, cfg=cfg), params, tokens[:, 0], state)
    steps = []
    for t in range(L):
        lt, state = step(params, tokens[:, t], state)
        steps.append(lt)
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(logits), rtol=2e-4, atol=2e-4)
    # Causality end to end (same executable): future tokens leave past logits alone.
    t = 9
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
    other = forward(params, changed)
    np.testing.assert_array_equal(np.asarray(other[:, : t + 1]), np.asarray(logits[:, : t + 1]))
    assert not np.allclose(np.asarray(other[:, t + 1:]), np.asarray(logits[:, t + 1:]))


@pytest.mark.parametrize("name", ["llama-tiny", "gemma2-tiny"])
def test_prefill_then_decode_equals_forward(name):
    cfg = zoo.presets.get(name)
    params = _scaled_params(cfg, seed=1)
    tokens = _tokens(cfg, seed=1)
    logits = _as_users_compile(lambda p, x: zoo.forward(p, x, cfg=cfg), params, tokens)(params, tokens)
    state = zoo.init_state(cfg, B, L + 4)
    prefill = lambda p, x, s: zoo.forward(p, x, cfg=cfg, state=s)  # noqa: E731
    first, state = _as_users_compile(prefill, params, tokens[:, :17], state)(params, tokens[:, :17], state)
    rest, state = _as_users_compile(prefill, params, tokens[:, 17:], state)(params, tokens[:, 17:], state)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), np.asarray(logits), rtol=2e-4, atol=2e-4)


def test_step_compiles_once_for_32_tokens():
    cfg = zoo.presets.get("llama-tiny", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    params = zoo.init(jax.random.key(0), cfg)
    state = zoo.init_state(cfg, 1, 32)
    before = zoo.model._step_jit._cache_size()
    tokens = _tokens(cfg, shape=(1, 32))
    for t in range(32):
        _, state = zoo.step(params, tokens[:, t], state, cfg=cfg)
    assert zoo.model._step_jit._cache_size() - before == 1


@pytest.mark.parametrize("name", ["gpt2-tiny", "gemma2-tiny"])
def test_scan_and_unrolled_layers_agree(name):
    cfg = zoo.presets.get(name, n_layers=4)
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    params = _scaled_params(cfg, seed=2)
    tokens = _tokens(cfg, seed=2)
    np.testing.assert_allclose(np.asarray(zoo.forward(params, tokens, cfg=unrolled)),
                               np.asarray(zoo.forward(params, tokens, cfg=cfg)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
    base = zoo.presets.get("llama-tiny", n_layers=2)
    params = zoo.init(jax.random.key(3), base)
    tokens = _tokens(base, seed=3)

    def grads(cfg):
        def loss(p):
            logits = zoo.model._forward(p, tokens, cfg)[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
                logits, tokens[..., None], -1)[..., 0])
        return jax.jit(jax.grad(loss))(params)

    want = grads(base)
    for policy in ("full", "dots_saveable", "nothing_saveable", "dots_with_no_batch_dims_saveable"):
        got = grads(dataclasses.replace(base, remat=policy))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-tiny", "gemma2-tiny"])
def test_causality_gradient_through_the_block_stack(name):
    """d output[t] / d input[s] is exactly zero for s > t, and non-zero for s <= t."""
    cfg = zoo.presets.get(name)
    params = zoo.init(jax.random.key(4), cfg)
    x_BLD = jax.random.normal(jax.random.key(5), (B, L, cfg.d_model))
    pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    t = 9

    def out_t(x):
        y, _, _ = zoo.model.run_blocks(params["blocks"], x, cfg, None, pos_BL, None)
        return jnp.sum(y[:, t])

    g = np.asarray(jax.grad(out_t)(x_BLD))
    assert np.all(g[:, t + 1:] == 0.0)
    assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0)


def test_bf16_compute_close_to_fp32():
    cfg = zoo.presets.get("llama-tiny")
    params = zoo.init(jax.random.key(5), cfg)
    tokens = _tokens(cfg, seed=5)
    l32 = zoo.forward(params, tokens, cfg=cfg)
    l16 = zoo.forward(params, tokens, cfg=dataclasses.replace(cfg, dtype="bfloat16"))
    assert l16.dtype == jnp.float32  # logits stay fp32 for the loss
    np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), rtol=0.05, atol=0.05)


def test_param_specs_match_params_and_carry_logical_axes():
    cfg = zoo.presets.get("gemma2-tiny")
    specs = zoo.param_specs(cfg)
    params = zoo.init(jax.random.key(0), cfg)
    from layers import params as P
    abstract = P.abstract(specs)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)):
        assert a.shape == p.shape and a.dtype == p.dtype
    for spec in jax.tree.leaves(specs, is_leaf=P.is_spec):
        assert len(spec.logical_axes) == len(spec.shape)
        assert all(isinstance(a, str) for a in spec.logical_axes)
    # Stacked block params lead with the layers axis.
    wq = specs["blocks"][0]["mixer"]["wq_DHK"]
    assert wq.logical_axes == ("layers", "embed", "heads", "head_dim") and wq.shape[0] == cfg.n_repeats


def test_real_preset_shapes_without_memory():
    specs = zoo.param_specs(zoo.presets.get("llama3-8b"))
    from layers import params as P
    n = P.count(specs)
    assert 7.5e9 < n < 8.5e9, n


@pytest.mark.parametrize("override, field", [
    (dict(n_heads=3), "n_heads"),           # 64 not divisible by 3
    (dict(n_kv_heads=3), "n_kv_heads"),     # does not divide 4 heads
    (dict(sliding_window=0), "sliding_window"),
    (dict(n_layers=0), "n_layers"),
    (dict(remat="sometimes"), "remat"),
    (dict(dtype="float8"), "dtype"),
])
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        zoo.presets.get("mistral-tiny", **override)


def test_gemma_pattern_needs_even_layers():
    with pytest.raises(ConfigError, match="n_layers=3"):
        zoo.presets.get("gemma2-tiny", n_layers=3)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="no-such-model"):
        zoo.presets.get("no-such-model")
    with pytest.raises(ValueError, match="n_experts"):
        zoo.presets.get("llama-tiny", n_experts=4)


def test_bad_tokens_are_rejected_with_clear_errors():
    cfg = zoo.presets.get("llama-tiny")
    params = zoo.init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"tokens.*vocab_size=256.*\[300, 300\]"):
        zoo.forward(params, jnp.full((1, 4), 300, jnp.int32), cfg=cfg)
    with pytest.raises(ValueError, match="rank 2"):
        zoo.forward(params, jnp.zeros((4,), jnp.int32), cfg=cfg)
    with pytest.raises(TypeError, match="integer"):
        zoo.forward(params, jnp.zeros((1, 4), jnp.float32), cfg=cfg)
    state = zoo.init_state(cfg, 1, 4)
    with pytest.raises(ValueError, match="tokens.*-1"):
        zoo.step(params, jnp.array([-1], jnp.int32), state, cfg=cfg)
    with pytest.raises(TypeError, match="cfg"):
        zoo.forward(params, jnp.zeros((1, 4), jnp.int32), cfg={"d_model": 64})


def test_full_cache_is_refused():
    cfg = zoo.presets.get("llama-tiny")
    params = zoo.init(jax.random.key(0), cfg)
    state = zoo.init_state(cfg, 1, 3)
    _, state = zoo.forward(params, jnp.ones((1, 3), jnp.int32), cfg=cfg, state=state)
    with pytest.raises(ValueError, match="max_len"):
        zoo.step(params, jnp.ones((1,), jnp.int32), state, cfg=cfg)


def test_moe_aux_outputs_and_training_loss():
    from zoo import train
    cfg = zoo.presets.get("switch-tiny")
    params = zoo.init(jax.random.key(6), cfg)
    tokens = _tokens(cfg, seed=6)
    logits, aux = zoo.forward(params, tokens, cfg=cfg, return_aux=True)
    ffn_aux = aux["blocks"][0]["ffn"]
    # One entry per layer; every token routed to exactly one expert (top-1).
    assert ffn_aux["tokens_per_expert"].shape == (cfg.n_layers, 8)
    assert np.all(np.asarray(ffn_aux["tokens_per_expert"]).sum(-1) == B * L)
    moe_cfg = cfg.pattern[0].ffn
    want_aux = float(jnp.sum(moe_cfg.load_balance_weight * ffn_aux["load_balance_loss"]
                             + moe_cfg.router_z_weight * ffn_aux["router_z_loss"]))
    assert want_aux > 0
    np.testing.assert_allclose(float(zoo.model.aux_loss(cfg, aux)), want_aux, rtol=1e-6)
    ce = float(jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]))
    np.testing.assert_allclose(float(train.loss_fn(params, tokens, tokens, cfg)), ce + want_aux, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY + ["switch-tiny"])
def test_every_preset_trains(name):
    """A few optimizer steps on the built-in corpus lower the loss for every preset."""
    from zoo import data, train
    cfg = zoo.presets.get(name)
    tcfg = train.TrainConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=100)
    _, history = train.train(cfg, tcfg, data=data.builtin_corpus(200_000), print_fn=lambda s: None)
    assert np.all(np.isfinite(history)) and np.mean(history[-3:]) < history[0]


def test_impl_override_reaches_only_mixers_that_have_one():
    cfg = zoo.presets.get("hybrid-tiny", impl="reference")
    assert [getattr(b.mixer, "impl", None) for b in cfg.pattern] == [None, None, "reference", None]


# ------------------------------------------------------------------ prefix blocks (first_k_dense)


def test_first_k_dense_preset_structure():
    """deepseek-tiny: one dense-FFN block (unscanned prefix), then two scanned MoE blocks
    (forward == step for it runs in test_forward_equals_step_by_step_and_is_causal)."""
    from layers import params as P
    cfg = zoo.presets.get("deepseek-tiny")
    assert len(cfg.prefix) == 1 and cfg.n_layers == 3 and cfg.n_repeats == 2
    assert type(cfg.prefix[0].ffn).__name__ == "MLPConfig" and type(cfg.pattern[0].ffn).__name__ == "MoEConfig"
    specs = zoo.param_specs(cfg)
    assert specs["prefix"][0]["ffn"]["up"]["w"].shape == (cfg.d_model, 128)  # dense, not stacked
    assert specs["blocks"][0]["ffn"]["experts"]["up_EDF"].shape[0] == 2  # stacked over repeats
    assert all("layers" not in s.logical_axes for s in jax.tree.leaves(specs["prefix"], is_leaf=P.is_spec))
    state = jax.eval_shape(lambda: zoo.init_state(cfg, B, 16))
    assert state["prefix"][0]["mixer"].keys() == state["blocks"][0]["mixer"].keys()
    # Sharding rules place prefix parameters like any other (no layers axis to skip).
    from sharding import rules
    mesh = rules.make_mesh({"fsdp": -1})
    shard = rules.param_shardings(specs, mesh, rules.PRESETS["fsdp"])
    assert shard["prefix"][0]["ffn"]["up"]["w"].spec[0] == "fsdp"


def _prefixed_cfg(**kw):
    """An attention + MoE prefix block before scanned minGRU blocks (which keep no KV cache)."""
    from layers.attention import AttentionConfig
    from layers.mingru import MinGRUConfig
    from layers.mlp import MLPConfig
    from layers.moe import MoEConfig
    D = 32
    moe = MoEConfig(d_model=D, d_ff=32, n_experts=4, top_k=2, load_balance_weight=0.1, router_z_weight=0.01)
    first = zoo.BlockConfig(mixer=AttentionConfig(d_model=D, n_heads=2), ffn=moe)
    rest = zoo.BlockConfig(mixer=MinGRUConfig(d_model=D, expand=1.0, conv_width=None, chunk_size=None),
                           ffn=MLPConfig(d_model=D, d_ff=48))
    return zoo.ModelConfig(vocab_size=64, d_model=D, n_layers=3, prefix=(first,), pattern=(rest,), max_len=32, **kw)


@pytest.mark.slow  # one more compile of the model; forward == step runs by default below
def test_prefix_model_equals_manual_composition():
    from layers import embed, norms
    from zoo import blocks
    cfg = _prefixed_cfg()
    params = _scaled_params(cfg, seed=8, scale=2.0)
    tokens = _tokens(cfg, seed=8, shape=(B, 10))
    logits = zoo.forward(params, tokens, cfg=cfg)
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (B, 10))

    @jax.jit
    def manual(params):
        x = embed.embed(params["embed"], tokens)
        x, _, _ = blocks.forward(params["prefix"][0], x, cfg=cfg.prefix[0], positions=pos)
        for i in range(cfg.n_repeats):
            x, _, _ = blocks.forward(jax.tree.map(lambda a: a[i], params["blocks"][0]), x, cfg=cfg.pattern[0],
                                     positions=pos)
        return embed.unembed(params["embed"], norms.forward(params["final_norm"], x, cfg=cfg.final_norm))

    np.testing.assert_allclose(np.asarray(logits), np.asarray(manual(params)), rtol=1e-5, atol=1e-5)


def test_prefix_decodes_like_forward_and_its_cache_and_aux_are_seen():
    cfg = _prefixed_cfg()
    params = _scaled_params(cfg, seed=8, scale=2.0)
    tokens = _tokens(cfg, seed=8, shape=(B, 10))
    logits, aux = zoo.forward(params, tokens, cfg=cfg, return_aux=True)
    state = zoo.init_state(cfg, B, 10)
    stepped = []
    for t in range(10):
        lt, state = zoo.step(params, tokens[:, t], state, cfg=cfg)
        stepped.append(lt)
    np.testing.assert_allclose(np.stack(stepped, 1), np.asarray(logits), rtol=2e-4, atol=2e-4)
    # The only KV cache lives in the prefix: the room check must find it there.
    with pytest.raises(ValueError, match="max_len"):
        zoo.step(params, tokens[:, 0], state, cfg=cfg)
    # aux_loss includes the prefix's MoE losses.
    moe_aux = aux["prefix"][0]["ffn"]
    want = 0.1 * moe_aux["load_balance_loss"] + 0.01 * moe_aux["router_z_loss"]
    assert float(want) > 0
    np.testing.assert_allclose(float(zoo.model.aux_loss(cfg, aux)), float(want), rtol=1e-6)
    # Beam search reorders prefix states along their batch axis (0: not stacked over layers).
    from zoo import beam
    axes = beam.state_batch_axes(state)
    assert set(jax.tree.leaves(axes["prefix"])) == {0}


def test_prefix_config_validation():
    with pytest.raises(ConfigError, match=r"n_layers=1 must be len\(prefix\)=1 plus a positive multiple"):
        dataclasses.replace(_prefixed_cfg(), n_layers=1)
    with pytest.raises(ConfigError, match=r"prefix\[0\].mixer.d_model"):
        cfg = zoo.presets.get("deepseek-tiny")
        dataclasses.replace(cfg, prefix=(zoo.presets.get("llama-tiny", d_model=32).pattern[0],))
    assert zoo.presets.get("deepseek-tiny", first_k_dense=0, n_layers=2).prefix == ()


def test_model_api_dispatches_on_the_config_type():
    with pytest.raises(TypeError, match=r"cfg: expected a zoo model config \(EncDecConfig, EncoderConfig, ModelConfig"):
        zoo.param_specs({"d_model": 64})
    assert zoo.presets.kind_of("llama-tiny") == "decoder"
    assert set(zoo.presets.names()) == set().union(*(zoo.presets.names(k) for k in zoo.presets.KINDS))
