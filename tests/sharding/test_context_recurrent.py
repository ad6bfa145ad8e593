"""Under the `cp` rules (sequence over 4 devices, batch over 2), the scan cores of mLSTM, Mamba-2
(SSD), minGRU / minLSTM, RG-LRU and RWKV-4 run context-parallel (sharding.context_recurrent):
outputs, final states and gradients (w.r.t. the inputs and the initial state) equal the
unsharded scan, on packed rows whose documents cross the devices' block edges, from a nonzero
initial state; whole mLSTM and Mamba-2 models give the single-device logits and gradients
without gathering the sequence."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from layers import segments

B, L = 2, 16
MESH = "fsdp=2,sequence=4"
# Row 0: documents start at 3 and 9 (inside device blocks of 4 tokens) and 12 (a block edge);
# row 1: one document.
SEG = jnp.asarray([[1] * 3 + [2] * 6 + [3] * 3 + [4] * 4, [1] * L], jnp.int32)
RESET = segments.starts(SEG)


def _normal(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _loss_and_grads(fn, args, argnums):
    """value_and_grad of a random projection of everything fn returns (outputs and final state)."""
    out_shapes = jax.eval_shape(fn, *args)
    leaves, _ = jax.tree.flatten(out_shapes)
    ws = [_normal(jax.random.key(100 + j), leaf.shape) for j, leaf in enumerate(leaves)]

    def loss(*a):
        outs = jax.tree.leaves(fn(*a))
        return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(outs, ws)), outs

    return jax.value_and_grad(loss, argnums=argnums, has_aux=True)


def _compare(fn_ref, fn_cp, args, argnums, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5,
             gather_dtypes=r"\w+"):
    """fn_cp traced under the cp rules equals fn_ref (values and gradients); returns the HLO."""
    (_, want), want_g = jax.jit(_loss_and_grads(fn_ref, args, argnums))(*args)
    with sharding.use_rules(sharding.make_mesh(MESH), "cp"):
        run = jax.jit(_loss_and_grads(fn_cp, args, argnums)).lower(*args).compile()
    (_, got), got_g = run(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=grad_rtol,
                                   atol=grad_atol)
    hlo = run.as_text()
    # The devices exchange chunk summaries, never the sequence: no all-gather has length L.
    gathered = _all_gather_shapes(hlo, gather_dtypes)
    assert gathered and not [s for s in gathered if L in s], gathered
    return hlo


def _all_gather_shapes(hlo, dtypes=r"\w+"):
    """Result shapes of the all-gathers (of these element types) in a compiled module."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            shapes += [tuple(int(d) for d in dims.split(",") if d)
                       for dims in re.findall(rf"\b(?:{dtypes})\[([\d,]*)\]", m.group(1))]
    return shapes


# ----- mLSTM -----


def _mlstm_inputs(dtype=jnp.float32):
    H, K = 2, 4
    ks = jax.random.split(jax.random.key(0), 8)
    q, k, v = (_normal(ks[j], (B, L, H, K), dtype) for j in range(3))
    i = _normal(ks[3], (B, L, H), dtype)
    f = _normal(ks[4], (B, L, H), dtype, 2.0) + 1.0
    state = (_normal(ks[5], (B, H, K, K)), jnp.abs(_normal(ks[6], (B, H, K))), _normal(ks[7], (B, H), scale=0.5))
    return q, k, v, i, f, state


# The default run checks one form (the cheapest to compile, ~5 s); the split logic around the
# cell is the same for every form.
@pytest.mark.parametrize("form", ["parallel", pytest.param("chunkwise", marks=pytest.mark.slow),
                                  pytest.param("recurrent", marks=pytest.mark.slow)])
def test_mlstm_cell_is_context_parallel(form):
    from layers import mlstm

    def cell(form):
        return lambda q, k, v, i, f, s: mlstm.cell(q, k, v, i, f, s, form=form, chunk_size=2, starts_BL=RESET)

    _compare(cell("recurrent"), cell(form), _mlstm_inputs(), argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.slow
def test_mlstm_cell_bf16_inputs_and_soft_cap():
    from layers import mlstm

    def cell(form):
        return lambda q, k, v, i, f, s: mlstm.cell(q, k, v, i, f, s, form=form, chunk_size=2, starts_BL=RESET,
                                                   gate_soft_cap=3.0)

    # bf16 inputs, fp32 cell: the split changes only the fp32 summation order.
    # Values are fp32; gradients w.r.t. bf16 inputs are bf16 (8 bits: 1 ulp is up to 2^-7 relative).
    _compare(cell("recurrent"), cell("chunkwise"), _mlstm_inputs(jnp.bfloat16), argnums=(0, 1, 2, 3, 4, 5),
             grad_rtol=1e-2, grad_atol=1e-2)


# ----- Mamba-2 (SSD) -----


def _ssd_inputs(dtype=jnp.float32):
    H, Pd, G, N = 4, 3, 2, 4
    ks = jax.random.split(jax.random.key(1), 6)
    x = _normal(ks[0], (B, L, H, Pd), dtype)
    log_a = -jax.nn.softplus(_normal(ks[1], (B, L, H))) * 0.5
    Bm = _normal(ks[2], (B, L, G, N), dtype)
    Cm = _normal(ks[3], (B, L, G, N), dtype)
    h0 = _normal(ks[4], (B, H, Pd, N))
    return x, log_a, Bm, Cm, h0


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_ssd_is_context_parallel(dtype):
    from layers import mamba2

    def run(mode):
        return lambda x, la, Bm, Cm, h0: mamba2.ssd(x, la, Bm, Cm, h0, RESET, chunk_size=2, mode=mode)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    _compare(run("sequential"), run("chunked"), _ssd_inputs(dtype), argnums=(0, 1, 2, 3, 4), **tol,
             grad_rtol=1e-4 if dtype == jnp.float32 else 1e-2, grad_atol=1e-5 if dtype == jnp.float32 else 1e-2)


# ----- minGRU / minLSTM, RG-LRU -----


@pytest.mark.slow
@pytest.mark.parametrize("kind,form,chunk,packed", [("gru", "log_scan", 2, True), ("gru", "log_scan", None, False),
                                                    ("lstm", "log_scan", None, True), ("gru", "sequential", None, True)])
def test_mingru_layer_is_context_parallel(kind, form, chunk, packed):
    import dataclasses

    from layers import mingru

    make = mingru.MinGRUConfig if kind == "gru" else mingru.MinLSTMConfig
    cfg = make(d_model=4, expand=1.25, conv_width=2, form="sequential")
    params = mingru.init(jax.random.key(2), cfg)
    ks = jax.random.split(jax.random.key(3), 3)
    x = _normal(ks[0], (B, L, 4))
    state = {"h_BE": _normal(ks[1], (B, 5)), "conv_BWD": _normal(ks[2], (B, 1, 4))}
    seg = SEG if packed else None

    def run(c):
        return lambda p, x, st: mingru.forward(p, x, cfg=c, state=st, segment_ids=seg)

    # Floating-point gathers only: the conv's document masks are gathered (see _sharded_compile).
    _compare(run(cfg), run(dataclasses.replace(cfg, form=form, chunk_size=chunk)), (params, x, state),
             argnums=(0, 1, 2), gather_dtypes="f32|bf16|f16")


@pytest.mark.slow
def test_rg_lru_is_context_parallel():
    from layers import rglru

    E = 5
    ks = jax.random.split(jax.random.key(3), 5)
    u = _normal(ks[0], (B, L, E))
    r = jax.nn.sigmoid(_normal(ks[1], (B, L, E)))
    i = jax.nn.sigmoid(_normal(ks[2], (B, L, E)))
    lam = _normal(ks[3], (E,))
    h0 = _normal(ks[4], (B, E))
    # Position 0 resets too (as the layer's forward without state does) in row 1 only.
    reset = RESET.at[1, 0].set(True)

    def run(u, r, i, lam, h0):
        return rglru.rg_lru(u, r, i, lam, reset, h0, c=8.0)

    _compare(run, run, (u, r, i, lam, h0), argnums=(0, 1, 2, 3, 4))


# ----- RWKV-4 -----


# The parallel form's gradient w.r.t. the decay and the keys has NaNs when compiled at XLA CPU
# backend optimisation level 0 (tests/conftest.py's default), even for wkv_block alone on the
# per-device blocks without shard_map; values are right, and at level 3 all of it matches.
_RWKV4_O0 = pytest.mark.xfail(reason="layers.rwkv4.wkv_block: NaN gradient at XLA backend level 0 on these "
                                     "blocks (cause not found)", strict=False)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["recurrent", "chunked", pytest.param("parallel", marks=_RWKV4_O0)])
def test_rwkv4_time_mix_is_context_parallel(form):
    import dataclasses

    from layers import rwkv4

    cfg = rwkv4.RWKV4TimeMixConfig(d_model=8, d_att=6, form="recurrent", chunk_size=2)
    params = rwkv4.init(jax.random.key(4), cfg)
    ks = jax.random.split(jax.random.key(5), 5)
    x = _normal(ks[0], (B, L, 8))
    state = {"x_prev_BD": _normal(ks[1], (B, 8)), "aa_BA": _normal(ks[2], (B, 6)),
             "bb_BA": jnp.abs(_normal(ks[3], (B, 6))), "pp_BA": _normal(ks[4], (B, 6))}

    def run(c):
        return lambda p, x, st: rwkv4.forward(p, x, cfg=c, state=st, segment_ids=SEG)

    _compare(run(cfg), run(dataclasses.replace(cfg, form=form)), (params, x, state), argnums=(0, 1, 2))


# ----- whole models -----

LM = 24  # model tests: no parameter dimension is 24, so an all-gather of length LM is the sequence's
MODELS = {  # one block each; xLSTM without its sLSTM block (not context-parallel: see the docs)
    "xlstm": lambda **kw: zoo_presets().xlstm(**kw, n_heads=2, group=1, slstm_at=()),
    "mamba2": lambda **kw: zoo_presets().get("mamba2-tiny", **kw),
}


def zoo_presets():
    import zoo

    return zoo.presets


def _model(name):
    import zoo
    from layers import params as P

    cfg = MODELS[name](vocab_size=32, d_model=16, n_layers=1, max_len=LM)
    params = P.init(jax.random.key(6), zoo.param_specs(cfg))
    tokens = jax.random.randint(jax.random.key(7), (B, LM + 1), 0, cfg.vocab_size, jnp.int32)
    # Documents start at 5 and 13 (inside the 6-token blocks) and 18 (a block edge).
    seg = jnp.asarray([[1] * 5 + [2] * 8 + [3] * 5 + [4] * 6, [1] * LM], jnp.int32)
    return cfg, params, tokens[:, :-1], tokens[:, 1:], seg


def _sharded_compile(fn, cfg, params, *batch):
    import zoo

    mesh = sharding.make_mesh(MESH)
    params = jax.device_put(params, sharding.param_shardings(zoo.param_specs(cfg), mesh, "cp"))
    batch = tuple(jax.device_put(a, sharding.batch_sharding(mesh, "cp", a.shape)) for a in batch)
    with sharding.use_rules(mesh, "cp"):
        run = jax.jit(fn).lower(params, *batch).compile()
    hlo = run.as_text()
    # Weights and chunk summaries are gathered; no activation of the sequence (length LM) is.
    # (GSPMD does gather the [B, L] document masks that segments.starts and short_conv build with
    # a shift and a cumsum over the whole sequence: int/bool, L elements per row.)
    gathered = _all_gather_shapes(hlo, "f32|bf16|f16")
    assert gathered and not [s for s in gathered if LM in s], gathered
    return run(params, *batch), hlo


@pytest.mark.slow  # ~10 s of compiling each on 2 cores
@pytest.mark.parametrize("name", ["xlstm", "mamba2"])
def test_model_forward_is_context_parallel(name):
    import zoo

    cfg, params, inputs, _, seg = _model(name)

    def logits(p, x, s):
        return zoo.forward(p, x, cfg=cfg, segment_ids=s)

    want = jax.jit(logits)(params, inputs, seg)
    got, hlo = _sharded_compile(logits, cfg, params, inputs, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert "shard_map" in hlo  # the scan core ran context-parallel (not only GSPMD-partitioned)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xlstm", "mamba2"])
def test_model_loss_and_grads_are_context_parallel(name):
    from zoo.train import loss_fn

    cfg, params, inputs, targets, seg = _model(name)

    def loss_and_grads(p, x, y, s):
        return jax.value_and_grad(loss_fn)(p, x, y, cfg, segment_ids=s)

    want_loss, want_g = jax.jit(loss_and_grads)(params, inputs, targets, seg)
    (loss, grads), _ = _sharded_compile(loss_and_grads, cfg, params, inputs, targets, seg)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 grads, want_g)
