"""Pallas kernels (GPU, TPU) beside their pure-jnp references; CPU runs them with interpret=True.

Kernels register with the layers' dispatchers (e.g. `layers.attention_core.KERNELS`), so layers
never import kernel internals."""
