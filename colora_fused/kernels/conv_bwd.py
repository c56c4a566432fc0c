"""Transitional: the backward kernels live in conv_bwd_input.py and conv_bwd_adapters.py."""
from .conv_bwd_adapters import colora_conv_backward_adapters  # noqa: F401
from .conv_bwd_input import colora_conv_backward_input  # noqa: F401
