"""Hugging Face tokenizers travel with converted checkpoints.

A tiny Llama plus a tiny BPE trained by `tokenizers` and saved through
`transformers.PreTrainedTokenizerFast.save_pretrained` form a published-style folder; `zoo convert
--from-hf` it, `zoo generate --ckpt` greedy, and compare ids and text with transformers'
`AutoTokenizer` on the same prompt, including stopping at the eos id that only config.json names.
The default run writes the Llama with `zoo.convert.to_hf` and takes the reference continuation
from `zoo.generate` (the logits themselves are compared with transformers in test_convert.py);
the slow test builds the model with transformers and compares with its `model.generate`.
"""

from __future__ import annotations

import json
import os

import jax
import pytest

import zoo
from zoo import cli, convert, generate
from zoo import tokenizer as ztok

PROMPT = "the quick brown fox"
N_NEW = 12
CORPUS = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps; the fox runs", "quick quick fox"] * 4


@pytest.fixture(scope="module")
def hf():
    """(torch or None, transformers): the default tests need transformers' tokenizers only."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    transformers.logging.set_verbosity_error()
    try:
        import torch
    except ImportError:
        torch = None
    return torch, transformers


def _train_bpe(vocab_size: int):
    """A byte-level BPE with <s> / </s> whose post-processor prepends <s> (Llama 3's layout)."""
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def _greedy(hf, model, ids, eos):
    torch, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def _first_new(tokens: list[int], start: int) -> int:
    """The first index >= start whose token has not appeared before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    """(HF folder, zoo checkpoint, transformers tokenizer, reference new ids, eos) for a zoo Llama
    written with `convert.to_hf`, whose eos is a token its greedy continuation of PROMPT reaches."""
    _, transformers = hf
    root = tmp_path_factory.mktemp("hf_tokenizer")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_train_bpe(300), bos_token="<s>",
                                                eos_token="</s>")
    vocab = fast.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    cfg = zoo.presets.get("llama-tiny", vocab_size=vocab + 4, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                          d_ff=64, max_len=64)
    params = zoo.init(jax.random.key(0), cfg)
    prompt_ids = fast(PROMPT)["input_ids"]
    # A padded id the tokenizer never produces as the stop: same compiled shape, full length.
    free = generate.generate(params, [prompt_ids], cfg, max_new_tokens=N_NEW, stop_tokens=[vocab + 3]).tokens[0]
    assert len(free) == N_NEW
    k = _first_new(free, 2)
    hf_dir = root / "hf"
    convert.to_hf(cfg, params, hf_dir, model_type="llama")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "bos_token_id": 0, "eos_token_id": free[k]}))
    fast.save_pretrained(hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ckpt_dir = root / "ckpt"
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(ckpt_dir)]) == 0
    return hf_dir, ckpt_dir, reference, free[:k + 1], free[k]


@pytest.fixture(scope="module")
def converted_torch(hf, tmp_path_factory):
    """(HF folder, zoo checkpoint, transformers tokenizer, reference new ids, eos) for a Llama built
    by transformers, whose eos is a token its greedy continuation of PROMPT reaches at step >= 3."""
    torch, transformers = hf
    if torch is None:
        pytest.skip("the transformers model needs torch")
    root = tmp_path_factory.mktemp("hf_tokenizer")
    tok = _train_bpe(300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    vocab = fast.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab + 4, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, initializer_range=0.2, bos_token_id=0,
                                      eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt_ids = fast(PROMPT)["input_ids"]
    free = _greedy(hf, model, prompt_ids, eos=None)
    # The first token that appears for the first time at step >= 3 becomes the eos, so the
    # reference stops early and the zoo must stop at the same place.
    k = _first_new(free, 3)
    eos = free[k]
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    fast.save_pretrained(hf_dir)
    # Only config.json names the eos: the converter must derive generation_config.json from it.
    (hf_dir / ztok.HF_GENERATION_FILE).unlink(missing_ok=True)
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    want = _greedy(hf, model, reference(PROMPT)["input_ids"], eos=eos)
    assert want == free[:k + 1]
    ckpt_dir = root / "ckpt"
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(ckpt_dir)]) == 0
    return hf_dir, ckpt_dir, reference, want, eos


def _generate_json(ckpt_dir, capsys, *extra) -> dict:
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", str(ckpt_dir), "--prompt", PROMPT, "--max-new-tokens", str(N_NEW),
                     "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_from_converted_checkpoint_uses_its_tokenizer(converted, capsys):
    hf_dir, ckpt_dir, reference, want, eos = converted
    got = _generate_json(ckpt_dir, capsys)
    assert got["prompt_tokens"] == len(reference(PROMPT)["input_ids"]) < len(PROMPT.encode())  # BPE + BOS
    assert got["tokens"] == want and want[-1] == eos and len(want) < N_NEW  # stopped at config.json's eos
    assert got["text"] == reference.decode(want, skip_special_tokens=True)


@pytest.mark.slow
def test_generate_from_converted_checkpoint_matches_transformers(converted_torch, capsys):
    hf_dir, ckpt_dir, reference, want, eos = converted_torch
    got = _generate_json(ckpt_dir, capsys)
    assert got["prompt_tokens"] == len(reference(PROMPT)["input_ids"])
    assert got["tokens"] == want and want[-1] == eos  # stopped at the eos, like transformers
    assert got["text"] == reference.decode(want, skip_special_tokens=True)
    # --ignore-eos runs on to --max-new-tokens
    longer = _generate_json(ckpt_dir, capsys, "--ignore-eos")["tokens"]
    assert len(longer) == N_NEW and longer[:len(want)] == want
    # Streaming prints the same text after the prompt.
    assert cli.main(["generate", "--ckpt", str(ckpt_dir), "--prompt", PROMPT, "--max-new-tokens", str(N_NEW)]) == 0
    assert capsys.readouterr().out == PROMPT + got["text"] + "\n"


def test_hf_tokenizer_encodes_and_decodes_like_transformers(converted):
    hf_dir, ckpt_dir, reference, _, eos = converted
    tok = ztok.load(ckpt_dir)
    assert isinstance(tok, ztok.HFTokenizer)
    assert tok.eos_ids == (eos,) and tok.bos_id == reference.bos_token_id == 0
    for text in (PROMPT, "lazy dogs, über 😀 jump!", " leading space"):
        ids = tok.encode(text)
        assert ids.tolist() == reference(text)["input_ids"] and ids[0] == tok.bos_id
        assert tok.encode(text, add_special_tokens=False).tolist() == reference(text, add_special_tokens=False)[
            "input_ids"]
        assert tok.decode(ids) == reference.decode(ids.tolist(), skip_special_tokens=True) == text
        # byte-level pieces: joined, they are the text's bytes (bits per byte stays exact)
        assert b"".join(tok.piece(i) for i in ids[1:]) == text.encode()
        assert int(tok.token_bytes()[ids[1:]].sum()) == len(text.encode())
    # tokenizer_config.json's add_bos_token/add_eos_token, when present, replace the template
    cfg = json.loads((hf_dir / ztok.HF_CONFIG_FILE).read_text())
    flagged = ztok.HFTokenizer(tok._tok, bos_id=0, eos_ids=[1], add_bos=False, add_eos=True)
    assert flagged.encode(PROMPT).tolist() == [*reference(PROMPT, add_special_tokens=False)["input_ids"], 1]
    assert "add_bos_token" not in cfg or cfg["add_bos_token"] is True


def test_to_hf_carries_the_tokenizer_files_back_out(converted, hf, tmp_path):
    _, transformers = hf
    hf_dir, ckpt_dir, reference, _, eos = converted
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt_dir / name).read_bytes() == (hf_dir / name).read_bytes()
    assert json.loads((ckpt_dir / ztok.HF_GENERATION_FILE).read_text()) == {"bos_token_id": 0, "eos_token_id": eos}
    out = tmp_path / "exported"
    assert cli.main(["convert", "--to-hf", str(ckpt_dir), "--out", str(out)]) == 0
    carried = sorted(n for n in os.listdir(ckpt_dir) if n in ztok.HF_FILES)
    assert ztok.TOKENIZER_FILE in carried and ztok.HF_GENERATION_FILE in carried
    for name in carried:
        assert (out / name).read_bytes() == (ckpt_dir / name).read_bytes()
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again(PROMPT)["input_ids"] == reference(PROMPT)["input_ids"]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eos


def test_load_picks_the_tokenizer_kind(converted, tmp_path):
    _, ckpt_dir, _, _, _ = converted
    assert ztok.kind(tmp_path) == "bytes" and ztok.load(tmp_path) == ztok.ByteTokenizer()
    assert ztok.kind(ckpt_dir) == "hf"
    bpe_dir = tmp_path / "bpe"
    bpe_dir.mkdir()
    bpe = ztok.BPETokenizer.train(CORPUS, 270)
    bpe.save(bpe_dir)
    assert ztok.kind(bpe_dir) == "bpe" and ztok.load(bpe_dir) == bpe
    # A bare HF tokenizer.json (no tokenizer_config.json) is told apart by its vocabulary layout.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / ztok.TOKENIZER_FILE).write_bytes((ckpt_dir / ztok.TOKENIZER_FILE).read_bytes())
    assert ztok.kind(bare) == "hf" and isinstance(ztok.load(bare), ztok.HFTokenizer)
