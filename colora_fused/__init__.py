"""colora_fused: fast CoLoRA fine-tuning of convolutional networks (Rivera & Hoyos, 2025).

A CoLoRA layer keeps a conv's weight K0 frozen and trains a separable residual ΔK = Kp ⊛ Kd (a pointwise
and a depthwise kernel) plus a bias delta, folded into K0 by `merge_colora` after every epoch.
"""
from . import functional
from .functional import colora_conv
from .model import (apply_colora, colora_layers, colora_state_dict, count_parameters, load_colora_state_dict,
                    merge_colora, unapply_colora)
from .modules import CoLoRAConv1d, CoLoRAConv2d, CoLoRAConv3d

__version__ = "0.1.0"

__all__ = [
    "CoLoRAConv1d", "CoLoRAConv2d", "CoLoRAConv3d", "apply_colora", "colora_conv", "colora_layers",
    "colora_state_dict", "count_parameters", "functional", "load_colora_state_dict", "merge_colora",
    "unapply_colora",
]
