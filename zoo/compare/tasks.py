"""The tasks of `zoo compare`: each names its data, its sequence length, vocabulary and metric.

Synthetic tasks (MQAR, selective copying, induction heads) are scored by accuracy on freshly
drawn batches from a seed no training batch uses; byte-level language modelling is scored in
bits per byte on the held-out tail of the built-in corpus (`zoo.data.split`).

MQAR follows the Zoology recipe (`zoo.tasks.MQARConfig`) with a vocabulary of 2 L instead of
8192, so a CPU run spends its steps on recall rather than on learning thousands of embeddings.

Packing: a run trains every task on rows of one length, the longest task's (`row_length`).
A shorter task puts row_length // L of its sequences in each row, with segment ids and
per-sequence positions, so that no token sees another sequence (the model's `segment_ids=` and
`positions=`; exact for every family, tests/zoo/test_compare_packing.py). Every task then has
the same tokens per step and the same model shape (vocabulary: the run's largest), so a family
compiles one sweep step and one scorer for the whole run instead of one per length: on a CPU
a compile costs more than a task's training (docs/compare.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from zoo import data as zdata
from zoo import tasks as ztasks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """Attributes:
    name: key in results.json.
    metric: "accuracy" (higher is better) or "bits_per_byte" (lower is better).
    vocab_size, seq_len: the model vocabulary and training length for this task.
    source: a `zoo.tasks` config, or None for language modelling on the built-in corpus.
    """

    name: str
    metric: str
    vocab_size: int
    seq_len: int
    source: Any = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def mqar(seq_len: int, kv: int, vocab_size: int | None = None) -> Task:
    """MQAR at (seq_len, kv) with vocabulary `vocab_size` (default 2 * seq_len; must exceed seq_len)."""
    cfg = ztasks.MQARConfig(vocab_size=2 * seq_len if vocab_size is None else vocab_size, seq_len=seq_len,
                            num_kv_pairs=kv)
    return Task(name=f"mqar_{seq_len}_{kv}", metric="accuracy", vocab_size=cfg.vocab_size, seq_len=seq_len,
                source=cfg)


def selective_copy(seq_len: int = 64) -> Task:
    cfg = ztasks.SelectiveCopyConfig(vocab_size=16, seq_len=seq_len, n_tokens_to_copy=8)
    return Task(name="selective_copy", metric="accuracy", vocab_size=16, seq_len=seq_len, source=cfg)


def induction(seq_len: int = 64) -> Task:
    cfg = ztasks.InductionConfig(vocab_size=16, seq_len=seq_len)
    return Task(name="induction", metric="accuracy", vocab_size=16, seq_len=seq_len, source=cfg)


def lm(seq_len: int = 128) -> Task:
    return Task(name="lm", metric="bits_per_byte", vocab_size=256, seq_len=seq_len, source=None)


#: MQAR's vocabulary in --quick (keys 1..35, values 36..71).
QUICK_MQAR_VOCAB = 72

#: Groups accepted by --tasks besides single task names.
GROUPS = ("mqar", "selective_copy", "induction", "lm")


def default_tasks(mode: str) -> list[Task]:
    """The task list of a mode: "quick", "default" or "full"."""
    if mode == "quick":
        # A vocabulary just above L (MQAR needs V > L): fewer embeddings to learn, so attention
        # leaves the ln(4) plateau within the quick budget (docs/compare.md, "MQAR on a CPU").
        return [mqar(64, 4, vocab_size=QUICK_MQAR_VOCAB), lm(64)]
    # The default mode keeps MQAR at the three lengths the comparison is about (Zoology's recall
    # against sequence length and number of pairs); the shorter tasks are packed into rows of the
    # longest, so each family still compiles one sweep step (see Packing above).
    pairs = [(64, 4), (128, 8), (256, 16)] + ([(512, 64)] if mode == "full" else [])
    return [mqar(L, kv) for L, kv in pairs] + [selective_copy(), induction(), lm()]


def row_length(tasks: list[Task]) -> int:
    """The length of every training and scoring row of a run of `tasks`: the longest task's."""
    return max(t.seq_len for t in tasks)


def model_vocab(tasks: list[Task]) -> int:
    """The model vocabulary of a run of `tasks`: the largest task vocabulary. All tasks then train
    one model shape (see Packing above); a task's data use only its own first `vocab_size` ids,
    and the extra output rows just learn to stay unlikely."""
    return max(t.vocab_size for t in tasks)


def packed(tasks: list[Task]) -> bool:
    """Whether a run of `tasks` packs sequences into rows: some task is shorter than the rows.
    Every task then passes segment ids and positions (one executable); when all tasks fill the
    rows, none does, and attention may take its blocked path."""
    return any(t.seq_len < row_length(tasks) for t in tasks)


def pack(inputs_NL: np.ndarray, targets_NL: np.ndarray, rows: int, row_len: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """N = rows * (row_len // L) sequences of length L -> (inputs, targets, segment_ids,
    positions), each [rows, row_len]. Sequence j of a row has segment id j + 1 and positions
    0..L-1; a tail shorter than L (row_len not a multiple of L) is padding: its own segment,
    targets IGNORE (-1)."""
    N, L = inputs_NL.shape
    k = row_len // L
    if k < 1 or N != rows * k:
        raise ValueError(f"pack: expected {rows} x {k} sequences of length <= row_len={row_len}, got {N} of {L}")
    tail = row_len - k * L
    x = np.pad(inputs_NL.reshape(rows, k * L), ((0, 0), (0, tail)))
    y = np.pad(targets_NL.reshape(rows, k * L), ((0, 0), (0, tail)), constant_values=-1)
    seg_T = np.concatenate([np.repeat(np.arange(1, k + 1, dtype=np.int32), L), np.full(tail, k + 1, np.int32)])
    pos_T = np.concatenate([np.tile(np.arange(L, dtype=np.int32), k), np.arange(tail, dtype=np.int32)])
    return (x.astype(np.int32), y.astype(np.int32), np.broadcast_to(seg_T, (rows, row_len)),
            np.broadcast_to(pos_T, (rows, row_len)))


def select(tasks: list[Task], wanted: list[str]) -> list[Task]:
    """Tasks whose name is in `wanted` or whose group (name before the first '_' for MQAR) is."""
    return [t for t in tasks if t.name in wanted or (t.name.startswith("mqar_") and "mqar" in wanted)]


_CORPUS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def corpus_split(max_bytes: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) bytes of the built-in corpus (the last 5% held out), cached per process."""
    if max_bytes not in _CORPUS:
        _CORPUS[max_bytes] = tuple(zdata.split(zdata.as_array(zdata.builtin_corpus(max_bytes)), 0.05))
    return _CORPUS[max_bytes]


def _per_row(task: Task, row_len: int | None) -> int:
    return 1 if row_len is None else row_len // task.seq_len


def train_batches(task: Task, rows: int, seed: int, row_len: int | None = None
                  ) -> Iterator[tuple[np.ndarray, ...]]:
    """Training batches: (inputs, targets) [rows, L], or packed into rows of `row_len` tokens
    (`pack`: inputs, targets, segment_ids, positions) when row_len is given."""
    n = rows * _per_row(task, row_len)
    if task.source is None:
        sequences = iter(zdata.WindowSampler(corpus_split()[0], n, task.seq_len, seed))
    else:
        sequences = iter(ztasks.Sampler(task.source, n, seed))
    if row_len is None:
        return sequences
    return (pack(x, y, rows, row_len) for x, y in sequences)


def eval_batches(task: Task, rows: int, n_batches: int, seed: int, row_len: int | None = None
                 ) -> list[tuple[np.ndarray, ...]]:
    """Held-out batches, shaped like `train_batches`': corpus windows from the held-out split, or
    task batches drawn from a seed (seed + 1_000_003) that no training sampler of this run uses."""
    n = rows * _per_row(task, row_len)
    if task.source is None:
        x_NL, y_NL = zdata.sequential_windows(corpus_split()[1], task.seq_len, n_batches * n)
        batches = [(x_NL[i:i + n], y_NL[i:i + n]) for i in range(0, (x_NL.shape[0] // n) * n, n)]
    else:
        sampler = ztasks.Sampler(task.source, n, seed + 1_000_003)
        batches = [sampler.batch(i) for i in range(n_batches)]
    return batches if row_len is None else [pack(x, y, rows, row_len) for x, y in batches]
