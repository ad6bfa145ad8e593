from __future__ import annotations

import pytest

from zoo import cli

SMALL = ["--d-model", "32", "--n-layers", "2", "--batch-size", "2", "--seq-len", "16",
         "--max-bytes", "20000"]


def test_train_prints_losses_bits_per_byte_and_sample(capsys):
    rc = cli.main(["train", "--steps", "3", *SMALL, "--prompt", "def ", "--sample-tokens", "8",
                   "--log-every", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "preset llama-tiny: d_model=32 n_layers=2" in out
    for step in (1, 2, 3):
        assert f"step {step:>6}/3  loss " in out
    assert "val bits/byte " in out
    assert "--- greedy sample (8 tokens after 'def ') ---" in out
    sample = out.split("--- greedy sample (8 tokens after 'def ') ---\n", 1)[1]
    assert sample.startswith("def ")


def _error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("zoo train: error: ")
    return err


def test_unknown_preset_exits_2_naming_the_flag(capsys):
    err = _error(["train", "--preset", "nope-tiny"], capsys)
    assert "--preset" in err and "nope-tiny" in err and "llama-tiny" in err


@pytest.mark.parametrize("args, flag", [
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--steps", "5", "--warmup-steps", "5"], "--warmup-steps"),
    (["--seq-len", "4096"], "--seq-len"),
    (["--n-heads", "5"], "--n-heads"),
    (["--preset", "gpt2-tiny", "--n-kv-heads", "2"], "--n-kv-heads"),
    (["--prompt", "", "--sample-tokens", "4"], "--prompt"),
    (["--sample-tokens", "1000"], "--sample-tokens"),
    (["--resume"], "--resume"),
    (["--grad-accum", "3"], "--grad-accum"),
    (["--schedule", "step"], "--schedule"),
    (["--schedule", "wsd", "--decay-fraction", "2"], "--decay-fraction"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--precision", "fp8"], "--precision"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--z-loss", "-1"], "--z-loss"),
    (["--data", "/nonexistent/corpus"], "--data"),
    (["--task", "mqar", "--seq-len", "6"], "--task"),
    (["--task", "mqar", "--data", "notes.txt"], "--task"),
    (["--task", "sorting"], "--task"),
    (["--save-every", "5"], "--save-every"),
    (["--peak-flops", "0"], "--peak-flops"),
])
def test_bad_flags_exit_2_naming_the_flag(args, flag, capsys):
    err = _error(["train", *args], capsys)
    assert flag in err


def test_missing_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


@pytest.mark.slow  # packed-document training: tests/zoo/test_train.py (default)
def test_train_on_jsonl_documents_writes_metrics_beside_checkpoints(tmp_path, capsys):
    import json

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": f"doc {i}: " + "xyz " * (i % 5 + 2)}) + "\n" for i in range(40)))
    ckpt = tmp_path / "ckpt"
    rc = cli.main(["train", "--steps", "2", "--d-model", "32", "--n-layers", "2", "--batch-size", "2",
                   "--seq-len", "16", "--data", str(docs), "--jsonl-field", "body",
                   "--checkpoint-dir", str(ckpt), "--sample-tokens", "0",
                   "--peak-flops", "1e11"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "40 documents" in out and "val bits/byte" in out
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (ckpt / "checkpoints" / "2").is_dir() and (ckpt / "config.json").is_file()


@pytest.mark.slow
def test_train_on_the_mqar_task_reports_accuracy(capsys):
    rc = cli.main(["train", "--steps", "2", "--d-model", "32", "--n-layers", "2", "--batch-size", "4",
                   "--seq-len", "32", "--task", "mqar", "--grad-accum", "2", "--peak-flops", "1e11"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "task mqar: MQARConfig(vocab_size=256, seq_len=32" in out
    assert "mqar accuracy on 4 held-out rows: " in out and "greedy sample" not in out
