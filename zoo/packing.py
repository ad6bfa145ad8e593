"""Documents as training data: reading text files, folders and JSONL, and packing documents
into fixed-length rows with segment ids, per-document positions and loss masks.

Packing: each epoch the documents are shuffled (a permutation drawn from `(seed, epoch)`) and
concatenated into one stream; row r of the epoch is stream[r*L : r*L + L]. A document may
continue into the next row. Within a row,
  segment_ids: 1, 2, ... numbering the documents (pieces) in the row, so attention stays inside
    a document (the model's `segment_ids=`);
  positions: the position inside that piece, from 0 at the piece's first token in the row;
  targets: the next token of the same document; mask: 1 where such a next token exists (0 at
    a document's last token, whose successor would be the next document's first token).
`PackedSampler` draws batch i as rows [i*B, (i+1)*B) of this endless sequence of epochs, so
its `step` is the whole iterator state (see `zoo.data.SeededSampler`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from zoo import data as zdata

if TYPE_CHECKING:
    from jaxtyping import Int

#: Files in a data folder read as documents (others, and hidden files, are skipped).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".csv", ".tex")


def _read_jsonl(path: str, field: str) -> list[bytes]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{n}: expected an object with a {field!r} field, got {keys}")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}:{n}: field {field!r}: expected a string, got "
                                 f"{type(record[field]).__name__}")
            docs.append(record[field].encode("utf-8"))
    return docs


def read_documents(path: str, *, jsonl_field: str = "text") -> list[bytes]:
    """The documents under `path`, as UTF-8 bytes, in a deterministic order.

    A `.jsonl` file gives one document per line (its `jsonl_field` string); any other file is
    one document; a folder gives the documents of its files with a text suffix (TEXT_SUFFIXES),
    recursively, sorted by relative path. Empty documents are dropped.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"read_documents: path: {path!r} does not exist")
    files = [path]
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, n) for n in filenames
                      if not n.startswith(".") and n.endswith(TEXT_SUFFIXES)]
        files.sort()
    docs: list[bytes] = []
    for f in files:
        if f.endswith(".jsonl"):
            docs += _read_jsonl(f, jsonl_field)
        else:
            with open(f, "rb") as fh:
                docs.append(fh.read())
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"read_documents: path: no non-empty documents found in {path!r}")
    return docs


def split_documents(docs: list[Any], val_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, val): the last `val_fraction` of the documents (at least one when val_fraction > 0);
    a single document is cut instead, its tail being the validation document."""
    if val_fraction <= 0:
        return list(docs), []
    if len(docs) == 1:
        cut = len(docs[0]) - max(1, int(round(len(docs[0]) * val_fraction)))
        if cut < 2:
            raise ValueError(f"split_documents: docs: a single document of {len(docs[0])} tokens is too "
                             f"short to split")
        return [docs[0][:cut]], [docs[0][cut:]]
    n_val = min(len(docs) - 1, max(1, int(round(len(docs) * val_fraction))))
    return list(docs[:-n_val]), list(docs[-n_val:])


def pack_stream(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document index per token) of the documents concatenated in the given order."""
    tokens = np.concatenate([np.asarray(d) for d in docs]).astype(np.int32)
    doc_ids = np.repeat(np.arange(len(docs), dtype=np.int64), [len(d) for d in docs])
    return tokens, doc_ids


def pack_rows(tokens: np.ndarray, doc_ids: np.ndarray, next_tokens: np.ndarray, next_doc_ids: np.ndarray
              ) -> dict[str, "Int[np.ndarray, 'R L']"]:
    """Rows [R, L] from token / document-id rows and the stream shifted by one (the next token
    and its document id): inputs, targets, mask, segment_ids (from 1 per row), positions."""
    starts_RL = np.ones(doc_ids.shape, bool)
    starts_RL[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment_ids_RL = np.cumsum(starts_RL, axis=1).astype(np.int32)
    idx_RL = np.broadcast_to(np.arange(doc_ids.shape[1]), doc_ids.shape)
    start_idx_RL = np.maximum.accumulate(np.where(starts_RL, idx_RL, 0), axis=1)
    return {"inputs": tokens.astype(np.int32), "targets": next_tokens.astype(np.int32),
            "mask": (doc_ids == next_doc_ids).astype(np.float32), "segment_ids": segment_ids_RL,
            "positions": (idx_RL - start_idx_RL).astype(np.int32)}


class PackedSampler(zdata.SeededSampler):
    """Batches of packed rows (see the module doc) from documents of token ids.

    docs: token-id sequences (bytes become byte ids); batch `i` depends only on
    (seed, i) (see zoo.data.SeededSampler). Every epoch holds total_tokens // seq_len rows
    (the shuffled stream's tail that does not fill a row is dropped that epoch).
    """

    def __init__(self, docs: list[Any], batch_size: int, seq_len: int, seed: int = 0, *, step: int = 0):
        self.docs = [zdata.as_array(d, f"PackedSampler: docs[{k}]") for k, d in enumerate(docs)]
        self.docs = [d for d in self.docs if d.size]
        if not self.docs:
            raise ValueError("PackedSampler: docs: expected at least one non-empty document")
        self.seq_len = seq_len
        total = sum(d.size for d in self.docs)
        # the stream needs one token beyond the last row for its target
        self.rows_per_epoch = (total - 1) // seq_len
        if self.rows_per_epoch < 1:
            raise ValueError(f"PackedSampler: docs: expected more than seq_len = {seq_len} tokens in all, "
                             f"got {total}")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        super().__init__(batch_size, seed, step=step)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.docs))
            tokens, doc_ids = pack_stream([self.docs[k] for k in order])
            self._epoch_cache = (epoch, tokens, doc_ids)
        return self._epoch_cache[1], self._epoch_cache[2]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        rows = []
        for r in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, row = divmod(r, self.rows_per_epoch)
            tokens, doc_ids = self._epoch(epoch)
            sl = slice(row * L, row * L + L + 1)
            rows.append((tokens[sl], doc_ids[sl]))
        tok_RL1 = np.stack([t for t, _ in rows])
        doc_RL1 = np.stack([d for _, d in rows])
        return pack_rows(tok_RL1[:, :-1], doc_RL1[:, :-1], tok_RL1[:, 1:], doc_RL1[:, 1:])

    def __repr__(self) -> str:
        return (f"PackedSampler({len(self.docs)} docs, {self.rows_per_epoch} rows of {self.seq_len} per epoch, "
                f"batch_size={self.batch_size}, seed={self.seed}, step={self._step})")
