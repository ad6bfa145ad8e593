"""One train step under DP, FSDP, TP and FSDP+TP on 8 simulated devices equals the single-device
step: same loss, same updated params; optimizer state placed like the params; each device holds
the share of the parameters the rules promise; the compiled step has the collectives the
strategy needs and not those it should avoid."""

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
from zoo.train import loss_fn

CFG = zoo.presets.get("llama-tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_len=16)
B, L = 8, 16


def _optimizer():
    # Linear in the gradient, so that fp32 reduction-order noise stays noise: Adam's first step
    # is lr * g / (|g| + eps), whose value flips with the sign of a gradient entry near zero.
    return optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9))


def _step(params, opt_state, inputs_BL, targets_BL):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BL, targets_BL, CFG)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = _optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (B, L + 1), 0, CFG.vocab_size, jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(scope="module")
def single():
    specs = zoo.param_specs(CFG)
    params = jax.jit(lambda k: P.init(k, specs))(jax.random.key(0))
    with jax.numpy_dtype_promotion("standard"):
        opt_state = _optimizer().init(params)
    new_params, _, loss = jax.jit(_step)(params, opt_state, *_batch())
    return params, jax.device_get(new_params), float(loss)


def sharded_step(mesh_spec, rules):
    """(compiled step, params, opt_state, inputs, targets) for this mesh and rule preset."""
    mesh = sharding.make_mesh(mesh_spec)
    specs = zoo.param_specs(CFG)
    p_shard = sharding.param_shardings(specs, mesh, rules)
    params = sharding.init_sharded(jax.random.key(0), specs, mesh, rules)
    opt_state = sharding.init_optimizer_sharded(_optimizer(), params, p_shard, mesh)
    inputs, targets = _batch()
    data = sharding.batch_sharding(mesh, rules, inputs.shape)
    inputs, targets = jax.device_put(inputs, data), jax.device_put(targets, data)
    with sharding.use_rules(mesh, rules):
        o_shard = sharding.like_params_shardings(opt_state, p_shard, mesh)
        step = jax.jit(_step, out_shardings=(p_shard, o_shard, None))
        compiled = step.lower(params, opt_state, inputs, targets).compile()
    return compiled, params, opt_state, inputs, targets, mesh


def _expected_device_bytes(specs, mesh, rules):
    total = 0
    for s in jax.tree.leaves(specs, is_leaf=P.is_spec):
        spec = sharding.spec_for(s.logical_axes, s.shape, mesh, rules)
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        total += math.prod(s.shape) * np.dtype(s.dtype).itemsize // math.prod(mesh.shape[a] for a in axes)
    return total


def _collectives(hlo: str) -> set[str]:
    """Collective ops in a compiled module, except those of the embedding lookup: a gather from a
    vocab-sharded table is resharded by the partitioner (all-to-all, collective-permute) in
    whatever way it likes, which no rule can steer."""
    found = set()
    for line in hlo.splitlines():
        m = re.search(r"\b(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?:-start)?\(", line)
        if m and "jit(_take)" not in line:
            found.add(m.group(1))
    return found


STRATEGIES = {
    # name: (mesh, rules, collectives required, collectives forbidden, max per-device share)
    "dp": ("data=8", "dp", {"all-reduce"}, {"all-gather", "reduce-scatter", "all-to-all"}, 1.0),
    "fsdp": ("fsdp=8", "fsdp", {"all-gather"}, {"all-to-all"}, 1 / 6),
    "tp": ("data=2,tensor=4", "tp", {"all-reduce"}, {"all-to-all"}, 1 / 2),
    "fsdp_tp": ("fsdp=4,tensor=2", "fsdp_tp", {"all-gather", "all-reduce"}, {"all-to-all", "collective-permute"},
                1 / 5),
    # Sequence sharding left to the partitioner (ring attention is sharding.ring_attention): the
    # residual stream is split along seq, weights over fsdp x sequence.
    "cp": ("fsdp=2,sequence=4", "cp", {"all-gather"}, set(), 1 / 6),
}


# fsdp and fsdp_tp run by default (about 14 s of CPU each); the other strategies under -m slow.
DEFAULT_STRATEGIES = ("fsdp", "fsdp_tp")


@pytest.mark.parametrize("name", [n if n in DEFAULT_STRATEGIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in STRATEGIES])
def test_sharded_train_step_matches_single_device(name, single):
    mesh_spec, rules, required, forbidden, max_share = STRATEGIES[name]
    params0, want_params, want_loss = single
    compiled, params, opt_state, inputs, targets, mesh = sharded_step(mesh_spec, rules)
    specs = zoo.param_specs(CFG)

    # Sharded init draws the same numbers as the single-device init.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params0)
    # Optimizer moments live where their parameters live.
    mu = opt_state[1][0].trace
    jax.tree.map(lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim) or pytest.fail(
        f"{name}: moment sharding {m.sharding.spec} != param sharding {p.sharding.spec}"), mu, params)
    # Each device holds exactly the share the rules promise, and the strategy saves what it should.
    held = sharding.per_device_bytes(params)
    assert held == _expected_device_bytes(specs, mesh, rules)
    assert held <= max_share * P.count(specs) * 4

    hlo = compiled.as_text()
    found = _collectives(hlo)
    assert required <= found, f"{name}: expected {required} in the compiled step, found {found}"
    assert not (forbidden & found), f"{name}: unexpected {forbidden & found} in the compiled step"
    if name == "fsdp":
        # Gradients of fsdp-sharded weights are reduced into shards (reduce-scatter, which XLA's
        # CPU pipeline may express as all-reduce + dynamic-slice): either way a reduction exists.
        assert found & {"reduce-scatter", "all-reduce"}

    new_params, new_opt_state, loss = compiled(params, opt_state, inputs, targets)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
                 new_params, want_params)
    # The updated params keep their layout (the next step compiles to the same program).
    jax.tree.map(lambda a, p: a.sharding.is_equivalent_to(p.sharding, a.ndim) or pytest.fail(
        f"{name}: updated param sharding {a.sharding.spec} != {p.sharding.spec}"), new_params, params)
    jax.tree.map(lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim) or pytest.fail(
        f"{name}: updated moment sharding {m.sharding.spec}"), new_opt_state[1][0].trace, params)


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
