"""The decoder: embed -> blocks (the pattern, repeated and scanned) -> norm -> unembed.

A model is itself a mixer over tokens: `forward` for whole sequences (optionally continuing a
state), `init_state` and `step` for decoding one token at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from layers import checks, embed, norms, positions as pos_lib
from layers import params as P
from zoo import blocks
from zoo.config import DTYPES, ModelConfig

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


def param_specs(cfg: ModelConfig) -> dict:
    _check_cfg(cfg)
    D = cfg.d_model
    specs: dict[str, Any] = {
        "embed": embed.param_specs(cfg.vocab_size, D, tied=cfg.tie_embeddings, init_std=cfg.init_std),
        "blocks": tuple(P.stack(blocks.param_specs(b, D), cfg.n_repeats) for b in cfg.pattern),
        "final_norm": norms.param_specs(cfg.final_norm, D),
    }
    if cfg.position == "learned":
        specs["pos"] = pos_lib.learned_param_specs(cfg.max_len, D, cfg.init_std)
    dtype = DTYPES[cfg.param_dtype]
    return jax.tree.map(lambda s: s if s.keep_dtype else dataclasses.replace(s, dtype=dtype), specs,
                        is_leaf=P.is_spec)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _init(key, cfg):
    return P.init(key, param_specs(cfg))


def init(key: jax.Array, cfg: ModelConfig) -> dict:
    """Parameters as a plain pytree of arrays (same structure as `param_specs(cfg)`)."""
    _check_cfg(cfg)
    return _init(key, cfg)


def init_state(cfg: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None) -> dict:
    """Decoding state of every block (KV caches, recurrent states), stacked like the params."""
    _check_cfg(cfg)
    max_len = cfg.max_len if max_len is None else max_len
    checks.positive("init_state", "batch_size", batch_size)
    checks.positive("init_state", "max_len", max_len)
    dtype = cfg.compute_dtype if dtype is None else dtype

    def stacked(block_cfg):
        one = blocks.init_state(block_cfg, batch_size, max_len, dtype)
        return jax.tree.map(lambda a: jnp.repeat(a[None], cfg.n_repeats, axis=0), one)

    # pos_B: the next token's logical position per row (rows may start at different offsets
    # when prompts are left-padded).
    return {"blocks": tuple(stacked(b) for b in cfg.pattern),
            "pos_B": jnp.zeros((batch_size,), jnp.int32)}


def _remat(fn, cfg: ModelConfig):
    if cfg.remat == "none":
        return fn
    policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
    # Inside scan the CSE guard only costs speed (the loop already prevents the merge).
    return jax.checkpoint(fn, policy=policy, prevent_cse=not cfg.scan_layers)


def _run_blocks(params_blocks, x_BLD, cfg: ModelConfig, states, positions_BL, segment_ids_BL):
    """-> (x, states stacked like the params, aux per pattern position stacked over repeats)."""
    def repeat(x, xs):
        p_repeat, s_repeat = xs
        new_states, auxes = [], []
        for j, block_cfg in enumerate(cfg.pattern):
            s = None if s_repeat is None else s_repeat[j]
            x, s, aux = blocks.forward(p_repeat[j], x, cfg=block_cfg, state=s,
                                       positions=positions_BL, segment_ids=segment_ids_BL)
            new_states.append(s)
            auxes.append(aux)
        return x, (None if s_repeat is None else tuple(new_states), tuple(auxes))

    repeat = _remat(repeat, cfg)
    if cfg.scan_layers:
        x_BLD, (new_states, aux) = jax.lax.scan(repeat, x_BLD, (params_blocks, states))
        return x_BLD, new_states, aux
    outs = []
    for i in range(cfg.n_repeats):
        x_BLD, out = repeat(x_BLD, jax.tree.map(lambda a: a[i], (params_blocks, states)))
        outs.append(out)
    new_states, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x_BLD, new_states, aux


def aux_loss(cfg: ModelConfig, aux: dict) -> jax.Array:
    """The weighted auxiliary losses (MoE load balance, router z-loss) summed over all layers."""
    total = jnp.zeros((), jnp.float32)
    for block_cfg, block_aux in zip(cfg.pattern, aux["blocks"]):
        total = total + blocks.aux_loss(block_cfg, block_aux)
    return total


def _forward(params, tokens_BL, cfg: ModelConfig, state=None, positions_BL=None, segment_ids_BL=None):
    B, L = tokens_BL.shape
    if positions_BL is None:
        start_B = jnp.zeros((B,), jnp.int32) if state is None else state["pos_B"]
        positions_BL = start_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
    dtype = cfg.compute_dtype
    x_BLD = embed.embed(params["embed"], tokens_BL, dtype)
    if cfg.embed_scale is not None:
        x_BLD = x_BLD * jnp.asarray(cfg.embed_scale, dtype)
    if cfg.position == "learned":
        x_BLD = x_BLD + pos_lib.learned(params["pos"], positions_BL, dtype)
    elif cfg.position == "sinusoidal":
        x_BLD = x_BLD + pos_lib.sinusoidal(positions_BL, cfg.d_model, dtype=dtype)
    x_BLD, block_states, block_aux = _run_blocks(params["blocks"], x_BLD, cfg,
                                                 None if state is None else state["blocks"],
                                                 positions_BL, segment_ids_BL)
    x_BLD = norms.forward(params["final_norm"], x_BLD, cfg=cfg.final_norm)
    logits_BLV = embed.unembed(params["embed"], x_BLD)
    if cfg.final_logit_softcap is not None:
        cap = cfg.final_logit_softcap
        logits_BLV = cap * jnp.tanh(logits_BLV / cap)
    new_state = None if state is None else {"blocks": block_states, "pos_B": positions_BL[:, -1] + 1}
    return logits_BLV, new_state, {"blocks": block_aux}


_forward_jit = jax.jit(_forward, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _step_jit(params, tokens_B, state, cfg):
    logits_B1V, state, _ = _forward(params, tokens_B[:, None], cfg, state)
    return logits_B1V[:, 0], state


def forward(params: dict, tokens: "Int[Array, 'B L']", *, cfg: ModelConfig, state: dict | None = None,
            positions: "Int[Array, 'B L'] | None" = None, segment_ids: "Int[Array, 'B L'] | None" = None,
            return_aux: bool = False):
    """Logits float32 [B, L, V]; given `state`, returns (logits, state after the last token).

    positions: per-token positions (default 0..L-1, or continuing the state).
    segment_ids: packed rows attend within their own segment; with a state, id 0 marks padding.
    return_aux: also return the layers' auxiliary outputs (MoE losses and load statistics,
      stacked per pattern position over layers) as the last element; `aux_loss(cfg, aux)`
      gives the weighted loss to add to the objective.
    """
    _check_cfg(cfg)
    checks.array("tokens", tokens, rank=2, kind="i")
    checks.token_range("tokens", tokens, cfg.vocab_size)
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is not None:
            checks.array(name, arr, kind="i", shape=tuple(tokens.shape))
    if state is not None:
        _check_room(state, tokens.shape[1])
    logits, new_state, aux = _forward_jit(params, tokens, cfg, state, positions, segment_ids)
    out = (logits,) if state is None else (logits, new_state)
    out = out + (aux,) if return_aux else out
    return out[0] if len(out) == 1 else out


def step(params: dict, tokens: "Int[Array, 'B']", state: dict, *, cfg: ModelConfig):
    """One decoding step: tokens int32 [B] -> (logits float32 [B, V], next state)."""
    _check_cfg(cfg)
    checks.array("tokens", tokens, rank=1, kind="i", shape=(state["pos_B"].shape[0],))
    checks.token_range("tokens", tokens, cfg.vocab_size)
    _check_room(state, 1)
    return _step_jit(params, tokens, state, cfg)


def _check_cfg(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg: expected a zoo ModelConfig, got {type(cfg).__name__}")


def _check_room(state: dict, n_new: int) -> None:
    """A full KV cache would silently overwrite its last slot: refuse while values are concrete.
    Caches expose their capacity as `pos_BT` and their fill as `index_B` (layers.attention)."""
    leaves = {jax.tree_util.keystr(path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(state["blocks"])}
    for name, pos in leaves.items():
        if not name.endswith("['pos_BT']"):
            continue
        index = leaves.get(name[: -len("['pos_BT']")] + "['index_B']")
        if index is None or isinstance(index, jax.core.Tracer):
            continue
        capacity, used = pos.shape[-1], int(jnp.max(index))
        if used + n_new > capacity:
            raise ValueError(f"state: the cache holds {capacity} positions, {used} are used and "
                             f"{n_new} more were given; allocate init_state with a larger max_len")
        return
