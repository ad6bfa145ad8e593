"""Registry of sequence and channel mixers: a config's class names the module that runs it.

Every registered module provides the mixer protocol (DESIGN.md):
  param_specs(cfg) -> specs
  init(key, cfg) -> params
  forward(params, x_BLD, *, cfg, state=None, positions=None, segment_ids=None) -> (y_BLD, state)
  init_state(cfg, batch_size, max_len, dtype) -> state
  step(params, x_BD, state, *, cfg) -> (y_BD, state)
Blocks look the module up here. A family is one module under layers/ that defines its config
class(es) and the protocol functions: the class's home module is found on first use.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

_REGISTRY: dict[type, ModuleType] = {}
PROTOCOL = ("param_specs", "init", "forward", "init_state", "step")


def register(config_cls: type, module: ModuleType) -> None:
    missing = [f for f in PROTOCOL if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"mixer module {module.__name__} lacks protocol functions {missing}")
    _REGISTRY[config_cls] = module


def module_for(cfg: Any) -> ModuleType:
    """The module running `cfg`. A config class defined in a module that provides the protocol
    belongs to that module (registered on first use); other layouts call `register`."""
    cls = type(cfg)
    if cls not in _REGISTRY:
        home = sys.modules.get(cls.__module__)
        if home is not None and home.__name__.startswith("layers.") and all(
                callable(getattr(home, f, None)) for f in PROTOCOL):
            register(cls, home)
    try:
        return _REGISTRY[cls]
    except KeyError:
        known = sorted(c.__name__ for c in _REGISTRY)
        raise TypeError(f"no mixer registered for config type {cls.__name__}; known: {known}") from None


def state_bytes(cfg: Any, batch_size: int, max_len: int, dtype=None) -> int:
    """Bytes of decoding state for one mixer (no memory is allocated)."""
    import jax
    import jax.numpy as jnp
    module = module_for(cfg)
    shapes = jax.eval_shape(lambda: module.init_state(cfg, batch_size, max_len, dtype or jnp.float32))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
