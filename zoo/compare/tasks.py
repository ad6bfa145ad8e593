"""The tasks of `zoo compare`: each names its data, its sequence length, vocabulary and metric.

Synthetic tasks (MQAR, selective copying, induction heads) are scored by accuracy on freshly
drawn batches from a seed no training batch uses; byte-level language modelling is scored in
bits per byte on the held-out tail of the built-in corpus (`zoo.data.split`).

MQAR follows the Zoology recipe (`zoo.tasks.MQARConfig`) with a vocabulary of 2 L instead of
8192, so a CPU run spends its steps on recall rather than on learning thousands of embeddings.
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
    # against sequence length and number of pairs); each length is one shape group, so each
    # family compiles three sweep steps (docs/compare.md: what that costs on a CPU).
    pairs = [(64, 4), (128, 8), (256, 16)] + ([(512, 64)] if mode == "full" else [])
    return [mqar(L, kv) for L, kv in pairs] + [selective_copy(), induction(), lm()]


def model_vocab(task: Task, tasks: list[Task]) -> int:
    """The model vocabulary for `task` in a run of `tasks`: the largest vocabulary among the tasks
    of its sequence length. Tasks of one length then train one model shape, so a family compiles
    one sweep step and one scorer per length instead of per task; a task's data only use its own
    first `vocab_size` ids, and the extra output rows just learn to stay unlikely."""
    return max(t.vocab_size for t in tasks if t.seq_len == task.seq_len)


def select(tasks: list[Task], wanted: list[str]) -> list[Task]:
    """Tasks whose name is in `wanted` or whose group (name before the first '_' for MQAR) is."""
    return [t for t in tasks if t.name in wanted or (t.name.startswith("mqar_") and "mqar" in wanted)]


_CORPUS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def corpus_split(max_bytes: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) bytes of the built-in corpus (the last 5% held out), cached per process."""
    if max_bytes not in _CORPUS:
        _CORPUS[max_bytes] = tuple(zdata.split(zdata.as_array(zdata.builtin_corpus(max_bytes)), 0.05))
    return _CORPUS[max_bytes]


def train_batches(task: Task, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if task.source is None:
        return iter(zdata.WindowSampler(corpus_split()[0], batch_size, task.seq_len, seed))
    return iter(ztasks.Sampler(task.source, batch_size, seed))


def eval_batches(task: Task, batch_size: int, n_batches: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out batches: corpus windows from the held-out split, or task batches drawn from a
    seed (seed + 1_000_003) that no training sampler of this run uses."""
    if task.source is None:
        x_NL, y_NL = zdata.sequential_windows(corpus_split()[1], task.seq_len, n_batches * batch_size)
        n = (x_NL.shape[0] // batch_size) * batch_size
        return [(x_NL[i:i + batch_size], y_NL[i:i + batch_size]) for i in range(0, n, batch_size)]
    sampler = ztasks.Sampler(task.source, batch_size, seed + 1_000_003)
    return [sampler.batch(i) for i in range(n_batches)]
