"""Reading and writing a Hugging Face model folder: config.json and safetensors shards.

Nothing here executes code from the folder: config.json is JSON and the tensors come from
safetensors files (a JSON header followed by raw little-endian arrays). The safetensors
library's NumPy API reads every dtype NumPy knows; bfloat16, which NumPy lacks, is read from
the documented file layout into `ml_dtypes.bfloat16` arrays (jax's own bfloat16 type).
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype names NumPy cannot parse, read from the raw buffer instead.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _decode_floats(obj: dict) -> Any:
    # transformers writes non-finite floats as {"__float__": "Infinity"} (JSON has no inf).
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def _encode_floats(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": "Infinity" if x > 0 else ("-Infinity" if x < 0 else "NaN")}
    if isinstance(x, dict):
        return {k: _encode_floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_floats(v) for v in x]
    return x


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_hf: path: expected a folder holding config.json, got {folder!r}")
    with open(path) as f:
        return json.load(f, object_hook=_decode_floats)


def write_config(folder: str, config: dict) -> None:
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_encode_floats(config), f, indent=2, sort_keys=True)
        f.write("\n")


def _shard_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
        extra = (f"; it holds {', '.join(os.path.basename(b) for b in bins)}, which are pickles and are "
                 "never loaded (convert them to safetensors first)") if bins else ""
        raise FileNotFoundError(f"from_hf: path: no *.safetensors file in {folder!r}{extra}")
    return files


def _read_raw(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors whose dtype NumPy lacks, from the file layout: u64 header size, JSON header
    {name: {dtype, shape, data_offsets}}, then the data block the offsets point into."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name in names:
        info = header[name]
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end].tobytes(), dtype=_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors shard in `folder`, by name, in its stored dtype."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in _shard_files(folder):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        raw = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] in _RAW_DTYPES]
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if name not in raw:
                    tensors[name] = f.get_tensor(name)
        tensors.update(_read_raw(path, raw))
    return tensors


def write_tensors(folder: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
