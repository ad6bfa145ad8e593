"""`zoo generate`: streams, --json parses and agrees with the library, checkpoints from
`zoo train`, bad flags exit 2 naming the flag."""

from __future__ import annotations

import json

import jax
import pytest

import zoo
from zoo import cli, data, generate

SMALL = ["--preset", "llama-tiny", "--d-model", "32", "--n-layers", "2", "--max-len", "32"]


def _error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_json_parses_with_tokens_text_and_timings(capsys):
    assert cli.main(["generate", *SMALL, "--prompt", "def ", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == out["n_tokens"] == 6 and out["text"] == data.ByteTokenizer().decode(out["tokens"])
    assert out["prefill_ms"] > 0 and out["decode_ms_per_token"] > 0 and out["compile_ms"] > 0


@pytest.mark.slow
def test_json_tokens_equal_library_greedy(capsys):
    assert cli.main(["generate", *SMALL, "--prompt", "def ", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = zoo.presets.get("llama-tiny", d_model=32, n_layers=2, max_len=32)
    params = zoo.init(jax.random.key(0), cfg)  # --seed 0
    want = generate.generate(params, [data.ByteTokenizer().encode("def ")], cfg, max_new_tokens=6).tokens[0]
    assert out["tokens"] == want


@pytest.mark.slow
def test_streams_the_prompt_then_the_tokens(capsys):
    assert cli.main(["generate", *SMALL, "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0.7",
                     "--top-k", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ab") and len(out) > 2


@pytest.mark.slow
def test_checkpoint_from_zoo_train_beams_and_draft(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["train", *SMALL, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                     "--max-bytes", "4000", "--sample-tokens", "0", "--checkpoint-dir", ckpt]) == 0
    capsys.readouterr()
    assert cli.main(["generate", *SMALL, "--ckpt", ckpt, "--prompt", "def ", "--max-new-tokens", "5", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 5
    assert cli.main(["generate", *SMALL, "--prompt", "x", "--max-new-tokens", "4", "--beams", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["beams"]) == 2
    assert cli.main(["generate", *SMALL, "--prompt", "x", "--max-new-tokens", "6", "--draft-preset", "mingru-tiny",
                     "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["acceptance_rate"] <= 1
    # The checkpoint of another width does not load.
    err = _error(["generate", "--preset", "llama-tiny", "--d-model", "64", "--max-len", "32", "--ckpt", ckpt,
                  "--prompt", "x", "--max-new-tokens", "4"], capsys)
    assert err.startswith("zoo generate: error: --ckpt:")


@pytest.mark.parametrize("args, flag", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--temperature", "-1"], "--temperature"),
    (["--min-p", "1"], "--min-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x" * 40], "--prompt"), (["--stop", "ab"], "--stop"),
    (["--draft-preset", "nope"], "--draft-preset"), (["--ckpt", "/nonexistent/dir"], "--ckpt")])
def test_bad_flags_exit_2_naming_the_flag(args, flag, capsys):
    argv = ["generate", *SMALL, "--prompt", "x", "--max-new-tokens", "4", *args]
    err = _error(argv, capsys)
    assert flag in err, err
