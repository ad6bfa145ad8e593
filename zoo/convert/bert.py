"""BERT (`BertModel`, `BertForMaskedLM`) <-> zoo.encoder: learned positions and token types,
embedding LayerNorm, post-norm blocks with biased bidirectional attention and GELU MLP, and the
optional pooler and masked-LM head (present when the checkpoint holds them). BertModel files
have no `bert.` prefix; BertForMaskedLM files do, and carry the MLM head instead of the pooler.
"""

from __future__ import annotations

from layers.attention import AttentionConfig
from layers.mlp import MLPConfig
from layers.norms import NormConfig
from zoo.config import BlockConfig
from zoo.convert import parts
from zoo.convert.common import (Tensors, UnsupportedError, activation, activation_to_hf, from_linear, stack_layers,
                                to_linear, to_linear_in, unstack_layers, unsupported)
from zoo.encoder import EncoderConfig

ARCHITECTURES = {"bert": "BertForMaskedLM"}


def config_from_hf(hf: dict, *, pooler: bool = False, mlm_head: bool = True) -> EncoderConfig:
    mt = hf["model_type"]
    if hf.get("position_embedding_type", "absolute") != "absolute":
        unsupported(mt, "position_embedding_type", hf["position_embedding_type"])
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        unsupported(mt, "is_decoder", True, "zoo.encoder is bidirectional")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    norm = NormConfig(kind="layer", eps=float(hf.get("layer_norm_eps", 1e-12)))
    act = activation(mt, "hidden_act", hf.get("hidden_act", "gelu"))
    block = BlockConfig(
        mixer=AttentionConfig(d_model=D, n_heads=H, n_kv_heads=H, rope=None, causal=False, use_bias=True, out_bias=True),
        ffn=MLPConfig(d_model=D, d_ff=hf["intermediate_size"], activation=act, gated=False, use_bias=True),
        norm=norm, norm_position="post")
    return EncoderConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"], pattern=(block,),
                         max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                         embed_norm=norm, mlm_norm=norm, mlm_activation=act, pooler=pooler, mlm_head=mlm_head,
                         output="mlm" if mlm_head else "hidden")


def config_options(names: set[str]) -> dict:
    """Which heads the checkpoint holds (BertModel: pooler; BertForMaskedLM: the MLM head)."""
    return {"pooler": any(n.endswith("pooler.dense.weight") for n in names),
            "mlm_head": "cls.predictions.bias" in names}


def _prefix(t: Tensors) -> str:
    return "bert." if t.has("bert.embeddings.word_embeddings.weight") else ""


def params_from_hf(cfg: EncoderConfig, hf: dict, t: Tensors) -> dict:
    D, pre = cfg.d_model, _prefix(t)
    H = cfg.pattern[0].mixer.n_heads
    F = cfg.pattern[0].ffn.d_ff
    e = pre + "embeddings."
    p = {"embed": {"table_VD": t.take(e + "word_embeddings.weight", (cfg.vocab_size, D))},
         "pos": {"pos_PD": t.take(e + "position_embeddings.weight", (cfg.max_len, D))},
         "embed_norm": parts.norm_from_hf(t, e + "LayerNorm", D, bias=True)}
    if cfg.type_vocab_size:
        p["types"] = {"table_TD": t.take(e + "token_type_embeddings.weight", (cfg.type_vocab_size, D))}
    t.discard(e + "position_ids")
    layers = []
    for i in range(cfg.n_layers):
        lp = f"{pre}encoder.layer.{i}."
        a = lp + "attention."
        q, k, v = (from_linear(t.take(f"{a}self.{n}.weight", (D, D)), H, D // H) for n in ("query", "key", "value"))
        bq, bk, bv = (t.take(f"{a}self.{n}.bias", (D,)).reshape(H, D // H) for n in ("query", "key", "value"))
        layers.append({
            "mixer": {"wq_DHK": q, "wk_DGK": k, "wv_DGK": v, "bq_HK": bq, "bk_GK": bk, "bv_GK": bv,
                      "wo_HKD": from_linear(t.take(a + "output.dense.weight", (D, D))).reshape(H, D // H, D),
                      "bo_D": t.take(a + "output.dense.bias", (D,))},
            "mixer_norm": parts.norm_from_hf(t, a + "output.LayerNorm", D, bias=True),
            "ffn": {"up": {"w": from_linear(t.take(lp + "intermediate.dense.weight", (F, D))),
                           "b": t.take(lp + "intermediate.dense.bias", (F,))},
                    "down": {"w": from_linear(t.take(lp + "output.dense.weight", (D, F))),
                             "b": t.take(lp + "output.dense.bias", (D,))}},
            "ffn_norm": parts.norm_from_hf(t, lp + "output.LayerNorm", D, bias=True),
        })
    p["blocks"] = stack_layers(cfg, layers)
    if cfg.pooler:
        p["pooler"] = {"w": from_linear(t.take(pre + "pooler.dense.weight", (D, D))),
                       "b": t.take(pre + "pooler.dense.bias", (D,))}
    if cfg.mlm_head:
        c = "cls.predictions."
        p["mlm"] = {"dense": {"w": from_linear(t.take(c + "transform.dense.weight", (D, D))),
                              "b": t.take(c + "transform.dense.bias", (D,))},
                    "norm": parts.norm_from_hf(t, c + "transform.LayerNorm", D, bias=True),
                    "bias_V": t.take(c + "bias", (cfg.vocab_size,))}
        t.discard(c + "decoder.weight")  # tied to the word embeddings
        t.discard(c + "decoder.bias")    # the same tensor as cls.predictions.bias
    return p


def check_exportable(cfg, model_type: str) -> None:
    b = cfg.pattern[0] if isinstance(cfg, EncoderConfig) else None
    ok = (b is not None and len(cfg.pattern) == 1 and b.norm_position == "post" and isinstance(b.mixer, AttentionConfig)
          and isinstance(b.ffn, MLPConfig) and b.mixer.rope is None and not b.mixer.alibi and b.mixer.use_bias
          and b.mixer.out_bias and b.mixer.n_kv_heads == b.mixer.n_heads and not b.ffn.gated and b.ffn.use_bias
          and b.mixer.sliding_window is None and b.mixer.query_scale is None and not b.mixer.qk_norm
          and cfg.embed_norm == b.norm and cfg.final_norm is None and b.norm.kind == "layer"
          and (not cfg.mlm_head or (cfg.mlm_norm == b.norm and cfg.mlm_activation == b.ffn.activation)))
    if not ok:
        raise UnsupportedError(f"to_hf({model_type}): only BERT encoders (post-LayerNorm, biased MHA without rope, "
                               "plain biased MLP, embedding LayerNorm, no final norm) can be written")


def config_to_hf(cfg: EncoderConfig, model_type: str) -> dict:
    b = cfg.pattern[0]
    hf = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=b.mixer.n_heads,
              intermediate_size=b.ffn.d_ff, hidden_act=activation_to_hf(b.ffn.activation),
              max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=b.norm.eps,
              pad_token_id=0)
    if not cfg.mlm_head:
        hf["architectures"] = ["BertModel"]
    return hf


def params_to_hf(cfg: EncoderConfig, params: dict, model_type: str) -> dict:
    pre = "bert." if cfg.mlm_head else ""
    e = pre + "embeddings."
    out = {e + "word_embeddings.weight": params["embed"]["table_VD"],
           e + "position_embeddings.weight": params["pos"]["pos_PD"]}
    out.update(parts.norm_to_hf(params["embed_norm"], e + "LayerNorm"))
    if "types" in params:
        out[e + "token_type_embeddings.weight"] = params["types"]["table_TD"]
    for i, p in enumerate(unstack_layers(cfg, params["blocks"])):
        lp, m = f"{pre}encoder.layer.{i}.", p["mixer"]
        a = lp + "attention."
        for n, w, bias in (("query", "wq_DHK", "bq_HK"), ("key", "wk_DGK", "bk_GK"), ("value", "wv_DGK", "bv_GK")):
            out[f"{a}self.{n}.weight"], out[f"{a}self.{n}.bias"] = to_linear(m[w]), m[bias].reshape(-1)
        out[a + "output.dense.weight"], out[a + "output.dense.bias"] = to_linear_in(m["wo_HKD"], 2), m["bo_D"]
        out.update(parts.norm_to_hf(p["mixer_norm"], a + "output.LayerNorm"))
        out[lp + "intermediate.dense.weight"], out[lp + "intermediate.dense.bias"] = (
            to_linear(p["ffn"]["up"]["w"]), p["ffn"]["up"]["b"])
        out[lp + "output.dense.weight"], out[lp + "output.dense.bias"] = to_linear(p["ffn"]["down"]["w"]), p["ffn"]["down"]["b"]
        out.update(parts.norm_to_hf(p["ffn_norm"], lp + "output.LayerNorm"))
    if "pooler" in params:
        if cfg.mlm_head:
            raise UnsupportedError("to_hf(bert): BertForMaskedLM has no pooler; drop it or the MLM head")
        out[pre + "pooler.dense.weight"], out[pre + "pooler.dense.bias"] = (
            to_linear(params["pooler"]["w"]), params["pooler"]["b"])
    if "mlm" in params:
        c, h = "cls.predictions.", params["mlm"]
        out[c + "transform.dense.weight"], out[c + "transform.dense.bias"] = to_linear(h["dense"]["w"]), h["dense"]["b"]
        out.update(parts.norm_to_hf(h["norm"], c + "transform.LayerNorm"))
        out[c + "bias"] = h["bias_V"]
    return out
