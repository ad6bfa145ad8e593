from __future__ import annotations

import dataclasses
import json
import resource

import jax
import jax.numpy as jnp
import pytest

import zoo
from zoo import cli, cost_report as cr

TINY = dict(d_model=32, n_layers=2)


def test_jaxpr_flops_counts_scan_bodies_times_their_length():
    def f(w_DD, x_BD):
        def body(h, _):
            return jnp.tanh(h @ w_DD), None
        h, _ = jax.lax.scan(body, x_BD, None, length=5)
        return jnp.einsum("bd,ed->be", h, w_DD)

    w, x = jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((3, 8), jnp.float32)
    flops, exact = cr.jaxpr_flops(jax.make_jaxpr(f)(w, x).jaxpr)
    assert exact
    assert flops == 6 * (2 * 3 * 8 * 8)  # five scanned matmuls and one outside


def test_jaxpr_flops_marks_while_loops_inexact():
    def f(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]

    flops, exact = cr.jaxpr_flops(jax.make_jaxpr(f)(jax.ShapeDtypeStruct((4, 4), jnp.float32)).jaxpr)
    assert flops == 2 * 4 * 4 * 4 and not exact


def test_mean_context_causal_and_window():
    assert cr.mean_context(4, causal=True, window=None) == pytest.approx(2.5)
    assert cr.mean_context(4, causal=True, window=2) == pytest.approx(1.75)
    assert cr.mean_context(4, causal=False, window=None) == 4


def test_cli_report_has_every_part_with_sane_values(capsys, tmp_path):
    path = tmp_path / "report.json"
    rc = cli.main(["report", "--preset", "llama-tiny", "--d-model", "32", "--n-layers", "2",
                   "--batch-size", "2", "--seq-len", "16", "--json", str(path)])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("zoo report: llama-tiny", "compile s", "XLA FLOPs", "temps", "HLO instructions", "all-reduce"):
        assert label in text
    rep = json.loads(path.read_text())
    cfg = zoo.presets.get("llama-tiny", **TINY)
    shapes = jax.eval_shape(lambda key: zoo.init(key, cfg), jax.random.key(0))
    assert rep["params"] == sum(x.size for x in jax.tree.leaves(shapes))
    assert set(rep["parts"]) == {"forward", "train", "decode"}
    for name, part in rep["parts"].items():
        assert part["lower_s"] > 0 and part["compile_s"] > 0, name
        assert part["xla_flops"] > 0 and part["xla_bytes_accessed"] > 0, name
        assert part["jaxpr_flops"] > 0 and part["jaxpr_flops_exact"], name
        mem = part["memory_per_device"]
        assert mem["temp_bytes"] > 0 and mem["output_bytes"] > 0, name
        assert part["hlo_instructions"] > 10, name
        assert sum(part["collectives"].values()) == 0, name  # one device
    param_bytes = 4 * rep["params"]
    fwd, train, dec = (rep["parts"][p] for p in ("forward", "train", "decode"))
    assert fwd["memory_per_device"]["argument_bytes"] >= param_bytes
    # The train step takes params and both Adam moments, and donates them.
    assert train["memory_per_device"]["argument_bytes"] >= 3 * param_bytes
    assert train["memory_per_device"]["alias_bytes"] >= 3 * param_bytes
    # Backward costs about twice the forward in matmuls; the model convention says exactly 3x.
    assert 2.5 < train["jaxpr_flops"] / fwd["jaxpr_flops"] < 3.5
    assert train["model_flops"] == pytest.approx(3 * fwd["model_flops"])
    # The scanned layers are counted once by XLA: fewer FLOPs than the program executes.
    assert fwd["xla_flops"] < fwd["jaxpr_flops"]
    assert dec["tokens"] == 2 and fwd["tokens"] == 32


def test_analytic_flops_match_xla_for_an_unrolled_model():
    cfg = dataclasses.replace(zoo.presets.get("llama-tiny", **TINY), scan_layers=False)
    part = cr.report_part(cfg, cr.ReportConfig(batch_size=2, seq_len=32), "forward")
    # XLA also counts elementwise work: it may exceed the matmul count, but not by 2x.
    assert 1.0 <= part["xla_flops"] / part["jaxpr_flops"] < 2.0
    assert 0.5 < part["model_flops"] / part["jaxpr_flops"] < 1.5


def test_sharded_forward_counts_collectives_and_splits_params():
    cfg = zoo.presets.get("llama-tiny", **TINY)
    rcfg = cr.ReportConfig(batch_size=8, seq_len=16, mesh=(("fsdp", 4), ("tensor", 2)), parts=("forward",))
    rep = cr.report(cfg, rcfg)
    fwd = rep["parts"]["forward"]
    assert rep["devices"] == 8 and rep["rules"] == "fsdp_tp"
    assert fwd["collectives"]["all-gather"] + fwd["collectives"]["all-reduce"] > 0
    # Matrices are split 8 ways (small vectors stay replicated): far below one full copy.
    assert fwd["memory_per_device"]["argument_bytes"] < 4 * rep["params"] / 4


def test_decode_report_for_a_recurrent_preset():
    cfg = zoo.presets.get("mamba-tiny", d_model=32, n_layers=1)
    part = cr.report_part(cfg, cr.ReportConfig(batch_size=2, seq_len=16), "decode")
    assert part["xla_flops"] > 0 and part["tokens"] == 2
    # One token through the blocks and the unembedding: about 2 FLOPs per active parameter.
    assert 0.5 < part["jaxpr_flops"] / part["model_flops"] < 1.5


@pytest.mark.parametrize("args, flag", [
    (["--mesh", "fsdp"], "--mesh"),
    (["--mesh", "fsdp=64"], "--mesh"),
    (["--parts", "forward,backward"], "--parts"),
    (["--depths", "0"], "--depths"),
    (["--rules", "nope"], "--rules"),
    (["--remat", "sometimes"], "--remat"),
])
def test_cli_bad_flags_exit_2_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "--preset", "llama-tiny", "--parts", "forward", *args])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_compile_time_of_a_4x_deeper_scanned_model_stays_under_1_5x():
    rcfg = cr.ReportConfig(batch_size=1, seq_len=16)

    def best_of_2(n_layers):
        cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=n_layers)
        return min(cr.compile_seconds(cfg, rcfg, "train") for _ in range(2))

    best_of_2(1)  # the first compilation in a process pays one-off costs
    shallow, deep = best_of_2(2), best_of_2(8)
    assert deep < 1.5 * shallow, (shallow, deep)


@pytest.mark.slow
def test_llama3_8b_is_reported_without_allocating_it(capsys):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = cli.main(["report", "--preset", "llama3-8b", "--batch-size", "1", "--seq-len", "256",
                   "--json", "-"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert 7.5e9 < rep["params"] < 8.5e9
    train = rep["parts"]["train"]
    # Params and both Adam moments in fp32 would need over 90 GB ...
    assert train["memory_per_device"]["argument_bytes"] > 3 * 4 * 7.5e9
    # ... but the process grew by far less than one copy of the params (ru_maxrss is KiB on Linux).
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert grown < 4 * 7.5e9 / 4
    assert rep["parts"]["decode"]["xla_flops"] > 0


def _one_repeat(name: str):
    """The preset with one repeat of its pattern (after any prefix blocks): every layer kind, once."""
    cfg = zoo.presets.get(name)
    if isinstance(cfg, zoo.ModelConfig):
        cfg = dataclasses.replace(cfg, n_layers=len(cfg.prefix) + len(cfg.pattern))
    return cfg


@pytest.mark.parametrize("name", zoo.presets.names())
def test_lowered_report_works_for_every_preset(name):
    # Default run: every preset's forward (and decode step, for decoders) is traced and lowered,
    # not compiled, so all presets fit the test budget; the compiled report of every preset and
    # part is the slow test below.
    cfg = _one_repeat(name)
    decoder = isinstance(cfg, zoo.ModelConfig)
    rep = cr.report(cfg, cr.ReportConfig(batch_size=1, seq_len=16, parts=("forward", "decode"), compile=False),
                    name=name)
    assert rep["params"] > 0 and rep["param_bytes"] >= 2 * rep["params"], name
    fwd, dec = rep["parts"]["forward"], rep["parts"]["decode"]
    assert fwd["lower_s"] > 0 and fwd["stablehlo_ops"] > 10 and fwd["tokens"] == 16, name
    assert fwd["jaxpr_flops"] > 0 and fwd["jaxpr_flops_exact"], name
    assert "compile_s" not in fwd and "memory_per_device" not in fwd  # nothing was compiled
    if decoder:
        assert fwd["model_flops"] > 0 and rep["active_params"] > 0, name
        assert dec["jaxpr_flops"] > 0 and dec["tokens"] == 1, name
        # One token costs less than sixteen in matmuls, whatever the family.
        assert dec["jaxpr_flops"] < fwd["jaxpr_flops"], name
    else:
        assert "skipped" in dec and fwd["model_flops"] is None, name
    text = cr.format_report(rep)
    assert "StableHLO ops" in text and "compile s" not in text


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny", "hybrid-tiny"])
def test_compiled_forward_report_for_each_model_kind(name):
    # One encoder, one encoder-decoder, one heterogeneous hybrid decoder (llama-tiny's full report
    # is the CLI test above): the compiled report's XLA fields are there and consistent.
    cfg = _one_repeat(name)
    rep = cr.report(cfg, cr.ReportConfig(batch_size=1, seq_len=16, parts=("forward",)), name=name)
    fwd = rep["parts"]["forward"]
    assert fwd["compile_s"] > 0 and fwd["xla_flops"] > 0 and fwd["hlo_instructions"] > 10, name
    # Each returns fp32 logits over the vocabulary for the 16 tokens.
    assert fwd["memory_per_device"]["output_bytes"] == 16 * cfg.vocab_size * 4, name
    lowered = cr.report(cfg, cr.ReportConfig(batch_size=1, seq_len=16, parts=("forward",), compile=False))
    assert lowered["parts"]["forward"]["jaxpr_flops"] == fwd["jaxpr_flops"], name


def test_cli_report_no_compile(capsys):
    rc = cli.main(["report", "--preset", "t5-tiny", "--seq-len", "8", "--no-compile", "--json", "-"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["parts"]["forward"]) == {"lower_s", "jaxpr_flops", "jaxpr_flops_exact", "model_flops",
                                            "tokens", "stablehlo_ops"}
    assert rep["parts"]["train"]["skipped"].startswith("EncDecConfig")


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.presets.names())
def test_report_works_for_every_preset(name):
    cfg = _one_repeat(name)
    decoder = isinstance(cfg, zoo.ModelConfig)
    rep = cr.report(cfg, cr.ReportConfig(batch_size=1, seq_len=32), name=name)
    assert rep["parts"]["forward"].get("xla_flops", 0) > 0, name
    for part_name, part in rep["parts"].items():
        if "skipped" in part:
            assert not decoder and part_name != "forward", (name, part_name, part["skipped"])
            continue
        assert part["xla_flops"] > 0 and part["jaxpr_flops"] > 0, (name, part_name)
        assert part["memory_per_device"]["temp_bytes"] > 0, (name, part_name)
        if decoder:
            assert part["model_flops"] > 0, (name, part_name)
