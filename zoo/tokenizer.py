"""Tokenizers: UTF-8 bytes by default, a trained byte-level BPE as an option.

Every tokenizer maps `str -> int32 ids` and back, and knows which bytes of text each id stands
for (`piece`). That last part is what makes bits per byte comparable across tokenizers: the
loss summed over a window of tokens, divided by the number of text bytes those tokens cover
(`covered_bytes`), is independent of how the text was cut into tokens.

`BPETokenizer` is a thin wrapper around Hugging Face `tokenizers` (the library behind most
published tokenizers; `pip install 'jax-zoo[bpe]'`), configured as GPT-2's byte-level BPE: the
256 byte symbols are always in the vocabulary, so any string encodes, and decoding the ids of a
text gives that text back exactly. It is imported only when a BPE is trained or loaded, so the
byte-level default needs nothing beyond numpy.

A run folder holds the trained BPE as `tokenizer.json` (the library's own format, readable by
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`); a folder without one is byte level.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Int

#: The file a run folder stores its BPE in (absent: the run is byte level).
TOKENIZER_FILE = "tokenizer.json"
#: The optional dependency's install hint, quoted by every error about it.
INSTALL_HINT = "pip install 'jax-zoo[bpe]'"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
#: Texts longer than this are encoded in newline-aligned pieces, in parallel (see BPETokenizer.encode).
_CHUNK_CHARS = 1 << 12


class MissingDependencyError(ImportError):
    """An optional library is not installed; the message says which extra provides it."""


@runtime_checkable
class Tokenizer(Protocol):
    """What training, evaluation and generation need from a tokenizer.

    vocab_size: ids are in [0, vocab_size).
    eos_id, pad_id: the end-of-text and padding ids, or None where the vocabulary has none
      (byte level: all 256 ids are bytes).
    encode(text) -> int32 ids [L]; decode(ids) -> text (invalid UTF-8 becomes U+FFFD).
    piece(id) -> the bytes that id stands for; decode(ids) is the UTF-8 decoding of the pieces
      joined.
    token_bytes() -> int64 [vocab_size]: len(piece(id)) for every id.
    """

    vocab_size: int
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> "Int[np.ndarray, 'L']": ...

    def decode(self, ids: Any) -> str: ...

    def piece(self, token_id: int) -> bytes: ...

    def token_bytes(self) -> "Int[np.ndarray, 'V']": ...


def _check_ids(owner: str, ids: Any, vocab_size: int) -> np.ndarray:
    ids_L = np.asarray(ids)
    if ids_L.ndim != 1:
        raise ValueError(f"{owner}: ids: expected rank 1, got shape {ids_L.shape}")
    if ids_L.size and not np.issubdtype(ids_L.dtype, np.integer):
        raise TypeError(f"{owner}: ids: expected an integer dtype, got {ids_L.dtype}")
    if ids_L.size and (ids_L.min() < 0 or ids_L.max() >= vocab_size):
        raise ValueError(f"{owner}: ids: expected values in [0, {vocab_size}), "
                         f"got values in [{int(ids_L.min())}, {int(ids_L.max())}]")
    return ids_L


def _check_text(owner: str, text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{owner}: text: expected str, got {type(text).__name__}")


class ByteTokenizer:
    """UTF-8 bytes as token ids: `encode` gives int32 ids in [0, 256), `decode` inverts it.

    Decoding replaces invalid UTF-8 (e.g. a multi-byte character cut by the end of a sample)
    with U+FFFD instead of raising.
    """

    vocab_size: int = 256
    eos_id = None
    pad_id = None

    def encode(self, text: str) -> "Int[np.ndarray, 'L']":
        _check_text("ByteTokenizer.encode", text)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        ids_L = _check_ids("ByteTokenizer.decode", ids, self.vocab_size)
        return ids_L.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> bytes:
        return bytes([int(_check_ids("ByteTokenizer.piece", [token_id], self.vocab_size)[0])])

    def token_bytes(self) -> "Int[np.ndarray, 'V']":
        return np.ones(self.vocab_size, np.int64)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError(
            f"the BPE tokenizer needs the Hugging Face 'tokenizers' library: {INSTALL_HINT}") from None
    return tokenizers


def check_bpe_available() -> None:
    """Raise MissingDependencyError (naming the extra to install) unless `tokenizers` imports."""
    _tokenizers()


@functools.lru_cache(maxsize=1)
def _byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character (GPT-2's table): printable
    Latin-1 bytes stand for themselves, the other 68 are moved to 256, 257, ... in byte order,
    so no vocabulary entry holds whitespace or control characters. This inverts that table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbol = {b: chr(b) for b in printable}
    moved = 0
    for b in range(256):
        if b not in symbol:
            symbol[b] = chr(256 + moved)
            moved += 1
    return {s: b for b, s in symbol.items()}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained and run by Hugging Face `tokenizers`.

    Ids: 0 is `<|endoftext|>` (eos), 1 is `<|pad|>`, 2..257 the 256 bytes, then the merges in
    the order they were learned. Encoding splits text with GPT-2's pre-tokenizer regex (no
    prefix space is added), so decode(encode(text)) == text for every str.

    Build one with `BPETokenizer.train(texts, vocab_size)` or `BPETokenizer.load(path)`.
    """

    def __init__(self, tok: Any):
        """tok: a `tokenizers.Tokenizer` holding a byte-level BPE with both special tokens."""
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = tok.token_to_id(EOS)
        self.pad_id = tok.token_to_id(PAD)
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"BPETokenizer: tok: expected a vocabulary holding {EOS!r} and {PAD!r}, "
                             f"got eos id {self.eos_id}, pad id {self.pad_id}")
        self._pieces = self._build_pieces()

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges from `texts` (one str, or any iterable of str, e.g. a generator over a
        corpus) until the vocabulary holds `vocab_size` ids (fewer when the texts run out of
        pairs seen at least `min_frequency` times).

        vocab_size: at least 258 (256 bytes + eos + pad). The result is a function of the texts
          and settings only: the library breaks ties between equally frequent pairs by the
          pair itself, never by hash or thread order, so two trainings give equal tokenizers.
        """
        if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) or vocab_size < 258:
            raise ValueError(f"BPETokenizer.train: vocab_size: expected an integer >= 258 "
                             f"(256 bytes + eos + pad), got {vocab_size!r}")
        if not isinstance(min_frequency, (int, np.integer)) or isinstance(min_frequency, bool) or min_frequency < 1:
            raise ValueError(f"BPETokenizer.train: min_frequency: expected a positive integer, got {min_frequency!r}")
        tk = _tokenizers()
        if isinstance(texts, str):
            texts = _newline_chunks(texts, _CHUNK_CHARS)  # pieces: the library pre-tokenizes them in parallel
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        # initial_alphabet puts all 256 byte symbols in the vocabulary even when the texts lack
        # some, so every string stays encodable.
        trainer = tk.trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                         special_tokens=[EOS, PAD], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_checked_texts(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Read a `tokenizer.json` written by `save` (a file, or a folder holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPETokenizer.load: path: expected a {TOKENIZER_FILE} file, got {path!r}")
        try:
            tok = _tokenizers().Tokenizer.from_file(path)
        except Exception as e:  # the library raises plain Exception on malformed JSON
            if isinstance(e, MissingDependencyError):
                raise
            raise ValueError(f"BPETokenizer.load: {path}: not a tokenizers file ({str(e).splitlines()[0]})") from None
        return cls(tok)

    def save(self, path: str | os.PathLike) -> str:
        """Write `tokenizer.json` (to `path`, or into it if it is a folder); returns the file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        self._tok.save(path, pretty=True)
        return path

    def to_json(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> "Int[np.ndarray, 'L']":
        """Token ids of `text`. Long texts are encoded in pieces cut after a newline (in parallel):
        the ids can differ from a one-piece encoding only where a token would span a cut, and
        they always decode to `text`."""
        _check_text("BPETokenizer.encode", text)
        chunks = _newline_chunks(text, _CHUNK_CHARS)
        if len(chunks) == 1:
            return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets we do not use
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = batch(chunks, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, np.int32) for e in encodings])

    def decode(self, ids: Any) -> str:
        ids_L = _check_ids("BPETokenizer.decode", ids, self.vocab_size)
        return b"".join(self._pieces[i] for i in ids_L.tolist()).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> bytes:
        return self._pieces[int(_check_ids("BPETokenizer.piece", [token_id], self.vocab_size)[0])]

    def token_bytes(self) -> "Int[np.ndarray, 'V']":
        return np.asarray([len(p) for p in self._pieces], np.int64)

    def _build_pieces(self) -> list[bytes]:
        byte_of = _byte_of_symbol()
        special = {EOS, PAD} | {t.content for t in self._tok.get_added_tokens_decoder().values()}
        pieces: list[bytes] = [b""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token in special:
                pieces[i] = token.encode("utf-8")  # decoded as its own text, like the library does
            else:
                try:
                    pieces[i] = bytes(byte_of[c] for c in token)
                except KeyError:
                    raise ValueError(f"BPETokenizer: vocabulary entry {token!r} (id {i}) is not byte-level") from None
        return pieces

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _checked_texts(texts: Iterable[str]) -> Iterable[str]:
    for k, t in enumerate(texts):
        _check_text(f"BPETokenizer.train: texts[{k}]", t)
        yield t


def _newline_chunks(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each ending just after a newline
    where one exists (so pre-tokens, which never continue past a newline into a word, are
    rarely split)."""
    if len(text) <= size:
        return [text]
    chunks, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl >= start else end
        chunks.append(text[start:end])
        start = end
    return chunks


def load(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a run folder: its `tokenizer.json` (BPE) if present, else bytes."""
    path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
    return BPETokenizer.load(path) if os.path.isfile(path) else ByteTokenizer()


def covered_bytes(targets: Any, token_bytes: "Int[np.ndarray, 'V']", mask: Any = None) -> int:
    """Bytes of text covered by the scored targets: sum of token_bytes[t] over positions with
    t >= 0 and a non-zero mask (all positions when mask is None)."""
    targets = np.asarray(targets)
    scored = targets >= 0
    if mask is not None:
        scored = scored & (np.asarray(mask) != 0)
    return int(np.sum(np.where(scored, np.asarray(token_bytes)[np.maximum(targets, 0)], 0)))


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """A loss summed over tokens (nats) as bits per byte of the text those tokens cover."""
    return float(nats) / n_bytes / np.log(2) if n_bytes else float("nan")
