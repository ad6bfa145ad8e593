"""Which backend a kernel is traced for, and whether it runs in interpret mode.

A kernel's structure depends on its backend (Triton tiles are powers of two and have no
sequential grid axis; TPU blocks follow the (8, 128) layout), so it is fixed at trace time:
an explicit `backend=` argument wins, then `lowering_for(...)` (so a whole model traced on this
CPU machine can be lowered for TPU or CUDA), then the running backend.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

BACKENDS = ("gpu", "tpu", "cpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_target_backend", default=None)


@contextlib.contextmanager
def lowering_for(backend: str):
    """Trace kernels for `backend` ("gpu" | "tpu") inside the block, e.g. around
    `jax.jit(step).trace(...).lower(lowering_platforms=("tpu",))` on a CPU machine."""
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"lowering_for: backend must be 'gpu' or 'tpu', got {backend!r}")
    token = _TARGET.set(backend)
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve(backend: str | None, interpret: bool | None, owner: str) -> tuple[str, bool]:
    """(backend, interpret): interpret defaults to True only when the kernel targets the CPU."""
    if backend is None:
        backend = _TARGET.get()
    if backend is None:
        running = jax.default_backend()
        backend = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(running, "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    interpret = (backend == "cpu") if interpret is None else bool(interpret)
    if backend == "cpu" and not interpret:
        raise ValueError(f"{owner}: on CPU Pallas runs only with interpret=True")
    return backend, interpret
