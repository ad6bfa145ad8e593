"""A zoo checkpoint of converted weights: the params through `zoo.checkpoint.Checkpointer` (step 0)
and the ModelConfig as JSON, so `load` rebuilds the config, then restores the arrays against
the abstract targets of its parameter specs.

The config is written twice: inside the checkpoint's `extra` (with the step) and as
`model_config.json` beside the steps, which `load` reads first (a restore needs the config to
build its targets). Decoding imports only dataclasses defined under `layers.` or `zoo.`, so a
config file cannot name arbitrary code.

Assets (a Hugging Face tokenizer's files, see `zoo.tokenizer.HF_FILES`) are stored beside them.
`model_config.json` is written last, by rename, so a folder holding it holds the whole
checkpoint: the params step (Orbax finalises it by rename too) and every asset.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp


CONFIG_FILE = "model_config.json"
# Orbax refuses empty items; converted weights carry no optimizer state, so this stands in.
NO_OPT_STATE = {"none": jnp.zeros((), jnp.int32)}


def config_to_json(cfg: Any) -> Any:
    """Nested frozen dataclasses -> JSON-able dicts tagged with their class."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {"__class__": f"{type(cfg).__module__}:{type(cfg).__qualname__}"}
        for f in dataclasses.fields(cfg):
            out[f.name] = config_to_json(getattr(cfg, f.name))
        return out
    if isinstance(cfg, tuple):
        return {"__tuple__": [config_to_json(v) for v in cfg]}
    if isinstance(cfg, list):
        return [config_to_json(v) for v in cfg]
    if cfg is None or isinstance(cfg, (bool, int, float, str)):
        return cfg
    raise TypeError(f"config_to_json: cannot encode {type(cfg).__name__} value {cfg!r}")


def config_from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [config_from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(config_from_json(v) for v in obj["__tuple__"])
    if "__class__" not in obj:
        return {k: config_from_json(v) for k, v in obj.items()}
    module_name, _, qualname = obj["__class__"].partition(":")
    if not module_name.split(".")[0] in ("layers", "zoo"):
        raise ValueError(f"config_from_json: __class__ {obj['__class__']!r} is outside layers/ and zoo/")
    cls = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"config_from_json: {obj['__class__']!r} is not a config dataclass")
    return cls(**{k: config_from_json(v) for k, v in obj.items() if k != "__class__"})


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers see all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save(directory: str | os.PathLike, cfg: Any, params: Any, *, extra: dict | None = None,
         assets: Mapping[str, bytes] | None = None) -> str:
    """Write params (step 0), `assets` (file name -> contents, e.g. tokenizer files) and the config
    to `directory` (which must not hold a checkpoint)."""
    from zoo.checkpoint import Checkpointer

    directory = os.path.abspath(os.fspath(directory))
    for name in assets or {}:
        if os.path.basename(name) != name or name in (CONFIG_FILE, "") or name.startswith("."):
            raise ValueError(f"save: assets: expected plain file names other than {CONFIG_FILE}, got {name!r}")
    encoded = config_to_json(cfg)
    with Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(0, params=params, opt_state=NO_OPT_STATE, extra={"model_config": encoded, **(extra or {})})
    for name, data in (assets or {}).items():
        write_atomic(os.path.join(directory, name), data)
    write_atomic(os.path.join(directory, CONFIG_FILE), json.dumps(encoded, indent=1).encode())
    return directory


def read_assets(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, bytes]:
    """The contents of those of `names` that `directory` holds (name -> bytes)."""
    directory = os.fspath(directory)
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def load(directory: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(cfg, params, extra) of a checkpoint written by `save` (the latest step)."""
    from layers import params as P
    from zoo import model
    from zoo.checkpoint import Checkpointer

    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: {directory} has no {CONFIG_FILE} (not written by zoo convert)")
    with open(path) as f:
        cfg = config_from_json(json.load(f))
    try:
        model.family(cfg)
    except TypeError:
        raise ValueError(f"load: {path} does not describe a zoo model config") from None
    target = P.abstract(model.param_specs(cfg))
    opt_target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), NO_OPT_STATE)
    with Checkpointer(directory) as ckpt:
        params, _, extra = ckpt.restore(params_target=target, opt_state_target=opt_target)
    return cfg, params, extra
