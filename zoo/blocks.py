"""A residual block: a sequence mixer and an optional channel mixer, with its norms."""

from __future__ import annotations

import jax

from layers import mixers, mlp, norms
from zoo.config import BlockConfig


def param_specs(cfg: BlockConfig, d_model: int) -> dict:
    specs = {"mixer": mixers.module_for(cfg.mixer).param_specs(cfg.mixer),
             "mixer_norm": norms.param_specs(cfg.norm, d_model)}
    if cfg.norm_position == "sandwich":
        specs["mixer_post_norm"] = norms.param_specs(cfg.norm, d_model)
    if cfg.ffn is not None:
        specs["ffn"] = mlp.param_specs(cfg.ffn)
        if not cfg.parallel:
            specs["ffn_norm"] = norms.param_specs(cfg.norm, d_model)
        if cfg.norm_position == "sandwich":
            specs["ffn_post_norm"] = norms.param_specs(cfg.norm, d_model)
    return specs


def init_state(cfg: BlockConfig, batch_size: int, max_len: int, dtype):
    return mixers.module_for(cfg.mixer).init_state(cfg.mixer, batch_size, max_len, dtype)


def _residual(params, x, f, name: str, cfg: BlockConfig):
    """Apply sub-layer f around x with the block's norm placement."""
    norm = lambda key, v: norms.forward(params[key], v, cfg=cfg.norm)
    if cfg.norm_position == "post":
        y, aux = f(x)
        return norm(f"{name}_norm", x + y), aux
    y, aux = f(norm(f"{name}_norm", x))
    if cfg.norm_position == "sandwich":
        y = norm(f"{name}_post_norm", y)
    return x + y, aux


def forward(params: dict, x_BLD: jax.Array, *, cfg: BlockConfig, state=None, positions=None,
            segment_ids=None):
    """-> (x_BLD, mixer state)."""
    mixer = mixers.module_for(cfg.mixer)

    def mix(h):
        return mixer.forward(params["mixer"], h, cfg=cfg.mixer, state=state,
                             positions=positions, segment_ids=segment_ids)

    def ffn(h):
        return mlp.forward(params["ffn"], h, cfg=cfg.ffn), None

    if cfg.parallel:
        h_BLD = norms.forward(params["mixer_norm"], x_BLD, cfg=cfg.norm)
        y_BLD, state = mix(h_BLD)
        return x_BLD + y_BLD + ffn(h_BLD)[0], state
    x_BLD, state = _residual(params, x_BLD, mix, "mixer", cfg)
    if cfg.ffn is not None:
        x_BLD, _ = _residual(params, x_BLD, ffn, "ffn", cfg)
    return x_BLD, state
