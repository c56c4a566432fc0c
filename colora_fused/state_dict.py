"""The trained state of a CoLoRA model as a state dict: `colora_state_dict` and `load_colora_state_dict`."""
from typing import Dict, List

import torch
from torch import Tensor, nn

from .model import _adapter_tensors, colora_layers
from .modules import DEFAULT


def colora_state_dict(model: nn.Module, adapter: str = DEFAULT) -> Dict[str, Tensor]:
    """The adapter tensors (pointwise, depthwise, bias_delta) of every CoLoRA layer, keyed as in
    model.state_dict(): of the "default" adapter, or of the named `adapter`."""
    return {k: v.detach() for k, v in _adapter_tensors(colora_layers(model), adapter).items()}


def _state_dict_problems(own: Dict[str, Tensor], state_dict: Dict[str, object]) -> List[str]:
    """Each reason `state_dict` cannot be loaded into the tensors `own`, as "label: keys" lines."""
    nested = sorted(k for k, v in state_dict.items() if isinstance(v, dict))
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, (Tensor, dict)))
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(tensors) - set(own))
    common = [k for k in own if k in tensors]
    misshaped = sorted(f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
                       for k in common if tensors[k].shape != own[k].shape)
    wrong_dtype = sorted(f"{k}: {tensors[k].dtype} vs {own[k].dtype}" for k in common
                         if tensors[k].dtype != own[k].dtype)
    no_data = sorted(k for k in common if tensors[k].is_meta)
    non_finite = sorted(k for k in common if not tensors[k].is_meta and tensors[k].is_floating_point()
                        and not bool(torch.isfinite(tensors[k]).all()))
    return [f"{label}: {', '.join(keys)}" for label, keys in (
        ("nested dicts (pass the adapter dict itself, not a checkpoint holding it)", nested),
        ("not tensors", not_tensors), ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
        ("wrong dtype", wrong_dtype), ("meta tensors without data", no_data), ("non-finite values", non_finite),
    ) if keys]


@torch.no_grad()
def load_colora_state_dict(model: nn.Module, state_dict: Dict[str, Tensor], adapter: str = DEFAULT) -> None:
    """Load the tensors of the "default" adapter (or of the named `adapter`) of every CoLoRA layer, all or nothing.

    Every key is checked first; any nested dict, non-tensor, missing, unexpected or mis-shaped key, any tensor
    of another dtype than the adapter's, any meta tensor and any NaN/Inf raise ValueError naming the keys, and
    nothing is loaded. Tensors may sit on another device than the model (a CPU state dict loads into a CUDA
    model): each is copied to its adapter's device.
    """
    own = _adapter_tensors(colora_layers(model), adapter)
    problems = _state_dict_problems(own, state_dict)
    if problems:
        raise ValueError("load_colora_state_dict: " + "; ".join(problems) + " (nothing was loaded)")
    for key, p in own.items():
        p.copy_(state_dict[key])
