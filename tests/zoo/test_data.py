from __future__ import annotations

import numpy as np
import pytest

from zoo import data


def test_tokenizer_round_trip_ascii_and_unicode():
    tok = data.ByteTokenizer()
    for text in ["def f(x):\n    return x", "", "héllo wörld — ☃ 🐍 日本語"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.size == len(text.encode("utf-8"))
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
        assert tok.decode(ids) == text
    assert tok.vocab_size == 256


def test_tokenizer_decode_replaces_cut_characters_and_rejects_bad_ids():
    tok = data.ByteTokenizer()
    ids = tok.encode("☃")[:2]  # a three-byte character cut short
    assert tok.decode(ids) == "\ufffd"
    assert tok.decode([104, 105]) == "hi"
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 256\)"):
        tok.decode([0, 300])
    with pytest.raises(TypeError, match="text: expected str"):
        tok.encode(b"bytes")


def test_builtin_corpus_nonempty_deterministic_and_truncated():
    full = data.builtin_corpus()
    assert len(full) > 1_000_000
    first_rel = data.stdlib_files()[0][0]
    assert full.startswith(f"\n# ==== {first_rel} ====\n".encode())
    small = data.builtin_corpus(max_bytes=50_000)
    assert len(small) == 50_000
    assert small == full[:50_000]
    assert data.builtin_corpus(max_bytes=50_000) == small
    assert b"def " in small and b"# ==== " in small
    with pytest.raises(ValueError, match="max_bytes"):
        data.builtin_corpus(max_bytes=0)


def test_stdlib_files_sorted_and_skip_tests():
    files = data.stdlib_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels)
    for rel in rels:
        parts = rel.split("/")[:-1]
        assert not set(parts) & data.SKIP_DIRS, rel


def test_split_is_contiguous_and_deterministic():
    raw = bytes(range(200))
    train, val = data.split(raw, val_fraction=0.1)
    assert train + val == raw and len(val) == 20
    arr = np.arange(100)
    tr, va = data.split(arr, 0.05)
    np.testing.assert_array_equal(np.concatenate([tr, va]), arr)
    assert len(va) == 5
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(raw, 1.0)


def test_random_windows_targets_are_inputs_shifted():
    arr = np.arange(1000) % 251
    rng = np.random.default_rng(0)
    x, y = data.random_windows(arr, batch_size=4, seq_len=16, rng=rng)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    # each row is a contiguous slice of the data, so the target is the next item
    for row_x, row_y in zip(x, y):
        start = int(np.flatnonzero(arr == row_x[0])[0])
        np.testing.assert_array_equal(row_y, arr[start + 1:start + 17])
    with pytest.raises(ValueError, match="seq_len"):
        data.random_windows(arr[:10], 2, 10, rng)


def test_sequential_windows_cover_data_in_order():
    arr = np.arange(50)
    x, y = data.sequential_windows(arr, seq_len=8)
    assert x.shape == (6, 8)
    np.testing.assert_array_equal(x.reshape(-1), arr[:48])
    np.testing.assert_array_equal(y.reshape(-1), arr[1:49])
    assert data.sequential_windows(arr, seq_len=8, max_windows=2)[0].shape == (2, 8)


def test_window_sampler_deterministic_by_seed_and_resumable():
    corpus = data.builtin_corpus(max_bytes=20_000)
    a = data.WindowSampler(corpus, batch_size=3, seq_len=32, seed=7)
    b = data.WindowSampler(corpus, batch_size=3, seq_len=32, seed=7)
    c = data.WindowSampler(corpus, batch_size=3, seq_len=32, seed=8)
    assert a.step == 0
    batches_a = [next(a) for _ in range(3)]
    batches_b = [next(b) for _ in range(3)]
    assert a.step == b.step == 3
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])
    assert not np.array_equal(next(c)[0], batches_a[0][0])
    # a sampler resumed at step 2 continues with batch 2
    resumed = data.WindowSampler(corpus, batch_size=3, seq_len=32, seed=7, step=2)
    np.testing.assert_array_equal(next(resumed)[0], batches_a[2][0])
    assert resumed.step == 3
    with pytest.raises(ValueError, match="seq_len"):
        data.WindowSampler(corpus[:10], batch_size=3, seq_len=32, seed=0)
