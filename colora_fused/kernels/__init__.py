"""Triton kernels and their launchers. Importing this package imports triton.

Under `TRITON_INTERPRET=1` (set before triton is imported) the kernels run on CPU tensors; that is how CI
tests them. One file per kernel family or algorithm: `conv_fwd` the fused forward, `conv_bwd_input` the input
gradient, `conv_bwd_adapters` the adapter gradients' launcher over their three algorithms (`adapters_one_pass`,
`adapters_two_pass`, `adapters_gradw`), `merge` the in-place merge; `_common` holds the checks, layout helpers,
device limits, the launch helper and the launch arithmetic they share.
"""
