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

`HFTokenizer` runs a published model's own tokenizer (the `tokenizer.json` + `tokenizer_config.json`
+ `generation_config.json` that `zoo convert --from-hf` copies into its checkpoint), so a converted
Llama or Qwen is prompted in the vocabulary it was trained on. `load(folder)` tells the three
folder kinds apart (see `kind`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Int

#: The file a run folder stores its BPE in (absent: the run is byte level).
TOKENIZER_FILE = "tokenizer.json"
#: The optional dependency's install hint, quoted by every error about it.
INSTALL_HINT = "pip install 'jax-zoo[bpe]'"
#: The files of a Hugging Face tokenizer that travel with a converted checkpoint (those present).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_CONFIG_FILE = "tokenizer_config.json"
HF_GENERATION_FILE = "generation_config.json"
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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a str, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    """generation_config.json's `eos_token_id`: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"expected an int or a list of ints, got {value!r}")
    return list(values)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space a WordPiece decode leaves before
    punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


class HFTokenizer:
    """A published model's Hugging Face tokenizer (`tokenizer.json`), encoded and decoded the way
    `transformers.AutoTokenizer` does for that folder.

    Special tokens on encode (`add_special_tokens=True`, the transformers default): when
    tokenizer_config.json sets `add_bos_token` / `add_eos_token`, those flags decide (transformers
    rebuilds the post-processor from them); otherwise the post-processor stored in tokenizer.json
    does (e.g. Llama 3's template prepends `<|begin_of_text|>`, Qwen's adds nothing).

    Ids: bos/pad from tokenizer_config.json (else generation_config.json); the eos ids, where a
    generation stops, from generation_config.json (what `model.generate` uses; Qwen lists two),
    else tokenizer_config.json's `eos_token`. `decode` skips special tokens (display text).
    `piece` is exact for byte-level vocabularies (GPT-2, Llama 3, Qwen); for SentencePiece-style
    ones it maps `▁` to a space and `<0xNN>` to its byte.
    """

    def __init__(self, tok: Any, *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 pad_id: int | None = None, add_bos: bool | None = None, add_eos: bool | None = None,
                 clean_up_spaces: bool = False):
        """tok: a `tokenizers.Tokenizer`. add_bos / add_eos: None leaves special tokens to tok's
        post-processor; a bool adds (or not) that token around every encoded text instead."""
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_ids = tuple(int(i) for i in eos_ids)
        for name, ids in (("bos_id", [bos_id]), ("eos_ids", self.eos_ids), ("pad_id", [pad_id])):
            if any(i is not None and not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"HFTokenizer: {name}: expected ids in [0, {self.vocab_size}), got {ids}")
        if add_bos and bos_id is None:
            raise ValueError("HFTokenizer: add_bos: expected a bos_id to add, got bos_id=None")
        if add_eos and not self.eos_ids:
            raise ValueError("HFTokenizer: add_eos: expected an eos id to add, got none")
        self.bos_id, self.pad_id = bos_id, pad_id
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.add_bos, self.add_eos, self.clean_up_spaces = add_bos, add_eos, bool(clean_up_spaces)
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._pieces = self._build_pieces(vocab)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        """Read a Hugging Face tokenizer folder (tokenizer.json, optional tokenizer_config.json and
        generation_config.json)."""
        directory = os.fspath(directory)
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HFTokenizer.load: directory: expected a folder holding {TOKENIZER_FILE}, "
                                    f"got {directory!r}")
        tok = _from_file("HFTokenizer.load", path)
        config = _read_json(os.path.join(directory, HF_CONFIG_FILE))
        generation = _read_json(os.path.join(directory, HF_GENERATION_FILE))

        def token_id(key: str) -> int | None:
            text = _token_text(config.get(key))
            return None if text is None else tok.token_to_id(text)

        try:
            eos_ids = _id_list(generation.get("eos_token_id"))
        except ValueError as e:
            raise ValueError(f"HFTokenizer.load: {HF_GENERATION_FILE}: eos_token_id: {e}") from None
        if not eos_ids and token_id("eos_token") is not None:
            eos_ids = [token_id("eos_token")]
        bos_id = token_id("bos_token")
        bos_id = generation.get("bos_token_id") if bos_id is None else bos_id
        pad_id = token_id("pad_token")
        pad_id = generation.get("pad_token_id") if pad_id is None else pad_id
        # transformers rebuilds the template from these flags only when the config names one.
        explicit = "add_bos_token" in config or "add_eos_token" in config
        add_bos = bool(config.get("add_bos_token", False)) if explicit else None
        add_eos = bool(config.get("add_eos_token", False)) if explicit else None
        if add_eos:  # transformers appends the tokenizer's own eos, not generation_config's
            eos_token = token_id("eos_token")
            eos_ids = [eos_token, *(i for i in eos_ids if i != eos_token)] if eos_token is not None else eos_ids
        # transformers skips the clean-up for BPE models: it would delete real spaces.
        bpe = type(tok.model).__name__ == "BPE"
        clean = bool(config.get("clean_up_tokenization_spaces", False)) and not bpe
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
                   clean_up_spaces=clean)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> "Int[np.ndarray, 'L']":
        """Token ids of `text`; add_special_tokens=False gives the text's own tokens only (e.g. a
        stop string)."""
        _check_text("HFTokenizer.encode", text)
        if not add_special_tokens or self.add_bos is None:
            return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * bool(self.add_eos)
        return np.asarray(ids, np.int32)

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        ids_L = _check_ids("HFTokenizer.decode", ids, self.vocab_size)
        text = self._tok.decode(ids_L.tolist(), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def piece(self, token_id: int) -> bytes:
        return self._pieces[int(_check_ids("HFTokenizer.piece", [token_id], self.vocab_size)[0])]

    def token_bytes(self) -> "Int[np.ndarray, 'V']":
        return np.asarray([len(p) for p in self._pieces], np.int64)

    def _build_pieces(self, vocab: dict[str, int]) -> list[bytes]:
        byte_level = "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("decoder"))
        byte_of = _byte_of_symbol()
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        pieces: list[bytes] = [b""] * self.vocab_size
        for token, i in vocab.items():
            if token in added:
                pieces[i] = token.encode("utf-8")
            elif byte_level and all(c in byte_of for c in token):
                pieces[i] = bytes(byte_of[c] for c in token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                pieces[i] = bytes([int(token[3:5], 16)])  # SentencePiece byte fallback
            else:
                pieces[i] = token.replace("\u2581", " ").encode("utf-8")
        return pieces

    def to_json(self) -> str:
        return self._tok.to_str()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.to_json() == other.to_json() and (
            (self.bos_id, self.eos_ids, self.pad_id, self.add_bos, self.add_eos, self.clean_up_spaces)
            == (other.bos_id, other.eos_ids, other.pad_id, other.add_bos, other.add_eos, other.clean_up_spaces))

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"


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


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_zoo_bpe(tok: Any) -> bool:
    """Ids 0 and 1 are the zoo's eos and pad: the layout `BPETokenizer.train` always gives, and
    no published tokenizer we know of has (GPT-2's `<|endoftext|>` is 50256, with no `<|pad|>`)."""
    return tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1


def kind(directory: str | os.PathLike) -> str:
    """Which tokenizer a folder holds: "bytes" (no tokenizer.json), "hf" (a Hugging Face
    tokenizer: tokenizer_config.json beside it, which transformers always writes and `zoo train`
    never does, or a vocabulary not laid out like the zoo's) or "bpe" (written by `zoo train`)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return "bytes"
    if os.path.isfile(os.path.join(directory, HF_CONFIG_FILE)):
        return "hf"
    return "bpe" if _is_zoo_bpe(_from_file("load", path)) else "hf"


def _from_file(owner: str, path: str) -> Any:
    try:
        return _tokenizers().Tokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exception on malformed JSON
        if isinstance(e, MissingDependencyError):
            raise
        raise ValueError(f"{owner}: {path}: not a tokenizers file ({str(e).splitlines()[0]})") from None


def load(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a run folder or converted checkpoint, by `kind`: HFTokenizer, the zoo's
    BPETokenizer, or bytes when the folder holds no tokenizer.json."""
    which = kind(directory)
    if which == "bytes":
        return ByteTokenizer()
    return HFTokenizer.load(directory) if which == "hf" else BPETokenizer.load(directory)


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
