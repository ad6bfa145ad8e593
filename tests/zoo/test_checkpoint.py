"""zoo.checkpoint: round trip, retention, clear errors, atomicity, exact resume."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from layers import params as P
from zoo import checkpoint as ck
from zoo import data as zdata
from zoo import presets, train


def _cfg(**overrides):
    kw = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    kw.update(overrides)
    return presets.get("llama-tiny", **kw)


TCFG = train.TrainConfig(steps=4, batch_size=2, seq_len=8, warmup_steps=1, seed=3)
DATA = bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))


def _opt_init(optimizer, params):
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.init(params)


def _targets(cfg, optimizer):
    params_t = P.abstract(zoo.param_specs(cfg))
    with jax.numpy_dtype_promotion("standard"):
        opt_t = jax.eval_shape(optimizer.init, params_t)
    return params_t, opt_t


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    optimizer, step_fn = train.train_step_for(cfg, TCFG)
    return cfg, optimizer, step_fn


def _small(v: float):
    # tiny stand-ins for params / opt_state where only retention is under test
    return {"w": jnp.full((2,), v, jnp.float32)}, (jnp.int32(int(v)),)


def test_round_trip_bit_identical(tmp_path, model):
    cfg, optimizer, step_fn = model
    params = zoo.init(jax.random.key(1), cfg)
    opt_state = _opt_init(optimizer, params)
    # one real step so the Adam moments and count are non-trivial
    x, y = zdata.WindowSampler(DATA, TCFG.batch_size, TCFG.seq_len, 0).batch(0)
    params, opt_state, _ = step_fn(params, opt_state, x, y)
    extra = {"resume": ck.exact_resume_state(7, jax.random.key(5)), "model": {"d_model": 32},
             "metrics": {"val_loss": 1.25, "loss": np.float32(2.5)}, "lst": [1, 2, 3]}
    expected = (jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, opt_state))
    with ck.Checkpointer(tmp_path / "ckpt") as c:
        c.save(10, params=params, opt_state=opt_state, extra=extra)
        c.wait()
        assert c.all_steps() == [10] and c.latest_step() == 10
    c = ck.Checkpointer(tmp_path / "ckpt")
    p2, o2, e2 = c.restore(params_target=_targets(cfg, optimizer)[0],
                           opt_state_target=_targets(cfg, optimizer)[1])
    c.close()
    _assert_identical(p2, expected[0])
    _assert_identical(o2, expected[1])
    assert e2["metrics"] == {"val_loss": 1.25, "loss": 2.5}
    assert e2["lst"] == [1, 2, 3] and e2["model"] == {"d_model": 32}
    step, key = ck.resume_from(e2)
    assert step == 7
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(5)))
    np.testing.assert_array_equal(jax.random.normal(key, (3,)), jax.random.normal(jax.random.key(5), (3,)))


def test_resume_state_raw_key():
    state = ck.exact_resume_state(3, jax.random.PRNGKey(4))
    step, key = ck.resume_from(state)
    assert step == 3
    np.testing.assert_array_equal(key, jax.random.PRNGKey(4))
    assert ck.resume_from(ck.exact_resume_state(0))[1] is None


def test_keep_last(tmp_path):
    with ck.Checkpointer(tmp_path, keep_last=2) as c:
        for s in range(1, 6):
            p, o = _small(s)
            c.save(s, params=p, opt_state=o, extra={})
        c.wait()
        assert c.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_keep_best(tmp_path):
    losses = {1: 3.0, 2: 0.5, 3: 2.0, 4: 0.7, 5: 4.0, 6: 5.0}
    with ck.Checkpointer(tmp_path, keep_last=1, keep_best=2) as c:
        for s, v in losses.items():
            p, o = _small(s)
            c.save(s, params=p, opt_state=o, extra={"metrics": {"val_loss": v}})
        c.wait()
        # best two by lowest val_loss (2, 4) plus the newest (6)
        assert c.all_steps() == [2, 4, 6]


def test_save_rejects_old_step_and_bad_extra(tmp_path):
    with ck.Checkpointer(tmp_path, async_save=False) as c:
        p, o = _small(1)
        c.save(2, params=p, opt_state=o, extra={})
        with pytest.raises(ValueError, match="latest saved step 2"):
            c.save(2, params=p, opt_state=o, extra={})
        with pytest.raises(TypeError, match="extra"):
            c.save(3, params=p, opt_state=o, extra={"f": object()})


def test_mismatched_targets(tmp_path, model):
    cfg, optimizer, _ = model
    params = zoo.init(jax.random.key(1), cfg)
    with ck.Checkpointer(tmp_path, async_save=False) as c:
        c.save(1, params=params, opt_state=_opt_init(optimizer, params), extra={})
    c = ck.Checkpointer(tmp_path)
    params_t, opt_t = _targets(cfg, optimizer)

    wide = _cfg(d_model=64)
    wide_params_t, _ = _targets(wide, train.make_optimizer(TCFG))
    with pytest.raises(ValueError) as e:
        c.restore(1, params_target=wide_params_t, opt_state_target=opt_t)
    msg = str(e.value)
    assert "params_target" in msg and "embed/table_VD" in msg and "(256, 64)" in msg and "(256, 32)" in msg

    more = dict(params_t, extra_head={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(ValueError, match="in the target but not stored: \\['extra_head/w'\\]"):
        c.restore(1, params_target=more, opt_state_target=opt_t)

    fewer = {k: v for k, v in params_t.items() if k != "final_norm"}
    with pytest.raises(ValueError, match="stored but not in the target: \\['final_norm/scale'\\]"):
        c.restore(1, params_target=fewer, opt_state_target=opt_t)

    bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), params_t)
    with pytest.raises(ValueError, match="bfloat16, stored .* float32"):
        c.restore(1, params_target=bf16, opt_state_target=opt_t)

    with pytest.raises(FileNotFoundError, match="step 7 not found"):
        c.restore(7, params_target=params_t, opt_state_target=opt_t)
    c.close()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.Checkpointer(tmp_path / "nowhere").restore(params_target=params_t, opt_state_target=opt_t)
    assert not (tmp_path / "nowhere").exists()


def test_interrupted_save_is_skipped(tmp_path):
    with ck.Checkpointer(tmp_path, async_save=False) as c:
        for s in (1, 2):
            p, o = _small(s)
            c.save(s, params=p, opt_state=o, extra={"s": s})
    # What a crash mid-save leaves: orbax writes step 3 under a temporary name and renames it
    # only once complete, so the half-written directory keeps the temporary name.
    partial = tmp_path / "3.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "2", partial)
    for f in (partial / "params").iterdir():
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    (partial / "commit_success.txt").unlink(missing_ok=True)
    c = ck.Checkpointer(tmp_path)
    assert c.latest_step() == 2 and c.all_steps() == [1, 2]
    p_t, o_t = jax.eval_shape(lambda: _small(0.0))
    p, o, extra = c.restore(params_target=p_t, opt_state_target=o_t)
    np.testing.assert_array_equal(p["w"], [2.0, 2.0])
    assert extra == {"s": 2} and int(o[0]) == 2
    # a new save after the crash works
    pn, on = _small(3)
    c.save(3, params=pn, opt_state=on, extra={"s": 3})
    c.close()
    assert ck.Checkpointer(tmp_path).latest_step() == 3


def test_restore_into_target_shardings(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    w = jnp.arange(4, dtype=jnp.float32)
    with ck.Checkpointer(tmp_path, async_save=False) as c:
        c.save(1, params={"w": w}, opt_state=(jnp.int32(1),), extra={})
        p, o, _ = c.restore(params_target={"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharded)},
                            opt_state_target=(jax.ShapeDtypeStruct((), jnp.int32),))
    assert p["w"].sharding == sharded and len(p["w"].addressable_shards) == 2
    np.testing.assert_array_equal(p["w"], w)
    assert int(o[0]) == 1


def test_corrupt_step_dir_raises_clear_error(tmp_path):
    with ck.Checkpointer(tmp_path, async_save=False) as c:
        p, o = _small(1)
        c.save(1, params=p, opt_state=o, extra={})
    shutil.rmtree(tmp_path / "1" / "params")
    c = ck.Checkpointer(tmp_path)
    p_t, o_t = jax.eval_shape(lambda: _small(0.0))
    with pytest.raises(ValueError, match="step 1 .* incomplete or corrupt"):
        c.restore(1, params_target=p_t, opt_state_target=o_t)


@pytest.mark.slow
def test_exact_resume(tmp_path, model):
    cfg, optimizer, step_fn = model
    n, half = TCFG.steps, TCFG.steps // 2
    train_tokens, _ = zdata.split(zdata.as_array(DATA), TCFG.val_fraction)

    def fresh():
        params = zoo.init(jax.random.key(TCFG.seed), cfg)
        return params, _opt_init(optimizer, params)

    # uninterrupted run
    params, opt_state = fresh()
    sampler = zdata.WindowSampler(train_tokens, TCFG.batch_size, TCFG.seq_len, TCFG.seed)
    losses = []
    for _ in range(n):
        params, opt_state, m = step_fn(params, opt_state, *next(sampler))
        losses.append(float(m["loss"]))
    ref_params = jax.tree.map(np.asarray, params)

    # interrupted run: save at `half` (async; the live, soon-donated buffers are passed on
    # purpose: save must have copied them off before returning), keep training, "crash"
    params, opt_state = fresh()
    sampler = zdata.WindowSampler(train_tokens, TCFG.batch_size, TCFG.seq_len, TCFG.seed)
    c = ck.Checkpointer(tmp_path)
    for i in range(n):
        params, opt_state, m = step_fn(params, opt_state, *next(sampler))
        if i + 1 == half:
            c.save(half, params=params, opt_state=opt_state,
                   extra={"resume": ck.exact_resume_state(sampler.step, jax.random.key(TCFG.seed)),
                          "train_config": dataclasses.asdict(TCFG), "metrics": {"loss": float(m["loss"])}})
    c.close()
    del params, opt_state

    # resume in a "new process": abstract targets only
    c = ck.Checkpointer(tmp_path)
    params_t, opt_t = _targets(cfg, optimizer)
    params, opt_state, extra = c.restore(params_target=params_t, opt_state_target=opt_t)
    c.close()
    data_step, _ = ck.resume_from(extra)
    assert data_step == half and extra["train_config"]["seed"] == TCFG.seed
    sampler = zdata.WindowSampler(train_tokens, TCFG.batch_size, TCFG.seq_len, TCFG.seed, step=data_step)
    resumed = []
    for _ in range(half, n):
        params, opt_state, m = step_fn(params, opt_state, *next(sampler))
        resumed.append(float(m["loss"]))
    assert resumed == losses[half:]
    _assert_identical(jax.tree.map(np.asarray, params), ref_params)


_KILL_MID_SAVE = r"""
import os, signal, sys
import jax.numpy as jnp
from zoo import checkpoint as ck

c = ck.Checkpointer(sys.argv[1], keep_last=5)
c.save(1, params={"w": jnp.full((8,), 1.0)}, opt_state=(jnp.int32(1),), extra={"n": 1})
c.wait()
# Step 2 is big enough (64 MiB) that its background write cannot finish before the kill below.
big = {f"w{i}": jnp.full((1 << 20,), float(i)) for i in range(16)}
c.save(2, params=big, opt_state=(jnp.int32(2),), extra={"n": 2})
print("saving", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_during_a_save_leaves_the_previous_step_loadable(tmp_path):
    """A real process SIGKILLed while orbax writes step 2: step 1 restores intact, the partial
    step is never listed, and the directory takes new saves afterwards."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "saving" in proc.stdout
    leftovers = [n for n in os.listdir(tmp_path) if n not in ("1",)]
    assert leftovers and all(n.startswith("2.") for n in leftovers), os.listdir(tmp_path)  # killed mid-save

    c = ck.Checkpointer(tmp_path)
    assert c.all_steps() == [1]
    target = ({"w": jax.ShapeDtypeStruct((8,), jnp.float32)}, (jax.ShapeDtypeStruct((), jnp.int32),))
    params, opt_state, extra = c.restore(params_target=target[0], opt_state_target=target[1])
    np.testing.assert_array_equal(np.asarray(params["w"]), np.ones(8, np.float32))
    assert int(opt_state[0]) == 1 and extra == {"n": 1}
    c.save(2, params={"w": jnp.full((8,), 2.0)}, opt_state=(jnp.int32(2),))
    c.close()
    assert ck.Checkpointer(tmp_path).all_steps() == [1, 2]
