"""Whole-model CoLoRA: wrap, merge, unwrap, save and load adapters, count parameters."""
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._conv import check_order
from .functional import check_backend
from .modules import CONV_TO_COLORA, _CoLoRAConvNd

Selector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def _selected(selector: Selector, name: str, module: nn.Module) -> bool:
    """A regex (searched in the qualified name), a list of qualified names, or a callable (name, module) -> bool."""
    if isinstance(selector, str):
        return re.search(selector, name) is not None
    if callable(selector):
        return bool(selector(name, module))
    return name in selector


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def colora_layers(model: nn.Module) -> List[Tuple[str, _CoLoRAConvNd]]:
    """The (qualified name, layer) of every CoLoRA layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CoLoRAConvNd)]


def apply_colora(model: nn.Module, include: Selector = None, exclude: Selector = None,
                 order: str = "pointwise_first", train_bias: Optional[bool] = None,
                 backend: str = "auto") -> List[str]:
    """Replace the selected `nn.Conv1d/2d/3d` of `model`, in place, by CoLoRA layers sharing their weights.

    The wrapped convs' base weights and biases are frozen; nothing else is touched. Returns the qualified names
    replaced. Raises ValueError (and changes nothing) when the selection matches no conv.
    """
    check_order(order)
    check_backend(backend)
    convs = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
             if type(m) in CONV_TO_COLORA]
    chosen = [(n, m) for n, m in convs
              if (include is None or _selected(include, n, m)) and not (exclude is not None and _selected(exclude, n, m))]
    if not chosen:
        available = ", ".join(n for n, _ in convs) or "none"
        raise ValueError(f"apply_colora: include={include!r}, exclude={exclude!r} select no nn.Conv1d/2d/3d; "
                         f"the convs in this model are: {available}")
    if any(n == "" for n, _ in chosen):
        raise ValueError("apply_colora wraps the convs inside a model; wrap a lone conv with "
                         "CoLoRAConv{1,2,3}d.from_conv(conv)")
    wrapped: Dict[int, nn.Module] = {}
    for _, conv in chosen:
        if id(conv) not in wrapped:
            wrapped[id(conv)] = CONV_TO_COLORA[type(conv)].from_conv(conv, order, train_bias, backend)
    for name, conv in chosen:
        _set_submodule(model, name, wrapped[id(conv)])
    return [n for n, _ in chosen]


def _broadcast_from_rank0(tensors: Iterable[Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


@torch.no_grad()
def merge_colora(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> List[str]:
    """Fold every CoLoRA layer's ΔK, Δb into its base weights and reset its adapters (eq. 10–13).

    All layers are checked first: if any holds a non-finite delta, ValueError is raised and nothing changes.
    With `optimizer`, the state of the reset tensors (Adam's moments, step) is cleared. Under
    torch.distributed the fresh Kp of rank 0 is broadcast so that replicas stay identical.
    """
    layers = colora_layers(model)
    for name, layer in layers:
        try:
            layer.check_mergeable()
        except ValueError as err:
            raise ValueError(f"merge_colora: layer {name!r}: {err}") from None
    for _, layer in layers:
        layer.merge_()
        if optimizer is not None:
            for p in layer.adapter_parameters():
                optimizer.state.pop(p, None)
    _broadcast_from_rank0(layer.pointwise for _, layer in layers)
    return [n for n, _ in layers]


def unapply_colora(model: nn.Module) -> List[str]:
    """Replace every CoLoRA layer, in place, by a plain conv holding its merged weights. Returns their names."""
    layers = colora_layers(model)
    plain = {id(layer): layer.to_conv() for _, layer in layers}
    for name, layer in layers:
        _set_submodule(model, name, plain[id(layer)])
    return [n for n, _ in layers]


def colora_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The adapter tensors (pointwise, depthwise, bias_delta) of every CoLoRA layer, keyed as in model.state_dict()."""
    return {f"{name}.{key}" if name else key: value
            for name, layer in colora_layers(model)
            for key, value in layer.state_dict().items() if key in ("pointwise", "depthwise", "bias_delta")}


@torch.no_grad()
def load_colora_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Load adapter tensors, all or nothing: any missing, unexpected or mis-shaped key raises ValueError first."""
    own = {f"{name}.{key}" if name else key: p
           for name, layer in colora_layers(model)
           for key, p in (("pointwise", layer.pointwise), ("depthwise", layer.depthwise),
                          ("bias_delta", layer.bias_delta)) if p is not None}
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"load_colora_state_dict: not tensors: {', '.join(not_tensors)} (nothing was loaded)")
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = sorted(f"{k}: {tuple(state_dict[k].shape)} vs {tuple(p.shape)}"
                       for k, p in own.items() if k in state_dict and state_dict[k].shape != p.shape)
    if missing or unexpected or misshaped:
        parts = [f"{label}: {', '.join(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise ValueError("load_colora_state_dict: " + "; ".join(parts) + " (nothing was loaded)")
    for key, p in own.items():
        p.copy_(state_dict[key])


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """{"total", "trainable", "adapter"} parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    adapter_ids = {id(p) for _, layer in colora_layers(model) for p in layer.adapter_parameters()}
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "adapter": sum(p.numel() for p in params if id(p) in adapter_ids),
    }
