"""Data: a corpus that ships with every Python, and window sampling (tokenizers: zoo.tokenizer).

The tiny presets are byte level (vocab 256), so any text trains them without a vocabulary
file. `builtin_corpus` gathers the CPython standard library's own `.py` sources at runtime,
so a training run needs no download; `WindowSampler` draws next-byte prediction batches
deterministically from a seed and a step counter, so a resumed run sees the same batches.
"""

from __future__ import annotations

import abc

import os
import sysconfig
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from zoo.tokenizer import ByteTokenizer  # noqa: F401  (its home is zoo.tokenizer; kept here for old imports)

if TYPE_CHECKING:
    from jaxtyping import Int

#: Directories of the standard library that are not part of the corpus.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def _separator(rel_path: str) -> bytes:
    return f"\n# ==== {rel_path} ====\n".encode()


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """(relative posix path, absolute path) of the stdlib's `.py` files, sorted by relative path."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    found.sort()
    return found


def builtin_corpus(max_bytes: int | None = None) -> bytes:
    """The CPython standard library's `.py` sources, concatenated in sorted path order.

    Each file is preceded by a one-line separator naming it. `max_bytes` truncates the result
    (reading stops as soon as enough bytes are gathered). The content is deterministic for a
    given Python installation.
    """
    if max_bytes is not None and (
        not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 1
    ):
        raise ValueError(f"builtin_corpus: max_bytes: expected a positive integer or None, got {max_bytes!r}")
    parts: list[bytes] = []
    total = 0
    for rel, path in stdlib_files():
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            continue  # unreadable file (permissions, broken link): not part of the corpus
        chunk = _separator(rel) + body
        parts.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"".join(parts)
    if not data:
        raise RuntimeError(f"builtin_corpus: no .py files found under {sysconfig.get_paths()['stdlib']!r}")
    return data if max_bytes is None else data[:max_bytes]


def as_array(data: bytes | bytearray | np.ndarray, name: str = "data") -> np.ndarray:
    """A rank-1 integer array of byte/token ids (bytes become uint8 without a copy)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    arr = np.asarray(data)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected rank 1, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {arr.dtype}")
    return arr


def split(data: bytes | np.ndarray, val_fraction: float = 0.05) -> tuple[Any, Any]:
    """(train, val): the last `val_fraction` of `data` is validation, the rest training.

    Contiguous and deterministic; both halves keep the type of `data`.
    """
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split: val_fraction: expected a float in [0, 1), got {val_fraction!r}")
    n_val = int(round(len(data) * val_fraction))
    cut = len(data) - n_val
    if cut < 1:
        raise ValueError(f"split: data: expected enough data for a non-empty train split, got {len(data)} items")
    return data[:cut], data[cut:]


def random_windows(data_np: np.ndarray, batch_size: int, seq_len: int,
                   rng: np.random.Generator) -> tuple["Int[np.ndarray, 'B L']", "Int[np.ndarray, 'B L']"]:
    """`batch_size` windows at uniform random offsets: inputs [B, L] and next-token targets [B, L]."""
    data_np = as_array(data_np, "random_windows: data_np")
    for field, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"random_windows: {field}: expected a positive integer, got {value!r}")
    if len(data_np) < seq_len + 1:
        raise ValueError(
            f"random_windows: data_np: expected at least seq_len + 1 = {seq_len + 1} items, got {len(data_np)}"
        )
    starts_B = rng.integers(0, len(data_np) - seq_len, size=batch_size)
    idx_BL = starts_B[:, None] + np.arange(seq_len + 1)[None, :]
    windows_BL = data_np[idx_BL].astype(np.int32)
    return windows_BL[:, :-1], windows_BL[:, 1:]


def sequential_windows(data_np: np.ndarray, seq_len: int, max_windows: int | None = None
                       ) -> tuple["Int[np.ndarray, 'N L']", "Int[np.ndarray, 'N L']"]:
    """Non-overlapping windows from the start of `data_np` (evaluation): inputs and targets [N, L]."""
    data_np = as_array(data_np, "sequential_windows: data_np")
    n = (len(data_np) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        empty = np.zeros((0, seq_len), np.int32)
        return empty, empty
    idx_NL = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    windows_NL = data_np[idx_NL].astype(np.int32)
    return windows_NL[:, :-1], windows_NL[:, 1:]


class SeededSampler(abc.ABC):
    """Deterministic iterator whose batch `i` depends only on `(seed, i)`.

    `step` (the number of batches drawn so far) is therefore all the state a checkpoint needs:
    a sampler built with `step=i` continues exactly where a run left off, and `batch(i)` gives
    any batch without drawing the ones before it. Subclasses implement `batch(index)`, usually
    by drawing from `self.rng(index)`.
    """

    def __init__(self, batch_size: int, seed: int = 0, *, step: int = 0):
        name = type(self).__name__
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{name}: step: expected a non-negative integer, got {step!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{name}: seed: expected a non-negative integer, got {seed!r}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self._step = int(step)
        self.batch(0)  # validate the settings now, not at the first draw

    @abc.abstractmethod
    def batch(self, index: int) -> Any:
        """Batch number `index`: (inputs_BL, targets_BL) or a dict of named arrays."""

    def rng(self, index: int) -> np.random.Generator:
        """The generator that batch `index` draws from: a function of (seed, index) only."""
        return np.random.default_rng((self.seed, int(index)))

    @property
    def step(self) -> int:
        """Number of batches drawn so far (the index of the next batch)."""
        return self._step

    def seek(self, step: int) -> "SeededSampler":
        """Continue from batch `step` (a resumed run); returns self."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{type(self).__name__}.seek: step: expected a non-negative integer, got {step!r}")
        self._step = int(step)
        return self

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        out = self.batch(self._step)
        self._step += 1
        return out


class WindowSampler(SeededSampler):
    """Random next-token windows of `data` (see SeededSampler for the determinism contract)."""

    def __init__(self, data: bytes | np.ndarray, batch_size: int, seq_len: int, seed: int = 0, *,
                 step: int = 0):
        self.data = as_array(data, "WindowSampler: data")
        if len(self.data) < seq_len + 1:
            raise ValueError(
                f"WindowSampler: data: expected at least seq_len + 1 = {seq_len + 1} items, got {len(self.data)}"
            )
        self.seq_len = seq_len
        super().__init__(batch_size, seed, step=step)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return random_windows(self.data, self.batch_size, self.seq_len, self.rng(index))

    def __repr__(self) -> str:
        return (f"WindowSampler(len(data)={len(self.data)}, batch_size={self.batch_size}, "
                f"seq_len={self.seq_len}, seed={self.seed}, step={self._step})")
