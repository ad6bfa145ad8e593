"""The decayed linear recurrence shared by RetNet, GLA and linear attention.

Per batch row and head, with a state S of shape [K, V]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

g_t is the log-decay per key dimension ([B, L, H, K]: GLA), one per head ([B, L, H]: RetNet's
scalar gamma broadcast over K) or absent (g = 0: plain linear attention). `reset_BL` marks
document starts: the state carried into such a token is zero (layers.segments convention).

Three forms compute the same numbers:
  "recurrent"  lax.scan over tokens; O(L K V) work, the decoding path.
  "chunked"    lax.scan over chunks of C tokens; inside a chunk an attention-like [C, C] matrix
               with the decays written out explicitly as a masked [C, C, K] tensor, across chunks
               the [K, V] state. The body is rematerialised, so backward memory is the chunk
               boundary states, not the per-chunk [C, C, K] tensors.
  "parallel"   the chunked math applied to the whole sequence as one chunk: quadratic in L,
               for short sequences.

Stability (chosen over speed): every exponent is a sum of log-decays over a causal segment, so
it is <= 0 and exp never overflows; no factor exp(+G) is ever formed (the q*exp(G), k*exp(-G)
trick overflows under strong decays). Segment sums inside a chunk are masked cumulative sums
(sum_{j<m<=i} g_m accumulated directly), never differences of two prefix sums that cancel.
The cost is the explicit [C, C, K] decay tensor per chunk (C*C*K per chunk instead of C*K);
a per-head scalar decay uses a [C, C] tensor instead. The Pallas kernel
`pallas_kernels.linear_scan` replaces the chunked form (`impl`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from layers import checks

if TYPE_CHECKING:
    from jaxtyping import Array, Bool, Float

FORMS = ("recurrent", "chunked", "parallel")
IMPLS = ("auto", "xla", "pallas", "reference")


def _auto_impl(chunk_size: int) -> str:
    """The kernel where Pallas compiles natively and the chunk tiles it; else the XLA scan."""
    native = jax.default_backend() in ("gpu", "tpu")
    return "pallas" if native and chunk_size >= 8 and not chunk_size & (chunk_size - 1) else "xla"


def _validate(q_BLHK, k_BLHK, v_BLHV, g, h0_BHKV, reset_BL, form, chunk_size):
    checks.array("q_BLHK", q_BLHK, rank=4)
    B, L, H, K = q_BLHK.shape
    checks.array("k_BLHK", k_BLHK, shape=(B, L, H, K))
    checks.array("v_BLHV", v_BLHV, rank=4, shape=(B, L, H, None))
    V = v_BLHV.shape[-1]
    if g is not None:
        checks.array("g", g, shape=(B, L, H, K) if g.ndim == 4 else (B, L, H))
    if h0_BHKV is not None:
        checks.array("h0_BHKV", h0_BHKV, shape=(B, H, K, V))
    if reset_BL is not None:
        checks.array("reset_BL", reset_BL, shape=(B, L))
    checks.one_of("decayed_linear_attention", "form", form, FORMS)
    checks.positive("decayed_linear_attention", "chunk_size", chunk_size)


def _chunk(q_BCHK, k_BCHK, v_BCHV, g_BCHk, doc_BC, h_BHKV):
    """One chunk (fp32). g_BCHk has k = K or k = 1 (per-head scalar decay). doc_BC counts the
    document starts up to and including each token: 0 = still the document of the carried state.
    Returns (o_BCHV, h_BHKV after the chunk)."""
    C = q_BCHK.shape[1]
    # Inclusive prefix of log-decays from the chunk start (a sum, <= 0): decay of the carried
    # state as seen by token i.
    gin_BCHk = jnp.cumsum(g_BCHk, axis=1)
    # Exclusive suffix sum_{m>j} g_m (decay from token j to the chunk end), accumulated from a
    # shifted copy rather than as total - prefix, which cancels.
    shifted_BCHk = jnp.concatenate([g_BCHk[:, 1:], jnp.zeros_like(g_BCHk[:, :1])], axis=1)
    gout_BCHk = jnp.flip(jnp.cumsum(jnp.flip(shifted_BCHk, 1), axis=1), 1)
    gtot_BHk = gin_BCHk[:, -1]

    # Segment sums S[i, j] = sum_{j<m<=i} g_m: mask to i > j before accumulating over i, so
    # each entry is a sum of its own terms (Mamba-2's stable segsum).
    idx_C = jnp.arange(C)
    strict_CC = idx_C[:, None] > idx_C[None, :]
    causal_CC = idx_C[:, None] >= idx_C[None, :]
    g_BHkC = jnp.transpose(g_BCHk, (0, 2, 3, 1))
    x_BHkCC = jnp.where(strict_CC[None, None, None], g_BHkC[..., :, None], 0.0)
    seg_BHkCC = jnp.cumsum(x_BHkCC, axis=-2)
    same_doc_BCC = doc_BC[:, :, None] == doc_BC[:, None, :]
    valid_BCC = jnp.logical_and(causal_CC[None], same_doc_BCC)
    # seg is finite everywhere (masked entries are 0), so the where is gradient-safe.
    decay_BHkCC = jnp.where(valid_BCC[:, None, None], jnp.exp(seg_BHkCC), 0.0)

    if g_BCHk.shape[-1] == 1:
        a_BHCC = jnp.einsum("BiHK,BjHK->BHij", q_BCHK, k_BCHK) * decay_BHkCC[:, :, 0]
    else:
        a_BHCC = jnp.einsum("BiHK,BjHK,BHKij->BHij", q_BCHK, k_BCHK, decay_BHkCC)
    o_BCHV = jnp.einsum("BHij,BjHV->BiHV", a_BHCC, v_BCHV)

    # Carried state: reaches only tokens before the chunk's first document start.
    first_doc_BC11 = (doc_BC == 0).astype(jnp.float32)[:, :, None, None]
    qdec_BCHK = q_BCHK * jnp.exp(gin_BCHk)
    o_BCHV = o_BCHV + jnp.einsum("BiHK,BHKV->BiHV", qdec_BCHK, h_BHKV) * first_doc_BC11

    # New state: only the chunk's last document contributes; the old state survives only if
    # no document started in this chunk.
    last_doc_B = doc_BC[:, -1]
    in_last_BC11 = (doc_BC == last_doc_B[:, None]).astype(jnp.float32)[:, :, None, None]
    kdec_BCHK = k_BCHK * jnp.exp(gout_BCHk) * in_last_BC11
    keep_B111 = (last_doc_B == 0).astype(jnp.float32)[:, None, None, None]
    h_BHKV = (h_BHKV * jnp.exp(gtot_BHk)[..., None] * keep_B111
              + jnp.einsum("BjHK,BjHV->BHKV", kdec_BCHK, v_BCHV))
    return o_BCHV, h_BHKV


def _recurrent(q_BLHK, k_BLHK, v_BLHV, g_BLHk, reset_BL, h_BHKV):
    keep_LB = 1.0 - jnp.moveaxis(reset_BL, 1, 0).astype(jnp.float32)

    def body(h_BHKV, inp):
        q_BHK, k_BHK, v_BHV, g_BHk, keep_B = inp
        decay_BHk1 = jnp.exp(g_BHk)[..., None] * keep_B[:, None, None, None]
        h_BHKV = h_BHKV * decay_BHk1 + jnp.einsum("BHK,BHV->BHKV", k_BHK, v_BHV)
        return h_BHKV, jnp.einsum("BHK,BHKV->BHV", q_BHK, h_BHKV)

    seq = tuple(jnp.moveaxis(a, 1, 0) for a in (q_BLHK, k_BLHK, v_BLHV, g_BLHk)) + (keep_LB,)
    h_BHKV, o_LBHV = jax.lax.scan(body, h_BHKV, seq)
    return jnp.moveaxis(o_LBHV, 0, 1), h_BHKV


def _chunked(q_BLHK, k_BLHK, v_BLHV, g_BLHk, reset_BL, h_BHKV, chunk_size):
    B, L = q_BLHK.shape[:2]
    C = min(chunk_size, L)
    N = -(-L // C)
    pad = N * C - L
    if pad:
        # Padded tokens have k = 0 (add nothing), g = 0 (decay nothing), no reset: the state
        # after them equals the state after the last real token.
        def padded(a):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q_BLHK, k_BLHK, v_BLHV, g_BLHk, reset_BL = map(padded, (q_BLHK, k_BLHK, v_BLHV, g_BLHk, reset_BL))

    def chunks(a):  # [B, N*C, ...] -> [N, B, C, ...]
        return jnp.moveaxis(a.reshape((B, N, C) + a.shape[2:]), 1, 0)

    doc_NBC = jnp.cumsum(chunks(reset_BL.astype(jnp.int32)), axis=2)

    @jax.checkpoint
    def body(h_BHKV, inp):
        q_BCHK, k_BCHK, v_BCHV, g_BCHk, doc_BC = inp
        o_BCHV, h_BHKV = _chunk(q_BCHK, k_BCHK, v_BCHV, g_BCHk, doc_BC, h_BHKV)
        return h_BHKV, o_BCHV

    seq = tuple(chunks(a) for a in (q_BLHK, k_BLHK, v_BLHV, g_BLHk)) + (doc_NBC,)
    h_BHKV, o_NBCHV = jax.lax.scan(body, h_BHKV, seq)
    o_BLHV = jnp.moveaxis(o_NBCHV, 0, 1).reshape((B, N * C) + o_NBCHV.shape[3:])
    return o_BLHV[:, :L], h_BHKV


def decayed_linear_attention(
        q_BLHK: "Float[Array, 'B L H K']", k_BLHK: "Float[Array, 'B L H K']",
        v_BLHV: "Float[Array, 'B L H V']", g: "Float[Array, 'B L H K'] | Float[Array, 'B L H'] | None" = None,
        h0_BHKV: "Float[Array, 'B H K V'] | None" = None, reset_BL: "Bool[Array, 'B L'] | None" = None, *,
        scale: float, form: str = "chunked", chunk_size: int = 64, impl: str = "auto",
) -> tuple["Float[Array, 'B L H V']", "Float[Array, 'B H K V']"]:
    """o_t = scale * q_t S_t with S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t (see module doc).

    g: log-decays (<= 0 for a contraction; any finite values are accepted by "recurrent", the
      other forms assume g <= 0 so that their exponents are <= 0), per key dim [B, L, H, K] or per
      head [B, L, H]; None means no decay.
    h0_BHKV: initial state (zeros when None). reset_BL: True where a document starts.
    Returns the output in q's dtype and the final state in float32. Inputs may be bf16; all
    arithmetic is float32.
    impl (for form "chunked"): "xla" (the chunked scan here), "pallas" (the kernel
      `pallas_kernels.linear_scan`, interpret mode on CPU), "reference" (the recurrent form) or
      "auto" ("pallas" on GPU/TPU when chunk_size is a power of two >= 8, else "xla").
    """
    _validate(q_BLHK, k_BLHK, v_BLHV, g, h0_BHKV, reset_BL, form, chunk_size)
    checks.one_of("decayed_linear_attention", "impl", impl, IMPLS)
    # -- context parallelism (logic in sharding/context_scan.py): None unless the rules split seq --
    from sharding import context_scan
    split = context_scan.dispatch_linear(q_BLHK, k_BLHK, v_BLHV, g, h0_BHKV, reset_BL, scale=scale, form=form,
                                         chunk_size=chunk_size, impl=impl)
    if split is not None:
        return split
    # -- end context parallelism --
    L = q_BLHK.shape[1]
    if form == "chunked" and L > 0:
        impl = _auto_impl(chunk_size) if impl == "auto" else impl
        if impl == "pallas":
            from pallas_kernels.linear_scan import linear_scan
            # Kernel chunks are powers of two; a short input gets a chunk no longer than needed.
            C = max(8, min(1 << (chunk_size.bit_length() - 1), 1 << (L - 1).bit_length()))
            return linear_scan(q_BLHK, k_BLHK, v_BLHV, g, h0_BHKV, reset_BL, scale=scale, chunk_size=C)
        if impl == "reference":
            form = "recurrent"
    B, L, H, K = q_BLHK.shape
    V = v_BLHV.shape[-1]
    f32 = jnp.float32
    q32_BLHK = q_BLHK.astype(f32) * scale
    k32_BLHK, v32_BLHV = k_BLHK.astype(f32), v_BLHV.astype(f32)
    if g is None:
        g_BLHk = jnp.zeros((B, L, H, 1), f32)
    elif g.ndim == 3:
        g_BLHk = g.astype(f32)[..., None]
    else:
        g_BLHk = g.astype(f32)
    h_BHKV = jnp.zeros((B, H, K, V), f32) if h0_BHKV is None else h0_BHKV.astype(f32)
    reset_BL = jnp.zeros((B, L), bool) if reset_BL is None else reset_BL.astype(bool)
    if L == 0:
        return jnp.zeros((B, 0, H, V), q_BLHK.dtype), h_BHKV

    if form == "recurrent":
        o_BLHV, h_BHKV = _recurrent(q32_BLHK, k32_BLHK, v32_BLHV, g_BLHk, reset_BL, h_BHKV)
    elif form == "chunked":
        o_BLHV, h_BHKV = _chunked(q32_BLHK, k32_BLHK, v32_BLHV, g_BLHk, reset_BL, h_BHKV, chunk_size)
    else:
        doc_BL = jnp.cumsum(reset_BL.astype(jnp.int32), axis=1)
        o_BLHV, h_BHKV = _chunk(q32_BLHK, k32_BLHK, v32_BLHV, g_BLHk, doc_BL, h_BHKV)
    return o_BLHV.astype(q_BLHK.dtype), h_BHKV
