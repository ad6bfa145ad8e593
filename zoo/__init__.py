"""Architectures and the jobs around them. The model API:

    cfg = zoo.presets.get("llama-tiny")
    params = zoo.init(key, cfg)
    logits = zoo.forward(params, tokens, cfg=cfg)
    state = zoo.init_state(cfg, batch_size, max_len)
    logits_t, state = zoo.step(params, tokens_t, state, cfg=cfg)

The same functions take encoder configs (zoo.encoder.EncoderConfig, e.g. "bert-tiny") and
encoder-decoder configs (zoo.encdec.EncDecConfig, e.g. "t5-tiny"); they dispatch on the config's type.
"""

from zoo import presets
from zoo.config import BlockConfig, ModelConfig
from zoo.encdec import EncDecConfig
from zoo.encoder import EncoderConfig
from zoo.model import forward, init, init_state, param_specs, step

__all__ = ["presets", "BlockConfig", "ModelConfig", "EncoderConfig", "EncDecConfig", "forward", "init",
           "init_state", "param_specs", "step"]
