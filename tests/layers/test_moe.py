"""Mixture of Experts: dispatches against the dense reference, routers on hand-made logits,
balance statistics against their formulas, shared experts, config errors, the mixer protocol."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mlp, moe
from layers import params as P
from layers.checks import ConfigError
from layers.moe import MoEConfig

D, F = 16, 12

# Jitted entry points (config static): on this shared CPU one compile per shape costs far less
# than eager dispatch of every small op.
_apply = jax.jit(moe.apply, static_argnums=2)
_route = jax.jit(moe.route, static_argnums=2)
_reference = jax.jit(moe.apply_dense_reference, static_argnums=2)
_step = jax.jit(moe.step, static_argnames="cfg")


def _rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _params(cfg, seed=0):
    params = moe.init(jax.random.key(seed), cfg)
    if "router_bias_E" in params:
        # A non-zero bias, so that selection (biased) and weights (unbiased) really differ.
        params["router_bias_E"] = 0.3 * _rand(seed + 100, (cfg.n_experts,))
    return params


CONFIGS = {
    "softmax_renorm": dict(n_experts=4, top_k=2, router="softmax", renormalize=True),
    "softmax_raw": dict(n_experts=4, top_k=2, router="softmax", renormalize=False),
    "sigmoid_bias": dict(n_experts=8, top_k=3, router="sigmoid", routed_scaling=2.5),
    "switch": dict(n_experts=4, top_k=1, router="switch"),
    "group_sigmoid_shared": dict(n_experts=8, top_k=2, router="sigmoid", n_groups=4, topk_groups=2,
                                 n_shared_experts=1),
    "group_softmax_gelu_ungated": dict(n_experts=8, top_k=2, n_groups=2, topk_groups=1,
                                       activation="gelu", gated=False),
}


def _loss_and_grads(fn, params, x, cot):
    def loss(p, x):
        return jnp.sum(fn(p, x) * cot)
    # Jitted: one compile is cheaper than hundreds of eager op dispatches on a busy CPU.
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


# Gradient checks compile two backward passes each, so the default run keeps three that cover
# the softmax, sigmoid+bias, group-limited and capacity paths; the rest run under -m slow.
_GRAD_FAST = {("softmax_renorm", "dropless"), ("group_sigmoid_shared", "dropless"),
              ("group_softmax_gelu_ungated", "capacity")}
CASES = [(n, "dropless") for n in CONFIGS] + [("sigmoid_bias", "capacity"), ("group_softmax_gelu_ungated", "capacity")]


@pytest.mark.parametrize("name,dispatch", CASES)
def test_dispatch_matches_dense_reference_values(name, dispatch):
    # capacity_factor = E guarantees room for every assignment, so nothing is dropped.
    kw = CONFIGS[name]
    cfg = MoEConfig(d_model=D, d_ff=F, dispatch=dispatch, capacity_factor=float(kw["n_experts"]), **kw)
    params = _params(cfg)
    x = _rand(1, (2, 6, D))
    y, aux = _apply(params, x, cfg)
    want = _reference(params, x, cfg)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(aux["drop_fraction"]) == 0.0


@pytest.mark.parametrize("name,dispatch", [
    c if c in _GRAD_FAST else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_dispatch_matches_dense_reference_grads(name, dispatch):
    # capacity_factor = E guarantees room for every assignment, so nothing is dropped.
    kw = CONFIGS[name]
    cfg = MoEConfig(d_model=D, d_ff=F, dispatch=dispatch, capacity_factor=float(kw["n_experts"]), **kw)
    params = _params(cfg)
    x = _rand(1, (2, 6, D))
    cot = _rand(2, (2, 6, D))
    (l1, g1) = _loss_and_grads(lambda p, x: moe.apply(p, x, cfg)[0], params, x, cot)
    (l2, g2) = _loss_and_grads(lambda p, x: moe.apply_dense_reference(p, x, cfg), params, x, cot)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    _assert_trees_close(g1, g2)
    # The bias steers selection only: it has no gradient.
    if "router_bias_E" in params:
        assert np.all(np.asarray(g1[0]["router_bias_E"]) == 0.0)
    # The router and the experts actually receive gradient.
    assert np.abs(np.asarray(g1[0]["router_DE"])).max() > 0
    assert np.abs(np.asarray(g1[0]["experts"]["down_EFD"])).max() > 0


def _np_slots(experts_TK, E):
    """Capacity slots by the documented priority: all first choices (in token order), then all
    second choices, ..."""
    T, K = experts_TK.shape
    seen = np.zeros(E, np.int64)
    slot = np.zeros((T, K), np.int64)
    for k in range(K):
        for t in range(T):
            e = experts_TK[t, k]
            slot[t, k] = seen[e]
            seen[e] += 1
    return slot


def test_capacity_drops_counted_and_zeroed():
    cfg = MoEConfig(d_model=D, d_ff=F, n_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.25)
    params = _params(cfg)
    x = _rand(3, (2, 8, D))
    T = 16
    C = cfg.capacity(T)
    assert C == math.ceil(0.25 * T * 2 / 4) == 2
    y, aux = _apply(params, x, cfg)
    x_TD = x.reshape(T, D)
    w_TK, e_TK, _, _ = _route(params, x_TD, cfg)
    e_TK, w_TK = np.asarray(e_TK), np.asarray(w_TK, np.float64)
    keep_TK = _np_slots(e_TK, 4) < C
    want_drop = 1.0 - keep_TK.mean()
    assert want_drop > 0
    np.testing.assert_allclose(float(aux["drop_fraction"]), want_drop, rtol=1e-6)
    # Every expert is saturated: exactly C assignments kept for each expert with demand >= C.
    counts = np.bincount(e_TK.reshape(-1), minlength=4)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), counts)
    assert keep_TK.sum() == np.minimum(counts, C).sum()
    # Expected output: only kept assignments contribute, each as weight * its expert's MLP.
    ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
    xs = np.asarray(x_TD, np.float64)
    y_TD = np.asarray(y, np.float64).reshape(T, D)
    want = np.zeros((T, D))
    for t in range(T):
        for k in range(2):
            if keep_TK[t, k]:
                e = e_TK[t, k]
                g = xs[t] @ ex["gate_EDF"][e]
                out = (g / (1.0 + np.exp(-g)) * (xs[t] @ ex["up_EDF"][e])) @ ex["down_EFD"][e]
                want[t] += w_TK[t, k] * out
    np.testing.assert_allclose(y_TD, want, rtol=1e-5, atol=1e-5)
    # Tokens with every assignment dropped get exactly zero (the residual carries them).
    all_dropped = ~keep_TK.any(axis=1)
    assert all_dropped.any()
    assert np.all(y_TD[all_dropped] == 0.0)


def _identity_router(cfg, logits_TE):
    """Params whose router maps x = logits straight to the logits (D = E, router = identity)."""
    E = cfg.n_experts
    params = _params(cfg)
    if "router_bias_E" in params:
        params["router_bias_E"] = jnp.zeros((E,), jnp.float32)
    params["router_DE"] = jnp.eye(E, dtype=jnp.float32)
    return params, jnp.asarray(logits_TE, jnp.float32)


def test_router_softmax_hand_made():
    cfg = MoEConfig(d_model=4, d_ff=F, n_experts=4, top_k=2)
    logits = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]], np.float32)
    params, x = _identity_router(cfg, logits)
    w, e, probs, lg = _route(params, x, cfg)
    np.testing.assert_array_equal(np.asarray(e), [[1, 3], [0, 2]])
    assert e.dtype == jnp.int32 and w.dtype == jnp.float32
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lg), logits)
    sel = np.take_along_axis(p, np.array([[1, 3], [0, 2]]), axis=-1)
    np.testing.assert_allclose(np.asarray(w), sel / sel.sum(-1, keepdims=True), rtol=1e-6)
    raw = dataclasses.replace(cfg, renormalize=False)
    np.testing.assert_allclose(np.asarray(_route(params, x, raw)[0]), sel, rtol=1e-6)
    sw = MoEConfig(d_model=4, d_ff=F, n_experts=4, top_k=1, router="switch")
    w1, e1, _, _ = _route(params, x, sw)
    np.testing.assert_array_equal(np.asarray(e1), [[1], [0]])
    np.testing.assert_allclose(np.asarray(w1), p[[0, 1], [1, 0]][:, None], rtol=1e-6)


def test_router_sigmoid_bias_selects_but_does_not_weight():
    cfg = MoEConfig(d_model=4, d_ff=F, n_experts=4, top_k=2, router="sigmoid", routed_scaling=2.0)
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    params, x = _identity_router(cfg, logits)
    s = 1.0 / (1.0 + np.exp(-logits[0]))
    w, e, probs, _ = _route(params, x, cfg)
    np.testing.assert_array_equal(np.asarray(e), [[0, 1]])
    np.testing.assert_allclose(np.asarray(w)[0], 2.0 * s[[0, 1]] / s[[0, 1]].sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(probs)[0], s / s.sum(), rtol=1e-6)
    # A bias of 0.5 on expert 3 lifts it above expert 1 (0.269 + 0.5 > 0.731) but not above
    # expert 0 (0.881).
    params["router_bias_E"] = jnp.array([0.0, 0.0, 0.0, 0.5], jnp.float32)
    w, e, _, _ = _route(params, x, cfg)
    np.testing.assert_array_equal(np.asarray(e), [[0, 3]])
    np.testing.assert_allclose(np.asarray(w)[0], 2.0 * s[[0, 3]] / s[[0, 3]].sum(), rtol=1e-6)


def test_router_group_limited_hand_made():
    # 8 experts in 4 groups of 2. Expert 0 has the single best score, but its group (0, 1) has
    # the lowest top-2 sum, so with topk_groups=2 it is excluded; groups 1 and 3 win.
    cfg = MoEConfig(d_model=8, d_ff=F, n_experts=8, top_k=2, router="sigmoid", n_groups=4, topk_groups=2)
    logits = np.array([[4.0, -6.0, 2.0, 2.0, 1.0, 1.0, 3.0, 1.5]], np.float32)
    params, x = _identity_router(cfg, logits)
    s = 1.0 / (1.0 + np.exp(-logits[0]))
    w, e, _, _ = _route(params, x, cfg)
    np.testing.assert_array_equal(np.asarray(e), [[6, 2]])  # ties 2/3: the lower index first
    np.testing.assert_allclose(np.asarray(w)[0], s[[6, 2]] / s[[6, 2]].sum(), rtol=1e-6)
    # Without group limiting expert 0 wins.
    free = dataclasses.replace(cfg, n_groups=1, topk_groups=1)
    np.testing.assert_array_equal(np.asarray(_route(params, x, free)[1]), [[0, 6]])
    # Group scores use the biased scores: a bias on group 2 (experts 4, 5) makes it win.
    params["router_bias_E"] = jnp.array([0, 0, 0, 0, 1.0, 1.0, 0, 0], jnp.float32)
    w, e, _, _ = _route(params, x, cfg)
    np.testing.assert_array_equal(np.asarray(e), [[4, 5]])
    np.testing.assert_allclose(np.asarray(w)[0], [0.5, 0.5], rtol=1e-6)


def _ref_group_max_route(logits_TE, n_groups, topk_groups, top_k, scaling):
    """DeepSeek-V2 group_limited_greedy, token by token in float64: softmax scores, each group
    ranked by its best expert, the best topk_groups groups kept, greedy top-k inside them."""
    experts, weights = [], []
    for row in np.asarray(logits_TE, np.float64):
        s = np.exp(row - row.max())
        s /= s.sum()
        per = len(s) // n_groups
        best = sorted(range(n_groups), key=lambda g: -s[g * per:(g + 1) * per].max())[:topk_groups]
        allowed = [e for e in range(len(s)) if e // per in best]
        pick = sorted(allowed, key=lambda e: -s[e])[:top_k]
        experts.append(pick)
        weights.append([scaling * s[e] for e in pick])
    return np.array(experts), np.array(weights)


def test_router_group_max_matches_reference():
    # 16 experts in 4 groups of 4, pick 3 from the 2 best groups; random logits on many tokens
    # so that the max rule and the top-2-sum rule disagree on some of them.
    E, G = 16, 4
    cfg = MoEConfig(d_model=E, d_ff=F, n_experts=E, top_k=3, router="softmax", renormalize=False,
                    routed_scaling=2.0, n_groups=G, topk_groups=2, group_score="max")
    logits = np.random.default_rng(7).normal(0.0, 2.0, (64, E)).astype(np.float32)
    # route reads only the router (D = E, identity), so no expert weights are initialised.
    params, x = {"router_DE": jnp.eye(E, dtype=jnp.float32)}, jnp.asarray(logits)
    w, e, _, _ = _route(params, x, cfg)
    want_e, want_w = _ref_group_max_route(logits, G, 2, 3, 2.0)
    np.testing.assert_array_equal(np.asarray(e), want_e)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5)
    top2 = np.asarray(_route(params, x, dataclasses.replace(cfg, group_score="top2_sum"))[1])
    assert np.any(np.sort(top2, 1) != np.sort(want_e, 1))
    with pytest.raises(ConfigError, match="group_score"):
        dataclasses.replace(cfg, group_score="mean")


def test_load_balance_loss_uniform_collapsed_and_formula():
    E = 4
    cfg = MoEConfig(d_model=E, d_ff=F, n_experts=E, top_k=1)
    # Token t prefers expert t; by symmetry the mean router probability is uniform too.
    params, x = _identity_router(cfg, 3.0 * np.eye(E, dtype=np.float32))
    _, aux = _apply(params, x, cfg)
    np.testing.assert_allclose(float(aux["load_balance_loss"]), 1.0, rtol=1e-6)
    # Everything on expert 0 with probability ~1: the loss reaches its maximum, E.
    collapsed = np.zeros((E, E), np.float32)
    collapsed[:, 0] = 40.0
    params, x = _identity_router(cfg, collapsed)
    _, aux = _apply(params, x, cfg)
    np.testing.assert_allclose(float(aux["load_balance_loss"]), float(E), rtol=1e-5)
    # Random input, top-2 of 8: E * sum_e (count_e / (T K)) * mean_t p_te; z-loss formula.
    cfg = MoEConfig(d_model=D, d_ff=F, n_experts=8, top_k=2)
    params = _params(cfg, seed=4)
    x = 2.0 * _rand(5, (3, 5, D))
    _, aux = _apply(params, x, cfg)
    _, e_TK, _, _ = _route(params, x.reshape(-1, D), cfg)
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(params["router_DE"], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    counts = np.bincount(np.asarray(e_TK).reshape(-1), minlength=8)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), counts)
    assert aux["tokens_per_expert"].dtype == jnp.int32
    assert int(aux["tokens_per_expert"].sum()) == 15 * 2
    want = 8 * np.sum(counts / 30.0 * p.mean(0))
    np.testing.assert_allclose(float(aux["load_balance_loss"]), want, rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse ** 2), rtol=1e-5)


def test_shared_experts_add_exactly_the_shared_mlp():
    cfg = MoEConfig(d_model=D, d_ff=F, n_experts=4, top_k=2, n_shared_experts=2)
    params = _params(cfg)
    assert params["shared"]["up"]["w"].shape == (D, 2 * F)
    x = _rand(6, (2, 3, D))
    y, _ = _apply(params, x, cfg)
    routed_only = {k: v for k, v in params.items() if k != "shared"}
    y0, _ = _apply(routed_only, x, dataclasses.replace(cfg, n_shared_experts=0))
    shared = mlp.apply(params["shared"], x, cfg=mlp.MLPConfig(d_model=D, d_ff=2 * F))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0 + shared), rtol=1e-5, atol=1e-6)


def test_param_specs_axes_and_dtypes():
    cfg = MoEConfig(d_model=D, d_ff=F, n_experts=4, top_k=2, router="sigmoid", n_shared_experts=1)
    specs = moe.param_specs(cfg)
    assert specs["router_DE"].logical_axes == ("embed", "expert") and specs["router_DE"].keep_dtype
    assert specs["router_bias_E"].keep_dtype and specs["router_bias_E"].shape == (4,)
    assert specs["experts"]["up_EDF"].logical_axes == ("expert", "embed", "mlp")
    assert specs["experts"]["down_EFD"].shape == (4, F, D)
    assert "router_bias_E" not in moe.param_specs(dataclasses.replace(cfg, router="softmax"))
    assert P.count(specs) == D * 4 + 4 + 3 * 4 * D * F + 3 * D * F


def test_config_errors_name_the_field():
    base = dict(d_model=D, d_ff=F)
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5, **base)
    with pytest.raises(ConfigError, match="topk_groups"):
        MoEConfig(n_experts=8, n_groups=2, topk_groups=3, **base)
    with pytest.raises(ConfigError, match="n_groups"):
        MoEConfig(n_experts=8, n_groups=3, **base)
    with pytest.raises(ConfigError, match="router"):
        MoEConfig(n_experts=4, router="hash", **base)
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(n_experts=4, top_k=2, router="switch", **base)
    with pytest.raises(ConfigError, match="dispatch"):
        MoEConfig(n_experts=4, dispatch="token_choice", **base)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(n_experts=4, capacity_factor=0.0, **base)
    with pytest.raises(ConfigError, match="topk_groups"):  # 1 group of 2 experts cannot hold top-3
        MoEConfig(n_experts=8, top_k=3, n_groups=4, topk_groups=1, **base)
    hash(MoEConfig(n_experts=4, **base))


def test_protocol_forward_step_and_bf16():
    cfg = MoEConfig(d_model=D, d_ff=F, n_experts=4, top_k=2, dispatch="capacity", capacity_factor=4.0,
                    n_shared_experts=1)
    params = _params(cfg)
    x = _rand(7, (2, 5, D))
    assert moe.init_state(cfg, 2, 5, jnp.float32) is None
    y, st = jax.jit(moe.forward, static_argnames="cfg")(params, x, cfg=cfg)
    assert st is None
    y2, st2, aux = jax.jit(moe.forward_with_aux, static_argnames="cfg")(params, x, cfg=cfg)
    assert st2 is None and set(aux) == {"load_balance_loss", "router_z_loss", "tokens_per_expert",
                                        "drop_fraction"}
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
    for t in range(x.shape[1]):
        yt, s = _step(params, x[:, t], None, cfg=cfg)
        assert s is None
        np.testing.assert_allclose(np.asarray(yt), np.asarray(y[:, t]), rtol=1e-5, atol=1e-6)
    yb, _ = _apply(params, x.astype(jnp.bfloat16), cfg)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(y), rtol=0.1, atol=0.1)


def test_update_router_bias_moves_toward_balance():
    bias = jnp.zeros((4,), jnp.float32)
    new = moe.update_router_bias(bias, jnp.array([10, 2, 4, 0], jnp.int32), 1e-3)
    np.testing.assert_allclose(np.asarray(new), [-1e-3, 1e-3, 0.0, 1e-3])


def test_mod_select():
    logits = jnp.array([[0.1, 0.5, -1.0, 2.0, 0.0], [3.0, 2.0, 1.0, 0.0, -1.0]], jnp.float32)
    mask = moe.mod_select(logits, 0.4)
    np.testing.assert_array_equal(np.asarray(mask), [[False, True, False, True, False],
                                                     [True, True, False, False, False]])
    with pytest.raises(ValueError, match="capacity_fraction"):
        moe.mod_select(logits, 0.0)
