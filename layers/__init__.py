"""Pure-function building blocks: every layer is param_specs / init / forward (and, for
sequence mixers, init_state / step). Layers know nothing of models, meshes or kernels."""
