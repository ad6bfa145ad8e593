"""Ahead-of-time compile and cost reports: lower and compile a model's forward, train step and
decode step on abstract shapes, and read what XLA says about them.

Nothing is allocated: parameters, optimizer state and decoding state are `jax.ShapeDtypeStruct`s
(from the parameter specs and `jax.eval_shape`), so a 7B preset is reported on a laptop CPU.

Three FLOP counts, because each answers a different question:

- `xla_flops`: `compiled.cost_analysis()["flops"]`, per device. XLA counts the body of a
  while loop (hence of a `lax.scan` over layers) once, not once per trip, so a scanned model
  reads as if it had one repeat of its pattern.
- `jaxpr_flops`: the matmul and convolution FLOPs of the traced program (all devices together),
  with scan bodies multiplied by their trip counts: what the program really executes in
  matmuls, masked attention scores included in full. Elementwise work is not counted.
- `model_flops`: the usual MFU convention: 2 FLOPs per active parameter per token (MoE experts
  scaled by top_k / n_experts; the embedding lookup free, the unembedding counted) plus the
  attention scores and values over the average context (causal attention counts as half);
  a train step is 3x the forward. Recurrent mixers' state updates are not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

import zoo
from layers import checks, norms
from layers import params as P
from zoo.config import ModelConfig

PARTS = ("forward", "train", "decode")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_INSTRUCTION_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = ", re.MULTILINE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What to lower and compile.

    Attributes:
      batch_size: rows per step (B).
      seq_len: tokens per row for the forward and the train step (L).
      cache_len: decoding state capacity for the decode step (default: seq_len).
      mesh: mesh axis sizes, e.g. (("fsdp", 4), ("tensor", 2)); None runs on one device.
      rules: a `sharding.rules.PRESETS` name; None picks one from the mesh's axes.
      parts: which of PARTS to report.
      depths: n_layers values at which to time the train step's compilation, scanned and
        unrolled (empty: no depth sweep).
      compile: compile each part and read XLA's analyses; False stops after lowering (seconds
        instead of minutes for a large preset): the jaxpr and model FLOPs and the StableHLO op
        count remain, the XLA FLOPs, bytes, memory and collectives are left out.
    """

    batch_size: int = 1
    seq_len: int = 128
    cache_len: int | None = None
    mesh: tuple[tuple[str, int], ...] | None = None
    rules: str | None = None
    parts: tuple[str, ...] = PARTS
    depths: tuple[int, ...] = ()
    compile: bool = True

    def __post_init__(self):
        name = "ReportConfig"
        checks.positive(name, "batch_size", self.batch_size)
        checks.positive(name, "seq_len", self.seq_len)
        if self.cache_len is not None:
            checks.positive(name, "cache_len", self.cache_len)
        if not self.parts or any(p not in PARTS for p in self.parts):
            checks.fail(name, "parts", f"a non-empty tuple drawn from {PARTS}", self.parts)
        for d in self.depths:
            checks.positive(name, "depths[]", d)
        if self.mesh is not None:
            for axis, size in self.mesh:
                if not isinstance(axis, str):
                    checks.fail(name, "mesh", "(axis name, size) pairs", self.mesh)
                checks.positive(name, f"mesh[{axis!r}]", size)
        if self.rules is not None:
            from sharding import PRESETS
            checks.one_of(name, "rules", self.rules, tuple(PRESETS))


# ----------------------------------------------------------------------------------------------
# FLOP counts


def _sub_jaxprs(value: Any):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
        (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch))
        return 2 * math.prod(lhs) * rhs_free
    if name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * math.prod(out) * math.prod(rhs) // out_features
    return 0


def jaxpr_flops(jaxpr) -> tuple[int, bool]:
    """(matmul + convolution FLOPs of `jaxpr` with scan bodies times their length, exact):
    `exact` is False when a while loop (unknown trip count) was counted once."""
    total, exact = 0, True
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        counts = [jaxpr_flops(j) for j in subs]
        exact &= all(e for _, e in counts)
        if eqn.primitive.name == "cond":
            total += max(c for c, _ in counts)  # one branch runs
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(c for c, _ in counts)
        elif eqn.primitive.name == "while":
            exact = False
            total += sum(c for c, _ in counts)
        else:
            total += sum(c for c, _ in counts)
    return total, exact


def _attention_dims(mixer: Any) -> tuple[int, int, int] | None:
    """(heads, query-key dim, value dim) of a softmax-attention mixer, else None."""
    from layers.attention import AttentionConfig
    from layers.mla import MLAConfig
    if isinstance(mixer, AttentionConfig):
        return mixer.n_heads, mixer.head_dim, mixer.head_dim
    if isinstance(mixer, MLAConfig):
        return mixer.n_heads, mixer.qk_nope_head_dim + mixer.qk_rope_head_dim, mixer.v_head_dim
    return None


def mean_context(seq_len: int, *, causal: bool, window: int | None) -> float:
    """Average number of keys a query sees in a sequence of `seq_len` tokens."""
    if not causal:
        return float(seq_len)
    i = np.arange(1, seq_len + 1)
    return float(np.mean(i if window is None else np.minimum(i, window)))


def _blocks_with_counts(cfg: ModelConfig):
    """(block config, how many times it runs): prefix blocks once, pattern blocks per repeat."""
    return [(b, 1) for b in cfg.prefix] + [(b, cfg.n_repeats) for b in cfg.pattern]


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token touches: routed experts scaled by top_k / n_experts, the input
    embedding table and learned position table left out (a lookup) unless tied to the output."""
    from zoo import blocks
    total = 0
    for block, times in _blocks_with_counts(cfg):
        for spec in jax.tree.leaves(blocks.param_specs(block, cfg.d_model), is_leaf=P.is_spec):
            n = math.prod(spec.shape)
            if "expert" in spec.logical_axes and len(spec.shape) >= 3 and hasattr(block.ffn, "n_experts"):
                n = n * block.ffn.top_k // block.ffn.n_experts
            total += n * times
    D, V = cfg.d_model, cfg.vocab_size
    total += D * V  # the unembedding (the tied table, or unembed_DV)
    total += P.count(norms.param_specs(cfg.final_norm, D))
    return total


def model_flops_per_token(cfg: ModelConfig, context: int, *, decode: bool = False) -> float:
    """Forward FLOPs per token by the MFU convention (see the module docstring). `context` is the
    sequence length (training / prefill: averaged over causal positions) or, with
    decode=True, the number of cached keys each new token attends to."""
    flops = 2.0 * active_params(cfg)
    for block, times in _blocks_with_counts(cfg):
        dims = _attention_dims(block.mixer)
        if dims is None:
            continue
        H, Kqk, Kv = dims
        causal = getattr(block.mixer, "causal", True)
        window = getattr(block.mixer, "sliding_window", None)
        ctx = (min(context, window or context) if decode
               else mean_context(context, causal=causal, window=window))
        flops += 2.0 * H * (Kqk + Kv) * ctx * times
    return flops


# ----------------------------------------------------------------------------------------------
# Abstract inputs


def _mesh_and_rules(rcfg: ReportConfig):
    if rcfg.mesh is None:
        return None, None
    from sharding import PRESETS, make_mesh
    sizes = dict(rcfg.mesh)
    if math.prod(sizes.values()) > jax.device_count():
        raise ValueError(f"mesh: {sizes} needs {math.prod(sizes.values())} devices, "
                         f"{jax.device_count()} are visible (simulate CPU devices with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    mesh = make_mesh(sizes, jax.devices()[:math.prod(sizes.values())])
    name = rcfg.rules
    if name is None:
        has = {a for a, s in sizes.items() if s > 1}
        name = ("fsdp_tp" if {"fsdp", "tensor"} <= has else "tp" if "tensor" in has
                else "fsdp" if "fsdp" in has else "dp")
    return mesh, (name, PRESETS[name])


class _Placement:
    """ShapeDtypeStructs with shardings (or none, on one device)."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules

    def active(self):
        """The rules active while tracing, so the model's activation constraints apply too."""
        if self.mesh is None:
            return contextlib.nullcontext()
        from sharding import use_rules
        return use_rules(self.mesh, self.rules)

    def sharding(self, logical_axes, shape):
        from jax.sharding import NamedSharding
        from sharding import spec_for
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, spec_for(tuple(logical_axes), tuple(shape), self.mesh, self.rules))

    def array(self, shape, dtype, logical_axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharding(logical_axes, shape))

    def params(self, specs):
        return jax.tree.map(lambda s: self.array(s.shape, s.dtype, s.logical_axes), specs, is_leaf=P.is_spec)

    def like_params(self, tree, params):
        """Shard every subtree shaped like the params (Adam's moments) as the params; the rest
        (step counts) is replicated."""
        treedef = jax.tree.structure(params)

        def place(node):
            if jax.tree.structure(node) == treedef:
                return jax.tree.map(lambda a, p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=p.sharding),
                                    node, params)
            return self.array(node.shape, node.dtype, (None,) * len(node.shape))

        return jax.tree.map(place, tree, is_leaf=lambda n: jax.tree.structure(n) == treedef)

    def state(self, state):
        """Decoding state: the batch axis is axis 1 of the stacked block states, 0 of pos_B."""
        def place(path, a):
            batch_axis = 0 if jax.tree_util.keystr(path).endswith("['pos_B']") else 1
            axes = [None] * a.ndim
            if a.ndim > batch_axis:
                axes[batch_axis] = "batch"
            return self.array(a.shape, a.dtype, axes)

        return jax.tree_util.tree_map_with_path(place, state)


# ----------------------------------------------------------------------------------------------
# The three programs: each builder returns a fresh function (so every compilation is timed cold)
# and its abstract arguments.


def _is_decoder(cfg: Any) -> str | None:
    """None if the config is a causal decoder; else why the train/decode parts do not apply."""
    if not isinstance(cfg, ModelConfig):
        return f"{type(cfg).__name__} is not a decoder ModelConfig"
    for block, _ in _blocks_with_counts(cfg):
        if getattr(block.mixer, "causal", True) is False:
            return "a bidirectional mixer (an encoder): no next-token step or decoding"
    return None


def _token_inputs(cfg) -> int:
    """How many token arrays the model's forward takes (an encoder-decoder takes two)."""
    import inspect
    forward = zoo.model.family(cfg).forward
    positional = [p for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return max(1, len(positional) - 1)  # all but params


def _forward_program(cfg, rcfg, place):
    params = place.params(zoo.param_specs(cfg))
    tokens = place.array((rcfg.batch_size, rcfg.seq_len), jnp.int32, ("batch", None))
    fn = lambda params, *tokens: zoo.forward(params, *tokens, cfg=cfg)  # noqa: E731
    return jax.jit(fn), (params, *[tokens] * _token_inputs(cfg))


def _train_program(cfg, rcfg, place):
    from zoo import train
    tcfg = train.TrainConfig(batch_size=rcfg.batch_size, seq_len=rcfg.seq_len)
    specs = zoo.param_specs(cfg)
    optimizer = train.make_optimizer(tcfg, P.decay_mask(specs), specs)
    params = place.params(specs)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
        opt_state = place.like_params(jax.eval_shape(optimizer.init, params), params)
    tokens = place.array((rcfg.batch_size, rcfg.seq_len), jnp.int32, ("batch", None))
    return train.make_train_step(cfg, optimizer, tcfg), (params, opt_state, tokens, tokens)


def _decode_program(cfg, rcfg, place):
    cache_len = rcfg.cache_len or rcfg.seq_len
    params = place.params(zoo.param_specs(cfg))
    state = place.state(jax.eval_shape(lambda: zoo.init_state(cfg, rcfg.batch_size, cache_len)))
    tokens = place.array((rcfg.batch_size,), jnp.int32, ("batch",))
    fn = lambda params, tokens_B, state: zoo.step(params, tokens_B, state, cfg=cfg)  # noqa: E731
    return jax.jit(fn, donate_argnums=(2,)), (params, tokens, state)


_PROGRAMS: dict[str, Callable] = {"forward": _forward_program, "train": _train_program,
                                  "decode": _decode_program}


@contextlib.contextmanager
def _no_persistent_cache():
    """Compile times must be cold: a persistent-cache hit would time a file read."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def lower_and_compile(fn, args, place: "_Placement | None" = None) -> tuple[Any, Any, float, float]:
    """(traced, compiled, trace + lower seconds, compile seconds)."""
    with _no_persistent_cache(), (place or _Placement(None, None)).active():
        t0 = time.perf_counter()
        traced = fn.trace(*args)
        lowered = traced.lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return traced, compiled, t1 - t0, t2 - t1


def hlo_stats(hlo_text: str) -> dict:
    """Instruction count (every computation, fused ones included), fusion count and
    collectives by kind, from an HLO module's text."""
    counts = {kind: 0 for kind in COLLECTIVES}
    for m in _COLLECTIVE_RE.finditer(hlo_text):
        counts[m.group(1)] += 1
    return {"hlo_instructions": len(_INSTRUCTION_RE.findall(hlo_text)),
            "hlo_fusions": len(re.findall(r"\sfusion\(", hlo_text)),
            "collectives": counts}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    # Arguments, outputs and temporaries live together at worst; donated (aliased) outputs reuse
    # their arguments' buffers.
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"xla_flops": float(cost.get("flops", 0.0)),
            "xla_transcendentals": float(cost.get("transcendentals", 0.0)),
            "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


_STABLEHLO_OP_RE = re.compile(r"^\s*(?:%[\w#:]+(?:, %[\w#:]+)* = )?\"?(?:stablehlo|chlo)\.", re.MULTILINE)


def _flop_counts(cfg, rcfg: ReportConfig, part: str, traced) -> dict:
    flops, exact = jaxpr_flops(traced.jaxpr.jaxpr)
    decode = part == "decode"
    tokens = rcfg.batch_size * (1 if decode else rcfg.seq_len)
    model = None
    if isinstance(cfg, ModelConfig):
        per_token = model_flops_per_token(cfg, (rcfg.cache_len or rcfg.seq_len) if decode else rcfg.seq_len,
                                          decode=decode)
        model = tokens * per_token * (3 if part == "train" else 1)
    return {"jaxpr_flops": float(flops), "jaxpr_flops_exact": exact, "model_flops": model, "tokens": tokens}


def lower_part(cfg: Any, rcfg: ReportConfig, part: str, place: _Placement | None = None) -> dict:
    """Trace and lower one of PARTS without compiling it: seconds, FLOP counts and the number of
    StableHLO operations (before XLA's optimisations)."""
    place = place or _Placement(None, None)
    fn, args = _PROGRAMS[part](cfg, rcfg, place)
    with _no_persistent_cache(), place.active():
        t0 = time.perf_counter()
        traced = fn.trace(*args)
        text = traced.lower().as_text()
        lower_s = time.perf_counter() - t0
    return {"lower_s": lower_s, **_flop_counts(cfg, rcfg, part, traced),
            "stablehlo_ops": len(_STABLEHLO_OP_RE.findall(text))}


def report_part(cfg: ModelConfig, rcfg: ReportConfig, part: str, place: _Placement | None = None) -> dict:
    """Lower and compile one of PARTS and measure it."""
    place = place or _Placement(None, None)
    fn, args = _PROGRAMS[part](cfg, rcfg, place)
    traced, compiled, lower_s, compile_s = lower_and_compile(fn, args, place)
    return {"lower_s": lower_s, "compile_s": compile_s, **_cost(compiled),
            **_flop_counts(cfg, rcfg, part, traced),
            "memory_per_device": _memory(compiled), **hlo_stats(compiled.as_text())}


def compile_seconds(cfg: ModelConfig, rcfg: ReportConfig, part: str = "train") -> float:
    """Trace + lower + compile seconds of one part (a fresh function: nothing cached)."""
    mesh, rules = _mesh_and_rules(rcfg)
    place = _Placement(mesh, None if rules is None else rules[1])
    fn, args = _PROGRAMS[part](cfg, rcfg, place)
    _, _, lower_s, compile_s = lower_and_compile(fn, args, place)
    return lower_s + compile_s


def depth_sweep(cfg: ModelConfig, rcfg: ReportConfig, part: str = "train") -> list[dict]:
    """Compile seconds of `part` at each of rcfg.depths, scanned and unrolled."""
    rows = []
    for depth in rcfg.depths:
        n_prefix, n_pattern = len(cfg.prefix), len(cfg.pattern)
        if depth <= n_prefix or (depth - n_prefix) % n_pattern:
            raise ValueError(f"depths: {depth} is not {n_prefix} prefix blocks plus a positive multiple of "
                             f"the pattern length {n_pattern}")
        for scan in (True, False):
            deeper = dataclasses.replace(cfg, n_layers=depth, scan_layers=scan)
            rows.append({"n_layers": depth, "scan_layers": scan, "part": part,
                         "compile_s": compile_seconds(deeper, rcfg, part)})
    return rows


def report(cfg: Any, rcfg: ReportConfig, *, name: str | None = None) -> dict:
    """The whole report as a JSON-ready dict (see docs/performance.md for the fields)."""
    mesh, rules = _mesh_and_rules(rcfg)
    place = _Placement(mesh, None if rules is None else rules[1])
    out: dict[str, Any] = {
        "preset": name,
        "model": {"type": type(cfg).__name__, "d_model": getattr(cfg, "d_model", None),
                  "n_layers": getattr(cfg, "n_layers", None), "vocab_size": getattr(cfg, "vocab_size", None),
                  "scan_layers": getattr(cfg, "scan_layers", None), "remat": getattr(cfg, "remat", None),
                  "dtype": getattr(cfg, "dtype", None)},
        "shape": {"batch_size": rcfg.batch_size, "seq_len": rcfg.seq_len,
                  "cache_len": rcfg.cache_len or rcfg.seq_len},
        "mesh": None if mesh is None else dict(mesh.shape),
        "rules": None if rules is None else rules[0],
        "devices": 1 if mesh is None else mesh.size,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "parts": {},
    }
    try:
        specs = zoo.param_specs(cfg)
    except TypeError as e:
        out["skipped"] = str(e)
        return out
    out["params"] = P.count(specs)
    out["param_bytes"] = sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
                             for s in jax.tree.leaves(specs, is_leaf=P.is_spec))
    out["active_params"] = active_params(cfg) if isinstance(cfg, ModelConfig) else None
    not_decoder = _is_decoder(cfg)
    for part in rcfg.parts:
        if part != "forward" and not_decoder:
            out["parts"][part] = {"skipped": not_decoder}
            continue
        try:
            out["parts"][part] = (report_part if rcfg.compile else lower_part)(cfg, rcfg, part, place)
        except TypeError as e:
            if not not_decoder:
                raise
            # Other model kinds may take inputs besides token arrays.
            out["parts"][part] = {"skipped": f"{not_decoder}; its forward failed on token inputs: {e}"}
    if rcfg.depths:
        out["depth_sweep"] = depth_sweep(cfg, rcfg) if not not_decoder else []
    return out


# ----------------------------------------------------------------------------------------------
# Text


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.4g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for div, prefix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= div:
            return f"{x / div:.1f} {prefix}"
    return f"{int(x)} B"


def _cell(cell: Callable[[dict], str], part: dict) -> str | None:
    """A table cell, or None where the part lacks the field (a lowered-only report)."""
    try:
        return cell(part)
    except KeyError:
        return None


def format_report(rep: dict) -> str:
    """A readable table of a `report` dict."""
    model, shape = rep["model"], rep["shape"]
    mesh = ("1 device" if rep["mesh"] is None
            else f"mesh {','.join(f'{k}={v}' for k, v in rep['mesh'].items())} (rules {rep['rules']})")
    depth = ("" if model["n_layers"] is None else
             f", {model['n_layers']} layers ({'scanned' if model['scan_layers'] else 'unrolled'})")
    lines = [f"zoo report: {rep['preset'] or model['type']} ({model['type']})  d_model {model['d_model']}{depth}"
             f", {model['dtype']}; batch "
             f"{shape['batch_size']} x {shape['seq_len']} tokens, decode cache {shape['cache_len']}; {mesh}, "
             f"{rep['backend']}, jax {rep['jax_version']}"]
    if "skipped" in rep:
        return "\n".join(lines + [f"skipped: {rep['skipped']}"])
    active = "-" if rep["active_params"] is None else f"{rep['active_params']:,}"
    lines.append(f"parameters {rep['params']:,} ({_bytes(rep['param_bytes'])}); active per token {active}")
    parts = list(rep["parts"])
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("trace+lower s", lambda r: f"{r['lower_s']:.2f}"),
        ("compile s", lambda r: f"{r['compile_s']:.2f}"),
        ("XLA FLOPs / device (loop bodies once)", lambda r: _si(r["xla_flops"])),
        ("jaxpr matmul FLOPs (x trip counts)", lambda r: _si(r["jaxpr_flops"]) + ("" if r["jaxpr_flops_exact"] else " (while once)")),
        ("model FLOPs (MFU convention)", lambda r: _si(r["model_flops"])),
        ("XLA bytes accessed / device", lambda r: _bytes(r["xla_bytes_accessed"])),
        ("memory / device: arguments", lambda r: _bytes(r["memory_per_device"].get("argument_bytes"))),
        ("                 outputs", lambda r: _bytes(r["memory_per_device"].get("output_bytes"))),
        ("                 temps", lambda r: _bytes(r["memory_per_device"].get("temp_bytes"))),
        ("                 aliased (donated)", lambda r: _bytes(r["memory_per_device"].get("alias_bytes"))),
        ("                 total", lambda r: _bytes(r["memory_per_device"].get("total_bytes"))),
        ("HLO instructions", lambda r: f"{r['hlo_instructions']:,}"),
        ("HLO fusions", lambda r: f"{r['hlo_fusions']:,}"),
        ("StableHLO ops (lowered, not compiled)", lambda r: f"{r['stablehlo_ops']:,}"),
        *[(f"collectives: {kind}", (lambda k: lambda r: str(r["collectives"][k]))(kind)) for kind in COLLECTIVES],
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines.append(" " * width + "".join(f"{p:>16}" for p in parts))
    for label, cell in rows:
        cells = ["skipped" if "skipped" in rep["parts"][p] else _cell(cell, rep["parts"][p]) for p in parts]
        if all(c in (None, "skipped") for c in cells):  # a field this kind of report lacks
            continue
        cells = ["-" if c is None else c for c in cells]
        lines.append(f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells))
    for p in parts:
        if "skipped" in rep["parts"][p]:
            lines.append(f"{p} skipped: {rep['parts'][p]['skipped']}")
    if rep.get("depth_sweep"):
        lines.append("train-step compile seconds against depth:")
        lines.append(f"{'n_layers':>10}{'scanned':>10}{'unrolled':>10}")
        for depth in sorted({r["n_layers"] for r in rep["depth_sweep"]}):
            s = {r["scan_layers"]: r["compile_s"] for r in rep["depth_sweep"] if r["n_layers"] == depth}
            lines.append(f"{depth:>10}{s[True]:>10.2f}{s[False]:>10.2f}")
    return "\n".join(lines)
