"""zoo.packing: reading documents, packing rows with segment ids / positions / masks, the
sampler's determinism and resumability, and no attention across packed documents."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import zoo
from zoo import packing


def _docs(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, rng.integers(3, 12)).astype(np.int32) for _ in range(n)]


def test_rows_follow_documents_one_by_one():
    """Rebuild every row from the shuffled documents by hand: targets are the next token of the same
    document, the mask is 0 exactly at a document's last token, segments and positions restart
    at each document (and at the start of every row)."""
    docs = _docs()
    s = packing.PackedSampler(docs, batch_size=2, seq_len=5, seed=3)
    order = np.random.default_rng((3, 0)).permutation(len(docs))
    stream = [(int(tok), k, i) for k in order for i, tok in enumerate(docs[k])]
    b = s.batch(0)
    for r in range(2):
        for t in range(5):
            tok, doc, _ = stream[5 * r + t]
            nxt, nxt_doc, _ = stream[5 * r + t + 1]
            assert b["inputs"][r, t] == tok and b["targets"][r, t] == nxt
            assert b["mask"][r, t] == float(doc == nxt_doc)
        docs_in_row = [stream[5 * r + t][1] for t in range(5)]
        firsts = [t == 0 or docs_in_row[t] != docs_in_row[t - 1] for t in range(5)]
        np.testing.assert_array_equal(b["segment_ids"][r], np.cumsum(firsts))
        expected_pos = [t - max(u for u in range(t + 1) if firsts[u]) for t in range(5)]
        np.testing.assert_array_equal(b["positions"][r], expected_pos)
    assert {k: v.dtype for k, v in b.items()} == {"inputs": np.int32, "targets": np.int32, "mask": np.float32,
                                                  "segment_ids": np.int32, "positions": np.int32}


def test_sampler_is_deterministic_by_seed_resumable_and_reshuffles_each_epoch():
    docs = _docs(9)
    a = packing.PackedSampler(docs, 2, 6, seed=1)
    first = [next(a) for _ in range(12)]  # several epochs
    b = packing.PackedSampler(docs, 2, 6, seed=1).seek(5)
    for i in range(5, 12):
        got = next(b)
        for k in first[i]:
            np.testing.assert_array_equal(got[k], first[i][k])
    assert b.step == 12
    c = packing.PackedSampler(docs, 2, 6, seed=2)
    assert not np.array_equal(c.batch(0)["inputs"], first[0]["inputs"])
    per_epoch = a.rows_per_epoch
    assert per_epoch == (sum(len(d) for d in docs) - 1) // 6
    e0 = np.random.default_rng((1, 0)).permutation(9)
    e1 = np.random.default_rng((1, 1)).permutation(9)
    assert not np.array_equal(e0, e1)


def test_read_documents_from_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "beta", "id": 1}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    (sub / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("no")
    assert packing.read_documents(str(tmp_path)) == [b"alpha", b"beta", b"gamma"]
    assert packing.read_documents(str(tmp_path / "a.txt")) == [b"alpha"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert packing.read_documents(str(tmp_path / "c.jsonl"), jsonl_field="body") == [b"x"]
    with pytest.raises(ValueError, match=r"c.jsonl:1: expected an object with a 'text' field, got \['body'\]"):
        packing.read_documents(str(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        packing.read_documents(str(tmp_path / "missing"))


def test_split_documents():
    docs = [b"a" * 5] * 20
    train_docs, val_docs = packing.split_documents(docs, 0.1)
    assert len(train_docs) == 18 and len(val_docs) == 2
    one_train, one_val = packing.split_documents([b"abcdefghij"], 0.2)
    assert one_train == [b"abcdefgh"] and one_val == [b"ij"]


def test_packed_rows_do_not_attend_across_documents():
    """The logits of each document inside a packed row equal those of the document alone."""
    cfg = zoo.presets.get("gpt2-tiny", d_model=32, n_layers=2, max_len=32)  # learned positions: resets matter
    params = zoo.init(jax.random.key(0), cfg)
    docs = [np.arange(1, 6, dtype=np.int32) * 7, np.arange(1, 9, dtype=np.int32) * 3, np.full(4, 9, np.int32)]
    tokens, doc_ids = packing.pack_stream(docs)
    row = packing.pack_rows(tokens[None, :-1], doc_ids[None, :-1], tokens[None, 1:], doc_ids[None, 1:])
    L = row["inputs"].shape[1]
    # Each document alone in its own row, padded at the end (causal: padding after a token cannot
    # change its logits); the packed row repeated to the same [3, L] batch: one compilation.
    alone_RL = np.stack([np.pad(d[:L], (0, max(0, L - len(d)))) for d in docs])
    both = {k: np.concatenate([np.repeat(row[k], 3, 0), v]) for k, v in (
        ("inputs", alone_RL), ("segment_ids", np.ones_like(alone_RL)),
        ("positions", np.broadcast_to(np.arange(L, dtype=np.int32), alone_RL.shape)))}
    logits = np.asarray(zoo.forward(params, both["inputs"], cfg=cfg, segment_ids=both["segment_ids"],
                                    positions=both["positions"]))
    start = 0
    for j, d in enumerate(docs):
        n = min(len(d), L - start)
        np.testing.assert_allclose(logits[0, start:start + n], logits[3 + j, :n], rtol=1e-5, atol=1e-5)
        start += n
    assert start == L
