"""Architectures and the jobs around them. The model API:

    cfg = zoo.presets.get("llama-tiny")
    params = zoo.init(key, cfg)
    logits = zoo.forward(params, tokens, cfg=cfg)
    state = zoo.init_state(cfg, batch_size, max_len)
    logits_t, state = zoo.step(params, tokens_t, state, cfg=cfg)
"""

from zoo import presets
from zoo.config import BlockConfig, ModelConfig
from zoo.model import forward, init, init_state, param_specs, step

__all__ = ["presets", "BlockConfig", "ModelConfig", "forward", "init", "init_state", "param_specs", "step"]
