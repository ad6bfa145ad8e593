"""The public model API and the decoder: embed -> prefix blocks -> blocks (the pattern, repeated
and scanned) -> norm -> unembed.

A model is itself a mixer over tokens: `forward` for whole sequences (optionally continuing a
state), `init_state` and `step` for decoding one token at a time.

`param_specs`, `init`, `forward`, `init_state`, `step` and `aux_loss` dispatch on the config's
type through a small registry (`register_family`): the decoder (ModelConfig) is registered here,
encoders (zoo.encoder) and encoder-decoders (zoo.encdec) register themselves on import.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp

from layers import checks, embed, norms, positions as pos_lib
from layers import params as P
from sharding import constrain
from zoo import blocks
from zoo.config import DTYPES, ModelConfig

if TYPE_CHECKING:
    from jaxtyping import Array, Float, Int


# ------------------------------------------------------------------------------ family registry


@dataclasses.dataclass(frozen=True)
class Family:
    """The functions that run one kind of model (decoder, encoder, encoder-decoder)."""

    param_specs: Callable
    forward: Callable
    init_state: Callable | None = None
    step: Callable | None = None
    aux_loss: Callable | None = None


_FAMILIES: dict[type, Family] = {}


def register_family(config_cls: type, family: Family) -> None:
    _FAMILIES[config_cls] = family


def family(cfg: Any) -> Family:
    """The functions for `cfg`'s model kind; a TypeError naming `cfg` for anything else."""
    try:
        return _FAMILIES[type(cfg)]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in _FAMILIES))
        raise TypeError(f"cfg: expected a zoo model config ({known}), got {type(cfg).__name__}") from None


def _needs(cfg: Any, name: str) -> Callable:
    fn = getattr(family(cfg), name)
    if fn is None:
        raise TypeError(f"cfg: {type(cfg).__name__} models have no {name}")
    return fn


def param_specs(cfg: Any) -> dict:
    """Tree of ParamSpec (shape, logical axes, init) of the model's parameters."""
    return family(cfg).param_specs(cfg)


def init(key: jax.Array, cfg: Any) -> dict:
    """Parameters as a plain pytree of arrays (same structure as `param_specs(cfg)`)."""
    family(cfg)
    return _init(key, cfg)


def forward(params: dict, *args, cfg: Any, **kwargs):
    """The model's forward pass; arguments depend on the kind (decoder: `decoder_forward`,
    encoder: `zoo.encoder.forward`, encoder-decoder: `zoo.encdec.forward`)."""
    return family(cfg).forward(params, *args, cfg=cfg, **kwargs)


def init_state(cfg: Any, *args, **kwargs):
    """Decoding state (decoder: `decoder_init_state`; encoder-decoder: `zoo.encdec.init_state`)."""
    return _needs(cfg, "init_state")(cfg, *args, **kwargs)


def step(params: dict, tokens: "Int[Array, 'B']", state: dict, *, cfg: Any):
    """One decoding step: tokens int32 [B] -> (logits float32 [B, V], next state)."""
    return _needs(cfg, "step")(params, tokens, state, cfg=cfg)


def aux_loss(cfg: Any, aux: dict) -> jax.Array:
    """The weighted auxiliary losses (MoE load balance, router z-loss) summed over all layers."""
    fn = family(cfg).aux_loss
    return jnp.zeros((), jnp.float32) if fn is None else fn(cfg, aux)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _init(key, cfg):
    return P.init(key, param_specs(cfg))


def _cast_specs(specs: Any, param_dtype: str) -> Any:
    """Store parameters in `param_dtype`, except those pinned to their own dtype."""
    dtype = DTYPES[param_dtype]
    return jax.tree.map(lambda s: s if s.keep_dtype else dataclasses.replace(s, dtype=dtype), specs,
                        is_leaf=P.is_spec)


# ------------------------------------------------------------------------------------- decoder


def decoder_param_specs(cfg: ModelConfig) -> dict:
    D = cfg.d_model
    specs: dict[str, Any] = {
        "embed": embed.param_specs(cfg.vocab_size, D, tied=cfg.tie_embeddings, init_std=cfg.init_std),
        "blocks": tuple(P.stack(blocks.param_specs(b, D), cfg.n_repeats) for b in cfg.pattern),
        "final_norm": norms.param_specs(cfg.final_norm, D),
    }
    if cfg.prefix:
        specs["prefix"] = tuple(blocks.param_specs(b, D) for b in cfg.prefix)
    if cfg.embed_norm is not None:
        specs["embed_norm"] = norms.param_specs(cfg.embed_norm, D)
    if cfg.position == "learned":
        specs["pos"] = pos_lib.learned_param_specs(cfg.max_len, D, cfg.init_std)
    return _cast_specs(specs, cfg.param_dtype)


def decoder_init_state(cfg: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None) -> dict:
    """Decoding state of every block (KV caches, recurrent states), stacked like the params:
    {"blocks": per pattern position, stacked over repeats, ["prefix": per prefix block], "pos_B"}."""
    max_len = cfg.max_len if max_len is None else max_len
    checks.positive("init_state", "batch_size", batch_size)
    checks.positive("init_state", "max_len", max_len)
    dtype = cfg.compute_dtype if dtype is None else dtype

    def stacked(block_cfg):
        one = blocks.init_state(block_cfg, batch_size, max_len, dtype)
        return jax.tree.map(lambda a: jnp.repeat(a[None], cfg.n_repeats, axis=0), one)

    # pos_B: the next token's logical position per row (rows may start at different offsets
    # when prompts are left-padded).
    state = {"blocks": tuple(stacked(b) for b in cfg.pattern),
             "pos_B": jnp.zeros((batch_size,), jnp.int32)}
    if cfg.prefix:
        state["prefix"] = tuple(blocks.init_state(b, batch_size, max_len, dtype) for b in cfg.prefix)
    return state


def _remat(fn, cfg):
    if cfg.remat == "none":
        return fn
    policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
    # Inside scan the CSE guard only costs speed (the loop already prevents the merge).
    return jax.checkpoint(fn, policy=policy, prevent_cse=not cfg.scan_layers)


def run_blocks(params_blocks, x_BLD, cfg, states, positions_BL, segment_ids_BL):
    """The scanned part of a block stack: `cfg.pattern` repeated `cfg.n_repeats` times (any config
    with pattern, n_repeats, scan_layers and remat: decoders and encoders).

    -> (x, states stacked like the params, aux per pattern position stacked over repeats)."""
    def repeat(x, xs):
        p_repeat, s_repeat = xs
        new_states, auxes = [], []
        for j, block_cfg in enumerate(cfg.pattern):
            s = None if s_repeat is None else s_repeat[j]
            x, s, aux = blocks.forward(p_repeat[j], x, cfg=block_cfg, state=s,
                                       positions=positions_BL, segment_ids=segment_ids_BL)
            # Pins the residual stream's layout under active sharding rules (identity otherwise):
            # left to itself the partitioner reshards it inside blocks (all-to-alls under FSDP).
            x = constrain(x, ("batch", "seq", "embed"))
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


def run_prefix(params_prefix, x_BLD, prefix: tuple, states, positions_BL, segment_ids_BL):
    """Blocks that run once each, unscanned -> (x, per-block states or None, per-block aux)."""
    new_states, auxes = [], []
    for j, block_cfg in enumerate(prefix):
        x_BLD, s, aux = blocks.forward(params_prefix[j], x_BLD, cfg=block_cfg,
                                       state=None if states is None else states[j],
                                       positions=positions_BL, segment_ids=segment_ids_BL)
        x_BLD = constrain(x_BLD, ("batch", "seq", "embed"))  # as in run_blocks
        new_states.append(s)
        auxes.append(aux)
    return x_BLD, None if states is None else tuple(new_states), tuple(auxes)


def stack_aux_loss(cfg, aux: dict) -> jax.Array:
    """aux_loss for any config with `pattern` (and optionally `prefix`) whose aux is
    {"blocks": ..., ["prefix": ...]} as `run_blocks` / `run_prefix` return it."""
    total = jnp.zeros((), jnp.float32)
    for block_cfg, block_aux in zip(cfg.pattern, aux["blocks"]):
        total = total + blocks.aux_loss(block_cfg, block_aux)
    for block_cfg, block_aux in zip(getattr(cfg, "prefix", ()), aux.get("prefix", ())):
        total = total + blocks.aux_loss(block_cfg, block_aux)
    return total


def _forward(params, tokens_BL, cfg: ModelConfig, state=None, positions_BL=None, segment_ids_BL=None):
    B, L = tokens_BL.shape
    # Training on the default positions 0..L-1: the mixers get positions=None and build the same
    # ones, which tells attention that positions follow token order, so impl="auto" may take the
    # blocked path (layers/blocked_attention.py). Given positions (packing, left padding) or a
    # state (where positions continue the cache) are passed as they are.
    mixer_positions_BL = positions_BL
    if positions_BL is None:
        start_B = jnp.zeros((B,), jnp.int32) if state is None else state["pos_B"]
        positions_BL = start_B[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
        if state is not None:
            mixer_positions_BL = positions_BL
    dtype = cfg.compute_dtype
    x_BLD = embed.embed(params["embed"], tokens_BL, dtype)
    if cfg.embed_scale is not None:
        x_BLD = x_BLD * jnp.asarray(cfg.embed_scale, dtype)
    if cfg.position == "learned":
        x_BLD = x_BLD + pos_lib.learned(params["pos"], positions_BL, dtype)
    elif cfg.position == "sinusoidal":
        x_BLD = x_BLD + pos_lib.sinusoidal(positions_BL, cfg.d_model, dtype=dtype)
    if cfg.embed_norm is not None:
        x_BLD = norms.forward(params["embed_norm"], x_BLD, cfg=cfg.embed_norm)
    aux = {}
    if cfg.prefix:
        x_BLD, prefix_states, aux["prefix"] = run_prefix(params["prefix"], x_BLD, cfg.prefix,
                                                         None if state is None else state["prefix"],
                                                         mixer_positions_BL, segment_ids_BL)
    x_BLD, block_states, aux["blocks"] = run_blocks(params["blocks"], x_BLD, cfg,
                                                    None if state is None else state["blocks"],
                                                    mixer_positions_BL, segment_ids_BL)
    x_BLD = norms.forward(params["final_norm"], x_BLD, cfg=cfg.final_norm)
    logits_BLV = embed.unembed(params["embed"], x_BLD)
    if cfg.final_logit_softcap is not None:
        cap = cfg.final_logit_softcap
        logits_BLV = cap * jnp.tanh(logits_BLV / cap)
    new_state = None
    if state is not None:
        new_state = {"blocks": block_states, "pos_B": positions_BL[:, -1] + 1}
        if cfg.prefix:
            new_state["prefix"] = prefix_states
    return logits_BLV, new_state, aux


_forward_jit = jax.jit(_forward, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _step_jit(params, tokens_B, state, cfg):
    logits_B1V, state, _ = _forward(params, tokens_B[:, None], cfg, state)
    return logits_B1V[:, 0], state


def decoder_forward(params: dict, tokens: "Int[Array, 'B L']", *, cfg: ModelConfig, state: dict | None = None,
                    positions: "Int[Array, 'B L'] | None" = None,
                    segment_ids: "Int[Array, 'B L'] | None" = None, return_aux: bool = False):
    """Logits float32 [B, L, V]; given `state`, returns (logits, state after the last token).

    positions: per-token positions (default 0..L-1, or continuing the state).
    segment_ids: packed rows attend within their own segment; with a state, id 0 marks padding.
    return_aux: also return the layers' auxiliary outputs (MoE losses and load statistics,
      stacked per pattern position over layers; {"blocks": ..., ["prefix": ...]}) as the last
      element; `aux_loss(cfg, aux)` gives the weighted loss to add to the objective.
    """
    checks.array("tokens", tokens, rank=2, kind="i")
    checks.token_range("tokens", tokens, cfg.vocab_size)
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is not None:
            checks.array(name, arr, kind="i", shape=tuple(tokens.shape))
    if state is not None:
        check_room(state, tokens.shape[1])
    logits, new_state, aux = _forward_jit(params, tokens, cfg, state, positions, segment_ids)
    out = (logits,) if state is None else (logits, new_state)
    out = out + (aux,) if return_aux else out
    return out[0] if len(out) == 1 else out


def decoder_step(params: dict, tokens: "Int[Array, 'B']", state: dict, *, cfg: ModelConfig):
    """One decoding step: tokens int32 [B] -> (logits float32 [B, V], next state)."""
    checks.array("tokens", tokens, rank=1, kind="i", shape=(state["pos_B"].shape[0],))
    checks.token_range("tokens", tokens, cfg.vocab_size)
    check_room(state, 1)
    return _step_jit(params, tokens, state, cfg)


def check_room(state: dict, n_new: int) -> None:
    """A full KV cache would silently overwrite its last slot: refuse while values are concrete.
    Caches expose their capacity as `pos_BT` and their fill as `index_B` (layers.attention)."""
    leaves = {jax.tree_util.keystr(path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
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


register_family(ModelConfig, Family(param_specs=decoder_param_specs, forward=decoder_forward,
                                    init_state=decoder_init_state, step=decoder_step,
                                    aux_loss=stack_aux_loss))
