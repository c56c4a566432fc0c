"""Triton kernels and their launchers. Importing this package imports triton.

Under `TRITON_INTERPRET=1` (set before triton is imported) the kernels run on CPU tensors; that is how CI
tests them. One file per kernel family: `conv_fwd` the fused forward, `conv_bwd_input` the input gradient,
`conv_bwd_adapters` the adapter gradients, `merge` the merged-weight kernels; `_common` holds the checks,
layout helpers, device limits and the launch helper they share.
"""
