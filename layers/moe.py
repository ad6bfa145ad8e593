"""Mixture of Experts as a channel mixer (Switch, Mixtral, Qwen-MoE, DeepSeek-V3 routing).

A router scores every token against E experts, keeps the top K, and the token's output is the
weighted sum of those experts' gated MLPs (plus always-on shared experts, if any). Two dispatches:

  dropless  every (token, expert) assignment is computed: assignments are sorted by expert and
            the expert MLPs run as one grouped matmul (`jax.lax.ragged_dot`), so no token is lost
            and no capacity padding is spent;
  capacity  each expert takes at most C = ceil(capacity_factor * T * K / E) assignments into a
            fixed [E, C, D] buffer (static shapes, the GShard/Switch layout for expert
            parallelism); assignments over capacity are dropped: that expert contributes zero,
            so with the residual connection the token passes through.

Routers (all router math is fp32):

  softmax   softmax over experts, then top-k; `renormalize` rescales the k weights to sum 1
            (Mixtral does; Jamba does not; Qwen-MoE exposes it as `norm_topk_prob`).
  sigmoid   DeepSeek-V3: per-expert sigmoid scores; experts are *selected* by score + router_bias
            (a parameter moved outside the gradient by `update_router_bias`: auxiliary-loss-free
            balancing), but *weighted* by the unbiased scores, normalised, times routed_scaling.
  switch    Switch Transformer: top-1 of the softmax, weighted by that probability.

Group-limited routing (DeepSeek): experts are split into n_groups groups; each group is scored
by the sum of its two best selection scores (V3, `group_score="top2_sum"`) or by its best one
(V2's group_limited_greedy, `"max"`); only experts in the topk_groups best groups can be picked.

`apply` returns (y, aux) with the balance statistics; `forward` / `init_state` / `step` give the
layer the mixer protocol with an empty state, and `forward_with_aux` exposes aux to the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp

from layers import checks, mlp
from layers import params as P
from layers.params import ParamSpec, fan_in_normal, zeros

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float, Int

ROUTERS = ("softmax", "sigmoid", "switch")
DISPATCHES = ("dropless", "capacity")
GROUP_SCORES = ("top2_sum", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Attributes:
    d_model: input and output width (D).
    d_ff: hidden width of each routed expert (F).
    n_experts: number of routed experts (E).
    top_k: experts per token (K); must be 1 for the switch router.
    router: "softmax" | "sigmoid" | "switch" (see the module docstring).
    renormalize: rescale the top-k weights to sum 1 (softmax and sigmoid; switch ignores it).
    routed_scaling: multiplies the routed weights (DeepSeek-V3 uses 2.5); 1.0 leaves them alone.
    n_groups: expert groups for group-limited routing (1 = off); must divide n_experts.
    topk_groups: groups a token may pick its experts from; topk_groups * n_experts / n_groups
      must be >= top_k.
    group_score: how a group is ranked: "top2_sum" (its two best selection scores, DeepSeek-V3)
      or "max" (its best one, DeepSeek-V2). Read only when n_groups > 1.
    dispatch: "dropless" (grouped matmul, nothing dropped) or "capacity" (fixed buffers, drops).
    capacity_factor: capacity dispatch only: each expert's buffer holds
      ceil(capacity_factor * tokens * top_k / n_experts) assignments.
    n_shared_experts: always-on experts, run as one gated MLP of width n_shared_experts * d_ff
      and added to the routed output (Qwen-MoE, DeepSeek); 0 = none.
    shared_gate: scale the shared experts' output per token by sigmoid(x . w_gate), a learned
      D-vector (Qwen2-MoE's shared_expert_gate); needs n_shared_experts > 0.
    activation: expert activation, one of layers.mlp.ACTIVATIONS.
    gated: act(x W_gate) * (x W_up) before W_down (SwiGLU with silu), as in layers.mlp.
    load_balance_weight: coefficient the model puts on aux["load_balance_loss"] (Switch 1e-2).
    router_z_weight: coefficient the model puts on aux["router_z_loss"] (ST-MoE 1e-3).
    router_bias_rate: step size of `update_router_bias` (sigmoid router; DeepSeek-V3 1e-3).
    expert_parallel_axis: name of a mesh axis to split the experts over (expert parallelism:
      tokens travel to their experts' devices by all_to_all, sharding/expert_parallel.py). Takes
      effect inside `sharding.use_rules(mesh, rules)` when the mesh has that axis with size > 1
      and it divides n_experts and the token count; otherwise the dispatch runs as without it.
    """

    d_model: int
    d_ff: int
    n_experts: int
    top_k: int = 2
    router: Literal["softmax", "sigmoid", "switch"] = "softmax"
    renormalize: bool = True
    routed_scaling: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    n_shared_experts: int = 0
    shared_gate: bool = False
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "silu"
    gated: bool = True
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.0
    router_bias_rate: float = 1e-3
    expert_parallel_axis: str | None = None

    def __post_init__(self):
        own = "MoEConfig"
        checks.positive(own, "d_model", self.d_model)
        checks.positive(own, "d_ff", self.d_ff)
        checks.positive(own, "n_experts", self.n_experts)
        checks.positive(own, "top_k", self.top_k)
        checks.positive(own, "n_groups", self.n_groups)
        checks.positive(own, "topk_groups", self.topk_groups)
        checks.one_of(own, "router", self.router, ROUTERS)
        checks.one_of(own, "dispatch", self.dispatch, DISPATCHES)
        checks.one_of(own, "group_score", self.group_score, GROUP_SCORES)
        checks.one_of(own, "activation", self.activation, tuple(mlp.ACTIVATIONS))
        if self.top_k > self.n_experts:
            checks.fail(own, "top_k", f"<= n_experts={self.n_experts}", self.top_k)
        if self.router == "switch" and self.top_k != 1:
            checks.fail(own, "top_k", "1 for router='switch'", self.top_k)
        if self.topk_groups > self.n_groups:
            checks.fail(own, "topk_groups", f"<= n_groups={self.n_groups}", self.topk_groups)
        checks.divides(own, "n_groups", self.n_groups, "n_experts", self.n_experts)
        if self.topk_groups * (self.n_experts // self.n_groups) < self.top_k:
            checks.fail(own, "topk_groups",
                        f"enough groups to hold top_k={self.top_k} experts "
                        f"({self.n_experts // self.n_groups} experts per group)", self.topk_groups)
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            checks.fail(own, "n_shared_experts", "a non-negative integer", self.n_shared_experts)
        if self.shared_gate and not self.n_shared_experts:
            checks.fail(own, "shared_gate", "False when n_shared_experts=0 (it gates the shared experts)",
                        self.shared_gate)
        if not self.capacity_factor > 0:
            checks.fail(own, "capacity_factor", "> 0", self.capacity_factor)
        if not self.routed_scaling > 0:
            checks.fail(own, "routed_scaling", "> 0", self.routed_scaling)
        if self.expert_parallel_axis is not None and not (
                isinstance(self.expert_parallel_axis, str) and self.expert_parallel_axis):
            checks.fail(own, "expert_parallel_axis", "None or a mesh axis name", self.expert_parallel_axis)

    def shared_mlp(self) -> mlp.MLPConfig:
        """The shared experts as one MLP (concatenating n gated MLPs along F is one wider MLP)."""
        return mlp.MLPConfig(d_model=self.d_model, d_ff=self.n_shared_experts * self.d_ff,
                             activation=self.activation, gated=self.gated)

    def capacity(self, n_tokens: int) -> int:
        """Per-expert buffer size for `n_tokens` tokens under capacity dispatch."""
        # The small slack keeps float noise (0.3 * 10 = 3.0000000000000004) from adding a slot.
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts - 1e-9))


def param_specs(cfg: MoEConfig) -> dict:
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    experts = {
        "up_EDF": ParamSpec((E, D, F), ("expert", "embed", "mlp"), fan_in_normal((1,))),
        "down_EFD": ParamSpec((E, F, D), ("expert", "mlp", "embed"), fan_in_normal((1,))),
    }
    if cfg.gated:
        experts["gate_EDF"] = ParamSpec((E, D, F), ("expert", "embed", "mlp"), fan_in_normal((1,)))
    # The router stays fp32 under a bf16 param policy: small logit differences decide routing.
    specs = {"router_DE": ParamSpec((D, E), ("embed", "expert"), fan_in_normal((0,)), keep_dtype=True),
             "experts": experts}
    if cfg.router == "sigmoid":
        # Not trained by gradient (selection only); moved by update_router_bias. fp32 because its
        # steps (1e-3) vanish in bf16 next to O(1) scores.
        specs["router_bias_E"] = ParamSpec((E,), ("expert",), zeros, keep_dtype=True)
    if cfg.n_shared_experts:
        specs["shared"] = mlp.param_specs(cfg.shared_mlp())
    if cfg.shared_gate:
        # A vector, so the default decay rule leaves it undecayed, like the router bias and norms.
        specs["shared_gate_D"] = ParamSpec((D,), ("embed",), fan_in_normal((0,)))
    return specs


def init(key: jax.Array, cfg: MoEConfig) -> dict:
    return P.init(key, param_specs(cfg))


# ----------------------------------------------------------------------------------------- router


def _top2_sum(s_TGN: "Float[Array, 'T G N']") -> "Float[Array, 'T G']":
    n = min(2, s_TGN.shape[-1])
    return jnp.sum(jax.lax.top_k(s_TGN, n)[0], axis=-1)


def route(params: dict, x_TD: "Float[Array, 'T D']", cfg: MoEConfig):
    """-> (weights_TK fp32, experts_TK int32, router_probs_TE fp32, router_logits_TE fp32).

    router_probs_TE is a distribution over experts per token, used by the balance loss: the
    softmax for softmax/switch routers; for the sigmoid router the scores normalised to sum 1
    (DeepSeek-V3's sequence-wise balance loss does the same).
    """
    E, K, G = cfg.n_experts, cfg.top_k, cfg.n_groups
    logits_TE = jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32),
                           params["router_DE"].astype(jnp.float32))
    if cfg.router == "sigmoid":
        scores_TE = jax.nn.sigmoid(logits_TE)
        # The bias only steers selection; it has no gradient path (balancing is done outside
        # the loss) and never enters the weights.
        bias_E = jax.lax.stop_gradient(params["router_bias_E"].astype(jnp.float32))
        select_TE = scores_TE + bias_E[None, :]
        probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
    else:
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
        select_TE = scores_TE
        probs_TE = scores_TE
    T = x_TD.shape[0]
    if G > 1:
        # Group-limited routing: keep the topk_groups groups whose best (two) experts score highest.
        select_TGN = select_TE.reshape(T, G, E // G)
        group_TG = jnp.max(select_TGN, axis=-1) if cfg.group_score == "max" else _top2_sum(select_TGN)
        _, groups_TK = jax.lax.top_k(group_TG, cfg.topk_groups)
        keep_TG = jnp.any(jax.nn.one_hot(groups_TK, G, dtype=jnp.bool_), axis=1)
        select_TE = jnp.where(keep_TG[:, :, None], select_TGN, -jnp.inf).reshape(T, E)
    _, experts_TK = jax.lax.top_k(select_TE, K)
    experts_TK = experts_TK.astype(jnp.int32)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if cfg.renormalize and cfg.router != "switch":
        # The small floor guards all-zero sigmoid scores (deep saturation); softmax never hits it.
        weights_TK = weights_TK / jnp.maximum(jnp.sum(weights_TK, axis=-1, keepdims=True), 1e-20)
    if cfg.routed_scaling != 1.0:
        weights_TK = weights_TK * cfg.routed_scaling
    return weights_TK, experts_TK, probs_TE, logits_TE


def load_balance_loss(probs_TE, experts_TK, n_experts: int):
    """Switch/GShard balance loss E * sum_e f_e P_e.

    f_e is the fraction of the T*K assignments that went to expert e, P_e the mean router
    probability of e. Perfectly uniform routing gives 1; everything on one expert with
    probability 1 gives E.
    """
    counts_E = tokens_per_expert(experts_TK, n_experts)
    f_E = counts_E.astype(jnp.float32) / experts_TK.size
    P_E = jnp.mean(probs_TE.astype(jnp.float32), axis=0)
    return n_experts * jnp.sum(f_E * P_E)


def router_z_loss(logits_TE):
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def tokens_per_expert(experts_TK, n_experts: int) -> "Int[Array, 'E']":
    return jnp.bincount(experts_TK.reshape(-1), length=n_experts).astype(jnp.int32)


def update_router_bias(bias_E, tokens_per_expert_E, rate: float):
    """DeepSeek-V3 auxiliary-loss-free balancing, applied after each step outside the gradient:
    raise the bias of under-loaded experts and lower it for over-loaded ones by `rate`."""
    load_E = tokens_per_expert_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)


# --------------------------------------------------------------------------------------- experts


def _activate(gate_F, up_F, cfg: MoEConfig, dtype):
    """Gated or plain activation in fp32 (as layers.mlp), result in the compute dtype."""
    act = mlp.ACTIVATIONS[cfg.activation]
    if cfg.gated:
        return (act(gate_F.astype(jnp.float32)) * up_F.astype(jnp.float32)).astype(dtype)
    return act(up_F.astype(jnp.float32)).astype(dtype)


def _experts_dropless(experts: dict, x_TD, experts_TK, cfg: MoEConfig):
    """Every assignment's expert output, [T, K, D] fp32, through grouped matmuls."""
    T, D = x_TD.shape
    K, E = cfg.top_k, cfg.n_experts
    dt = x_TD.dtype
    flat_A = experts_TK.reshape(-1)
    # Sort assignments so each expert's rows are contiguous: ragged_dot multiplies group e of
    # the rows by expert e's weights.
    order_A = jnp.argsort(flat_A, stable=True)
    x_AD = jnp.take(x_TD, order_A // K, axis=0)
    sizes_E = tokens_per_expert(experts_TK, E)

    def gmm(lhs, w):
        return jax.lax.ragged_dot(lhs, w.astype(dt), sizes_E, preferred_element_type=jnp.float32)

    up_AF = gmm(x_AD, experts["up_EDF"])
    gate_AF = gmm(x_AD, experts["gate_EDF"]) if cfg.gated else None
    h_AF = _activate(gate_AF, up_AF, cfg, dt)
    y_AD = gmm(h_AF, experts["down_EFD"])
    # Undo the sort: row i of the sorted outputs belongs to assignment order_A[i].
    inverse_A = jnp.argsort(order_A)
    return jnp.take(y_AD, inverse_A, axis=0).reshape(T, K, D), sizes_E


def _capacity_slots(experts_TK, n_experts: int):
    """Each assignment's slot in its expert's buffer.

    Priority follows GShard/Switch: every token's first choice is placed before any second
    choice, and within one choice rank earlier tokens come first.
    """
    T, K = experts_TK.shape
    onehot_KTE = jax.nn.one_hot(experts_TK.T, n_experts, dtype=jnp.int32)
    seen_KTE = jnp.cumsum(onehot_KTE.reshape(K * T, n_experts), axis=0).reshape(K, T, n_experts)
    slot_KT = jnp.sum(seen_KTE * onehot_KTE, axis=-1) - 1
    return slot_KT.T


def expert_mlps(experts: dict, x_ECD: "Float[Array, 'E C D']", cfg: MoEConfig) -> "Float[Array, 'E C D']":
    """Expert e's MLP on buffer row e (fp32 out): the capacity layout, also run per device by
    expert parallelism on its own experts' rows."""
    dt = x_ECD.dtype
    up_ECF = jnp.einsum("ECD,EDF->ECF", x_ECD, experts["up_EDF"].astype(dt),
                        preferred_element_type=jnp.float32)
    gate_ECF = (jnp.einsum("ECD,EDF->ECF", x_ECD, experts["gate_EDF"].astype(dt),
                           preferred_element_type=jnp.float32) if cfg.gated else None)
    h_ECF = _activate(gate_ECF, up_ECF, cfg, dt)
    return jnp.einsum("ECF,EFD->ECD", h_ECF, experts["down_EFD"].astype(dt),
                      preferred_element_type=jnp.float32)


def _expert_parallel_mesh(cfg: MoEConfig, n_tokens: int):
    """(mesh, rules) when expert parallelism applies to this call, else None."""
    axis = cfg.expert_parallel_axis
    if axis is None:
        return None
    from sharding import context  # layers reach sharding only for collectives (see DESIGN.md)

    active = context.active()
    if active is None:
        return None
    size = active[0].shape.get(axis, 1)
    if size < 2 or cfg.n_experts % size or n_tokens % size:
        return None
    return active


def _experts_capacity(experts: dict, x_TD, experts_TK, cfg: MoEConfig):
    """Expert outputs [T, K, D] fp32 with assignments beyond capacity zeroed; and the kept mask."""
    T, D = x_TD.shape
    E, K = cfg.n_experts, cfg.top_k
    C = cfg.capacity(T)
    dt = x_TD.dtype
    slot_TK = _capacity_slots(experts_TK, E)
    keep_TK = slot_TK < C
    # Dropped assignments point one past the buffer; mode="drop" discards those writes.
    slot_TK = jnp.where(keep_TK, slot_TK, C)
    x_TKD = jnp.broadcast_to(x_TD[:, None, :], (T, K, D))
    x_ECD = jnp.zeros((E, C, D), dt).at[experts_TK, slot_TK].set(x_TKD, mode="drop")
    y_ECD = expert_mlps(experts, x_ECD, cfg)
    y_TKD = y_ECD.at[experts_TK, slot_TK].get(mode="fill", fill_value=0.0)
    return jnp.where(keep_TK[:, :, None], y_TKD, 0.0), keep_TK


def _combine(y_TKD, weights_TK):
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK)


def _shared(params, x_TD, cfg: MoEConfig):
    y_TD = mlp.apply(params["shared"], x_TD, cfg=cfg.shared_mlp()).astype(jnp.float32)
    if cfg.shared_gate:
        # fp32 like the router: the gate is a per-token scalar that scales a whole output row.
        gate_T = jax.nn.sigmoid(jnp.einsum("TD,D->T", x_TD.astype(jnp.float32),
                                           params["shared_gate_D"].astype(jnp.float32)))
        y_TD = gate_T[:, None] * y_TD
    return y_TD


def apply(params: dict, x_BLD: "Float[Array, '... D']", cfg: MoEConfig, *,
          dispatch: str | None = None):
    """-> (y with x's shape and dtype, aux).

    aux: "load_balance_loss" (fp32 scalar), "router_z_loss" (fp32 scalar), "tokens_per_expert"
    ([E] int32: assignments routed to each expert, before any capacity drop; sums to T*K) and
    "drop_fraction" (fp32 scalar: dropped assignments / T*K; 0 for dropless).
    `dispatch` overrides cfg.dispatch (decoding uses dropless).
    """
    checks.array("x_BLD", x_BLD, kind="f")
    if x_BLD.shape[-1] != cfg.d_model:
        raise ValueError(f"x_BLD: expected last dimension d_model={cfg.d_model}, got shape {x_BLD.shape}")
    dispatch = dispatch or cfg.dispatch
    lead = x_BLD.shape[:-1]
    x_TD = x_BLD.reshape(-1, cfg.d_model)
    weights_TK, experts_TK, probs_TE, logits_TE = route(params, x_TD, cfg)
    ep = _expert_parallel_mesh(cfg, x_TD.shape[0])
    if ep is not None:
        from sharding import expert_parallel

        y_TKD, keep_TK = expert_parallel.expert_outputs(params["experts"], x_TD, experts_TK, cfg, mesh=ep[0],
                                                        axis=cfg.expert_parallel_axis, rules=ep[1],
                                                        dispatch=dispatch)
        sizes_E = tokens_per_expert(experts_TK, cfg.n_experts)
        drop_fraction = jnp.sum(~keep_TK).astype(jnp.float32) / keep_TK.size
    elif dispatch == "dropless":
        y_TKD, sizes_E = _experts_dropless(params["experts"], x_TD, experts_TK, cfg)
        drop_fraction = jnp.zeros((), jnp.float32)
    else:
        y_TKD, keep_TK = _experts_capacity(params["experts"], x_TD, experts_TK, cfg)
        sizes_E = tokens_per_expert(experts_TK, cfg.n_experts)
        drop_fraction = jnp.sum(~keep_TK).astype(jnp.float32) / keep_TK.size
    y_TD = _combine(y_TKD, weights_TK)
    if cfg.n_shared_experts:
        y_TD = y_TD + _shared(params, x_TD, cfg)
    aux = {
        "load_balance_loss": load_balance_loss(probs_TE, experts_TK, cfg.n_experts),
        "router_z_loss": router_z_loss(logits_TE),
        "tokens_per_expert": sizes_E,
        "drop_fraction": drop_fraction,
    }
    return y_TD.astype(x_BLD.dtype).reshape(*lead, cfg.d_model), aux


def apply_dense_reference(params: dict, x_BLD, cfg: MoEConfig):
    """Slow, obvious reference: every expert on every token, unselected experts weighted 0."""
    lead = x_BLD.shape[:-1]
    x_TD = x_BLD.reshape(-1, cfg.d_model)
    dt = x_TD.dtype
    ex = params["experts"]
    weights_TK, experts_TK, _, _ = route(params, x_TD, cfg)
    up_TEF = jnp.einsum("TD,EDF->TEF", x_TD, ex["up_EDF"].astype(dt), preferred_element_type=jnp.float32)
    gate_TEF = (jnp.einsum("TD,EDF->TEF", x_TD, ex["gate_EDF"].astype(dt),
                           preferred_element_type=jnp.float32) if cfg.gated else None)
    h_TEF = _activate(gate_TEF, up_TEF, cfg, dt)
    y_TED = jnp.einsum("TEF,EFD->TED", h_TEF, ex["down_EFD"].astype(dt), preferred_element_type=jnp.float32)
    combine_TE = jnp.einsum("TK,TKE->TE", weights_TK,
                            jax.nn.one_hot(experts_TK, cfg.n_experts, dtype=jnp.float32))
    y_TD = jnp.einsum("TE,TED->TD", combine_TE, y_TED)
    if cfg.n_shared_experts:
        y_TD = y_TD + _shared(params, x_TD, cfg)
    return y_TD.astype(x_BLD.dtype).reshape(*lead, cfg.d_model)


# -------------------------------------------------------------------------------------- protocol


def forward(params: dict, x_BLD, *, cfg: MoEConfig, state=None, positions=None, segment_ids=None):
    return apply(params, x_BLD, cfg)[0], None


def forward_with_aux(params: dict, x_BLD, *, cfg: MoEConfig, state=None, positions=None,
                     segment_ids=None):
    y_BLD, aux = apply(params, x_BLD, cfg)
    return y_BLD, None, aux


def init_state(cfg: MoEConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    return None


def step(params: dict, x_BD, state, *, cfg: MoEConfig):
    # Decoding never drops: capacity is a training-throughput device, and with B tokens per step
    # a capacity buffer would drop tokens that forward (over B*L tokens) kept.
    return apply(params, x_BD, cfg, dispatch="dropless")[0], None


# ------------------------------------------------------------------------------- mixture of depths


def mod_select(router_logits_BL: "Float[Array, 'B L']", capacity_fraction: float) -> "Bool[Array, 'B L']":
    """Mixture-of-Depths token choice: per row, mark the ceil(capacity_fraction * L) tokens with
    the largest router logits (those go through the block; the rest skip it via the residual).

    Top-k over the sequence is not causal: at decode time a MoD model needs a predictor of
    this choice (the paper's auxiliary router); this helper is the training-time selection.
    """
    checks.array("router_logits_BL", router_logits_BL, rank=2, kind="f")
    if not 0.0 < capacity_fraction <= 1.0:
        raise ValueError(f"capacity_fraction: expected a value in (0, 1], got {capacity_fraction!r}")
    B, L = router_logits_BL.shape
    k = max(1, math.ceil(capacity_fraction * L - 1e-9))
    _, idx_BK = jax.lax.top_k(router_logits_BL, k)
    return jnp.any(jax.nn.one_hot(idx_BK, L, dtype=jnp.bool_), axis=1)


def aux_loss(cfg: MoEConfig, aux: dict) -> jax.Array:
    """The weighted auxiliary loss to add to the objective (per layer when aux is stacked)."""
    return (cfg.load_balance_weight * aux["load_balance_loss"]
            + cfg.router_z_weight * aux["router_z_loss"])
