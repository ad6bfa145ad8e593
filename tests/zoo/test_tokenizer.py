"""Tokenizers: byte and BPE round trips, BPE determinism / vocabulary / save-load, bits per byte
against a hand computation, and the `zoo train --tokenizer bpe` -> `zoo generate --ckpt` /
`zoo eval --ckpt` path."""

from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np
import pytest

import zoo
from layers import params as P
from zoo import cli, data, generate, train
from zoo import tokenizer as ztok
from zoo.convert import ckpt as zckpt

VOCAB = 300
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--d-ff", "32",
        "--max-len", "32"]


def _random_text(rng: np.random.Generator, n: int) -> str:
    """Mixed ASCII, whitespace, 2-, 3- and 4-byte UTF-8 characters (no surrogates)."""
    pools = [(32, 127), (9, 11), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    kinds = rng.integers(0, len(pools), size=n)
    return "".join(chr(int(rng.integers(*pools[k]))) for k in kinds)


@pytest.fixture(scope="module")
def corpus() -> str:
    return data.builtin_corpus(30_000).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def bpe(corpus) -> ztok.BPETokenizer:
    pytest.importorskip("tokenizers", reason="the optional BPE dependency: pip install 'jax-zoo[bpe]'")
    return ztok.BPETokenizer.train(corpus, VOCAB)


def test_byte_tokenizer_round_trip_is_utf8(corpus):
    tok = ztok.ByteTokenizer()
    text = _random_text(np.random.default_rng(0), 300) + corpus[:200]
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and bytes(ids.astype(np.uint8)) == text.encode("utf-8")
    assert tok.decode(ids) == text
    assert b"".join(tok.piece(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes().shape == (256,) and (tok.token_bytes() == 1).all()
    assert isinstance(tok, ztok.Tokenizer) and tok.eos_id is None and data.ByteTokenizer is ztok.ByteTokenizer


def test_bpe_round_trips_random_unicode(bpe, corpus):
    rng = np.random.default_rng(1)
    for text in (_random_text(rng, 500), corpus[-3000:], "<|endoftext|> a  \n\t b", ""):
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and ((0 <= ids) & (ids < VOCAB)).all()
        assert bpe.decode(ids) == text
        assert b"".join(bpe.piece(i) for i in ids) == text.encode("utf-8")  # what bits per byte counts
        assert bpe._tok.decode(ids.tolist(), skip_special_tokens=False) == text  # the library agrees
    long = _random_text(rng, 1000) + corpus  # longer than one encoding chunk
    assert bpe.decode(bpe.encode(long)) == long
    assert len(bpe.encode(corpus)) < 0.8 * len(corpus.encode())  # it does compress


def test_bpe_vocabulary_layout_and_size(bpe):
    assert bpe.vocab_size == VOCAB and isinstance(bpe, ztok.Tokenizer)
    assert (bpe.eos_id, bpe.pad_id) == (0, 1)
    assert bpe.piece(0) == ztok.EOS.encode()
    assert sorted(bpe.piece(i) for i in range(2, 258)) == [bytes([b]) for b in range(256)]
    assert (bpe.token_bytes()[258:] >= 2).all()
    small = ztok.BPETokenizer.train(["ab ab ab"], 1000)  # runs out of pairs: fewer, never more
    assert 258 <= small.vocab_size < 1000
    with pytest.raises(ValueError, match="vocab_size: expected an integer >= 258"):
        ztok.BPETokenizer.train(["ab"], 257)
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 300\)"):
        bpe.decode(np.array([VOCAB]))


def test_bpe_training_is_deterministic(bpe, corpus):
    again = ztok.BPETokenizer.train(iter(ztok._newline_chunks(corpus, 4096)), VOCAB)  # an iterator of pieces
    assert again == bpe and again.to_json() == bpe.to_json()
    assert ztok.BPETokenizer.train(corpus, VOCAB + 20) != bpe


def test_bpe_save_load(bpe, corpus, tmp_path):
    path = bpe.save(tmp_path)
    assert path.endswith(ztok.TOKENIZER_FILE)
    for loaded in (ztok.BPETokenizer.load(path), ztok.BPETokenizer.load(tmp_path), ztok.load(tmp_path)):
        assert loaded == bpe
        assert (loaded.token_bytes() == bpe.token_bytes()).all()
        np.testing.assert_array_equal(loaded.encode(corpus[:2000]), bpe.encode(corpus[:2000]))
    assert ztok.load(tmp_path / "nothing") == ztok.ByteTokenizer()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        ztok.BPETokenizer.load(tmp_path / "bad.json")


def test_bits_per_byte_against_a_hand_computation(bpe, corpus):
    """train.evaluate(token_bytes=...) = summed nats over the scored targets / the UTF-8 bytes of
    the text those targets decode to / ln 2, with a padded (masked) last batch."""
    seq_len, batch = 8, 2
    ids = bpe.encode(corpus[:400])[:3 * seq_len + 1]  # 3 windows: the second batch is half padding
    cfg = zoo.presets.get("llama-tiny", d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_len=32,
                          vocab_size=VOCAB)
    rng = np.random.default_rng(0)  # any weights do; zoo.init would cost a compile
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype),
                          P.abstract(zoo.param_specs(cfg)))
    got = train.evaluate(params, cfg, ids, batch_size=batch, seq_len=seq_len, token_bytes=bpe.token_bytes())
    inputs, targets = ids[:-1].reshape(3, seq_len), ids[1:].reshape(3, seq_len)
    logits = np.asarray(jax.jit(zoo.forward, static_argnames="cfg")(params, inputs, cfg=cfg), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nats = np.sum(lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
    n_bytes = len(bpe.decode(ids[1:]).encode("utf-8"))
    assert ztok.covered_bytes(targets, bpe.token_bytes()) == n_bytes
    assert got == pytest.approx(nats / n_bytes / math.log(2), rel=1e-5)
    assert ztok.bits_per_byte(nats, n_bytes) == pytest.approx(nats / n_bytes / math.log(2), rel=1e-12)
    # bits per token would differ: the tokens here cover more than one byte each on average
    assert n_bytes > targets.size
    # masked and negative targets cover nothing
    mask = np.ones(targets.shape)
    mask[0] = 0
    targets_neg = targets.copy()
    targets_neg[1, :2] = -100
    want = n_bytes - sum(len(bpe.piece(t)) for t in targets[0]) - sum(len(bpe.piece(t)) for t in targets[1, :2])
    assert ztok.covered_bytes(targets_neg, bpe.token_bytes(), mask) == want


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_train_bpe_then_generate_from_the_run_folder(tmp_path, capsys):
    pytest.importorskip("tokenizers", reason="the optional BPE dependency: pip install 'jax-zoo[bpe]'")
    run = tmp_path / "run"
    argv = ["train", "--tokenizer", "bpe", "--vocab-size", str(VOCAB), "--steps", "3", *TINY, "--batch-size", "2",
            "--seq-len", "16", "--max-bytes", "20000", "--sample-tokens", "0", "--peak-flops", "1e12", "--out", str(run)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "val bits/byte " in out and f"vocab_size={VOCAB}" in out
    # The tokenizer saw the training split only (the last 5% is validation).
    raw = data.builtin_corpus(20_000)
    want = ztok.BPETokenizer.train(data.split(raw, 0.05)[0].decode("utf-8", errors="replace"), VOCAB)
    saved = ztok.BPETokenizer.load(run)
    assert saved == want
    cfg = zckpt.config_from_json(json.loads((run / "config.json").read_text()))
    assert cfg.vocab_size == VOCAB and cfg.d_model == 16
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bits_per_byte"] < r["bits"] for r in records if "bits" in r)  # > 1 byte per token
    # generate needs no --preset: config.json and tokenizer.json come from the folder
    prompt = "def __init__(self"
    assert cli.main(["generate", "--ckpt", str(run), "--prompt", prompt, "--max-new-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["text"] == saved.decode(got["tokens"]) and len(got["tokens"]) == 4
    assert got["prompt_tokens"] == len(saved.encode(prompt)) < len(prompt)  # BPE, not bytes
    # zoo eval with the run's data settings reproduces its final held-out bits per byte exactly
    assert cli.main(["eval", "--ckpt", str(run), "--max-bytes", "20000", "--seq-len", "16", "--batch-size", "2",
                     "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["val_bits_per_byte"] == [r["val_bits"] for r in records if "val_bits" in r][-1]
    # A second run into the folder with another tokenizer is refused before it trains.
    err = _error([*argv[:4], str(VOCAB + 10), *argv[5:]], capsys)
    assert err.startswith("zoo train: error: --checkpoint-dir:") and "config.json differs" in err


def test_generate_takes_the_model_config_from_either_file(tmp_path):
    from zoo.commands.generate import _folder_config

    cfg = zoo.presets.get("llama-tiny", d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_len=32)
    other = zoo.presets.get("mamba-tiny", max_len=32)
    args = type("Args", (), {k: None for k in cli.MODEL_OVERRIDES})()
    for name, want in (("model_config.json", cfg), ("config.json", other)):  # config.json first when both
        (tmp_path / name).write_text(json.dumps(zckpt.config_to_json(want)))
        args.ckpt = str(tmp_path)
        assert _folder_config(args, None) == want


@pytest.mark.slow
def test_generate_from_a_converted_checkpoint_equals_the_library(tmp_path, capsys):
    cfg = zoo.presets.get("llama-tiny", d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_len=32)
    params = zoo.init(jax.random.key(3), cfg)
    zckpt.save(tmp_path / "conv", cfg, params)
    assert cli.main(["generate", "--ckpt", str(tmp_path / "conv"), "--prompt", "ab", "--max-new-tokens", "4",
                     "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = generate.generate(params, [ztok.ByteTokenizer().encode("ab")], cfg, max_new_tokens=4).tokens[0]
    assert got["tokens"] == want


@pytest.mark.parametrize("argv, start", [
    (["generate", "--prompt", "x"], "--preset: required without --ckpt"),
    (["generate", "--ckpt", "{tmp}", "--prompt", "x"], "--ckpt: '{tmp}' holds neither config.json"),
    (["generate", "--ckpt", "{tmp}/hf", "--prompt", "x"], "--ckpt: {tmp}/hf/config.json is not a zoo model config"),
    (["generate", "--ckpt", "{tmp}/hf", "--d-model", "8", "--prompt", "x"], "--d-model: model overrides need --preset"),
    (["eval", "--ckpt", "{tmp}"], "--ckpt: '{tmp}' holds neither config.json"),
    (["train", "--vocab-size", "512"], "--vocab-size: only with --tokenizer bpe"),
    (["train", "--tokenizer", "bpe", "--task", "mqar"], "--tokenizer: bpe tokenizes text"),
    (["train", "--tokenizer", "bpe", "--vocab-size", "100", "--max-bytes", "5000"],
     "--vocab-size: BPETokenizer.train: vocab_size: expected an integer >= 258"),
])
def test_error_lines(argv, start, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    argv = [a.format(tmp=tmp_path) for a in argv]
    err = _error(argv, capsys)
    assert err.startswith(f"zoo {argv[0]}: error: {start.format(tmp=tmp_path)}"), err


def test_bpe_without_the_library_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    err = _error(["train", "--tokenizer", "bpe"], capsys)
    assert err == ("zoo train: error: --tokenizer: the BPE tokenizer needs the Hugging Face 'tokenizers' "
                   "library: pip install 'jax-zoo[bpe]'")
    with pytest.raises(ztok.MissingDependencyError, match="jax-zoo\\[bpe\\]"):
        ztok.BPETokenizer.train(["ab"], 300)
