"""transformers' xLSTM (the xLSTM-7B architecture): refused, with the reason.

xLSTM-7B's mLSTM layer is not the layer of layers.mlstm (the original xLSTM block):

- 7B projects q, k (width qk_dim_factor * D, 0.5 in the released model) and v (v_dim_factor * D)
  straight from the block input; layers.mlstm up-projects to E = proj_factor * D, feeds q and k
  through a causal depthwise conv + silu, and uses one head dim for q, k and v;
- 7B gates the output with a sigmoid output gate (ogate_preact) computed from the input;
  layers.mlstm gates with silu(z) and adds a learnable skip from the conv branch;
- 7B's blocks are pre-RMSNorm mLSTM + SwiGLU FFN pairs (ffn_proj_factor, rounded up to
  ffn_round_up_to_multiple_of) with a final logit soft cap; the gates are soft-capped too.

Mapping one onto the other would change the function, so every config is refused naming the
first option that stands in the way. A faithful port needs an "xlstm7b" variant of the mLSTM
mixer (a config flag for the projection layout and output gate), which layers.mlstm lacks.
"""

from __future__ import annotations

from typing import Any

from zoo.convert.common import UnsupportedError, unsupported

ARCHITECTURES = {"xlstm": "xLSTMForCausalLM"}
_WHY = ("transformers' xLSTM is the xLSTM-7B mLSTM layer (q/k/v projected from the input without up-projection "
        "or conv, sigmoid output gate); layers.mlstm implements the original xLSTM block (up-projection, conv-fed "
        "q/k, equal q/k/v head dims, silu(z) gate, learnable skip)")


def config_from_hf(hf: dict) -> Any:
    qk = hf.get("qk_dim_factor", 0.5)
    if qk != hf.get("v_dim_factor", 1.0):
        unsupported("xlstm", "qk_dim_factor", qk, _WHY)
    unsupported("xlstm", "weight_mode", hf.get("weight_mode", "single"), _WHY)


def check_exportable(cfg: Any, model_type: str) -> None:
    raise UnsupportedError(f"to_hf({model_type}): {_WHY}")
