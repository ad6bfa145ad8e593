"""Channel mixers: plain MLP (GELU, ReLU, ...) and gated MLP (SwiGLU, GeGLU).

`apply` is the math; `forward` / `init_state` / `step` give it the mixer protocol (with an empty
state), so a block treats every channel mixer alike, stateless or not (RWKV's channel mix keeps
the previous token)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp

from layers import checks, dense

if TYPE_CHECKING:
    from jaxtyping import Array, Float

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """Attributes:
    d_model: input and output width (D).
    d_ff: hidden width (F).
    activation: one of ACTIVATIONS.
    gated: act(x W_gate) * (x W_up) before W_down (SwiGLU with silu, GeGLU with gelu).
    use_bias: biases on every projection (GPT-2 style).
    """

    d_model: int
    d_ff: int
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "silu"
    gated: bool = True
    use_bias: bool = False

    def __post_init__(self):
        checks.positive("MLPConfig", "d_model", self.d_model)
        checks.positive("MLPConfig", "d_ff", self.d_ff)
        checks.one_of("MLPConfig", "activation", self.activation, tuple(ACTIVATIONS))


def param_specs(cfg: MLPConfig) -> dict:
    D, F = cfg.d_model, cfg.d_ff
    specs = {
        "up": dense.param_specs(D, F, ("embed", "mlp"), use_bias=cfg.use_bias),
        "down": dense.param_specs(F, D, ("mlp", "embed"), use_bias=cfg.use_bias),
    }
    if cfg.gated:
        specs["gate"] = dense.param_specs(D, F, ("embed", "mlp"), use_bias=cfg.use_bias)
    return specs


def apply(params: dict, x_BLD: "Float[Array, '... D']", *, cfg: MLPConfig) -> "Float[Array, '... D']":
    if x_BLD.ndim > 2 and dense.flat_rows():
        x_ND = x_BLD.reshape(-1, x_BLD.shape[-1])
        return _apply(params, x_ND, cfg=cfg).reshape(x_BLD.shape)
    return _apply(params, x_BLD, cfg=cfg)


def _apply(params: dict, x_BLD, *, cfg: MLPConfig):
    act = ACTIVATIONS[cfg.activation]
    h_BLF = dense.forward(params["up"], x_BLD)
    if cfg.gated:
        # The activation runs in fp32: bf16 silu/gelu lose more than the matmuls do.
        g_BLF = act(dense.forward(params["gate"], x_BLD).astype(jnp.float32))
        h_BLF = (g_BLF * h_BLF.astype(jnp.float32)).astype(x_BLD.dtype)
    else:
        h_BLF = act(h_BLF.astype(jnp.float32)).astype(x_BLD.dtype)
    return dense.forward(params["down"], h_BLF)


def init(key: jax.Array, cfg: MLPConfig) -> dict:
    from layers import params as P
    return P.init(key, param_specs(cfg))


def forward(params: dict, x_BLD, *, cfg: MLPConfig, state=None, positions=None, segment_ids=None):
    return apply(params, x_BLD, cfg=cfg), None


def init_state(cfg: MLPConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    return None


def step(params: dict, x_BD, state, *, cfg: MLPConfig):
    return apply(params, x_BD, cfg=cfg), None
