"""A residual block: a sequence mixer and an optional channel mixer, with its norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers import mixers, norms
from zoo.config import BlockConfig


def param_specs(cfg: BlockConfig, d_model: int) -> dict:
    specs = {"mixer": mixers.module_for(cfg.mixer).param_specs(cfg.mixer),
             "mixer_norm": norms.param_specs(cfg.norm, d_model)}
    if cfg.norm_position == "sandwich":
        specs["mixer_post_norm"] = norms.param_specs(cfg.norm, d_model)
    if cfg.ffn is not None:
        specs["ffn"] = mixers.module_for(cfg.ffn).param_specs(cfg.ffn)
        if not cfg.parallel:
            specs["ffn_norm"] = norms.param_specs(cfg.norm, d_model)
        if cfg.norm_position == "sandwich":
            specs["ffn_post_norm"] = norms.param_specs(cfg.norm, d_model)
    return specs


def init_state(cfg: BlockConfig, batch_size: int, max_len: int, dtype) -> dict:
    state = {"mixer": mixers.module_for(cfg.mixer).init_state(cfg.mixer, batch_size, max_len, dtype)}
    if cfg.ffn is not None:
        state["ffn"] = mixers.module_for(cfg.ffn).init_state(cfg.ffn, batch_size, max_len, dtype)
    return state


def _residual(params, x, f, name: str, cfg: BlockConfig):
    """Apply sub-layer f (returning (y, state, aux)) around x with the block's norm placement."""
    norm = lambda key, v: norms.forward(params[key], v, cfg=cfg.norm)
    if cfg.norm_position == "post":
        y, state, aux = f(x)
        return norm(f"{name}_norm", x + y), state, aux
    y, state, aux = f(norm(f"{name}_norm", x))
    if cfg.norm_position == "sandwich":
        y = norm(f"{name}_post_norm", y)
    return x + y, state, aux


def forward(params: dict, x_BLD: jax.Array, *, cfg: BlockConfig, state=None, positions=None,
            segment_ids=None):
    """-> (x_BLD, block state {"mixer", "ffn"} or None, aux {"mixer"?, "ffn"?}).

    aux holds what sub-layers with `forward_with_aux` report (MoE losses and load statistics).
    """
    def sublayer(part):
        module, sub_cfg = mixers.module_for(getattr(cfg, part)), getattr(cfg, part)
        kwargs = dict(cfg=sub_cfg, state=None if state is None else state[part], positions=positions,
                      segment_ids=segment_ids)
        if hasattr(module, "forward_with_aux"):
            return lambda h: module.forward_with_aux(params[part], h, **kwargs)
        return lambda h: (*module.forward(params[part], h, **kwargs), None)

    new_state, aux = {}, {}
    if cfg.parallel:
        h_BLD = norms.forward(params["mixer_norm"], x_BLD, cfg=cfg.norm)
        y_BLD, new_state["mixer"], aux["mixer"] = sublayer("mixer")(h_BLD)
        f_BLD, new_state["ffn"], aux["ffn"] = sublayer("ffn")(h_BLD)
        x_BLD = x_BLD + y_BLD + f_BLD
    else:
        x_BLD, new_state["mixer"], aux["mixer"] = _residual(params, x_BLD, sublayer("mixer"), "mixer", cfg)
        if cfg.ffn is not None:
            x_BLD, new_state["ffn"], aux["ffn"] = _residual(params, x_BLD, sublayer("ffn"), "ffn", cfg)
    aux = {k: v for k, v in aux.items() if v is not None}
    return x_BLD, None if state is None else new_state, aux


def aux_loss(cfg: BlockConfig, aux: dict) -> jax.Array:
    """The weighted auxiliary loss of one block (0 when no sub-layer reports one); leaves of
    `aux` may carry a leading layers axis, which is summed."""
    total = jnp.zeros((), jnp.float32)
    for part, part_aux in aux.items():
        module = mixers.module_for(getattr(cfg, part))
        if hasattr(module, "aux_loss"):
            total = total + jnp.sum(module.aux_loss(getattr(cfg, part), part_aux))
    return total
