"""Triton kernels and their launchers. Importing this package imports triton.

Under `TRITON_INTERPRET=1` (set before triton is imported) the kernels run on CPU tensors; that is how CI
tests them. `conv_fwd` holds the fused forward, `merge` the merged-weight kernels, `conv_bwd` the input and
adapter gradients.
"""
