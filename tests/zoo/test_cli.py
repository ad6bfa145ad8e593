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
])
def test_bad_flags_exit_2_naming_the_flag(args, flag, capsys):
    err = _error(["train", *args], capsys)
    assert flag in err


def test_missing_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
