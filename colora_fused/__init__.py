"""colora_fused: fast CoLoRA fine-tuning of convolutional networks (Rivera & Hoyos, 2025).

A CoLoRA layer keeps a conv's weight K0 frozen and trains a separable residual ΔK = Kp ⊛ Kd (a pointwise
and a depthwise kernel) plus a bias delta, folded into K0 by `merge_colora` after every epoch.

"design §n" in the code is section n of docs/design.md.

`CoLoRATrainerCallback` (HF transformers) and `CoLoRALightningCallback` (PyTorch Lightning) are built on first
access, so that neither framework is needed to import the package.
"""
from . import adapters, callbacks, functional
from .adapters import (active_adapters, add_adapter, delete_adapter, set_active_adapters,
                       set_trainable_adapters)
from .capacity import RankPlan, allocate_rank
from .callbacks import MergeSchedule
from .config import CoLoRAConfig
from .functional import clear_caches, colora_conv
from .model import (apply_colora, colora_layers, count_parameters, disable_colora, get_colora_model,
                    merge_and_unload, merge_colora, print_trainable_parameters, unapply_colora)
from .layers import CoLoRAConv1d, CoLoRAConv2d, CoLoRAConv3d
from .mixed import colora_conv_mixed
from .per_sample import adapters_per_sample
from .serialization import load_merged, save_merged
from .state_dict import colora_state_dict, load_adapter, load_colora_state_dict, save_colora

__version__ = "0.1.0"

_LAZY_CALLBACKS = ("CoLoRALightningCallback", "CoLoRATrainerCallback")

# The lazy callback names stay out of __all__: `from colora_fused import *` must work without their frameworks.
__all__ = [
    "CoLoRAConfig", "CoLoRAConv1d", "CoLoRAConv2d", "CoLoRAConv3d", "MergeSchedule", "RankPlan", "active_adapters",
    "adapters", "adapters_per_sample", "add_adapter", "allocate_rank", "apply_colora", "callbacks", "clear_caches",
    "colora_conv", "colora_conv_mixed", "colora_layers", "colora_state_dict", "count_parameters", "delete_adapter",
    "disable_colora", "functional", "get_colora_model", "load_adapter", "load_colora_state_dict", "load_merged",
    "merge_and_unload", "merge_colora", "print_trainable_parameters", "save_colora", "save_merged",
    "set_active_adapters", "set_trainable_adapters", "unapply_colora",
]


def __getattr__(name: str):
    if name in _LAZY_CALLBACKS:
        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
