"""One train step under DP, FSDP, TP, FSDP+TP, EP and CP on 8 simulated devices equals the
single-device step: same loss, same updated params; optimizer state placed like the params; each
device holds the share of the parameters the rules promise; the compiled step has the
collectives the strategy needs and not those it should avoid.

One small hybrid model serves every strategy but ep, so its single-device baseline is compiled
once: a Llama block (GQA attention, RoPE, SwiGLU) then a GLA block. Under cp its attention is
ring attention and its GLA scan the context-parallel scan (sharding.ring_attention,
sharding.context_scan), dispatched by the layers themselves. Expert parallelism trains a
one-block Mixtral (4 experts), against its own baseline; its layer-level checks (both dispatches,
balance statistics) are in tests/sharding/test_expert_parallel.py.
Compiles use XLA's backend optimisation level 0: the partitioned HLO (what these tests read) is
the same, the CPU code generation several seconds cheaper.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import sharding
import zoo
from layers import params as P
from layers.gla import GLAConfig
from zoo.train import loss_fn

B, L = 8, 24  # L: a multiple of 2 x the sequence axis (zigzag), and no parameter dimension is 24
_LLAMA = zoo.presets.get("llama-tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_len=L)
CFG = dataclasses.replace(_LLAMA, pattern=_LLAMA.pattern + (dataclasses.replace(
    _LLAMA.pattern[0], mixer=GLAConfig(d_model=32, n_heads=4, chunk_size=4)),))
# Expert parallelism needs experts: one Mixtral block (attention, then a MoE of 4 experts that ep
# splits over the expert axis). A model of its own, because under the other presets a dropless
# MoE's global sort of the tokens gathers the batch (an all-gather that dp must not have).
MOE_CFG = zoo.presets.get("mixtral-tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_len=L,
                          moe=dict(d_ff=16, n_experts=4, top_k=2, load_balance_weight=0.02,
                                   expert_parallel_axis="expert"))
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _optimizer():
    # Linear in the gradient, so that fp32 reduction-order noise stays noise: Adam's first step
    # is lr * g / (|g| + eps), whose value flips with the sign of a gradient entry near zero.
    # The learning rate keeps lr x (reduction-order noise of the gradient) under the comparison's
    # atol: the embedding's gradient (entries up to ~0.3, embeddings start at std 1) moves by
    # ~5e-6 when only the order of the batch sum changes (two half-batch gradients averaged).
    return optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))


def _step(params, opt_state, inputs_BL, targets_BL, segment_ids_BL, *, cfg):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BL, targets_BL, cfg, segment_ids=segment_ids_BL)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = _optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (B, L + 1), 0, CFG.vocab_size, jnp.int32)
    # Packed rows: documents cross the sequence devices' block edges (cp: 4 blocks of 6 tokens).
    seg = jnp.asarray([[1] * 5 + [2] * 11 + [3] * 8, [1] * L] * (B // 2), jnp.int32)
    return tokens[:, :-1], tokens[:, 1:], seg


MODELS = {"hybrid": CFG, "moe": MOE_CFG}


@pytest.fixture(scope="module")
def single():
    """model name -> (params, params after one single-device step, loss); each model's baseline
    is compiled once, by the first strategy that needs it."""
    cache = {}

    def baseline(model):
        if model not in cache:
            cfg = MODELS[model]
            specs = zoo.param_specs(cfg)
            params = jax.jit(lambda k: P.init(k, specs)).lower(jax.random.key(0)).compile(FAST_COMPILE)(
                jax.random.key(0))
            with jax.numpy_dtype_promotion("standard"):
                opt_state = _optimizer().init(params)
            step = jax.jit(functools.partial(_step, cfg=cfg)).lower(params, opt_state, *_batch()).compile(FAST_COMPILE)
            new_params, _, loss = step(params, opt_state, *_batch())
            cache[model] = params, jax.device_get(new_params), float(loss)
        return cache[model]

    return baseline


def sharded_step(cfg, mesh_spec, rules, params0):
    """(compiled step, params, opt_state, batch, mesh) for this model, mesh and rule preset, with
    the baseline's `params0` placed by the rules (test_init_sharded_draws_the_single_device_numbers
    covers initialising directly sharded)."""
    mesh = sharding.make_mesh(mesh_spec)
    specs = zoo.param_specs(cfg)
    p_shard = sharding.param_shardings(specs, mesh, rules)
    params = jax.device_put(params0, p_shard)
    opt_state = sharding.init_optimizer_sharded(_optimizer(), params, p_shard, mesh)
    data = sharding.batch_sharding(mesh, rules, (B, L))
    batch = tuple(jax.device_put(a, data) for a in _batch())
    with sharding.use_rules(mesh, rules):
        o_shard = sharding.like_params_shardings(opt_state, p_shard, mesh)
        step = jax.jit(functools.partial(_step, cfg=cfg), out_shardings=(p_shard, o_shard, None))
        compiled = step.lower(params, opt_state, *batch).compile(FAST_COMPILE)
    return compiled, params, opt_state, batch, mesh


def _expected_device_bytes(specs, mesh, rules):
    total = 0
    for s in jax.tree.leaves(specs, is_leaf=P.is_spec):
        spec = sharding.spec_for(s.logical_axes, s.shape, mesh, rules)
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        total += math.prod(s.shape) * np.dtype(s.dtype).itemsize // math.prod(mesh.shape[a] for a in axes)
    return total


_COLLECTIVE = re.compile(r"\b(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?:-start)?\(")


def _collectives(hlo: str) -> set[str]:
    """Collective ops in a compiled module, except those of the embedding lookup: a gather from a
    vocab-sharded table is resharded by the partitioner (all-to-all, collective-permute) in
    whatever way it likes, which no rule can steer."""
    found = set()
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m and "jit(_take)" not in line:
            found.add(m.group(1))
    return found


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The result shapes of every all-gather in a compiled module."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]
    return shapes


STRATEGIES = {
    # name: (model, mesh, rules, collectives required, collectives forbidden, max per-device share)
    "dp": ("hybrid", "data=8", "dp", {"all-reduce"}, {"all-gather", "reduce-scatter", "all-to-all"}, 1.0),
    "fsdp": ("hybrid", "fsdp=8", "fsdp", {"all-gather"}, {"all-to-all"}, 1 / 4),
    "tp": ("hybrid", "data=2,tensor=4", "tp", {"all-reduce"}, {"all-to-all"}, 1 / 2),
    "fsdp_tp": ("hybrid", "fsdp=4,tensor=2", "fsdp_tp", {"all-gather", "all-reduce"}, {"all-to-all"}, 1 / 4),
    # Tokens travel to their experts' devices and back by all-to-all (see the test); the rest of
    # the model is fsdp over the other axis, the experts a quarter per device.
    "ep": ("moe", "fsdp=2,expert=4", "ep", {"all-to-all", "all-gather"}, set(), 1 / 2),
    # Ring attention rotates K/V blocks (collective-permute), weights are split over fsdp x
    # sequence and gathered per layer; the sequence itself is never gathered (see the test).
    "cp": ("hybrid", "fsdp=2,sequence=4", "cp", {"collective-permute", "all-gather"}, set(), 1 / 4),
}


# Every strategy runs by default (about 4-8 s of CPU each, plus the two baselines): each rule
# table is what a user trains with, so each gets its own equivalence check in CI.
DEFAULT_STRATEGIES = tuple(STRATEGIES)


@pytest.mark.parametrize("name", [n if n in DEFAULT_STRATEGIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in STRATEGIES])
def test_sharded_train_step_matches_single_device(name, single):
    model, mesh_spec, rules, required, forbidden, max_share = STRATEGIES[name]
    cfg = MODELS[model]
    params0, want_params, want_loss = single(model)
    compiled, params, opt_state, batch, mesh = sharded_step(cfg, mesh_spec, rules, params0)
    specs = zoo.param_specs(cfg)

    # Optimizer moments live where their parameters live.
    mu = opt_state[1][0].trace
    jax.tree.map(lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim) or pytest.fail(
        f"{name}: moment sharding {m.sharding.spec} != param sharding {p.sharding.spec}"), mu, params)
    # Each device holds exactly the share the rules promise, and the strategy saves what it should.
    held = sharding.per_device_bytes(params)
    assert held == _expected_device_bytes(specs, mesh, rules)
    assert held <= max_share * P.count(specs) * 4, (name, held / (P.count(specs) * 4))

    hlo = compiled.as_text()
    found = _collectives(hlo)
    assert required <= found, f"{name}: expected {required} in the compiled step, found {found}"
    assert not (forbidden & found), f"{name}: unexpected {forbidden & found} in the compiled step"
    if name == "fsdp":
        # Gradients of fsdp-sharded weights are reduced into shards (reduce-scatter, which XLA's
        # CPU pipeline may express as all-reduce + dynamic-slice): either way a reduction exists.
        assert found & {"reduce-scatter", "all-reduce"}
    if name == "cp":
        # Activations stay split along the sequence: no all-gather result has a dimension of the
        # full length L (what gathers are there: weights, and the scans' [B, H, K, V] states).
        gathered = _all_gather_shapes(hlo)
        assert gathered and not [s for s in gathered if L in s], gathered
        # The permutes are ring attention's (its shard_map's ppermute of K/V blocks inside the
        # round loop), not only the partitioner's own.
        assert re.search(r"collective-permute(?:-start)?\(.*op_name=\"[^\"]*shard_map/while/body/[^\"]*ppermute",
                         hlo)
    if name == "ep":
        # The all-to-alls are the MoE's token exchange (its shard_map), not the partitioner's.
        assert re.search(r"all-to-all(?:-start)?\(.*op_name=\"[^\"]*shard_map/[^\"]*all_to_all", hlo)
        # Each device holds a quarter of the experts.
        up = params["blocks"][0]["ffn"]["experts"]["up_EDF"]
        assert up.addressable_shards[0].data.shape[1] == cfg.pattern[0].ffn.n_experts // 4

    new_params, new_opt_state, loss = compiled(params, opt_state, *batch)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
                 new_params, want_params)
    # The updated params keep their layout (the next step compiles to the same program).
    jax.tree.map(lambda a, p: a.sharding.is_equivalent_to(p.sharding, a.ndim) or pytest.fail(
        f"{name}: updated param sharding {a.sharding.spec} != {p.sharding.spec}"), new_params, params)
    jax.tree.map(lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim) or pytest.fail(
        f"{name}: updated moment sharding {m.sharding.spec}"), new_opt_state[1][0].trace, params)


@pytest.mark.parametrize("mesh_spec, rules, part", [
    ("fsdp=4,tensor=2", "fsdp_tp", lambda: zoo.param_specs(CFG)["embed"]),
    ("fsdp=2,expert=4", "ep", lambda: zoo.param_specs(MOE_CFG)["blocks"][0]["ffn"]["experts"]),
], ids=["fsdp_tp_embed", "ep_experts"])
def test_init_sharded_draws_the_single_device_numbers(mesh_spec, rules, part):
    # Part of a model (a compile of the whole initialiser costs ~7 s of CPU), materialised shard
    # by shard: the same numbers, in the promised layout (the experts a quarter per device).
    specs = part()
    mesh = sharding.make_mesh(mesh_spec)
    got = sharding.init_sharded(jax.random.key(0), specs, mesh, rules)
    want = jax.jit(lambda k: P.init(k, specs))(jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f"{a.sharding.spec} != {s.spec}"),
                 got, sharding.param_shardings(specs, mesh, rules))
    assert sharding.per_device_bytes(got) == _expected_device_bytes(specs, mesh, rules)


def test_constrain_is_identity_without_rules_and_places_with_them():
    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    assert sharding.constrain(x, ("batch", "seq", "embed")) is x
    mesh = sharding.make_mesh("data=4,tensor=2")
    with sharding.use_rules(mesh, "tp"):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "seq", "heads")))(x)
    assert y.sharding.spec == PartitionSpec("data", None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    with pytest.raises(ValueError, match="names 2 dimensions"):
        with sharding.use_rules(mesh, "tp"):
            sharding.constrain(x, ("batch", "seq"))
    assert sharding.active() is None
    assert isinstance(sharding.batch_sharding(mesh, "tp", (8, 4)), NamedSharding)
