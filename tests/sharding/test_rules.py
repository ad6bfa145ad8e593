"""Logical-axis rules shard a model over 8 simulated devices with unchanged numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import zoo
from layers import params as P
from sharding import PRESETS, make_mesh, param_shardings, spec_for


def test_spec_for_maps_and_avoids_collisions():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = PRESETS["fsdp_tp"]
    assert spec_for(("embed", "heads", "head_dim"), (64, 4, 16), mesh, rules) == PartitionSpec("fsdp", "tensor", None)
    # Two logical axes that map to one mesh axis: the second stays replicated.
    assert spec_for(("heads", "mlp"), (4, 8), mesh, rules) == PartitionSpec("tensor", None)
    # A dimension the mesh axis does not divide stays replicated.
    assert spec_for(("kv_heads",), (1,), mesh, rules) == PartitionSpec(None)


def test_make_mesh_fills_and_checks():
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "tensor": 2}
    with pytest.raises(ValueError, match="need 6 devices"):
        make_mesh({"data": 3, "tensor": 2})


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_sharded_init_and_forward_match_single_device(preset):
    cfg = zoo.presets.get("llama-tiny")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = zoo.param_specs(cfg)
    shardings = param_shardings(specs, mesh, PRESETS[preset])
    key = jax.random.key(0)
    # Initialised directly into the sharded layout: no full copy on one device.
    params = jax.jit(lambda k: P.init(k, specs), out_shardings=shardings)(key)
    wq = params["blocks"][0]["mixer"]["wq_DHK"]
    assert wq.sharding.spec == shardings["blocks"][0]["mixer"]["wq_DHK"].spec
    assert len({str(s.index) for s in wq.addressable_shards}) > 1
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size, jnp.int32)
    tokens_sharded = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    logits = zoo.forward(params, tokens_sharded, cfg=cfg)
    single = zoo.forward(jax.device_get(params), tokens, cfg=cfg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single), rtol=1e-5, atol=1e-5)
