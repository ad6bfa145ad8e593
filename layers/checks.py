"""Input and config validation with errors that name the argument, the expectation and the value."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class ConfigError(ValueError):
    """A configuration field holds a value the model cannot use."""


def fail(owner: str, field: str, expected: str, got: Any) -> None:
    raise ConfigError(f"{owner}.{field}: expected {expected}, got {got!r}")


def positive(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        fail(owner, field, "a positive integer", value)


def one_of(owner: str, field: str, value: Any, options: tuple) -> None:
    if value not in options:
        fail(owner, field, f"one of {options}", value)


def divides(owner: str, field: str, value: int, by_field: str, by: int) -> None:
    if by % value != 0:
        raise ConfigError(
            f"{owner}.{field}={value} must divide {owner}.{by_field}={by}"
        )


def array(name: str, x: Any, *, rank: int | None = None, kind: str | None = None,
          shape: tuple | None = None) -> None:
    """Check rank, dtype kind ('i' integer, 'f' floating) and shape (None entries match anything)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if rank is not None and x.ndim != rank:
        raise ValueError(f"{name}: expected rank {rank}, got shape {tuple(x.shape)} (rank {x.ndim})")
    if kind == "i" and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    if kind == "f" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if shape is not None:
        if len(shape) != x.ndim or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")


def token_range(name: str, tokens: Any, vocab_size: int) -> None:
    """Check 0 <= tokens < vocab_size where the values are concrete (skipped under tracing)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name}: token ids must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]"
        )
