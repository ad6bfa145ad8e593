"""Pallas kernels (GPU, TPU) beside their pure-jnp references; CPU runs them with interpret=True.

Kernels register with the layers' dispatchers (e.g. `layers.attention_core.KERNELS`), so layers
never import kernel internals. `lowering_for("tpu" | "gpu")` traces them for another backend
(cross-lowering from a CPU machine). See docs/kernels.md.

    flash_attention   tiled attention, fwd + bwd (GQA, causal/window band skipping, softcap, segments)
    linear_scan       chunked decayed linear recurrence (GLA, RetNet, linear attention), fwd + bwd
    selective_scan    Mamba-1 selective scan, fwd + bwd
"""

from layers import attention_core as _attention_core
from pallas_kernels.attention_dispatch import attend_pallas
from pallas_kernels.backend import lowering_for
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from pallas_kernels.linear_scan import linear_scan, linear_scan_reference
from pallas_kernels.selective_scan import selective_scan, selective_scan_reference

_attention_core.KERNELS["pallas"] = attend_pallas

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "linear_scan",
           "linear_scan_reference", "selective_scan", "selective_scan_reference", "attend_pallas", "lowering_for"]
