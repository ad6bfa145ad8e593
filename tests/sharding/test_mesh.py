"""Mesh specs, hybrid (DCN x ICI) meshes, the distributed no-op, rule coverage, golden placements
for two presets, and a checkpoint restored onto a different mesh."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import sharding
import zoo
import zoo.presets
from layers import params as P
from sharding import distributed
from zoo import checkpoint

GOLDEN = pathlib.Path(__file__).parent / "golden"


def test_parse_mesh_spec_strings_and_dicts():
    assert sharding.parse_mesh_spec("data=2, fsdp=-1,tensor=2") == {"data": 2, "fsdp": -1, "tensor": 2}
    assert sharding.parse_mesh_spec({"expert": 4}) == {"expert": 4}
    for bad, msg in [("data", "'name=size'"), ("data=x", "expected an integer, got 'x'"),
                     ("data=0", "positive integer or -1"), ("data=-1,fsdp=-1", "at most one axis may be -1"),
                     ("data=2,data=2", "appears twice"), ("", "at least one axis"), ("2d=2", "identifiers")]:
        with pytest.raises(ValueError, match=msg):
            sharding.parse_mesh_spec(bad)
    with pytest.raises(TypeError, match="expected a string"):
        sharding.parse_mesh_spec(["data"])
    mesh = sharding.make_mesh("data=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 4, "tensor": 2} and sharding.describe(mesh) == "data=4,tensor=2"
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.make_mesh("data=3,tensor=-1")


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_hybrid_mesh_keeps_dcn_axis_outermost():
    # 2 slices x 4 devices; data has a DCN part of 2, so its outer stride crosses slices while
    # fsdp and tensor stay inside one slice.
    devices = [FakeDevice(i, i // 4, i // 4) for i in range(8)]
    mesh = sharding.make_mesh("data=1,fsdp=2,tensor=2", devices, dcn="data=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    grid = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (grid[0] == 0).all() and (grid[1] == 1).all()
    # An axis named only in dcn is added, outermost; -1 there fills the slice count.
    mesh = sharding.make_mesh("fsdp=4", devices, dcn="replica=-1")
    assert tuple(mesh.axis_names) == ("replica", "fsdp") and mesh.shape["replica"] == 2
    with pytest.raises(ValueError, match="need 8 devices"):
        sharding.make_mesh("fsdp=8", devices, dcn="data=2")


def test_distributed_initialize_is_a_noop_for_one_process(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert distributed.initialize("localhost:1234", 1, 0) is False
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("localhost:1234", 2)
    with pytest.raises(ValueError, match="'host:port'"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"process_id: expected an integer in \[0, 2\)"):
        distributed.initialize("localhost:1", 2, 2)
    assert distributed.is_coordinator()


def test_every_logical_axis_in_the_zoo_is_known_and_rules_validate():
    names = set()
    for preset in zoo.presets.names():
        cfg = zoo.presets.get(preset)
        for spec in jax.tree.leaves(zoo.param_specs(cfg), is_leaf=P.is_spec):
            names.update(a for a in spec.logical_axes if a is not None)
    assert names <= set(sharding.LOGICAL_AXES), sorted(names - set(sharding.LOGICAL_AXES))
    mesh = sharding.make_mesh("data=2,expert=2,sequence=2")
    assert sharding.spec_for(("expert", "embed", "mlp"), (4, 8, 8), mesh, "ep") == PartitionSpec("expert", None, None)
    assert sharding.spec_for(("batch", "seq", "embed"), (4, 8, 8), mesh, "cp") == PartitionSpec("data", "sequence",
                                                                                                  None)
    with pytest.raises(ValueError, match="unknown preset 'zero'"):
        sharding.get_rules("zero")
    with pytest.raises(ValueError, match="two rules"):
        sharding.get_rules((("embed", "fsdp"), ("embed", "tensor")))


def _spec_table(preset, mesh_spec, rules):
    mesh = sharding.make_mesh(mesh_spec)
    specs = zoo.param_specs(zoo.presets.get(preset))
    flat = jax.tree_util.tree_flatten_with_path(sharding.param_partition_specs(specs, mesh, rules),
                                                is_leaf=lambda s: isinstance(s, PartitionSpec))[0]
    return {checkpoint._path_str(path): str(tuple(spec)) for path, spec in flat}


GOLDEN_CASES = [("llama-tiny", "data=2,fsdp=2,tensor=2", "fsdp_tp"), ("mixtral-tiny", "data=2,expert=4", "ep")]


@pytest.mark.parametrize("preset,mesh_spec,rules", GOLDEN_CASES)
def test_golden_placements(preset, mesh_spec, rules):
    """An accidental change in where a parameter goes fails here. After an intended change,
    regenerate with: python tests/sharding/test_mesh.py"""
    want = json.loads((GOLDEN / f"{preset}_{rules}.json").read_text())
    assert want["mesh"] == mesh_spec
    assert _spec_table(preset, mesh_spec, rules) == want["specs"]


@pytest.mark.slow  # orbax save + restore of a sharded model: ~10 s of CPU
def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    cfg = zoo.presets.get("llama-tiny", vocab_size=64, d_model=32, n_layers=2, d_ff=64)
    specs = zoo.param_specs(cfg)
    saved_mesh = sharding.make_mesh("fsdp=8")
    params = sharding.init_sharded(jax.random.key(0), specs, saved_mesh, "fsdp")
    opt_state = {"m": jax.tree.map(lambda a: a * 2, params)}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state)
    # Restore onto a 4 x 2 FSDP x TP mesh: arrays load straight into the new layout.
    new_mesh = sharding.make_mesh("fsdp=4,tensor=2")
    shardings = sharding.param_shardings(specs, new_mesh, "fsdp_tp")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), P.abstract(specs), shardings)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        got, got_opt, _ = ckpt.restore(params_target=target, opt_state_target={"m": target})
    wq = got["blocks"][0]["mixer"]["wq_DHK"]
    assert wq.sharding.spec == shardings["blocks"][0]["mixer"]["wq_DHK"].spec == PartitionSpec(
        None, "fsdp", "tensor", None)  # leading: the stacked layers
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), 2 * np.asarray(b)), got_opt["m"], params)


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for preset, mesh_spec, rules in GOLDEN_CASES:
        (GOLDEN / f"{preset}_{rules}.json").write_text(
            json.dumps({"mesh": mesh_spec, "specs": _spec_table(preset, mesh_spec, rules)}, indent=1) + "\n")


def test_cli_flags_build_mesh_and_rules(capsys):
    import argparse

    from sharding import cli

    parser = argparse.ArgumentParser()
    cli.add_flags(parser)
    mesh, rules = cli.setup(parser.parse_args(["--mesh", "fsdp=4,tensor=-1"]), parser)
    assert dict(mesh.shape) == {"fsdp": 4, "tensor": 2} and rules == "fsdp_tp"
    mesh, rules = cli.setup(parser.parse_args(["--mesh", "expert=8", "--rules", "ep"]), parser)
    assert rules == "ep"
    assert cli.setup(parser.parse_args([]), parser) == (None, None)
    for argv, msg in [(["--mesh", "data=3"], "--mesh: mesh: axes"), (["--rules", "tp"], "--rules: needs --mesh"),
                      (["--coordinator", "h:1"], "go together")]:
        with pytest.raises(SystemExit):
            cli.setup(parser.parse_args(argv), parser)
        assert msg in capsys.readouterr().err
