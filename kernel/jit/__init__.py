"""The @triton.jit kernels, one module per kernel family, and the helpers they share (common.py).

Only jit code and its constants live here: this folder is what the ops' versions hash (kernel/version.py).
The host code that launches each family lives with its op in kernel/ops/.
"""
