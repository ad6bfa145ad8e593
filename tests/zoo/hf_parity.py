"""What every Hugging Face parity test shares: the optional torch/transformers fixture, a tiny
random transformers model saved to a folder, its logits, random tokens and the tolerance.

Tolerance: max |zoo - transformers| <= 1e-4 times the logit scale (at least 1), fp32 both sides.
Models are built with initializer_range 0.2, large enough that rope scaling, soft caps and
windows change the logits measurably, and without special-token ids (random tokens only).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

#: Vocabulary of every tiny parity model, prompt length and tokens generated in greedy checks.
V, L_PROMPT, N_NEW = 96, 8, 20


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def build(hf, config_class: str, model_class: str, kwargs: dict, folder):
    """A seeded random transformers model from `config_class(**kwargs)`, saved to `folder`."""
    torch, transformers = hf
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                                                 pad_token_id=None, **kwargs)
    model = getattr(transformers, model_class)(config).eval()
    model.save_pretrained(folder)
    return model


def logits(hf, model, tokens) -> np.ndarray:
    torch, _ = hf
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens(rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (rows, length)).astype(np.int32)


def assert_close(got, want) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= 1e-4 * scale, f"max |diff| {err} > 1e-4 * {scale}"


def hf_greedy(hf, model, prompt) -> np.ndarray:
    """transformers' own greedy continuation: exactly N_NEW tokens after the prompt."""
    torch, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             do_sample=False)
    return out[:, prompt.shape[1]:].numpy()


def write_config(folder, **config):
    """A folder holding only config.json (for the refusals, which fail before reading tensors)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder
