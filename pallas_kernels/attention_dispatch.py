"""The adapter that lets `layers.attention_core.attend(impl="pallas")` call the flash kernel.

`attend` describes masks by token positions and segment ids (empty cache slots have position
-1), which is exactly what the kernel takes, so no [B, L, S] mask is ever built. Additive score
biases (ALiBi, T5 relative positions) are not supported by the kernel.
"""

from __future__ import annotations

from pallas_kernels.flash_attention import flash_attention


def attend_pallas(q_BLHK, k_BSGK, v_BSGK, *, q_pos_BL, k_pos_BS, q_seg_BL=None, k_seg_BS=None,
                  causal=True, window=None, bias_BHLS=None, scale=None, softcap=None):
    if bias_BHLS is not None:
        raise ValueError("attend: impl='pallas' does not support additive score biases (ALiBi, "
                         "relative position bias); use impl='xla' or 'auto'")
    segment_ids = None if q_seg_BL is None or k_seg_BS is None else (q_seg_BL, k_seg_BS)
    return flash_attention(q_BLHK, k_BSGK, v_BSGK, causal=causal, window=window, softcap=softcap,
                           segment_ids=segment_ids, sm_scale=scale, q_positions=q_pos_BL,
                           kv_positions=k_pos_BS)
